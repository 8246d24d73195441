"""Where a server that chooses its own blocks (``--blocks auto``) should sit, and when it should move.

The swarm is as fast as its weakest block. Every server adds, to each block of its span, the tokens
per second it can push through that span, ``1 / (len(span) / throughput + network_rtt)``, from its
record (compute measured by the server itself, network by the round trip of its announcements).

* :func:`blocks_for_memory` — how many blocks fit the memory budget once the KV cache is set aside.
* :func:`choose_span` — the window of a given length that lifts the weakest blocks most: windows are
  compared by the swarm's whole per-block throughput sorted weakest first, so among equally weak
  blocks the window that helps more of them wins. Throughputs within :data:`TOLERANCE` of each
  other count as equal (measurements are noisier than that): a window must be clearly better to win,
  else the current span, then the lowest start, is kept. Only blocks policy lets this node announce are
  considered (:class:`BlockRules`, from ``TrustContext.announceable_blocks``). A node that may serve
  the sensitive blocks sees their throughput at a discount (:data:`SENSITIVE_WEIGHT`), and a gap
  there as worse than any other: only such nodes can serve them, so it goes there first, and stays
  unless the rest of the swarm is much weaker.
* :func:`plan_move` — whether a placed server should move: only when it would fill a gap or the
  weakest block would gain at least ``min_gain`` (hysteresis), and never when a block it serves would
  be left without another server. A server that announced it is moving (``moving_to``) counts as
  serving only what it keeps, so two servers never both leave blocks each thought the other kept.

The approach follows Petals' block selection (lowest-throughput window, re-checks with a quality
threshold); the rates, policy rules, discount and move intents are this project's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fincluster.errors import ConfigurationError
from fincluster.spans import BlockSpan
from fincluster.wire import fincluster_pb2 as pb

SENSITIVE_WEIGHT = 2.0
"""A node that may serve sensitive blocks counts their throughput divided by this."""
UNKNOWN_SECONDS_PER_BLOCK = 0.01
"""Compute time assumed for a record that announces no throughput yet."""
TOLERANCE = 0.02
"""Per-block throughputs closer than this (relative) are equal for placement."""


@dataclass(frozen=True)
class BlockRules:
    """Per block of the model: may this node announce it, and is it sensitive (closed to unattested
    nodes by the announce policy)."""

    open: tuple[bool, ...]
    sensitive: tuple[bool, ...]

    @classmethod
    def anyone(cls, num_blocks: int) -> BlockRules:
        """No policy: every block open, none sensitive."""
        return cls((True,) * num_blocks, (False,) * num_blocks)

    @property
    def serves_sensitive(self) -> bool:
        return any(o and s for o, s in zip(self.open, self.sensitive, strict=True))

    def longest_open_run(self) -> int:
        best = run = 0
        for allowed in self.open:
            run = run + 1 if allowed else 0
            best = max(best, run)
        return best


def record_span(record: pb.ServerRecord) -> BlockSpan:
    return BlockSpan(record.span.start, record.span.end)


def server_rate(record: pb.ServerRecord) -> float:
    """Tokens per second the record's server can push through its whole span."""
    per_block = 1 / record.throughput if record.throughput > 0 else UNKNOWN_SECONDS_PER_BLOCK
    blocks = max(record.span.end - record.span.start, 1)
    return 1.0 / (blocks * per_block + max(record.network_rtt_seconds, 0.0))


def block_throughput(records: Sequence[pb.ServerRecord], num_blocks: int) -> list[float]:
    """Per block, the summed rates of the servers covering it; a server that announced a move is
    counted where it is going."""
    totals = [0.0] * num_blocks
    for record in records:
        span = record.moving_to if record.HasField("moving_to") else record.span
        rate = server_rate(record)
        for block in range(span.start, min(span.end, num_blocks)):
            totals[block] += rate
    return totals


def _placed(throughput: Sequence[float], span: BlockSpan, rate: float) -> list[float]:
    return [t + rate if span.start <= block < span.end else t for block, t in enumerate(throughput)]


def _perceived(throughput: Sequence[float], rules: BlockRules) -> list[float]:
    """What a node that may serve the sensitive blocks sees: their throughput at a discount, and a
    sensitive block no server covers as worse (-1) than any other gap."""
    if not rules.serves_sensitive:
        return list(throughput)
    return [
        (t / SENSITIVE_WEIGHT if t > 0 else -1.0) if s else t
        for t, s in zip(throughput, rules.sensitive, strict=True)
    ]


