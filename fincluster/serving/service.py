"""gRPC transport of a block server (``grpc.aio``): authenticate, admit, authorise, queue, answer.

Every handler is a coroutine, so an idle stream holds no thread. A call first passes
:class:`~fincluster.admission.Admission` (per-client and per-department limits), then the
serve policy (again during sessions), then waits for its turn on the
:class:`~fincluster.serving.scheduler.ComputeQueue`, where the computation, its encoding, digests and
receipt are made. The server's audit record is written by :class:`AuditWriter` off the response path;
if it fails, the server refuses every further call (nothing is served unrecorded).

Errors reach the caller with the status ``fincluster.wire.status`` maps them to. Policy and trust
refusals are one opaque ``PERMISSION_DENIED`` carrying only the decision id.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import grpc
import torch
from cryptography import x509
from google.protobuf.message import Message

from fincluster.admission import Admission
from fincluster.errors import (
    CertificateError,
    IdleError,
    InvalidRequestError,
    SessionError,
    TrustError,
    UnavailableError,
    WireError,
)
from fincluster.logs import get_logger
from fincluster.serving.adapters import LoadedAdapter
from fincluster.serving.batching import StepItem
from fincluster.serving.guard import ServeGuard
from fincluster.serving.runner import BlockRunner
from fincluster.serving.scheduler import ComputeQueue, Priority
from fincluster.serving.sessions import Session, SessionManager
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import MIN_NONCE_BYTES
from fincluster.trust.pki import RevocationList, spiffe_id_of
from fincluster.trust.tls import check_certificate_current, peer_certificate
from fincluster.values import Clock, utc_now
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.codec import (
    backward_input_digest,
    inputs_from_wire,
    prefixes_to_wire,
    span_from_wire,
    wire_tokens,
)
from fincluster.wire.compression import WireCompression
from fincluster.wire.status import answer_for
from fincluster.wire.tensors import decode, digest, digest_soon, encode, payload_size

log = get_logger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)
TransferHook = Callable[["Transfer"], None]
REAUTHORIZE_AFTER = timedelta(seconds=5)
"""How long a session step may rely on the last serve decision before policy is asked again."""


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
    adapter_sha256: str | None = None


@dataclass(frozen=True)
class StreamLimits:
    first_message_seconds: float
    idle_seconds: float


def checked_id(value: str, *, name: str = "session_id") -> str:
    """Session ids name receipts and audit records: 1 to 256 printable ASCII, no spaces."""
    if not 1 <= len(value) <= 256 or not all(33 <= ord(char) <= 126 for char in value):
        raise WireError(f"{name}: 1 to 256 printable ASCII characters without spaces are required")
    return value


class AuditWriter:
    """Writes the server's transfer records in order on one thread, after the responses are sent."""

    def __init__(self, hook: TransferHook | None) -> None:
        self._hook = hook
        self._queue: queue.Queue[Transfer | None] = queue.Queue()
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._write, name="audit-writer", daemon=True)
        if hook is not None:
            self._thread.start()

    def record(self, transfer: Transfer) -> None:
        if self._hook is not None:
            self._queue.put(transfer)

    def _write(self) -> None:
        while (transfer := self._queue.get()) is not None:
            try:
                if self._hook is not None:
                    self._hook(transfer)
            except Exception as error:  # fail closed: the servicer refuses every further call
                self.failure = str(error)
                log.exception("audit_write_failed", session=transfer.session_id)

    def close(self) -> None:
        """Write what is queued, then stop."""
        if self._hook is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)


