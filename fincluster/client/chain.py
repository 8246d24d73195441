"""Running hidden states through a chain of spans, with automatic failover.

Two ways through the chain:

* :func:`chain_forward` — a stateless, autograd-aware pass (training, scoring): each hop is a node of
  the autograd graph whose backward asks the servers for d(output)/d(input) and, when the pass carries
  deep prompts (:class:`~fincluster.wire.codec.BlockPrefixes`), d(output)/d(prefixes) of its blocks.
* :class:`InferenceSession` — KV-cached, step by step (generation); every hop keeps the inputs it
  received so that a replacement node can rebuild its cache. Deep prompts go with the first step.

Every hop gets only its own blocks' prefixes, and the LoRA adapter (if any) the pass or session names.

Outputs of attested nodes may be re-executed elsewhere as they arrive (``HopPlanner.verify``); one
found wrong fails its hop over like any other misbehaving node.

When a hop fails (see :func:`~fincluster.client.failover.is_node_failure`), the :class:`HopPlanner`
bans the node and routes its blocks again — under the same policy and pins, possibly split
differently — and the inputs the failed hop had received are replayed through the replacements
before the work goes on. It happens inside ``step`` / ``forward`` / ``backward``; callers see the
same outputs as without the failure, or, after ``attempts`` tries, the last error.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from fincluster.adapters.manifest import AdapterRef
from fincluster.backoff import Backoff
from fincluster.client.failover import is_node_failure
from fincluster.client.transport import SpanClient, SpanSessionClient
from fincluster.client.verification import concatenated
from fincluster.errors import (
    ClosedError,
    FinclusterError,
    RemoteError,
    RoutingError,
    TrustError,
    UsageError,
)
from fincluster.logs import get_logger
from fincluster.spans import BlockSpan
from fincluster.wire.codec import BlockPrefixes, SpanGradients, SpanInputs

log = get_logger(__name__)


class HopPlanner(Protocol):
    """Where a chain's hops come from: the whole chain, and replacements for one failed hop."""

    def plan(self, session_id: str) -> Sequence[SpanClient]:
        """Span clients covering every block, for ``session_id``."""
        ...

    def failed(self, span: BlockSpan, *, session_id: str, node: SpanClient, error: BaseException) -> None:
        """``node`` failed on ``span`` with ``error``: record why, and avoid the node if it is unhealthy."""
        ...

    def replace(self, span: BlockSpan, *, session_id: str, exclude: frozenset[str]) -> Sequence[SpanClient]:
        """Span clients that cover ``span`` under the same policy and pins, none of ``exclude``."""
        ...

    def verify(
        self,
        node: SpanClient,
        inputs: Callable[[], SpanInputs],
        output: torch.Tensor,
        *,
        session_id: str,
        step: int,
        adapter: AdapterRef | None,
    ) -> None:
        """Re-execute a sample of ``node``'s outputs elsewhere (:mod:`fincluster.client.verification`),
        with the same ``adapter``: ``inputs()`` gives the stateless inputs whose last positions
        ``output`` is. Raises InvalidResponseError naming ``node`` when its output is found wrong (the
        hop then fails over)."""
        ...


@dataclass(frozen=True)
class FailoverPolicy:
    """How many replacements to try for one failed hop, and how long to wait between tries."""

    attempts: int = 3
    backoff_seconds: float = 0.2
    backoff_max_seconds: float = 2.0
    sleep: Callable[[float], None] = time.sleep

    def backoff(self) -> Backoff:
        """A fresh series of waits for one failed hop."""
        return Backoff(
            initial=self.backoff_seconds, maximum=max(self.backoff_seconds, self.backoff_max_seconds)
        )


FailoverListener = Callable[[str, BlockSpan, str, Sequence[SpanClient], BaseException, int], None]
"""(session id, failed span, failed node id, replacements, error, replayed steps)."""


