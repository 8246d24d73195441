"""gRPC transport of a block server: decode, call the runner, encode, map errors to status codes.

Validation failures reach the caller as INVALID_ARGUMENT / OUT_OF_RANGE / NOT_FOUND /
RESOURCE_EXHAUSTED with a message saying what was wrong; anything unexpected is logged here and the
caller gets an opaque INTERNAL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import NoReturn, TypeVar

import grpc
import structlog
import torch

from fincluster.errors import CapacityError, RemoteError, WireError
from fincluster.serving.runner import BlockRunner, SpanInputs
from fincluster.serving.sessions import Session, SessionManager
from fincluster.serving.span_model import BlockSpan
from fincluster.trust.tls import peer_identity
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import decode, encode

log = structlog.get_logger(__name__)
T = TypeVar("T")


def span_from_wire(span: pb.BlockSpan) -> BlockSpan:
    try:
        return BlockSpan(span.start, span.end)
    except ValueError as error:
        raise RemoteError(str(error), code="OUT_OF_RANGE") from None


def inputs_from_wire(message: pb.SpanInputs) -> SpanInputs:
    return SpanInputs(
        hidden_states=decode(message.hidden_states, name="hidden_states"),
        attention_mask=decode(message.attention_mask, name="attention_mask"),
        position_ids=decode(message.position_ids, name="position_ids"),
    )


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with ``code``; ``context.abort`` raises, the line after it only makes that explicit."""
    context.abort(code, message)
    raise RuntimeError("grpc context.abort returned")


def abort_for(context: grpc.ServicerContext, error: Exception, *, method: str) -> NoReturn:
    """Abort the RPC with the status that fits ``error``."""
    if isinstance(error, WireError):
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, CapacityError):
        abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, error.reason)
    if isinstance(error, RemoteError):
        code = getattr(
            grpc.StatusCode, error.code or "FAILED_PRECONDITION", grpc.StatusCode.FAILED_PRECONDITION
        )
        abort(context, code, error.reason)
    log.exception("request failed", method=method)
    abort(context, grpc.StatusCode.INTERNAL, "internal error")


class BlockServicer(pb_grpc.BlockServiceServicer):
    """Serves one span: stateless forward/backward and KV-cached inference streams."""

    def __init__(
        self, runner: BlockRunner, sessions: SessionManager, info: Callable[[], pb.ServerInfo]
    ) -> None:
        self._runner = runner
        self._sessions = sessions
        self._info = info

    def _call(self, context: grpc.ServicerContext, method: str, work: Callable[[], T]) -> T:
        try:
            return work()
        except Exception as error:  # mapped to a status; unexpected errors are logged with a traceback
            abort_for(context, error, method=method)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        return self._info()

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        def work() -> pb.ForwardResponse:
            output = self._runner.forward(span_from_wire(request.span), inputs_from_wire(request.inputs))
            return pb.ForwardResponse(hidden_states=encode(output))

        return self._call(context, "Forward", work)

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        def work() -> pb.BackwardResponse:
            grad = self._runner.backward(
                span_from_wire(request.span),
                inputs_from_wire(request.inputs),
                decode(request.grad_outputs, name="grad_outputs"),
            )
            return pb.BackwardResponse(grad_inputs=encode(grad))

        return self._call(context, "Backward", work)

    def Inference(
        self, request_iterator: Iterator[pb.InferenceRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferenceResponse]:
        client_id = peer_identity(context)
        session: Session | None = None
        try:
            for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        abort(
                            context,
                            grpc.StatusCode.FAILED_PRECONDITION,
                            "a session is already open on this stream",
                        )
                    session = self._call(
                        context, "Inference.open", partial(self._open, request.open, client_id)
                    )
                    yield pb.InferenceResponse(
                        opened=pb.SessionOpened(session_id=session.session_id, max_length=session.max_length)
                    )
                elif kind == "step":
                    current = self._stream_session(context, session, request.step.session_id)
                    output = self._call(
                        context, "Inference.step", partial(self._step, current, request.step.inputs)
                    )
                    yield pb.InferenceResponse(
                        step=pb.StepResult(hidden_states=encode(output), position=current.position)
                    )
                elif kind == "close":
                    current = self._stream_session(context, session, request.close.session_id)
                    self._sessions.close(current.session_id)
                    session = None
                    yield pb.InferenceResponse(closed=pb.SessionClosed(session_id=current.session_id))
                else:
                    abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty inference request")
        finally:
            if session is not None:
                self._sessions.close(session.session_id, reason="closed: stream ended")

    def _step(self, session: Session, inputs: pb.SpanInputs) -> torch.Tensor:
        return self._runner.step(session, inputs_from_wire(inputs))

    def _open(self, request: pb.OpenSession, client_id: str) -> Session:
        span = span_from_wire(request.span)
        self._runner.check_span(span)
        session = self._sessions.open(
            span, max_length=request.max_length, batch_size=request.batch_size, client_id=client_id
        )
        log.info("session opened", session=session.session_id, client=client_id, span=str(span))
        return session

    def _stream_session(
        self, context: grpc.ServicerContext, session: Session | None, session_id: str
    ) -> Session:
        if session is None or session.session_id != session_id:
            abort(
                context, grpc.StatusCode.NOT_FOUND, f"unknown or closed session {session_id!r} on this stream"
            )
        if session.closed_reason is not None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"session {session_id} {session.closed_reason}")
        return self._call(context, "Inference", lambda: self._sessions.get(session_id))
