"""``--blocks auto``: a server's first choice of blocks, and its periodic re-checks and moves.

At start, :func:`auto_block_count` sizes the span from the memory budget and :func:`choose_first_span`
places it where the registry's records say the swarm is weakest, among the blocks the announce
policy lets this node announce (:func:`block_rules`). The :class:`Rebalancer` then re-checks every
``rebalance_seconds`` (with jitter, so servers do not decide in lockstep) with
:func:`~fincluster.serving.placement.plan_move`. A move is gap-free:

1. the server announces its intent (``moving_to`` in its record) and keeps serving its span;
2. it loads the new span's weights (checked against the manifest) while still serving the old;
3. it plans again from fresh records — other servers' intents included, so of two servers that
   would each leave blocks to the other, at least one sees the other's intent and stays;
4. it switches on the compute worker (between computations) and announces the new span at once.

Sessions inside the new span go on. Sessions outside it, and requests for blocks the server no
longer serves, are answered with ``MovedError`` (ABORTED, "moved away"): clients fail over to other
nodes, replaying the session's inputs, without banning the moved node (it may be the one that now
serves the blocks they need next).
"""

from __future__ import annotations

import random
import statistics
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from fincluster.errors import ConfigurationError, FinclusterError, RegistryError
from fincluster.logs import get_logger
from fincluster.registry.backend import Registry
from fincluster.serving.placement import (
    UNKNOWN_SECONDS_PER_BLOCK,
    BlockBudget,
    BlockRules,
    MovePlan,
    block_throughput,
    blocks_for_memory,
    choose_span,
    plan_move,
)
from fincluster.serving.span_model import SpanModel, cache_bytes_per_token
from fincluster.settings import ServerSettings
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.attestation import VerifiedClaims
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.policy import ModelRef
from fincluster.values import TensorDType
from fincluster.wire import fincluster_pb2 as pb

log = get_logger(__name__)


def block_rules(
    trust: TrustContext, model: ModelRef, *, node_id: str, claims: VerifiedClaims | None
) -> BlockRules:
    """Which blocks this node may announce, and which are sensitive — both asked of the announce
    policy (the sensitive ones are those it keeps from an unattested node)."""
    open_blocks = trust.announceable_blocks(model, node_id=node_id, claims=claims)
    open_to_anyone = trust.announceable_blocks(model, node_id=node_id, claims=None)
    return BlockRules(open_blocks, tuple(not allowed for allowed in open_to_anyone))