def _replacements(
    planner: HopPlanner,
    policy: FailoverPolicy,
    span: BlockSpan,
    *,
    session_id: str,
    failed: SpanClient,
    error: BaseException,
    rebuild: Callable[[Sequence[SpanClient]], None],
) -> Sequence[SpanClient]:
    """Replacements for ``failed`` on which ``rebuild`` succeeded. When none is allowed yet, or a
    replacement fails too, it tries again after a backoff (new servers may be announcing); once the
    attempts are used up it raises a RoutingError that names the first failure."""
    first_node, first_error = failed, error
    exclude: set[str] = set()
    waits = policy.backoff()
    no_route: RoutingError | None = None
    for attempt in range(max(policy.attempts, 1)):
        if failed.node_id not in exclude:
            log.warning(
                "hop_failed", node=failed.node_id, blocks=str(span), session=session_id, error=str(error)
            )
            planner.failed(span, session_id=session_id, node=failed, error=error)
            exclude.add(failed.node_id)
        if attempt:
            policy.sleep(waits.next_delay())
        try:
            clients = planner.replace(span, session_id=session_id, exclude=frozenset(exclude))
        except RoutingError as refused:
            no_route = refused
            continue
        try:
            rebuild(clients)
        except FinclusterError as again:
            if not is_node_failure(again):
                raise
            node = again.node_id if isinstance(again, RemoteError | TrustError) else None
            failed = next((c for c in clients if c.node_id == node), clients[0])
            error = again
            continue
        return clients
    detail = f"no other allowed server can take them over ({no_route})" if no_route else f"then {error}"
    raise RoutingError(
        f"{first_node.node_id} failed on blocks {span} ({first_error}); {detail}",
        missing_blocks=no_route.missing_blocks if no_route else tuple(span.blocks),
    ) from first_error


# -- stateless passes ---------------------------------------------------------------------------------


@dataclass
class _Pass:
    """What every hop of one stateless pass shares: its session id, the backward's (a pass of its own),
    and how to replace a failed hop."""

    session_id: str
    planner: HopPlanner | None
    policy: FailoverPolicy
    adapter: AdapterRef | None = None
    backward_session_id: str | None = None

    def backward_id(self) -> str:
        if self.backward_session_id is None:
            self.backward_session_id = uuid.uuid4().hex
        return self.backward_session_id


@dataclass
class _Part:
    """One client of a hop group and the inputs it was given in the forward pass."""

    client: SpanClient
    inputs: SpanInputs | None = None


