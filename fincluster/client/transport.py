"""The one seam where activations leave the client: a ``SpanClient`` per hop.

``GrpcSpanClient`` talks to a block server over mTLS; ``LocalSpanClient`` runs a ``SpanModel`` in this
process (local blocks, and fast in-process tests). Both speak in ``SpanInputs`` and tensors.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import grpc
import torch

from fincluster.errors import CapacityError, RemoteError, SessionError
from fincluster.serving.runner import BlockRunner, SpanInputs
from fincluster.serving.sessions import Session
from fincluster.serving.span_model import BlockSpan, SpanModel
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import decode, encode

T = TypeVar("T")


class SpanSessionClient(Protocol):
    session_id: str

    def step(self, inputs: SpanInputs) -> torch.Tensor: ...

    def close(self) -> None: ...


class SpanClient(Protocol):
    node_id: str
    span: BlockSpan

    def forward(self, inputs: SpanInputs) -> torch.Tensor: ...

    def backward(self, inputs: SpanInputs, grad_outputs: torch.Tensor) -> torch.Tensor: ...

    def open_session(self, *, max_length: int, batch_size: int) -> SpanSessionClient: ...


def inputs_to_wire(inputs: SpanInputs) -> pb.SpanInputs:
    return pb.SpanInputs(
        hidden_states=encode(inputs.hidden_states),
        attention_mask=encode(inputs.attention_mask),
        position_ids=encode(inputs.position_ids),
    )


def remote_error(
    error: grpc.RpcError, *, node_id: str, span: BlockSpan, session_id: str | None = None
) -> RemoteError:
    """Turn a gRPC failure into the matching fincluster error, with its context."""
    code = error.code()
    context = {
        "node_id": node_id,
        "span": (span.start, span.end),
        "session_id": session_id,
        "code": code.name,
    }
    message = error.details() or code.name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CapacityError(message, **context)
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE) and session_id is not None:
        return SessionError(message, **context)
    return RemoteError(message, **context)


class GrpcSpanSession:
    """One inference stream: open → steps → close, each answered in order."""

    def __init__(self, client: GrpcSpanClient, *, max_length: int, batch_size: int) -> None:
        self._client = client
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue()
        self._responses: Iterator[pb.InferenceResponse] = client.stub.Inference(
            iter(self._requests.get, None)
        )
        self.session_id = ""
        open_request = pb.OpenSession(
            span=client.wire_span, max_length=max_length, batch_size=batch_size, request_id=uuid.uuid4().hex
        )
        opened = self._exchange(pb.InferenceRequest(open=open_request), "opened")
        self.session_id = opened.opened.session_id

    def _exchange(self, request: pb.InferenceRequest, expected: str) -> pb.InferenceResponse:
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as error:
            self._requests.put(None)
            raise remote_error(
                error,
                node_id=self._client.node_id,
                span=self._client.span,
                session_id=self.session_id or None,
            ) from None
        if response.WhichOneof("kind") != expected:
            raise RemoteError(f"server answered {response.WhichOneof('kind')!r} to {expected!r}")
        return response

    def step(self, inputs: SpanInputs) -> torch.Tensor:
        request = pb.InferenceRequest(
            step=pb.SessionStep(session_id=self.session_id, inputs=inputs_to_wire(inputs))
        )
        response = self._exchange(request, "step")
        return decode(response.step.hidden_states, name="hidden_states")

    def close(self) -> None:
        try:
            self._exchange(pb.InferenceRequest(close=pb.CloseSession(session_id=self.session_id)), "closed")
        except RemoteError:
            pass  # the server already dropped the session; nothing is left to free
        finally:
            self._requests.put(None)


class GrpcSpanClient:
    """Calls to one server's span over an mTLS channel."""

    def __init__(self, record: pb.ServerRecord, channel: grpc.Channel, *, timeout_seconds: float) -> None:
        self.node_id = record.node_id
        self.address = record.address
        self.span = BlockSpan(record.span.start, record.span.end)
        self.wire_span = pb.BlockSpan(start=self.span.start, end=self.span.end)
        self.stub = pb_grpc.BlockServiceStub(channel)
        self._timeout = timeout_seconds

    def _call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except grpc.RpcError as error:
            raise remote_error(error, node_id=self.node_id, span=self.span) from None

    def info(self) -> pb.ServerInfo:
        info: pb.ServerInfo = self._call(lambda: self.stub.Info(pb.InfoRequest(), timeout=self._timeout))
        return info

    def forward(self, inputs: SpanInputs) -> torch.Tensor:
        request = pb.ForwardRequest(
            span=self.wire_span, inputs=inputs_to_wire(inputs), request_id=uuid.uuid4().hex
        )
        response = self._call(lambda: self.stub.Forward(request, timeout=self._timeout))
        return decode(response.hidden_states, name="hidden_states")

    def backward(self, inputs: SpanInputs, grad_outputs: torch.Tensor) -> torch.Tensor:
        request = pb.BackwardRequest(
            span=self.wire_span,
            inputs=inputs_to_wire(inputs),
            grad_outputs=encode(grad_outputs),
            request_id=uuid.uuid4().hex,
        )
        response = self._call(lambda: self.stub.Backward(request, timeout=self._timeout))
        return decode(response.grad_inputs, name="grad_inputs")

    def open_session(self, *, max_length: int, batch_size: int) -> GrpcSpanSession:
        return GrpcSpanSession(self, max_length=max_length, batch_size=batch_size)


class LocalSpanSession:
    def __init__(self, runner: BlockRunner, session: Session) -> None:
        self._runner = runner
        self._session = session
        self.session_id = session.session_id

    def step(self, inputs: SpanInputs) -> torch.Tensor:
        return self._runner.step(self._session, inputs)

    def close(self) -> None:
        self._session.closed_reason = "closed"


class LocalSpanClient:
    """Blocks computed in the client's own process: their activations never leave it."""

    def __init__(self, model: SpanModel, *, node_id: str = "local") -> None:
        self.node_id = node_id
        self.span = model.span
        self._runner = BlockRunner(model)
        self._model = model

    def forward(self, inputs: SpanInputs) -> torch.Tensor:
        return self._runner.forward(self.span, inputs)

    def backward(self, inputs: SpanInputs, grad_outputs: torch.Tensor) -> torch.Tensor:
        return self._runner.backward(self.span, inputs, grad_outputs)

    def open_session(self, *, max_length: int, batch_size: int) -> LocalSpanSession:
        import time

        session = Session(
            session_id=uuid.uuid4().hex,
            span=self.span,
            max_length=max_length,
            batch_size=batch_size,
            reserved_bytes=0,
            cache=self._model.new_cache(),
            client_id="local",
            last_used=time.monotonic(),
        )
        return LocalSpanSession(self._runner, session)
