"""Choosing a chain of servers that covers every block: fewest hops and lowest expected latency first.

A hop may use any contiguous part of a server's announced span (servers compute sub-spans), so chains
can mix servers with overlapping spans, a replacement need not match a failed span exactly, and the
chain can start at any block (``local_blocks=k``). Cut points are the requested range's ends and the
announced span boundaries inside it.

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


@dataclass(frozen=True)
class Hop:
    """Blocks ``span`` (inside the record's announced span) computed by the record's server."""

    record: pb.ServerRecord
    span: BlockSpan


def record_span(record: pb.ServerRecord) -> BlockSpan:
    return span_from_wire(record.span)


def expected_seconds(record: pb.ServerRecord, blocks: int, rtt_seconds: float) -> float:
    """Round trip plus ``blocks`` blocks of compute for one token at the announced throughput."""
    per_block = 1 / record.throughput if record.throughput > 0 else UNKNOWN_SECONDS_PER_BLOCK
    return rtt_seconds + blocks * per_block + HOP_PENALTY_SECONDS


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
                total = cost + expected_seconds(record, len(span), round_trip)
                if total < best.get(end, (math.inf, []))[0]:
                    best[end] = (total, [*hops, Hop(record, span)])
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