class _HopGroup:
    """The clients that cover one planned hop's blocks: one, or several after a split failover."""

    def __init__(self, client: SpanClient, one_pass: _Pass) -> None:
        self.span = client.span
        self.parts = [_Part(client)]
        self.one_pass = one_pass
        self.prefixes: BlockPrefixes | None = None  # the deep prompts of this hop's blocks

    def _inputs(self, part: _Part, hidden: torch.Tensor, like: SpanInputs) -> SpanInputs:
        """``part``'s inputs: ``hidden``, the pass's mask and positions, and its own blocks' prefixes."""
        prefixes = None
        if self.prefixes is not None:
            span, offset = part.client.span, self.span.start
            prefixes = self.prefixes.blocks(span.start - offset, span.end - offset)
        return SpanInputs(hidden, like.attention_mask, like.position_ids, prefixes)

    def _replace(self, index: int, error: FinclusterError, session_id: str) -> list[_Part]:
        """Replace part ``index`` (whose call raised ``error``); the first new part inherits its inputs."""
        part = self.parts[index]
        if self.one_pass.planner is None or not is_node_failure(error):
            raise error
        new_parts: list[_Part] = []

        def rebuild(clients: Sequence[SpanClient]) -> None:
            new_parts.clear()
            new_parts.extend(_Part(c) for c in clients)

        _replacements(
            self.one_pass.planner,
            self.one_pass.policy,
            part.client.span,
            session_id=session_id,
            failed=part.client,
            error=error,
            rebuild=rebuild,
        )
        if part.inputs is not None:
            new_parts[0].inputs = self._inputs(new_parts[0], part.inputs.hidden_states, part.inputs)
        self.parts[index : index + 1] = new_parts
        return new_parts

    def forward(self, inputs: SpanInputs) -> torch.Tensor:
        self.prefixes = inputs.prefixes
        index = 0
        hidden = inputs.hidden_states
        while index < len(self.parts):
            part = self.parts[index]
            part_inputs = part.inputs = self._inputs(part, hidden, inputs)
            try:
                output = part.client.forward(
                    part_inputs, session_id=self.one_pass.session_id, adapter=self.one_pass.adapter
                )
                if self.one_pass.planner is not None:
                    self.one_pass.planner.verify(
                        part.client,
                        partial(_same, part_inputs),
                        output,
                        session_id=self.one_pass.session_id,
                        step=0,
                        adapter=self.one_pass.adapter,
                    )
            except FinclusterError as error:
                self._replace(index, error, self.one_pass.session_id)
                continue  # the first replacement takes the same inputs
            hidden = output
            index += 1
        return hidden

    def backward(self, grad: torch.Tensor) -> SpanGradients:
        session_id = self.one_pass.backward_id()
        prefixes = self.prefixes
        grad_keys = torch.zeros_like(prefixes.keys) if prefixes is not None else None
        grad_values = torch.zeros_like(prefixes.values) if prefixes is not None else None
        index = len(self.parts) - 1
        while index >= 0:
            part = self.parts[index]
            # a replacement from a failed backward: run the forward of what comes before it first
            inputs = part.inputs if part.inputs is not None else self._refill(index)
            try:
                grads = part.client.backward(
                    inputs, grad, session_id=session_id, adapter=self.one_pass.adapter
                )
            except FinclusterError as error:
                new_parts = self._replace(index, error, session_id)
                new_parts[0].inputs = self._inputs(new_parts[0], inputs.hidden_states, inputs)
                index += len(new_parts) - 1
                continue
            grad = grads.inputs
            if grads.prefixes is not None and grad_keys is not None and grad_values is not None:
                start, end = part.client.span.start - self.span.start, part.client.span.end - self.span.start
                grad_keys[start:end] = grads.prefixes.keys.to(grad_keys.device)
                grad_values[start:end] = grads.prefixes.values.to(grad_values.device)
            index -= 1
        if grad_keys is None or grad_values is None:
            return SpanGradients(grad)
        return SpanGradients(grad, BlockPrefixes(grad_keys, grad_values))

    def _refill(self, index: int) -> SpanInputs:
        """Inputs of replacement part ``index``: forward from the nearest part before it whose inputs are
        known (the first part of a replacement inherits the failed part's)."""
        start = max(i for i in range(index + 1) if self.parts[i].inputs is not None)
        known = self.parts[start].inputs
        if known is None:  # pragma: no cover - start was chosen for its inputs
            raise UsageError("no inputs to rebuild a replaced hop from")
        hidden = known.hidden_states
        for i in range(start, index):
            inputs = self._inputs(self.parts[i], hidden, known)
            self.parts[i].inputs = inputs
            hidden = self.parts[i].client.forward(
                inputs, session_id=self.one_pass.backward_id(), adapter=self.one_pass.adapter
            )
        inputs = self._inputs(self.parts[index], hidden, known)
        self.parts[index].inputs = inputs
        return inputs


def _same(inputs: SpanInputs) -> SpanInputs:
    return inputs


