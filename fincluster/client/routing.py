"""Choosing a chain of servers that covers every block, fewest hops and lowest expected latency first.

``NodeFilter`` is the seam for policy: the trust layer passes a filter that admits only nodes policy
allows for each block of this request. Routing never falls back to a node the filter rejects; when no
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


@dataclass(frozen=True)
class Hop:
    record: pb.ServerRecord
    span: BlockSpan


def record_span(record: pb.ServerRecord) -> BlockSpan:
    return span_from_wire(record.span)


def expected_seconds(record: pb.ServerRecord, rtt_seconds: float) -> float:
    """Round trip plus the span's compute time for one token at the announced throughput."""
    blocks = record.span.end - record.span.start
    compute = blocks / record.throughput if record.throughput > 0 else blocks * 0.01
    return rtt_seconds + compute + HOP_PENALTY_SECONDS


def plan_route(
    records: Sequence[pb.ServerRecord],
    blocks: BlockSpan,
    *,
    rtt: Callable[[pb.ServerRecord], float] = lambda _record: 0.001,
    allow: NodeFilter | None = None,
) -> list[Hop]:
    """Cheapest chain of whole server spans from ``blocks.start`` to ``blocks.end``."""
    usable = [
        r
        for r in records
        if blocks.start <= r.span.start < r.span.end <= blocks.end
        and (allow is None or allow(r, record_span(r)))
    ]
    best: dict[int, tuple[float, list[Hop]]] = {blocks.start: (0.0, [])}
    for position in range(blocks.start, blocks.end):
        if position not in best:
            continue
        cost, hops = best[position]
        for record in usable:
            if record.span.start != position:
                continue
            total = cost + expected_seconds(record, rtt(record))
            if total < best.get(record.span.end, (math.inf, []))[0]:
                best[record.span.end] = (total, [*hops, Hop(record, record_span(record))])
    if blocks.end in best:
        return best[blocks.end][1]
    reachable = max(best)
    uncovered = tuple(
        b for b in range(blocks.start, blocks.end) if not any(r.span.start <= b < r.span.end for r in usable)
    )
    detail = (
        f"blocks {','.join(map(str, uncovered))} have no available server"
        if uncovered
        else f"no chain of server spans continues at block {reachable}"
    )
    raise RoutingError(
        f"cannot route blocks {blocks}: {detail} ({len(records)} servers known, {len(usable)} usable)",
        missing_blocks=uncovered or (reachable,),
    )
