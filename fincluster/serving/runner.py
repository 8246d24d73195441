"""What a server computes, independent of the transport: validated inputs in, hidden states out."""

from __future__ import annotations

import torch

from fincluster.errors import MovedError, SessionError, SessionLengthError, WireError
from fincluster.serving.sessions import Session
from fincluster.serving.span_model import OffsetCache, SpanModel
from fincluster.spans import BlockSpan
from fincluster.wire.codec import SpanInputs
from fincluster.wire.tensors import expect


class BlockRunner:
    """Runs forward, backward and session steps of one span, validating every input first."""

    def __init__(self, model: SpanModel, *, max_stateless_tokens: int = 4096) -> None:
        """``max_stateless_tokens``: the longest sequence a stateless forward/backward may carry (a
        session's length is bounded by its max_length instead)."""
        self.model = model
        self.span = model.span
        self.hidden_size: int = model.config.hidden_size
        self.max_positions: int = int(getattr(model.config, "max_position_embeddings", 2**31 - 1))
        self.max_stateless_tokens = max_stateless_tokens
        self.moved_from: list[BlockSpan] = []

    def move_to(self, model: SpanModel) -> None:
        """Serve ``model``'s span from now on (placement moved the server; call it on the compute
        worker, between computations)."""
        self.moved_from.append(self.span)
        self.model, self.span = model, model.span

    def check_span(self, span: BlockSpan) -> None:
        """Any contiguous part of the loaded span may be asked for; blocks this server served before
        it moved are refused with MovedError (the caller's view of the swarm is stale; sessions opened
        there before the move end this way at their next step)."""
        if not self.span.contains(span) and any(old.overlaps(span) for old in self.moved_from):
            raise MovedError(f"blocks {span} moved away; this server now serves blocks {self.span}")
        self.model.check(span)

    def validate(self, inputs: SpanInputs, *, batch_size: int | None = None, past_length: int = 0) -> None:
        hidden = expect(
            inputs.hidden_states,
            name="hidden_states",
            dtype=self.model.dtype,
            rank=3,
            sizes=(batch_size, None, self.hidden_size),
        )
        batch, seq = hidden.shape[0], hidden.shape[1]
        if batch < 1 or seq < 1:
            raise WireError(f"hidden_states: empty batch or sequence (shape {tuple(hidden.shape)})")
        expect(
            inputs.attention_mask,
            name="attention_mask",
            dtype=torch.int64,
            rank=2,
            sizes=(batch, past_length + seq),
        )
        expect(inputs.position_ids, name="position_ids", dtype=torch.int64, rank=2, sizes=(batch, seq))
        if not bool(((inputs.attention_mask == 0) | (inputs.attention_mask == 1)).all()):
            raise WireError("attention_mask: values must be 0 or 1")
        if bool((inputs.position_ids < 0).any()) or bool((inputs.position_ids >= self.max_positions).any()):
            raise WireError(
                f"position_ids: positions must lie within 0..{self.max_positions - 1} (the model's range)"
            )
        if not bool(torch.isfinite(hidden).all()):
            raise WireError("hidden_states: NaN or infinite values")

    def validate_stateless(self, inputs: SpanInputs) -> None:
        self.validate(inputs)
        seq = inputs.hidden_states.shape[1]
        if seq > self.max_stateless_tokens:
            raise WireError(
                f"hidden_states: {seq} tokens in one stateless call; this server takes at most "
                f"{self.max_stateless_tokens} (use an inference session, or shorter sequences)"
            )

    @torch.no_grad()
    def forward(self, span: BlockSpan, inputs: SpanInputs) -> torch.Tensor:
        self.check_span(span)
        self.validate_stateless(inputs)
        inputs = inputs.to(self.model.device)
        return self.model(inputs.hidden_states, inputs.attention_mask, inputs.position_ids, span=span)

    def backward(self, span: BlockSpan, inputs: SpanInputs, grad_outputs: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the input hidden states; the span's weights stay frozen."""
        self.check_span(span)
        self.validate_stateless(inputs)
        expect(
            grad_outputs,
            name="grad_outputs",
            dtype=self.model.dtype,
            rank=3,
            sizes=inputs.hidden_states.shape,
        )
        if not bool(torch.isfinite(grad_outputs).all()):
            raise WireError("grad_outputs: NaN or infinite values")
        inputs = inputs.to(self.model.device)
        with torch.enable_grad():
            hidden = inputs.hidden_states.detach().requires_grad_(True)
            output = self.model(hidden, inputs.attention_mask, inputs.position_ids, span=span)
            (grad,) = torch.autograd.grad(output, hidden, grad_outputs.to(output.device))
        return grad

    @torch.no_grad()
    def step(self, session: Session, inputs: SpanInputs) -> torch.Tensor:
        """Run new tokens through the span, extending the session's KV cache."""
        with session.lock:
            if session.closed_reason is not None:
                raise SessionError(f"session {session.closed_reason}", session_id=session.session_id)
            self.validate(inputs, batch_size=session.batch_size, past_length=session.position)
            seq = inputs.hidden_states.shape[1]
            if session.position + seq > session.max_length:
                raise SessionLengthError(
                    f"step of {seq} tokens at position {session.position} "
                    f"exceeds max_length {session.max_length}",
                    session_id=session.session_id,
                )
            self.check_span(session.span)
            if isinstance(session.cache, OffsetCache):  # layers count from the loaded span's start
                session.cache.offset = session.span.start - self.span.start
            inputs = inputs.to(self.model.device)
            output = self.model(
                inputs.hidden_states,
                inputs.attention_mask,
                inputs.position_ids,
                session.cache,
                span=session.span,
            )
            session.position += seq
            return output
