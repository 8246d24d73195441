"""Choosing a chain of servers that covers every block: fewest hops and lowest expected latency first.

A hop may use any contiguous part of a server's announced span (servers compute sub-spans), so chains
can mix servers with overlapping spans, a replacement need not match a failed span exactly, and the
chain can start at any block (``local_blocks=k``). Cut points are the requested range's ends and the
announced span boundaries inside it.

The cost of a hop (:class:`HopCost`, expected seconds for one token) adds the client's measured round
trip to the node, the blocks' compute at the node's announced throughput, the wait behind the jobs
on its queue, a fixed per-hop overhead, and a penalty that keeps overloaded (long queue) or nearly
full (little KV cache left) nodes out of chains whenever another chain exists within that penalty.

``NodeFilter`` is the seam for policy: the trust layer passes a filter that admits only the nodes
policy allows for each candidate hop. Routing never falls back to a node the filter rejects; when no
allowed chain exists it fails with the blocks that cannot be covered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fincluster.errors import RoutingError
from fincluster.spans import BlockSpan
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire.codec import span_from_wire

NodeFilter = Callable[[pb.ServerRecord, BlockSpan], bool]
HOP_PENALTY_SECONDS = 0.002
UNKNOWN_SECONDS_PER_BLOCK = 0.01
OVERLOADED_QUEUE_LENGTH = 8
"""A node with at least this many computations waiting is overloaded."""
NEARLY_FULL_FRACTION = 0.1
"""A node with less than this fraction of its KV-cache budget unreserved is nearly full."""
AVOID_SECONDS = 1.0
"""Added to an overloaded or nearly full node's hops: used only when no other chain is within it."""


@dataclass(frozen=True)
class HopCost:
    """Expected seconds of one token through a hop, term by term (logged as ``route_planned``)."""

    rtt: float
    compute: float
    queue: float
    load_penalty: float
    hop: float = HOP_PENALTY_SECONDS

    @property
    def total(self) -> float:
        return self.rtt + self.compute + self.queue + self.load_penalty + self.hop

    def as_log(self) -> dict[str, float]:
        """The terms in milliseconds."""
        terms = {"rtt": self.rtt, "compute": self.compute, "queue": self.queue, "load": self.load_penalty}
        return {
            f"{name}_ms": round(value * 1000, 3) for name, value in (*terms.items(), ("total", self.total))
        }


@dataclass(frozen=True)
class Hop:
    """Blocks ``span`` (inside the record's announced span) computed by the record's server."""

    record: pb.ServerRecord
    span: BlockSpan
    cost: HopCost | None = None


def record_span(record: pb.ServerRecord) -> BlockSpan:
    return span_from_wire(record.span)


def load_warnings(record: pb.ServerRecord) -> list[str]:
    """Why routing avoids the node now: ``overloaded`` and/or ``nearly full`` (empty: neither)."""
    warnings = []
    if record.queue_length >= OVERLOADED_QUEUE_LENGTH:
        warnings.append("overloaded")
    total = record.cache_bytes_total
    if total > 0 and record.cache_bytes_free < NEARLY_FULL_FRACTION * total:
        warnings.append("nearly full")
    return warnings


def hop_cost(record: pb.ServerRecord, blocks: int, rtt_seconds: float) -> HopCost:
    """Round trip, ``blocks`` blocks of compute at the announced throughput, the wait behind the
    queued jobs (each taken as a pass over the node's whole span), and the load penalty."""
    per_block = 1 / record.throughput if record.throughput > 0 else UNKNOWN_SECONDS_PER_BLOCK
    span_seconds = max(record.span.end - record.span.start, 1) * per_block
    return HopCost(
        rtt=rtt_seconds,
        compute=blocks * per_block,
        queue=record.queue_length * span_seconds,
        load_penalty=AVOID_SECONDS if load_warnings(record) else 0.0,
    )


def plan_route(
    records: Sequence[pb.ServerRecord],
    blocks: BlockSpan,
    *,
    rtt: Callable[[pb.ServerRecord], float] = lambda _record: 0.001,
    allow: NodeFilter | None = None,
) -> list[Hop]:
    """Cheapest chain of hops from ``blocks.start`` to ``blocks.end`` (each hop a part of a span)."""
    usable = [
        r
        for r in records
        if r.span.start < r.span.end and r.span.start < blocks.end and blocks.start < r.span.end
    ]
    cuts = sorted(
        {blocks.start, blocks.end}
        | {b for r in usable for b in (r.span.start, r.span.end) if blocks.start < b < blocks.end}
    )
    best: dict[int, tuple[float, list[Hop]]] = {blocks.start: (0.0, [])}
    for position in cuts:
        if position not in best:
            continue
        cost, hops = best[position]
        for record in usable:
            if not record.span.start <= position < record.span.end:
                continue
            round_trip = rtt(record)
            if math.isinf(round_trip):
                continue  # unreachable now
            # longest hop first: a filter that allows it usually allows its parts too
            ends = [q for q in cuts if position < q <= min(record.span.end, blocks.end)]
            for end in reversed(ends):
                span = BlockSpan(position, end)
                if allow is not None and not allow(record, span):
                    continue
                terms = hop_cost(record, len(span), round_trip)
                total = cost + terms.total
                if total < best.get(end, (math.inf, []))[0]:
                    best[end] = (total, [*hops, Hop(record, span, terms)])
    if blocks.end in best:
        return best[blocks.end][1]
    reachable = max(best)
    unserved = tuple(b for b in blocks.blocks if not any(r.span.start <= b < r.span.end for r in usable))
    if unserved:
        detail = f"blocks {','.join(map(str, unserved))} have no server"
    else:
        detail = f"no allowed, reachable server continues the chain at block {reachable}"
    raise RoutingError(
        f"cannot route blocks {blocks}: {detail} ({len(records)} servers known, {len(usable)} with blocks "
        "in range)",
        missing_blocks=unserved or (reachable,),
    )
