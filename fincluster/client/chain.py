"""Running hidden states through a chain of spans: autograd-aware forward, and inference sessions."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fincluster.client.transport import SpanClient, SpanSessionClient
from fincluster.errors import ClosedError, FinclusterError, UsageError
from fincluster.wire.codec import SpanInputs

ChainPlan = Callable[[str], Sequence[SpanClient]]
"""Span clients covering every block, for the session id given."""


@dataclass
class _Pass:
    """Session ids shared by every hop of one stateless pass: the forward's, and the backward's (a
    pass of its own) once it runs."""

    session_id: str
    backward_session_id: str | None = None

    def backward_id(self) -> str:
        if self.backward_session_id is None:
            self.backward_session_id = uuid.uuid4().hex
        return self.backward_session_id


class _RemoteSpanFunction(torch.autograd.Function):
    """One hop as an autograd node: backward asks the span for d(output)/d(input)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        client: SpanClient,
        one_pass: _Pass,
    ) -> torch.Tensor:
        inputs = SpanInputs(hidden.detach(), mask, positions)
        ctx.client, ctx.inputs, ctx.one_pass = client, inputs, one_pass
        return client.forward(inputs, session_id=one_pass.session_id).to(hidden.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        grad_output = grad_output.contiguous().to(ctx.inputs.hidden_states.dtype)
        grad = ctx.client.backward(ctx.inputs, grad_output, session_id=ctx.one_pass.backward_id())
        return grad.to(grad_output.device), None, None, None, None


def chain_forward(
    clients: Sequence[SpanClient],
    hidden: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    session_id: str,
) -> torch.Tensor:
    """Stateless pass through every hop; differentiable w.r.t. ``hidden``."""
    one_pass = _Pass(session_id)
    for client in clients:
        hidden = _RemoteSpanFunction.apply(hidden, mask, positions, client, one_pass)  # type: ignore[no-untyped-call]
    return hidden


@dataclass
class _HopState:
    client: SpanClient
    session: SpanSessionClient | None = None
    # Inputs this hop has received, kept so a replacement node can rebuild its KV cache (failover).
    history: list[SpanInputs] = field(default_factory=list)


FailoverListener = Callable[[str, SpanClient, SpanClient, int], None]


class InferenceSession:
    """A KV-cached session across every hop of a chain, for step-by-step generation.

    Every hop's server session carries the same ``session_id``. Hop sessions open lazily at the first
    step (when the batch size is known). ``position`` counts the tokens every hop holds. ``close()``
    ends all hop sessions; using a closed session raises ClosedError.
    """

    def __init__(
        self,
        plan: ChainPlan,
        *,
        max_length: int,
        session_id: str | None = None,
        on_failover: FailoverListener | None = None,
    ) -> None:
        if max_length < 1:
            raise UsageError("max_length must be at least 1")
        self.max_length = max_length
        self.session_id = session_id or uuid.uuid4().hex
        self.position = 0
        self.token_history: torch.Tensor | None = None
        self._plan = plan
        self._on_failover = on_failover
        self._hops: list[_HopState] | None = None
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

    def step(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self._closed:
            raise ClosedError("inference session is closed")
        seq = hidden.shape[1]
        if self.position + seq > self.max_length:
            raise UsageError(
                f"session max_length {self.max_length} reached: {self.position} tokens held, {seq} more given"
            )
        if self._hops is None:
            self._hops = [_HopState(client) for client in self._plan(self.session_id)]
        try:
            for hop in self._hops:
                if hop.session is None:
                    hop.session = hop.client.open_session(
                        max_length=self.max_length, batch_size=hidden.shape[0], session_id=self.session_id
                    )
                inputs = SpanInputs(hidden, mask, positions)
                hidden = hop.session.step(inputs)
                hop.history.append(inputs)
        except Exception:
            self.failed = True
            raise
        self.position += seq
        return hidden

    def replace_hop(self, index: int, replacement: SpanClient, *, batch_size: int) -> int:
        """Move hop ``index`` to ``replacement``: open a session there and replay every input the old
        node received, so its KV cache is rebuilt; the replays are transfers like any other.

        Returns the number of replayed steps. The caller chooses ``replacement`` (still under policy).
        """
        if self._closed or self._hops is None:
            raise ClosedError("no open session to move")
        hop = self._hops[index]
        if replacement.span != hop.client.span:
            raise UsageError(f"replacement serves {replacement.span}, the hop is {hop.client.span}")
        session = replacement.open_session(
            max_length=self.max_length, batch_size=batch_size, session_id=self.session_id
        )
        for inputs in hop.history:
            session.step(inputs, replay=True)
        previous = hop.client
        if hop.session is not None:
            with contextlib.suppress(FinclusterError):  # the old node may be gone; its cache goes with it
                hop.session.close()
        hop.client, hop.session = replacement, session
        if self._on_failover is not None:
            self._on_failover(self.session_id, previous, replacement, len(hop.history))
        return len(hop.history)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for hop in self._hops or []:
            if hop.session is not None:
                hop.session.close()

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