class _Refused(Exception):
    """Carries the status and message a handler answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class BlockServicer(pb_grpc.BlockServiceServicer):
    """Serves one span: stateless forward/backward and KV-cached inference streams."""

    def __init__(
        self,
        runner: BlockRunner,
        sessions: SessionManager,
        guard: ServeGuard,
        info: Callable[[], pb.ServerInfo],
        *,
        compute: ComputeQueue,
        admission: Admission,
        limits: StreamLimits,
        revocations: RevocationList | None = None,
        audit: AuditWriter | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._runner = runner
        self._sessions = sessions
        self._guard = guard
        self._info = info
        self._compute = compute
        self._admission = admission
        self._limits = limits
        self._revocations = revocations
        self._audit = audit or AuditWriter(None)
        self._clock = clock

    # -- the steps of every call ---------------------------------------------------------------

    def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[str, x509.Certificate]:
        """The caller's SPIFFE id and certificate, refused if revoked or expired since the handshake."""
        try:
            certificate = peer_certificate(context)  # type: ignore[arg-type]
            self._check_peer(certificate)
            return spiffe_id_of(certificate), certificate
        except (CertificateError, TrustError) as error:
            log.warning("peer_rejected", peer=context.peer(), reason=str(error))
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "peer certificate not accepted") from None

    def _check_peer(self, certificate: x509.Certificate) -> None:
        check_certificate_current(certificate, self._revocations, now=self._clock())

    def _ready(self) -> None:
        if self._audit.failure is not None:  # fail closed: no record, no service
            raise UnavailableError("server audit log unavailable")

    async def _answer(self, context: grpc.aio.ServicerContext, method: str, work: Awaitable[T]) -> T:
        """Await ``work``, mapping any error to the status the caller gets."""
        try:
            return await work
        except _Refused as refused:
            await context.abort(refused.code, refused.message)
        except Exception as error:
            await context.abort(*answer_for(error, method=method))
        raise AssertionError("context.abort returned")  # pragma: no cover - grpc always raises

    def _authorized_span(
        self, message: pb.BlockSpan, *, client_id: str, classification: str, session_id: str | None
    ) -> BlockSpan:
        span = span_from_wire(message)
        self._runner.check_span(span)
        self._guard.authorize(client_id, classification, span, session_id=session_id)
        return span

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
        output: Message,
        adapter: LoadedAdapter | None,
        input_sha256: str | None = None,
    ) -> Transfer:
        """Digest what was received (unless ``input_sha256`` is that digest: made while computing, or
        more than ``inputs``, a backward's incoming gradient too) and returned, and sign the receipt
        for it, naming the adapter applied."""
        input_sha256 = digest(inputs) if input_sha256 is None else input_sha256
        output_sha256 = digest(output)
        adapter_sha256 = adapter.digest if adapter is not None else None
        receipt = self._guard.receipt(
            session_id=session_id,
            step=step,
            span=span,
            input_sha256=input_sha256,
            output_sha256=output_sha256,
            adapter_sha256=adapter_sha256 or "",
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
            adapter_sha256=adapter_sha256,
        )

    # -- unary calls ---------------------------------------------------------------------------

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        async def work() -> pb.ServerInfo:
            client_id, _ = self._authenticate(context)
            with self._admission.call(client_id):
                return self._info()

        return await self._answer(context, "Info", work())

    async def ProvePossession(
        self, request: pb.PossessionChallenge, context: grpc.aio.ServicerContext
    ) -> pb.PossessionProof:
        async def work() -> pb.PossessionProof:
            client_id, _ = self._authenticate(context)
            with self._admission.call(client_id):
                return self._guard.prove(
                    nonce=request.nonce, session_id=request.session_id, client_id=client_id
                )

        return await self._answer(context, "ProvePossession", work())

    async def _stateless(
        self,
        context: grpc.aio.ServicerContext,
        request: pb.ForwardRequest | pb.BackwardRequest,
        operation: str,
        compute: Callable[[BlockSpan, LoadedAdapter | None], M],
        input_sha256: str | None = None,
        recorded: Callable[[M], Message] = lambda output: output,
    ) -> tuple[M, pb.Receipt]:
        """One forward or backward call: authorise, queue, compute (with the adapter the request names)
        and sign; record after answering. ``recorded``: the part of the computed response that the
        receipt and the audit digest as the output (default: all of it)."""

        async def work() -> tuple[M, pb.Receipt]:
            client_id, _ = self._authenticate(context)
            self._ready()
            with self._admission.call(client_id):
                session_id = checked_id(request.session_id)
                span = self._authorized_span(
                    request.span,
                    client_id=client_id,
                    classification=request.classification,
                    session_id=session_id,
                )
                tokens = wire_tokens(request.inputs)
                self._admission.charge(client_id, tokens * len(span))

                def job() -> tuple[M, Transfer]:
                    # hashed while computing (a backward's digest covers its incoming gradient too)
                    received_digest = (
                        digest_soon(request.inputs, payload_bytes=payload_size(request.inputs.hidden_states))
                        if input_sha256 is None
                        else None
                    )
                    adapter = self._runner.adapters.resolve(request.adapter_id)
                    output = compute(span, adapter)
                    transfer = self._transfer(
                        session_id=session_id,
                        step=0,
                        operation=operation,
                        span=span,
                        client_id=client_id,
                        classification=request.classification,
                        inputs=request.inputs,
                        output=recorded(output),
                        adapter=adapter,
                        input_sha256=received_digest() if received_digest is not None else input_sha256,
                    )
                    return output, transfer

                output, transfer = await self._compute.run(
                    job, client=client_id, tokens=tokens, priority=Priority.BATCH
                )
                self._audit.record(transfer)
                return output, transfer.receipt

        return await self._answer(context, operation, work())

    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardResponse:

        def compute(span: BlockSpan, adapter: LoadedAdapter | None) -> pb.ForwardResponse:
            response = pb.ForwardResponse()  # filled in place: the activations are copied once
            runner = self._runner  # decoded straight onto the span's device
            inputs = inputs_from_wire(request.inputs, device=runner.model.device)
            hidden = runner.forward(span, inputs, adapter=adapter)
            encode(hidden, into=response.hidden_states)
            return response

        response, receipt = await self._stateless(
            context, request, "forward", compute, recorded=lambda response: response.hidden_states
        )
        response.receipt.CopyFrom(receipt)
        return response

    async def Backward(
        self, request: pb.BackwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.BackwardResponse:

        def compute(span: BlockSpan, adapter: LoadedAdapter | None) -> pb.BackwardResponse:
            grads = self._runner.backward(
                span,
                inputs_from_wire(request.inputs, device=self._runner.model.device),
                decode(request.grad_outputs, name="grad_outputs", device=self._runner.model.device),
                adapter=adapter,
            )
            response = pb.BackwardResponse()
            encode(grads.inputs, into=response.grad_inputs)
            if grads.prefixes is not None:
                prefixes_to_wire(grads.prefixes, into=response.grad_prefixes)
            return response  # its digest (no receipt yet) is the receipt's output digest

        output, receipt = await self._stateless(
            context,
            request,
            "backward",
            compute,
            input_sha256=backward_input_digest(request.inputs, request.grad_outputs),
        )
        output.receipt.CopyFrom(receipt)
        return output

    # -- inference streams ---------------------------------------------------------------------

    async def Inference(
        self, request_iterator: AsyncIterator[pb.InferenceRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferenceResponse]:
        with contextlib.ExitStack() as held:
            try:
                client_id, certificate = self._authenticate(context)
                held.enter_context(self._admission.stream(client_id))
            except _Refused as refused:
                await context.abort(refused.code, refused.message)
            except Exception as error:
                await context.abort(*answer_for(error, method="Inference"))
            stream = _Stream(self, context, client_id, certificate)
            try:
                async for response in stream.run(request_iterator):
                    yield response
            finally:
                stream.end()


class _Stream:
    """One inference stream: open, then steps, then close, each message read with a deadline."""

    def __init__(
        self,
        servicer: BlockServicer,
        context: grpc.aio.ServicerContext,
        client_id: str,
        certificate: x509.Certificate,
    ) -> None:
        self.servicer = servicer
        self.context = context
        self.client_id = client_id
        self.certificate = certificate
        self.session: Session | None = None
        self.classification = ""
        self.authorized_until: datetime | None = None

    async def _next(self, iterator: AsyncIterator[pb.InferenceRequest]) -> pb.InferenceRequest | None:
        limits = self.servicer._limits
        timeout = limits.first_message_seconds if self.session is None else limits.idle_seconds
        try:
            return await asyncio.wait_for(anext(iterator), timeout)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if self.session is None:
                raise IdleError(f"no request within {timeout:g} s of opening the stream") from None
            reason = f"expired after {timeout:g} s idle"
            self.servicer._sessions.close(self.session.session_id, reason=reason)
            self.session = None
            raise SessionError(f"session {reason}") from None

    async def run(self, iterator: AsyncIterator[pb.InferenceRequest]) -> AsyncIterator[pb.InferenceResponse]:
        servicer = self.servicer
        while True:
            kind: str | None = "read"
            try:
                request = await self._next(iterator)
                if request is None:
                    return
                kind = request.WhichOneof("kind")
                servicer._ready()
                if kind == "open":
                    response = await self._open(request.open)
                elif kind == "step":
                    response, transfer = await self._step(request.step)
                    yield response
                    servicer._audit.record(transfer)
                    continue
                elif kind == "close":
                    response = self._close(request.close)
                else:
                    raise InvalidRequestError("empty inference request")
            except _Refused as refused:
                await self.context.abort(refused.code, refused.message)
            except Exception as error:
                await self.context.abort(*answer_for(error, method=f"Inference.{kind}"))
            yield response

    async def _open(self, request: pb.OpenSession) -> pb.InferenceResponse:
        servicer = self.servicer
        if self.session is not None:
            raise InvalidRequestError("a session is already open on this stream")
        # the client chooses the id (one id on every hop); without one the server picks it
        session_id = checked_id(request.session_id) if request.session_id else None
        span = servicer._authorized_span(
            request.span,
            client_id=self.client_id,
            classification=request.classification,
            session_id=session_id,
        )
        if len(request.nonce) < MIN_NONCE_BYTES:
            raise WireError(f"nonce: at least {MIN_NONCE_BYTES} fresh random bytes are required")
        compression = WireCompression.of_wire(request.compression)
        adapter = await asyncio.to_thread(servicer._runner.adapters.resolve, request.adapter_id)
        session = await asyncio.to_thread(
            servicer._sessions.open,
            span,
            max_length=request.max_length,
            batch_size=request.batch_size,
            client_id=self.client_id,
            session_id=session_id,
        )
        session.compression = compression
        session.adapter = adapter
        self.session, self.classification = session, request.classification
        self.authorized_until = self._authorized_until()
        log.info("session_opened", session=session.session_id, client=self.client_id, blocks=str(span))
        proof = servicer._guard.prove(
            nonce=request.nonce, session_id=session.session_id, client_id=self.client_id
        )
        return pb.InferenceResponse(
            opened=pb.SessionOpened(
                session_id=session.session_id,
                max_length=session.max_length,
                proof=proof,
                compression=compression.wire,
            )
        )

    def _current(self, session_id: str) -> Session:
        session = self.session
        if session is None or session.session_id != session_id:
            raise SessionError(f"unknown or closed session {session_id!r} on this stream")
        if session.closed_reason is not None:
            raise SessionError(f"session {session.closed_reason}", session_id=session_id)
        return self.servicer._sessions.get(session_id)

    def _reauthorize(self, session: Session) -> None:
        """Authorisation holds for every step: the peer's certificate (revocation, expiry) each time,
        and the serve decision again once the last one is a few seconds old."""
        try:
            self.servicer._check_peer(self.certificate)
        except TrustError as error:
            log.warning("peer_rejected", session=session.session_id, reason=str(error))
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "peer certificate not accepted") from None
        if self.authorized_until is None or self.servicer._clock() >= self.authorized_until:
            self.servicer._guard.authorize(
                self.client_id, self.classification, session.span, session_id=session.session_id
            )
            self.authorized_until = self._authorized_until()

    def _authorized_until(self) -> datetime:
        """When the last serve decision must be made again: a few seconds on, or when this server's own
        attestation expires (whichever comes first), on the trust context's clock."""
        until = self.servicer._clock() + REAUTHORIZE_AFTER
        claims = self.servicer._guard.own_claims
        return min(until, claims.expires_at) if claims is not None else until

    async def _step(self, request: pb.SessionStep) -> tuple[pb.InferenceResponse, Transfer]:
        servicer = self.servicer
        session = self._current(request.session_id)
        self._reauthorize(session)
        tokens = wire_tokens(request.inputs)
        servicer._admission.charge(self.client_id, tokens * len(session.span))

        received_digest = digest_soon(  # hashed while the step waits and runs
            request.inputs, payload_bytes=payload_size(request.inputs.hidden_states)
        )

        def finish(hidden: torch.Tensor) -> tuple[pb.InferenceResponse, Transfer]:
            response = pb.InferenceResponse()  # filled in place: the activations are copied once
            output = encode(hidden, session.compression, into=response.step.hidden_states)
            transfer = servicer._transfer(
                session_id=session.session_id,
                step=request.step,
                operation="inference_step",
                span=session.span,
                client_id=self.client_id,
                classification=self.classification,
                inputs=request.inputs,
                output=output,
                input_sha256=received_digest(),
                adapter=session.adapter,
            )
            response.step.position = session.position
            response.step.receipt.CopyFrom(transfer.receipt)
            return response, transfer

        def job() -> tuple[pb.InferenceResponse, Transfer]:
            return finish(servicer._runner.step(session, inputs_from_wire(request.inputs)))

        shape = request.inputs.hidden_states.shape
        batch = (
            (session.span, StepItem(session, request.inputs, finish))
            if len(shape) == 3 and servicer._runner.batchable(session, int(shape[1]))
            else None
        )
        return await servicer._compute.run(
            job, client=self.client_id, tokens=tokens, priority=Priority.INTERACTIVE, batch=batch
        )

    def _close(self, request: pb.CloseSession) -> pb.InferenceResponse:
        session = self._current(request.session_id)
        self.servicer._sessions.close(session.session_id)
        self.session = None
        return pb.InferenceResponse(closed=pb.SessionClosed(session_id=session.session_id))

    def end(self) -> None:
        if self.session is not None:
            self.servicer._sessions.close(
                self.session.session_id, reason="closed: the stream ended without a close"
            )
            self.session = None
