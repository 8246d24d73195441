"""gRPC transport of a block server: decode, authorise, call the runner, sign a receipt, encode.

Errors reach the caller with the status that ``fincluster.wire.status`` maps them to, and a message
saying what was wrong. Policy and trust refusals are one opaque ``PERMISSION_DENIED`` carrying only the
decision id; their reasons go to the local log and the audit trail. Anything unexpected is logged here
and the caller gets an opaque ``INTERNAL``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import grpc
import structlog
import torch

from fincluster.errors import InvalidRequestError, SessionError, UnavailableError, WireError
from fincluster.serving.guard import ServeGuard
from fincluster.serving.runner import BlockRunner
from fincluster.serving.sessions import Session, SessionManager
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import MIN_NONCE_BYTES
from fincluster.trust.tls import peer_identity
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.codec import inputs_from_wire, span_from_wire, wire_tokens
from fincluster.wire.status import abort_for
from fincluster.wire.tensors import decode, digest, encode

log = structlog.get_logger(__name__)
T = TypeVar("T")
TransferHook = Callable[["Transfer"], None]


@dataclass(frozen=True)
class Transfer:
    """What the server received and returned in one call, with the receipt it signed (its audit trail
    records exactly this receipt)."""

    session_id: str
    step: int
    operation: str
    span: BlockSpan
    client_id: str
    classification: str
    num_tokens: int
    input_sha256: str
    output_sha256: str
    receipt: pb.Receipt


def checked_id(value: str, *, name: str = "session_id") -> str:
    """Session ids name receipts and audit records: 1 to 256 printable ASCII, no spaces."""
    if not 1 <= len(value) <= 256 or not all(33 <= ord(char) <= 126 for char in value):
        raise WireError(f"{name}: 1 to 256 printable ASCII characters without spaces are required")
    return value


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
        try:
            if self._audit_failure is not None:  # fail closed: no record, no service
                raise UnavailableError("server audit log unavailable")
            return work()
        except Exception as error:  # mapped to a status; unexpected errors are logged with a traceback
            abort_for(context, error, method=method)

    def _transfer(
        self,
        *,
        session_id: str,
        step: int,
        operation: str,
        span: BlockSpan,
        client_id: str,
        classification: str,
        inputs: pb.SpanInputs,
        output: pb.Tensor,
    ) -> Transfer:
        """Digest what was received and returned, and sign the receipt for it."""
        input_sha256, output_sha256 = digest(inputs), digest(output)
        receipt = self._guard.receipt(
            session_id=session_id,
            step=step,
            span=span,
            input_sha256=input_sha256,
            output_sha256=output_sha256,
        )
        return Transfer(
            session_id=session_id,
            step=step,
            operation=operation,
            span=span,
            client_id=client_id,
            classification=classification,
            num_tokens=wire_tokens(inputs),
            input_sha256=input_sha256,
            output_sha256=output_sha256,
            receipt=receipt,
        )

    def _record(self, transfer: Transfer) -> None:
        """Write the server's record of a transfer once its response is on the way (off the critical
        path). If that fails, the server stops serving until restarted: no call goes unrecorded."""
        if self._on_transfer is None:
            return
        try:
            self._on_transfer(transfer)
        except Exception as error:
            self._audit_failure = str(error)
            log.exception("audit_write_failed", session=transfer.session_id)

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

    def _authorized_span(
        self, message: pb.BlockSpan, *, client_id: str, classification: str, session_id: str | None
    ) -> BlockSpan:
        span = span_from_wire(message)
        self._runner.check_span(span)
        self._guard.authorize(client_id, classification, span, session_id=session_id)
        return span

    def _stateless(
        self,
        context: grpc.ServicerContext,
        request: pb.ForwardRequest | pb.BackwardRequest,
        operation: str,
        compute: Callable[[BlockSpan], torch.Tensor],
    ) -> tuple[pb.Tensor, pb.Receipt]:
        """One forward or backward call: authorise, compute, sign; the record is written once the
        response is on its way."""
        client_id = peer_identity(context)

        def work() -> tuple[pb.Tensor, pb.Receipt]:
            session_id = checked_id(request.session_id)
            span = self._authorized_span(
                request.span,
                client_id=client_id,
                classification=request.classification,
                session_id=session_id,
            )
            output = encode(compute(span))
            transfer = self._transfer(
                session_id=session_id,
                step=0,
                operation=operation,
                span=span,
                client_id=client_id,
                classification=request.classification,
                inputs=request.inputs,
                output=output,
            )
            context.add_callback(partial(self._record, transfer))
            return output, transfer.receipt

        return self._call(context, operation, work)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        output, receipt = self._stateless(
            context,
            request,
            "forward",
            lambda span: self._runner.forward(span, inputs_from_wire(request.inputs)),
        )
        return pb.ForwardResponse(hidden_states=output, receipt=receipt)

    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        output, receipt = self._stateless(
            context,
            request,
            "backward",
            lambda span: self._runner.backward(
                span, inputs_from_wire(request.inputs), decode(request.grad_outputs, name="grad_outputs")
            ),
        )
        return pb.BackwardResponse(grad_inputs=output, receipt=receipt)

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
                        abort_for(
                            context,
                            InvalidRequestError("a session is already open on this stream"),
                            method="Inference.open",
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
                    transfer = self._call(
                        context,
                        "Inference.step",
                        partial(
                            self._transfer,
                            session_id=current.session_id,
                            step=request.step.step,
                            operation="inference_step",
                            span=current.span,
                            client_id=client_id,
                            classification=classification,
                            inputs=request.step.inputs,
                            output=encoded,
                        ),
                    )
                    try:
                        yield pb.InferenceResponse(
                            step=pb.StepResult(
                                hidden_states=encoded, position=current.position, receipt=transfer.receipt
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
                    abort_for(context, InvalidRequestError("empty inference request"), method="Inference")
        finally:
            if session is not None:
                self._sessions.close(session.session_id, reason="closed: the stream ended without a close")

    def _step(self, session: Session, inputs: pb.SpanInputs) -> torch.Tensor:
        return self._runner.step(session, inputs_from_wire(inputs))

    def _open(self, request: pb.OpenSession, client_id: str) -> Session:
        # the client chooses the id (one id on every hop); without one the server picks it
        session_id = checked_id(request.session_id) if request.session_id else None
        span = self._authorized_span(
            request.span, client_id=client_id, classification=request.classification, session_id=session_id
        )
        if len(request.nonce) < MIN_NONCE_BYTES:
            raise WireError(f"nonce: at least {MIN_NONCE_BYTES} fresh random bytes are required")
        session = self._sessions.open(
            span,
            max_length=request.max_length,
            batch_size=request.batch_size,
            client_id=client_id,
            session_id=session_id,
        )
        log.info("session_opened", session=session.session_id, client=client_id, blocks=str(span))
        return session

    def _stream_session(
        self, context: grpc.ServicerContext, session: Session | None, session_id: str
    ) -> Session:
        def current() -> Session:
            if session is None or session.session_id != session_id:
                raise SessionError(f"unknown or closed session {session_id!r} on this stream")
            if session.closed_reason is not None:
                raise SessionError(f"session {session.closed_reason}", session_id=session_id)
            return self._sessions.get(session_id)

        return self._call(context, "Inference", current)
