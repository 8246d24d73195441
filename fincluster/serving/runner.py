"""What a server computes, independent of the transport: validated inputs in, hidden states out.

Deep prompts (``SpanInputs.prefixes``) go into the pass's KV cache ahead of the tokens, and the mask
gains one attended column per prefix position; a backward returns their gradients beside the input's.
A LoRA adapter, when a request names one, is applied for that computation only (``serving.adapters``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fincluster.errors import MovedError, SessionError, SessionLengthError, WireError
from fincluster.serving.adapters import LoadedAdapter, SpanAdapters
from fincluster.serving.fast_step import StepEngine
from fincluster.serving.kv_pool import SlotCache
from fincluster.serving.sessions import Session
from fincluster.serving.span_model import OffsetCache, SpanModel, kv_shape, prefill_cache
from fincluster.spans import BlockSpan
from fincluster.values import StepStrategy
from fincluster.wire.codec import BlockPrefixes, SpanGradients, SpanInputs
from fincluster.wire.tensors import all_finite, expect


class BlockRunner:
    """Runs forward, backward and session steps of one span, validating every input first."""

    def __init__(
        self,
        model: SpanModel,
        *,
        max_stateless_tokens: int = 4096,
        engine: StepEngine | None = None,
        adapters: SpanAdapters | None = None,
    ) -> None:
        """``max_stateless_tokens``: the longest sequence (deep-prompt prefix included) a stateless
        forward/backward may carry (a session's length is bounded by its max_length instead).
        ``engine`` runs session steps (default: transformers' eager path with a ``DynamicCache`` per
        session). ``adapters``: the LoRA adapters this span may apply (none: requests naming one are
        refused)."""
        self.model = model
        self.engine = engine or StepEngine(
            model, StepStrategy.EAGER, cache_bytes=0, max_length=max_stateless_tokens
        )
        self.span = model.span
        self.hidden_size: int = model.config.hidden_size
        self.max_positions: int = int(getattr(model.config, "max_position_embeddings", 2**31 - 1))
        self.max_stateless_tokens = max_stateless_tokens
        self.moved_from: list[BlockSpan] = []
        self.adapters = adapters or SpanAdapters.none(model)

    def move_to(self, model: SpanModel, engine: StepEngine, adapters: SpanAdapters | None = None) -> None:
        """Serve ``model``'s span from now on, its steps run by ``engine`` (placement moved the server;
        call it on the compute worker, between computations)."""
        self.moved_from.append(self.span)
        self.model, self.span, self.engine = model, model.span, engine
        self.adapters = adapters or SpanAdapters.none(model)

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
        if not all_finite(hidden):
            raise WireError("hidden_states: NaN or infinite values")

    def validate_prefixes(self, prefixes: BlockPrefixes, span: BlockSpan, batch: int) -> None:
        """Deep prompts must be one [batch, kv_heads, prefix, head_dim] pair per block of ``span``."""
        heads, head_dim = kv_shape(self.model.config)
        for name, tensor in (("prefixes.keys", prefixes.keys), ("prefixes.values", prefixes.values)):
            expect(
                tensor,
                name=name,
                dtype=self.model.dtype,
                rank=5,
                sizes=(len(span), batch, heads, None, head_dim),
            )
            if not all_finite(tensor):
                raise WireError(f"{name}: NaN or infinite values")
        if prefixes.keys.shape != prefixes.values.shape or prefixes.length < 1:
            raise WireError(
                f"prefixes: keys {tuple(prefixes.keys.shape)} and values {tuple(prefixes.values.shape)} "
                "must have one shape with at least one prefix position"
            )

    def validate_stateless(self, inputs: SpanInputs, span: BlockSpan) -> None:
        self.validate(inputs)
        seq = inputs.hidden_states.shape[1]
        if inputs.prefixes is not None:
            self.validate_prefixes(inputs.prefixes, span, inputs.hidden_states.shape[0])
            seq += inputs.prefixes.length
        if seq > self.max_stateless_tokens:
            included = " (deep prompts included)" if inputs.prefixes is not None else ""
            raise WireError(
                f"hidden_states: {seq} tokens{included} in one stateless call; this server takes at most "
                f"{self.max_stateless_tokens} (use an inference session, or shorter sequences)"
            )

    def _prefixed(self, span: BlockSpan, inputs: SpanInputs) -> tuple[torch.Tensor, OffsetCache | None]:
        """The mask over prefix + tokens and a cache holding the prefixes (None without prefixes)."""
        if inputs.prefixes is None:
            return inputs.attention_mask, None
        cache = self.model.new_cache(span)
        prefill_cache(cache, inputs.prefixes.keys, inputs.prefixes.values)
        return _with_prefix_columns(inputs.attention_mask, inputs.prefixes.length), cache

    @contextlib.contextmanager
    def _applied(self, adapter: LoadedAdapter | None) -> Iterator[None]:
        with self.adapters.applied(adapter):
            yield

    @torch.no_grad()
    def forward(
        self, span: BlockSpan, inputs: SpanInputs, *, adapter: LoadedAdapter | None = None
    ) -> torch.Tensor:
        self.check_span(span)
        inputs = inputs.to(self.model.device)  # validated there (on a GPU, far faster than on the host)
        self.validate_stateless(inputs, span)
        mask, cache = self._prefixed(span, inputs)
        with self._applied(adapter):
            return self.model(inputs.hidden_states, mask, inputs.position_ids, cache, span=span)

    def backward(
        self,
        span: BlockSpan,
        inputs: SpanInputs,
        grad_outputs: torch.Tensor,
        *,
        adapter: LoadedAdapter | None = None,
    ) -> SpanGradients:
        """Gradients w.r.t. the input hidden states and the deep prompts; the span's weights stay frozen."""
        self.check_span(span)
        inputs = inputs.to(self.model.device)  # validated there (on a GPU, far faster than on the host)
        grad_outputs = grad_outputs.to(self.model.device)
        self.validate_stateless(inputs, span)
        expect(
            grad_outputs,
            name="grad_outputs",
            dtype=self.model.dtype,
            rank=3,
            sizes=inputs.hidden_states.shape,
        )
        if not all_finite(grad_outputs):
            raise WireError("grad_outputs: NaN or infinite values")
        with torch.enable_grad(), self._applied(adapter):
            hidden = inputs.hidden_states.detach().requires_grad_(True)
            leaves = [hidden]
            prefixes = inputs.prefixes
            if prefixes is not None:
                prefixes = BlockPrefixes(
                    prefixes.keys.detach().requires_grad_(True), prefixes.values.detach().requires_grad_(True)
                )
                leaves += [prefixes.keys, prefixes.values]
            leaf_inputs = SpanInputs(hidden, inputs.attention_mask, inputs.position_ids, prefixes)
            mask, cache = self._prefixed(span, leaf_inputs)
            output = self.model(hidden, mask, inputs.position_ids, cache, span=span)
            grads = torch.autograd.grad(output, leaves, grad_outputs.to(output.device))
        return SpanGradients(grads[0], BlockPrefixes(grads[1], grads[2]) if prefixes is not None else None)

    def _check_step(self, session: Session, inputs: SpanInputs) -> None:
        if session.closed_reason is not None:
            raise SessionError(f"session {session.closed_reason}", session_id=session.session_id)
        self.validate(inputs, batch_size=session.batch_size, past_length=session.position)
        seq = inputs.hidden_states.shape[1]
        prefix = inputs.prefixes.length if inputs.prefixes is not None else 0
        if inputs.prefixes is not None:
            if session.position or session.prefix_length:
                raise WireError("prefixes: only the first step of a session may carry deep prompts")
            if isinstance(session.cache, SlotCache):
                raise WireError(
                    "prefixes: this server keeps sessions in a static KV pool, which holds no deep "
                    "prompts; use a server started with --step-strategy eager"
                )
            self.validate_prefixes(inputs.prefixes, session.span, session.batch_size)
        held = session.prefix_length + prefix + session.position
        if held + seq > session.max_length:
            raise SessionLengthError(
                f"step of {seq} tokens at position {held} (deep prompts included) "
                f"exceeds max_length {session.max_length}",
                session_id=session.session_id,
            )
        self.check_span(session.span)

    @torch.no_grad()
    def step(self, session: Session, inputs: SpanInputs) -> torch.Tensor:
        """Run new tokens through the span, extending the session's KV cache (the first step may bring
        the session's deep prompts, which the cache then holds ahead of every token)."""
        with session.lock:
            self._check_step(session, inputs)
            if isinstance(session.cache, OffsetCache):  # layers count from the loaded span's start
                session.cache.offset = session.span.start - self.span.start
            inputs = inputs.to(self.model.device)
            if inputs.prefixes is not None:
                prefill_cache(session.cache, inputs.prefixes.keys, inputs.prefixes.values)  # type: ignore[arg-type]
                session.prefix_length = inputs.prefixes.length
            step_inputs = SpanInputs(
                inputs.hidden_states,
                _with_prefix_columns(inputs.attention_mask, session.prefix_length),
                inputs.position_ids,
            )
            with self._applied(session.adapter):
                # an adapter's LoRA layers run only eagerly (a captured graph holds the base weights)
                output = self.engine.step(
                    session.span, session.cache, step_inputs, eager=session.adapter is not None
                )
            session.position += inputs.hidden_states.shape[1]
            return output

    def batchable(self, session: Session, new_tokens: int) -> bool:
        """Whether a step of ``new_tokens`` may run in one batch with other sessions' one-token steps."""
        return (
            self.engine.batches
            and isinstance(session.cache, SlotCache)
            and new_tokens == 1
            and session.adapter is None  # a batch runs the base weights (and a captured graph)
            and not session.prefix_length
        )

    @torch.no_grad()
    def step_batch(self, steps: list[tuple[Session, SpanInputs]]) -> list[torch.Tensor | BaseException]:
        """One-token steps of several sessions on the same span as one batch. Each step is validated
        on its own; a refused step gets its error and the others still run."""
        results: list[torch.Tensor | BaseException] = [SessionError("not run")] * len(steps)
        ordered = sorted(range(len(steps)), key=lambda i: id(steps[i][0]))  # one lock order
        held = []
        try:
            for index in ordered:
                steps[index][0].lock.acquire()
                held.append(steps[index][0])
            runnable: list[int] = []
            for index, (session, inputs) in enumerate(steps):
                try:
                    self._check_step(session, inputs)
                    if not isinstance(session.cache, SlotCache):
                        raise SessionError("session has no static cache", session_id=session.session_id)
                    runnable.append(index)
                except Exception as error:
                    results[index] = error
            if runnable:
                items = []
                for index in runnable:
                    session, inputs = steps[index]
                    assert isinstance(session.cache, SlotCache)
                    items.append((session.span, session.cache, inputs.to(self.model.device)))
                for index, output in zip(runnable, self.engine.decode(items), strict=True):
                    steps[index][0].position += 1
                    results[index] = output
        finally:
            for session in held:
                session.lock.release()
        return results


def _with_prefix_columns(mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """``mask`` [batch, tokens] with ``prefix`` attended columns ahead: prefixes are always attended."""
    if not prefix:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], prefix), mask], dim=1)