def device_free_bytes(device: str) -> int:
    """Free memory of ``device``: the GPU's free bytes, or the host's available RAM."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def auto_block_count(
    store: ModelStore, *, memory_bytes: int, cache_bytes: int, dtype: TensorDType
) -> BlockBudget:
    """How many blocks of ``store`` fit ``memory_bytes`` with ``cache_bytes`` of KV cache (the sizes
    of one block's weights at ``dtype``, measured from block 0)."""
    torch_dtype = TensorDType(dtype).torch_dtype
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    weights = sum(t.numel() for t in store.load_block_state(0).values()) * itemsize
    config = store.load_config()
    return blocks_for_memory(
        memory_bytes=memory_bytes,
        cache_bytes=cache_bytes,
        weight_bytes_per_block=weights,
        cache_bytes_per_token_per_block=cache_bytes_per_token(config, BlockSpan(0, 1), torch_dtype),
        model_blocks=store.num_blocks,
    )


def choose_first_span(
    records: Sequence[pb.ServerRecord], *, num_blocks: int, length: int, rules: BlockRules
) -> BlockSpan:
    """Where a new server of ``length`` blocks helps the swarm of ``records`` most. Its own speed is
    not measured yet: it is assumed to be the other servers' median (it matters only for ties)."""
    length = min(length, rules.longest_open_run())
    if length < 1:
        raise ConfigurationError("the announce policy lets this node announce no block of the model")
    speeds = [r.throughput for r in records if r.throughput > 0]
    per_block = 1 / statistics.median(speeds) if speeds else UNKNOWN_SECONDS_PER_BLOCK
    return choose_span(length, block_throughput(records, num_blocks), rules, 1 / (length * per_block))


def first_placement(
    store: ModelStore,
    settings: ServerSettings,
    *,
    registry: Registry | None,
    trust: TrustContext,
    node_id: str,
    claims: VerifiedClaims | None,
) -> BlockSpan:
    """The span a ``--blocks auto`` server loads at start: ``settings.num_blocks`` long, or as many
    blocks as ``settings.memory_budget_bytes`` (else the device's free memory) holds next to the KV
    cache, placed by :func:`choose_first_span`. The arithmetic and the choice are logged."""
    if settings.num_blocks is not None:
        length = min(settings.num_blocks, store.num_blocks)
        log.info("block_count_given", blocks=length, model_blocks=store.num_blocks)
    else:
        memory = settings.memory_budget_bytes or device_free_bytes(settings.device)
        budget = auto_block_count(
            store, memory_bytes=memory, cache_bytes=settings.cache_budget_bytes, dtype=settings.dtype
        )
        length = budget.blocks
        source = (
            "server.memory_budget_bytes"
            if settings.memory_budget_bytes
            else f"free memory of {settings.device}"
        )
        log.info("block_count_chosen", blocks=length, budget_from=source, arithmetic=budget.explanation)
    if trust.policy is None:
        log.warning(
            "placement_without_policy",
            note="no policy: sensitive blocks are unknown here, and a registry that enforces an announce "
            "policy may refuse the chosen span (give trust.policy_dir)",
        )
    model = ModelRef(id=store.model_id, num_blocks=store.num_blocks, manifest_sha256=store.manifest_digest)
    rules = block_rules(trust, model, node_id=node_id, claims=claims)
    records: list[pb.ServerRecord] = []
    if registry is not None:
        try:
            records = registry.list(store.model_id)
        except RegistryError as error:
            log.warning("placement_without_swarm_view", reason=str(error))
    span = choose_first_span(records, num_blocks=store.num_blocks, length=length, rules=rules)
    log.info(
        "span_chosen",
        blocks=str(span),
        servers_known=len(records),
        sensitive_blocks=sum(rules.sensitive),
        may_serve_sensitive=rules.serves_sensitive,
    )
    return span


class Movable(Protocol):
    """What the rebalancer needs from its server (``BlockServer``)."""

    node_id: str

    def record(self) -> pb.ServerRecord: ...

    def announce_intent(self, target: BlockSpan | None) -> bool:
        """Announce (or, with None, withdraw) the intent to move to ``target``; whether it was taken."""
        ...

    def switch_to(self, model: SpanModel) -> None:
        """Serve ``model`` from now on and announce it."""
        ...


class Rebalancer:
    """Re-checks the placement of one auto-placed server on a thread of its own, and moves it."""

    def __init__(
        self,
        server: Movable,
        registry: Registry,
        *,
        model_id: str,
        rules: Callable[[], BlockRules],
        load: Callable[[BlockSpan], SpanModel],
        interval_seconds: float,
        min_gain: float,
        rng: random.Random | None = None,
    ) -> None:
        """``rules`` is asked at every check (the node's attestation may change); ``load`` loads a span."""
        self._server = server
        self._registry = registry
        self._model_id = model_id
        self._rules = rules
        self._load = load
        self._interval = interval_seconds
        self._min_gain = min_gain
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.moves = 0
        self.on_move: Callable[[BlockSpan, BlockSpan], None] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rebalancer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval * self._rng.uniform(0.5, 1.5)):
            try:
                self.check()
            except FinclusterError as error:  # a failed check or move: try again next time
                log.warning("placement_check_failed", node=self._server.node_id, error=str(error))

    def _plan(self) -> MovePlan | None:
        try:
            records = self._registry.list(self._model_id)
        except RegistryError as error:
            log.info("placement_check_skipped", node=self._server.node_id, reason=str(error))
            return None
        own = self._server.record()
        if all(r.node_id != own.node_id for r in records):
            return None  # not listed (yet, or any more): nothing to balance against
        return plan_move(own, records, self._rules(), min_gain=self._min_gain)

    def check(self) -> MovePlan | None:
        """One re-check; moves when the plan says so. Returns the plan (None: no usable view)."""
        plan = self._plan()
        if plan is None or plan.target is None:
            if plan is not None:
                log.debug("placement_kept", node=self._server.node_id, reason=plan.reason)
            return plan
        before = BlockSpan(self._server.record().span.start, self._server.record().span.end)
        target = plan.target
        log.info(
            "span_move_planned",
            node=self._server.node_id,
            blocks=str(before),
            target=str(target),
            reason=plan.reason,
            weakest_now=round(plan.weakest_now, 3),
            weakest_after=round(plan.weakest_after, 3),
        )
        if not self._server.announce_intent(target):
            log.warning("span_move_abandoned", node=self._server.node_id, reason="intent not announced")
            return plan
        switched = False
        try:
            model = self._load(target)
            again = self._plan()
            if again is None or again.target != target:
                reason = "no view of the swarm" if again is None else again.reason
                log.info("span_move_abandoned", node=self._server.node_id, target=str(target), reason=reason)
                return again
            self._server.switch_to(model)
            switched = True
        finally:
            if not switched:
                self._server.announce_intent(None)
        self.moves += 1
        log.info("span_moved", node=self._server.node_id, blocks=str(target), moved_from=str(before))
        if self.on_move is not None:
            self.on_move(before, target)
        return plan
