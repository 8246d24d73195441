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
from fincluster.serving.runner import BlockRunner
from fincluster.serving.sessions import Session
from fincluster.serving.span_model import SpanModel
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.wire.codec import SpanGradients, SpanInputs


class LocalSpanSession:
    def __init__(self, runner: BlockRunner, session: Session) -> None:
        self._runner = runner
        self._session = session
        self.session_id = session.session_id

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor:
        return self._runner.step(self._session, inputs)

    def close(self) -> None:
        self._session.closed_reason = "closed"


class LocalSpanClient:
    """A span run in this process: its activations never leave it."""

    def __init__(
        self, model: SpanModel, *, node_id: str = "local", adapters: SpanAdapters | None = None
    ) -> None:
        """``adapters``: LoRA adapters these blocks may apply (none: a call naming one is refused)."""
        self.node_id = node_id
        self.span = model.span
        self._runner = BlockRunner(model, adapters=adapters)
        self._model = model

    @classmethod
    def from_store(
        cls, store: ModelStore, span: BlockSpan, *, dtype: torch.dtype, node_id: str = "local"
    ) -> LocalSpanClient:
        """Load ``span``'s weights from ``store`` (digests checked) and run them here."""
        blocks = {index: store.load_block_state(index) for index in span.blocks}
        return cls(SpanModel(store.load_config(), span, blocks, dtype=dtype), node_id=node_id)

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
            cache=self._model.new_cache(self.span),
            client_id="local",
            last_used=time.monotonic(),
            adapter=self._runner.adapters.resolve(adapter.adapter_id if adapter is not None else ""),
        )
        return LocalSpanSession(self._runner, session)