class _RemoteSpanFunction(torch.autograd.Function):
    """One planned hop as an autograd node: backward asks its servers for d(output)/d(input) and, with
    deep prompts, d(output)/d(keys, values) of its blocks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        keys: torch.Tensor | None,
        values: torch.Tensor | None,
        mask: torch.Tensor,
        positions: torch.Tensor,
        group: _HopGroup,
    ) -> torch.Tensor:
        ctx.group = group
        ctx.prefix_dtype = keys.dtype if keys is not None else None
        prefixes = None
        if keys is not None and values is not None:
            prefixes = BlockPrefixes(keys.detach().to(hidden.dtype), values.detach().to(hidden.dtype))
        return group.forward(SpanInputs(hidden.detach(), mask, positions, prefixes)).to(hidden.device)

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, None, None, None]:
        group: _HopGroup = ctx.group
        first = group.parts[0].inputs
        dtype = first.hidden_states.dtype if first is not None else grad_output.dtype
        grads = group.backward(grad_output.contiguous().to(dtype))
        device = grad_output.device
        if grads.prefixes is None:
            return grads.inputs.to(device), None, None, None, None, None
        return (
            grads.inputs.to(device),
            grads.prefixes.keys.to(device, ctx.prefix_dtype),
            grads.prefixes.values.to(device, ctx.prefix_dtype),
            None,
            None,
            None,
        )


def chain_forward(
    clients: Sequence[SpanClient],
    hidden: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    session_id: str,
    planner: HopPlanner | None = None,
    policy: FailoverPolicy | None = None,
    prefixes: BlockPrefixes | None = None,
    adapter: AdapterRef | None = None,
) -> torch.Tensor:
    """Stateless pass through every hop; differentiable w.r.t. ``hidden`` and ``prefixes`` (the deep
    prompts of every block, indexed by block number: a hop over blocks a:b gets ``[a:b]``). With a
    ``planner``, failed hops (in the forward or the backward) are replaced and their work redone.
    ``adapter``: the LoRA adapter every hop applies."""
    one_pass = _Pass(session_id, planner, policy or FailoverPolicy(), adapter)
    for client in clients:
        span = client.span
        keys = prefixes.keys[span.start : span.end] if prefixes is not None else None
        values = prefixes.values[span.start : span.end] if prefixes is not None else None
        hidden = _RemoteSpanFunction.apply(hidden, keys, values, mask, positions, _HopGroup(client, one_pass))  # type: ignore[no-untyped-call]
    return hidden


# -- inference sessions -------------------------------------------------------------------------------


@dataclass
class _HopState:
    client: SpanClient
    session: SpanSessionClient | None = None
    # Inputs this hop has received, kept so a replacement node can rebuild its KV cache (failover).
    history: list[SpanInputs] = field(default_factory=list)

    def opened(self) -> SpanSessionClient:
        if self.session is None:  # pragma: no cover - sessions open before anything is sent
            raise ClosedError(f"the session on {self.client.node_id} is not open")
        return self.session


class InferenceSession:
    """A KV-cached session across every hop of a chain, for step-by-step generation.

    Every hop's server session carries the same ``session_id``. Hop sessions open lazily at the first
    step (when the batch size is known). ``position`` counts the tokens every hop holds. A hop that
    fails is replaced (see the module docstring) inside :meth:`step`. ``close()`` ends all hop
    sessions; using a closed session raises ClosedError.

    Deep prompts come with the first step (each hop gets its blocks' prefixes, and its server session
    is opened ``prefix`` positions longer, since its cache holds them too). ``prompt_length``: the
    prompt the session was sized for — a first step that brings more (prompt tuning's virtual tokens
    ahead of the prompt) makes ``max_length`` longer by as many. ``adapter``: the LoRA adapter of
    every hop.
    """

    def __init__(
        self,
        planner: HopPlanner,
        *,
        max_length: int,
        session_id: str | None = None,
        policy: FailoverPolicy | None = None,
        on_failover: FailoverListener | None = None,
        prompt_length: int | None = None,
        adapter: AdapterRef | None = None,
    ) -> None:
        if max_length < 1:
            raise UsageError("max_length must be at least 1")
        self.max_length = max_length
        self.prompt_length = prompt_length
        self.adapter = adapter
        self.prefixes: BlockPrefixes | None = None
        """The deep prompts of every block (indexed by block number), sent with the first step."""
        self.session_id = session_id or uuid.uuid4().hex
        self.position = 0
        self.token_history: torch.Tensor | None = None
        self._planner = planner
        self._policy = policy or FailoverPolicy()
        self._on_failover = on_failover
        self._hops: list[_HopState] | None = None
        self._batch_size = 1
        self._closed = False
        self.failed = False

    def holds_prefix_of(self, input_ids: torch.Tensor) -> bool:
        """Whether ``input_ids`` starts with exactly the tokens this session already holds."""
        held = self.token_history
        return (
            held is not None
            and 0 < held.shape[1] < input_ids.shape[1]
            and held.shape[0] == input_ids.shape[0]
            and torch.equal(input_ids[:, : held.shape[1]].to(held.device), held)
        )

    def record_tokens(self, input_ids: torch.Tensor | None, new: int) -> None:
        """Remember the token ids sent (client-side only) so a later call may repeat them as a prefix.

        Tokens repeated before the ``new`` ones must be exactly the held ones, or the call is refused.
        """
        if input_ids is None:
            self.token_history = None  # embeddings were sent: no prefix can be checked later
            return
        repeated = input_ids[:, : input_ids.shape[1] - new]
        if repeated.shape[1] and not self.holds_prefix_of(input_ids):
            raise UsageError("input_ids do not continue the tokens this inference session already holds")
        fresh = input_ids[:, input_ids.shape[1] - new :].detach()
        held = self.token_history
        if held is None:
            self.token_history = fresh.clone() if self.position == 0 else None
        else:
            self.token_history = torch.cat([held, fresh], 1)

    @property
    def hops(self) -> list[_HopState]:
        return list(self._hops or [])

    def _hop_inputs(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        *,
        first: bool,
    ) -> SpanInputs:
        prefixes = self.prefixes.blocks(span.start, span.end) if first and self.prefixes is not None else None
        return SpanInputs(hidden, mask, positions, prefixes)

    def _server_length(self) -> int:
        """What each hop's server cache must hold: the tokens, and the deep prompts ahead of them."""
        return self.max_length + (self.prefixes.length if self.prefixes is not None else 0)

    def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        prefixes: BlockPrefixes | None = None,
    ) -> torch.Tensor:
        """Send new tokens through every hop; ``prefixes`` (deep prompts) only with the first step."""
        if self._closed:
            raise ClosedError("inference session is closed")
        seq = hidden.shape[1]
        if self.position == 0 and self._hops is None:
            if self.prompt_length is not None and seq > self.prompt_length:
                self.max_length += seq - self.prompt_length  # virtual tokens ahead of the prompt
                self.prompt_length = seq
            self.prefixes = (
                BlockPrefixes(prefixes.keys.detach(), prefixes.values.detach())
                if prefixes is not None
                else None
            )
        elif prefixes is not None and not _same_prefixes(prefixes, self.prefixes):
            raise UsageError(
                "deep prompts are fixed for an inference session: they went with its first step, and a "
                "later step brought different ones (open a new session for other prompts)"
            )
        if self.position + seq > self.max_length:
            raise UsageError(
                f"session max_length {self.max_length} reached: {self.position} tokens held, {seq} more given"
            )
        self._batch_size = hidden.shape[0]
        try:
            if self._hops is None:
                self._hops = [_HopState(client) for client in self._planner.plan(self.session_id)]
            index = 0
            while index < len(self._hops):
                hop = self._hops[index]
                inputs = self._hop_inputs(hop.client.span, hidden, mask, positions, first=self.position == 0)
                try:
                    if hop.session is None:
                        hop.session = hop.client.open_session(
                            max_length=self._server_length(),
                            batch_size=self._batch_size,
                            session_id=self.session_id,
                            adapter=self.adapter,
                        )
                    output = hop.session.step(inputs)
                    self._planner.verify(
                        hop.client,
                        partial(concatenated, [*hop.history, inputs]),
                        output,
                        session_id=self.session_id,
                        step=len(hop.history),
                        adapter=self.adapter,
                    )
                except FinclusterError as error:
                    if not is_node_failure(error):
                        raise
                    self._fail_over(index, error)
                    continue  # the replacements take this step's inputs
                hop.history.append(inputs)
                hidden = output
                index += 1
        except Exception:
            self.failed = True
            raise
        self.position += seq
        return hidden

    def _fail_over(self, index: int, error: BaseException) -> None:
        """Replace hop ``index`` by nodes routing allows for its blocks, replaying what it received."""
        if self._hops is None:  # pragma: no cover - only open hops fail
            raise ClosedError("no open session to fail over")
        hop = self._hops[index]
        with contextlib.suppress(FinclusterError):  # the old node may be gone; its cache goes with it
            if hop.session is not None:
                hop.session.close()
        new_hops: list[_HopState] = []

        def rebuild(clients: Sequence[SpanClient]) -> None:
            new_hops.clear()
            new_hops.extend(self._rebuilt(clients, hop.history))

        clients = _replacements(
            self._planner,
            self._policy,
            hop.client.span,
            session_id=self.session_id,
            failed=hop.client,
            error=error,
            rebuild=rebuild,
        )
        self._hops[index : index + 1] = new_hops
        if self._on_failover is not None:
            self._on_failover(
                self.session_id, hop.client.span, hop.client.node_id, clients, error, len(hop.history)
            )

    def _rebuilt(self, clients: Sequence[SpanClient], history: Sequence[SpanInputs]) -> list[_HopState]:
        """Open sessions on ``clients`` and replay ``history`` through them in order (the outputs of one
        are the inputs of the next), so their KV caches hold what the failed hop's did."""
        hops = [_HopState(client) for client in clients]
        for hop in hops:
            hop.session = hop.client.open_session(
                max_length=self._server_length(),
                batch_size=self._batch_size,
                session_id=self.session_id,
                adapter=self.adapter,
            )
        for number, inputs in enumerate(history):
            hidden = inputs.hidden_states
            for hop in hops:
                step_inputs = self._hop_inputs(
                    hop.client.span, hidden, inputs.attention_mask, inputs.position_ids, first=number == 0
                )
                hidden = hop.opened().step(step_inputs, replay=True)
                hop.history.append(step_inputs)
        return hops

    def replace_hop(self, index: int, replacements: Sequence[SpanClient]) -> int:
        """Move hop ``index`` to ``replacements`` (which must cover exactly its blocks), replaying every
        input the old node received so the new ones rebuild its KV cache. Returns the replayed steps.

        The caller chooses the replacements (still under policy): ``DistributedModelForCausalLM.move_hop``.
        """
        if self._closed or self._hops is None:
            raise ClosedError("no open session to move")
        hop = self._hops[index]
        if (
            not replacements
            or BlockSpan(replacements[0].span.start, replacements[-1].span.end) != hop.client.span
        ):
            raise UsageError(f"replacements do not cover exactly blocks {hop.client.span}")
        new_hops = self._rebuilt(replacements, hop.history)
        with contextlib.suppress(FinclusterError):
            if hop.session is not None:
                hop.session.close()
        self._hops[index : index + 1] = new_hops
        return len(hop.history)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for hop in self._hops or []:
            if hop.session is not None:
                with contextlib.suppress(FinclusterError):
                    hop.session.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_prefixes(given: BlockPrefixes, held: BlockPrefixes | None) -> bool:
    return (
        held is not None
        and given.keys.shape == held.keys.shape
        and torch.equal(given.keys.detach().to(held.keys.device), held.keys)
        and torch.equal(given.values.detach().to(held.values.device), held.values)
    )
