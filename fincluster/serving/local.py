"""Blocks computed in the client's own process, behind the same interface as a remote hop.

The client uses it for ``local_blocks=k`` (activations of those blocks never leave the process) and
tests use it to run the whole client over in-process spans without gRPC. It speaks the client's
``SpanClient`` protocol (``fincluster.client.transport``) structurally.
"""

from __future__ import annotations

import time

import torch

from fincluster.adapters.manifest import AdapterRef
from fincluster.serving.adapters import SpanAdapters
from fincluster.serving.fast_step import StepEngine
from fincluster.serving.runner import BlockRunner
from fincluster.serving.sessions import Session
from fincluster.serving.span_model import SpanModel
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.attestation import TrustTier
from fincluster.wire.codec import SpanGradients, SpanInputs, inputs_from_wire, inputs_to_wire
from fincluster.wire.compression import WireCompression
from fincluster.wire.tensors import decode, encode


class LocalSpanSession:
    def __init__(self, runner: BlockRunner, session: Session, compression: WireCompression) -> None:
        self._runner = runner
        self._session = session
        self.session_id = session.session_id
        self._compression = compression

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor:
        """With a compression other than none, the hidden states go through the wire codec both ways,
        exactly as they would to and from a server (quality measurements, tests)."""
        if self._compression is WireCompression.NONE:
            return self._runner.step(self._session, inputs)
        inputs = inputs_from_wire(inputs_to_wire(inputs, self._compression))
        output = self._runner.step(self._session, inputs)
        return decode(encode(output, self._compression), name="hidden_states")

    def close(self) -> None:
        self._session.closed_reason = "closed"
        self._runner.engine.release(self._session.cache)


class LocalSpanClient:
    """A span run in this process: its activations never leave it."""

    tier: TrustTier | None = None  # not attested: the client's own blocks are never re-executed elsewhere

    def __init__(
        self,
        model: SpanModel,
        *,
        node_id: str = "local",
        engine: StepEngine | None = None,
        adapters: SpanAdapters | None = None,
    ) -> None:
        """``engine`` runs session steps (default: transformers' eager path); ``adapters``: LoRA
        adapters these blocks may apply (none: a call naming one is refused)."""
        self.node_id = node_id
        self.span = model.span
        self.compression = WireCompression.NONE
        self._runner = BlockRunner(model, engine=engine, adapters=adapters)
        self._model = model

    @classmethod
    def from_store(
        cls,
        store: ModelStore,
        span: BlockSpan,
        *,
        dtype: torch.dtype,
        node_id: str = "local",
        device: str | torch.device = "cpu",
    ) -> LocalSpanClient:
        """Load ``span``'s weights from ``store`` (digests checked) and run them here, on ``device``."""
        blocks = {index: store.load_block_state(index) for index in span.blocks}
        model = SpanModel(store.load_config(), span, blocks, dtype=dtype, device=device)
        return cls(model, node_id=node_id)

    def to(self, device: str | torch.device) -> LocalSpanClient:
        """Run the span on ``device`` from now on (the client model moves its local blocks with it)."""
        self._model.base.to(device)
        return self

    def forward(
        self, inputs: SpanInputs, *, session_id: str, adapter: AdapterRef | None = None
    ) -> torch.Tensor:
        loaded = self._runner.adapters.resolve(adapter.adapter_id if adapter is not None else "")
        return self._runner.forward(self.span, inputs, adapter=loaded)

    def backward(
        self,
        inputs: SpanInputs,
        grad_outputs: torch.Tensor,
        *,
        session_id: str,
        adapter: AdapterRef | None = None,
    ) -> SpanGradients:
        loaded = self._runner.adapters.resolve(adapter.adapter_id if adapter is not None else "")
        return self._runner.backward(self.span, inputs, grad_outputs, adapter=loaded)

    def open_session(
        self, *, max_length: int, batch_size: int, session_id: str, adapter: AdapterRef | None = None
    ) -> LocalSpanSession:
        session = Session(
            session_id=session_id,
            span=self.span,
            max_length=max_length,
            batch_size=batch_size,
            reserved_bytes=0,
            cache=self._runner.engine.new_cache(self.span, batch_size=batch_size, max_length=max_length),
            client_id="local",
            last_used=time.monotonic(),
            adapter=self._runner.adapters.resolve(adapter.adapter_id if adapter is not None else ""),
        )
        return LocalSpanSession(self._runner, session, self.compression)