def _clearly_better(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether sorted throughputs ``a`` beat ``b``: at the first position where they differ by more
    than the tolerance, ``a`` is larger."""
    for x, y in zip(a, b, strict=True):
        if abs(x - y) > TOLERANCE * max(abs(x), abs(y)):
            return x > y
    return False


def choose_span(
    length: int,
    others: Sequence[float],
    rules: BlockRules,
    rate: float,
    *,
    current: BlockSpan | None = None,
) -> BlockSpan:
    """The open window of ``length`` blocks that best lifts the weakest blocks of ``others`` (the
    swarm's per-block throughput without this server) when this server adds ``rate`` to it; ties go
    to ``current``, then to the lowest start."""
    starts = [s for s in range(len(others) - length + 1) if all(rules.open[s : s + length])]
    if not starts:
        raise ConfigurationError(f"no {length} consecutive blocks of the model that this node may announce")
    if current is not None and current.start in starts and len(current) == length:
        starts.remove(current.start)
        starts.insert(0, current.start)

    def ranked(start: int) -> list[float]:
        return sorted(_perceived(_placed(others, BlockSpan(start, start + length), rate), rules))

    best, best_rank = starts[0], ranked(starts[0])
    for start in starts[1:]:
        rank = ranked(start)
        if _clearly_better(rank, best_rank):
            best, best_rank = start, rank
    return BlockSpan(best, best + length)


@dataclass(frozen=True)
class MovePlan:
    """What :func:`plan_move` concluded: a target span (None: stay) and why, with the weakest block's
    throughput (tokens/s, as this node perceives it) now and at the target."""

    target: BlockSpan | None
    reason: str
    weakest_now: float
    weakest_after: float


def _kept_by_others(block: int, others: Sequence[pb.ServerRecord]) -> bool:
    for record in others:
        if not record.span.start <= block < record.span.end:
            continue
        if not record.HasField("moving_to") or record.moving_to.start <= block < record.moving_to.end:
            return True
    return False


def plan_move(
    own: pb.ServerRecord, records: Sequence[pb.ServerRecord], rules: BlockRules, *, min_gain: float
) -> MovePlan:
    """Should the server of ``own`` move, given the swarm's ``records`` (its own may be among them)?"""
    others = [r for r in records if r.node_id != own.node_id and r.model_id == own.model_id]
    base = block_throughput(others, own.num_blocks)
    span, rate = record_span(own), server_rate(own)
    target = choose_span(len(span), base, rules, rate, current=span)
    now = _perceived(_placed(base, span, rate), rules)
    after = _perceived(_placed(base, target, rate), rules)
    weakest_now, weakest_after = min(now), min(after)

    def plan(moving: bool, reason: str) -> MovePlan:
        return MovePlan(target if moving else None, reason, weakest_now, weakest_after)

    if target == span:
        return plan(False, "already where the swarm needs it most")
    left = [b for b in span.blocks if not target.start <= b < target.end and not _kept_by_others(b, others)]
    if left:
        return plan(False, f"moving to {target} would leave {describe_blocks(left)} without a server")
    gaps_now, gaps_after = sum(t <= 0 for t in now), sum(t <= 0 for t in after)
    if gaps_after < gaps_now:
        return plan(True, f"{target} fills {gaps_now - gaps_after} blocks no server covers")
    if gaps_now:
        return plan(False, f"{gaps_now} blocks stay uncovered wherever this server goes")
    gain = weakest_after / weakest_now - 1
    if gain >= min_gain and weakest_after > weakest_now:
        return plan(True, f"the weakest block gains {gain:.0%} at {target} (threshold {min_gain:.0%})")
    return plan(False, f"the weakest block would gain {gain:.0%} at {target}, below {min_gain:.0%}")


def describe_blocks(blocks: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"blocks 0:3, 5:6"``."""
    runs: list[list[int]] = []
    for block in sorted(blocks):
        if runs and runs[-1][1] == block:
            runs[-1][1] = block + 1
        else:
            runs.append([block, block + 1])
    return "blocks " + ", ".join(f"{start}:{end}" for start, end in runs)


@dataclass(frozen=True)
class BlockBudget:
    """How many blocks a server loads, and the arithmetic that says why (for the log)."""

    blocks: int
    explanation: str


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def blocks_for_memory(
    *,
    memory_bytes: int,
    cache_bytes: int,
    weight_bytes_per_block: int,
    cache_bytes_per_token_per_block: int,
    model_blocks: int,
) -> BlockBudget:
    """Blocks whose weights fit ``memory_bytes`` once the KV cache's ``cache_bytes`` are set aside
    (at most the model's); ConfigurationError when not even one fits."""
    for_weights = memory_bytes - cache_bytes
    fit = for_weights // weight_bytes_per_block if for_weights > 0 else 0
    if fit < 1:
        raise ConfigurationError(
            f"memory budget {_size(memory_bytes)} leaves {_size(max(for_weights, 0))} after the KV cache "
            f"({_size(cache_bytes)}); one block's weights need {_size(weight_bytes_per_block)}: raise "
            "server.memory_budget_bytes or lower server.cache_budget_bytes"
        )
    blocks = min(fit, model_blocks)
    tokens = cache_bytes // max(cache_bytes_per_token_per_block * blocks, 1)
    capped = f", the model has {model_blocks}" if fit > model_blocks else ""
    return BlockBudget(
        blocks,
        f"{_size(memory_bytes)} memory - {_size(cache_bytes)} KV cache = {_size(for_weights)} for weights; "
        f"{_size(weight_bytes_per_block)} per block -> {fit} blocks fit{capped} -> {blocks} blocks; "
        f"the KV cache holds {tokens} tokens over them",
    )
