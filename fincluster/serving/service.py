"""gRPC transport of a block server: decode, authorise, call the runner, sign a receipt, encode.

Validation failures reach the caller as INVALID_ARGUMENT / OUT_OF_RANGE / NOT_FOUND /
RESOURCE_EXHAUSTED with a message saying what was wrong. Policy and trust refusals reach the caller as
one opaque PERMISSION_DENIED; their reasons go to the local log. Anything unexpected is logged here and
the caller gets an opaque INTERNAL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import NoReturn, TypeVar

import grpc
import structlog
import torch

from fincluster.errors import CapacityError, PolicyDenied, PolicyError, RemoteError, TrustError, WireError
from fincluster.serving.guard import ServeGuard
from fincluster.serving.runner import BlockRunner, SpanInputs
from fincluster.serving.sessions import Session, SessionManager
from fincluster.serving.span_model import BlockSpan
from fincluster.trust.tls import peer_identity
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import decode, digest, encode

log = structlog.get_logger(__name__)
T = TypeVar("T")
REFUSED = "request refused by policy"
MIN_NONCE_BYTES = 16
TransferHook = Callable[["Transfer"], None]


@dataclass
class Transfer:
    """What the server received and returned in one call (for its own audit trail)."""

    session_id: str
    request_id: str
    step: int
    operation: str
    span: BlockSpan
    client_id: str
    classification: str
    num_tokens: int
    input_sha256: str
    output_sha256: str
    receipt: str = ""


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
    if isinstance(error, PolicyError | TrustError):
        reasons = error.reasons if isinstance(error, PolicyDenied) else (str(error),)
        log.warning("request refused", method=method, reasons=list(reasons))
        abort(context, grpc.StatusCode.PERMISSION_DENIED, REFUSED)
    log.exception("request failed", method=method)
    abort(context, grpc.StatusCode.INTERNAL, "internal error")


def checked_request_id(value: str, *, name: str = "request_id") -> str:
    """Request and session ids name receipts and audit records: 1 to 256 printable ASCII, no spaces."""
    if not 1 <= len(value) <= 256 or not all(33 <= ord(char) <= 126 for char in value):
        raise WireError(f"{name}: 1 to 256 printable ASCII characters without spaces are required")
    return value


def _tokens(inputs: pb.SpanInputs) -> int:
    shape = list(inputs.hidden_states.shape)
    return int(shape[0] * shape[1]) if len(shape) == 3 else 0


class BlockServicer(pb_grpc.BlockServiceServicer):
    """Serves one span: stateless forward/backward and KV-cached inference streams."""

    def __init__(
        self,
        runner: BlockRunner,
        sessions: SessionManager,
        guard: ServeGuard,
        info: Callable[[], pb.ServerInfo],
        *,
        on_transfer: TransferHook | None = None,
    ) -> None:
        self._runner = runner
        self._sessions = sessions
        self._guard = guard
        self._info = info
        self._on_transfer = on_transfer
        self._audit_failure: str | None = None

    def _call(self, context: grpc.ServicerContext, method: str, work: Callable[[], T]) -> T:
        if self._audit_failure is not None:  # fail closed: no record, no service
            abort(context, grpc.StatusCode.UNAVAILABLE, "server audit log unavailable")
        try:
            return work()
        except Exception as error:  # mapped to a status; unexpected errors are logged with a traceback
            abort_for(context, error, method=method)

    def _sign(self, transfer: Transfer) -> str:
        receipt = self._guard.receipt(
            session_id=transfer.session_id,
            step=transfer.step,
            span=transfer.span,
            input_sha256=transfer.input_sha256,
            output_sha256=transfer.output_sha256,
        )
        transfer.receipt = receipt
        return receipt

    def _record(self, transfer: Transfer) -> None:
        """Write the server's record of a transfer once its response is on the way (off the critical
        path). If that fails, the server stops serving until restarted: no call goes unrecorded."""
        if self._on_transfer is None:
            return
        try:
            self._on_transfer(transfer)
        except Exception as error:
            self._audit_failure = str(error)
            log.exception("audit write failed; refusing further calls", session=transfer.session_id)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        return self._info()

    def ProvePossession(
        self, request: pb.PossessionChallenge, context: grpc.ServicerContext
    ) -> pb.PossessionProof:
        client_id = peer_identity(context)
        return self._call(
            context,
            "ProvePossession",
            lambda: self._guard.prove(
                nonce=request.nonce, session_id=request.session_id, client_id=client_id
            ),
        )

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        client_id = peer_identity(context)

        def work() -> pb.ForwardResponse:
            span = span_from_wire(request.span)
            self._runner.check_span(span)
            self._guard.authorize(client_id, request.classification, span)
            checked_request_id(request.request_id)
            output = encode(self._runner.forward(span, inputs_from_wire(request.inputs)))
            transfer = self._transfer(
                request.request_id,
                request.request_id,
                0,
                "forward",
                span,
                client_id,
                request.classification,
                request.inputs,
                output,
            )
            receipt = self._sign(transfer)
            context.add_callback(partial(self._record, transfer))
            return pb.ForwardResponse(hidden_states=output, receipt=receipt)

        return self._call(context, "Forward", work)

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        client_id = peer_identity(context)

        def work() -> pb.BackwardResponse:
            span = span_from_wire(request.span)
            self._runner.check_span(span)
            self._guard.authorize(client_id, request.classification, span)
            checked_request_id(request.request_id)
            grad = self._runner.backward(
                span, inputs_from_wire(request.inputs), decode(request.grad_outputs, name="grad_outputs")
            )
            output = encode(grad)
            transfer = self._transfer(
                request.request_id,
                request.request_id,
                0,
                "backward",
                span,
                client_id,
                request.classification,
                request.inputs,
                output,
            )
            receipt = self._sign(transfer)
            context.add_callback(partial(self._record, transfer))
            return pb.BackwardResponse(grad_inputs=output, receipt=receipt)

        return self._call(context, "Backward", work)

    @staticmethod
    def _transfer(
        session_id: str,
        request_id: str,
        step: int,
        operation: str,
        span: BlockSpan,
        client_id: str,
        classification: str,
        inputs: pb.SpanInputs,
        output: pb.Tensor,
    ) -> Transfer:
        return Transfer(
            session_id=session_id,
            request_id=request_id,
            step=step,
            operation=operation,
            span=span,
            client_id=client_id,
            classification=classification,
            num_tokens=_tokens(inputs),
            input_sha256=digest(inputs),
            output_sha256=digest(output),
        )

    def Inference(
        self, request_iterator: Iterator[pb.InferenceRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferenceResponse]:
        client_id = peer_identity(context)
        session: Session | None = None
        classification = ""
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
                    classification = request.open.classification
                    proof = self._call(
                        context,
                        "Inference.open",
                        partial(
                            self._guard.prove,
                            nonce=request.open.nonce,
                            session_id=session.session_id,
                            client_id=client_id,
                        ),
                    )
                    opened = pb.SessionOpened(
                        session_id=session.session_id, max_length=session.max_length, proof=proof
                    )
                    yield pb.InferenceResponse(opened=opened)
                elif kind == "step":
                    current = self._stream_session(context, session, request.step.session_id)
                    output = self._call(
                        context, "Inference.step", partial(self._step, current, request.step.inputs)
                    )
                    encoded = encode(output)
                    transfer = self._transfer(
                        current.session_id,
                        current.session_id,
                        request.step.step,
                        "inference_step",
                        current.span,
                        client_id,
                        classification,
                        request.step.inputs,
                        encoded,
                    )
                    receipt = self._call(context, "Inference.step", partial(self._sign, transfer))
                    try:
                        yield pb.InferenceResponse(
                            step=pb.StepResult(
                                hidden_states=encoded, position=current.position, receipt=receipt
                            )
                        )
                    finally:
                        self._record(transfer)
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
        self._guard.authorize(client_id, request.classification, span)
        if len(request.nonce) < MIN_NONCE_BYTES:
            raise WireError(f"nonce: at least {MIN_NONCE_BYTES} fresh random bytes are required")
        session_id = checked_request_id(request.session_id, name="session_id") if request.session_id else None
        session = self._sessions.open(
            span,
            max_length=request.max_length,
            batch_size=request.batch_size,
            client_id=client_id,
            session_id=session_id,
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
