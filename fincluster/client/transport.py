"""The one seam where activations leave the client: a ``SpanClient`` per hop.

``GrpcSpanClient`` talks to a block server over mTLS; ``LocalSpanClient`` runs a ``SpanModel`` in this
process (local blocks, and fast in-process tests). Both speak in ``SpanInputs`` and tensors.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fincluster.audit import Receipt, verify_receipt
from fincluster.errors import AuditIntegrityError, CapacityError, RemoteError, SessionError, TrustError
from fincluster.serving.runner import BlockRunner, SpanInputs
from fincluster.serving.sessions import Session
from fincluster.serving.span_model import BlockSpan, SpanModel
from fincluster.trust.attestation import VerifiedClaims, new_nonce
from fincluster.trust.enforcement import CertificateCheck, check_possession
from fincluster.trust.pki import certificate_fingerprint
from fincluster.trust.policy import Decision
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import decode, digest, encode

T = TypeVar("T")


class SpanSessionClient(Protocol):
    session_id: str

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor: ...

    def close(self) -> None: ...


class SpanClient(Protocol):
    """One hop. ``request_id`` is shared by the hops of one pass, ``session_id`` by those of a session."""

    node_id: str
    span: BlockSpan

    def forward(self, inputs: SpanInputs, *, request_id: str) -> torch.Tensor: ...

    def backward(
        self, inputs: SpanInputs, grad_outputs: torch.Tensor, *, request_id: str
    ) -> torch.Tensor: ...

    def open_session(self, *, max_length: int, batch_size: int, session_id: str) -> SpanSessionClient: ...


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


@dataclass(frozen=True)
class NodeBinding:
    """What routing concluded about the node: its verified claims and the policy decision."""

    node_id: str
    claims: VerifiedClaims | None
    decision: Decision | None


@dataclass(frozen=True)
class CallRecord:
    """One completed call as the client saw it, receipt checked: what the audit trail records."""

    operation: str
    session_id: str
    request_id: str
    step: int
    num_tokens: int
    input_sha256: str
    output_sha256: str
    receipt: Receipt


CallObserver = Callable[["GrpcSpanClient", CallRecord], None]


class GrpcSpanSession:
    """One inference stream: open (with a possession challenge) → steps → close, answered in order."""

    def __init__(self, client: GrpcSpanClient, *, max_length: int, batch_size: int, session_id: str) -> None:
        self._client = client
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue()
        self._responses: Iterator[pb.InferenceResponse] = client.stub.Inference(
            iter(self._requests.get, None)
        )
        self.session_id = session_id
        self.steps = 0
        nonce = new_nonce()
        open_request = pb.OpenSession(
            span=client.wire_span,
            max_length=max_length,
            batch_size=batch_size,
            request_id=session_id,
            nonce=nonce,
            classification=client.classification,
            session_id=session_id,
        )
        opened = self._exchange(pb.InferenceRequest(open=open_request), "opened").opened
        try:
            if opened.session_id != session_id:
                raise TrustError(f"{client.node_id} opened session {opened.session_id!r}, not {session_id!r}")
            client.accept_proof(opened.proof, nonce=nonce, session_id=session_id)
        except TrustError:
            self.close()
            raise

    def _exchange(self, request: pb.InferenceRequest, expected: str) -> pb.InferenceResponse:
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as error:
            self._requests.put(None)
            raise remote_error(
                error, node_id=self._client.node_id, span=self._client.span, session_id=self.session_id
            ) from None
        if response.WhichOneof("kind") != expected:
            raise RemoteError(f"server answered {response.WhichOneof('kind')!r} to {expected!r}")
        return response

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor:
        """Send new tokens' hidden states (``replay``: inputs re-sent to rebuild a replacement's cache)."""
        wire_inputs = inputs_to_wire(inputs)
        request = pb.SessionStep(session_id=self.session_id, inputs=wire_inputs, step=self.steps)
        result = self._exchange(pb.InferenceRequest(step=request), "step").step
        operation = "replay" if replay else "inference_step"
        self._client.observe(
            operation,
            self.session_id,
            self.session_id,
            self.steps,
            wire_inputs,
            result.hidden_states,
            result.receipt,
        )
        self.steps += 1
        return decode(result.hidden_states, name="hidden_states")

    def close(self) -> None:
        try:
            self._exchange(pb.InferenceRequest(close=pb.CloseSession(session_id=self.session_id)), "closed")
        except RemoteError:
            pass  # the server already dropped the session; nothing is left to free
        finally:
            self._requests.put(None)


class GrpcSpanClient:
    """Calls to one server's span over an mTLS channel, for one request's classification.

    Before the first activation is sent, the server must prove possession of the key of a valid swarm
    certificate for its identity (and, for an attested node, of the attested key). Every receipt must be
    signed by that key over the exact digests of what was sent and received. Anything else raises
    ``TrustError`` and nothing more is sent.
    """

    def __init__(
        self,
        record: pb.ServerRecord,
        channel: grpc.Channel,
        *,
        timeout_seconds: float,
        client_id: str,
        classification: str,
        binding: NodeBinding,
        certificates: CertificateCheck,
        observer: CallObserver | None = None,
    ) -> None:
        self.node_id = record.node_id
        self.address = record.address
        self.span = BlockSpan(record.span.start, record.span.end)
        self.wire_span = pb.BlockSpan(start=self.span.start, end=self.span.end)
        self.stub = pb_grpc.BlockServiceStub(channel)
        self.client_id = client_id
        self.classification = classification
        self.binding = binding
        self.certificates = certificates
        self.certificate: x509.Certificate | None = None
        self._cert_fingerprint: str | None = None
        self._observer = observer
        self._timeout = timeout_seconds

    @property
    def cert_fingerprint(self) -> str | None:
        return self._cert_fingerprint

    def _call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except grpc.RpcError as error:
            raise remote_error(error, node_id=self.node_id, span=self.span) from None

    def accept_proof(self, proof: pb.PossessionProof, *, nonce: bytes, session_id: str) -> None:
        """Check the server's answer to a challenge; remember its certificate."""
        self.certificate = check_possession(
            proof,
            certificates=self.certificates,
            node_id=self.node_id,
            claims=self.binding.claims,
            nonce=nonce,
            session_id=session_id,
            client_id=self.client_id,
        )
        self._cert_fingerprint = certificate_fingerprint(
            self.certificate.public_bytes(serialization.Encoding.PEM)
        )

    def _ensure_proven(self) -> None:
        if self.certificate is not None:
            return
        nonce = new_nonce()
        challenge_id = f"challenge-{nonce.hex()[:16]}"
        challenge = pb.PossessionChallenge(nonce=nonce, session_id=challenge_id)
        proof = self._call(lambda: self.stub.ProvePossession(challenge, timeout=self._timeout))
        self.accept_proof(proof, nonce=nonce, session_id=challenge_id)

    def observe(
        self,
        operation: str,
        session_id: str,
        request_id: str,
        step: int,
        sent: pb.SpanInputs,
        received: pb.Tensor,
        receipt_json: str,
    ) -> None:
        """Check the receipt against what was really sent and received, then report the call."""
        input_sha256, output_sha256 = digest(sent), digest(received)
        receipt = self._checked_receipt(receipt_json, session_id, step, input_sha256, output_sha256)
        if self._observer is not None:
            batch, seq = list(sent.hidden_states.shape)[:2]
            record = CallRecord(
                operation,
                session_id,
                request_id,
                step,
                int(batch * seq),
                input_sha256,
                output_sha256,
                receipt,
            )
            self._observer(self, record)

    def _checked_receipt(
        self, receipt_json: str, session_id: str, step: int, input_sha256: str, output_sha256: str
    ) -> Receipt:
        if self.certificate is None:
            raise TrustError(f"receipt from {self.node_id} before it proved its key")
        try:
            receipt = Receipt.model_validate_json(receipt_json)
            verify_receipt(receipt, self.certificate.public_key())  # type: ignore[arg-type]
        except (ValueError, AuditIntegrityError) as error:
            raise TrustError(f"invalid receipt from {self.node_id}: {error}") from None
        body = receipt.body
        expected = (
            session_id,
            step,
            self.span.start,
            self.span.end,
            input_sha256,
            output_sha256,
            self.node_id,
        )
        got = (
            body.session_id,
            body.step,
            body.block_span.start,
            body.block_span.end,
            body.input_sha256,
            body.output_sha256,
            body.node_id,
        )
        if got != expected:
            raise TrustError(f"receipt from {self.node_id} does not match the transfer: {got} != {expected}")
        return receipt

    def info(self) -> pb.ServerInfo:
        info: pb.ServerInfo = self._call(lambda: self.stub.Info(pb.InfoRequest(), timeout=self._timeout))
        return info

    def forward(self, inputs: SpanInputs, *, request_id: str) -> torch.Tensor:
        self._ensure_proven()
        wire_inputs = inputs_to_wire(inputs)
        request = pb.ForwardRequest(
            span=self.wire_span, inputs=wire_inputs, request_id=request_id, classification=self.classification
        )
        response = self._call(lambda: self.stub.Forward(request, timeout=self._timeout))
        self.observe(
            "forward", request_id, request_id, 0, wire_inputs, response.hidden_states, response.receipt
        )
        return decode(response.hidden_states, name="hidden_states")

    def backward(self, inputs: SpanInputs, grad_outputs: torch.Tensor, *, request_id: str) -> torch.Tensor:
        self._ensure_proven()
        wire_inputs = inputs_to_wire(inputs)
        request = pb.BackwardRequest(
            span=self.wire_span,
            inputs=wire_inputs,
            grad_outputs=encode(grad_outputs),
            request_id=request_id,
            classification=self.classification,
        )
        response = self._call(lambda: self.stub.Backward(request, timeout=self._timeout))
        self.observe(
            "backward", request_id, request_id, 0, wire_inputs, response.grad_inputs, response.receipt
        )
        return decode(response.grad_inputs, name="grad_inputs")

    def open_session(self, *, max_length: int, batch_size: int, session_id: str) -> GrpcSpanSession:
        return GrpcSpanSession(self, max_length=max_length, batch_size=batch_size, session_id=session_id)


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
    """Blocks computed in the client's own process: their activations never leave it."""

    def __init__(self, model: SpanModel, *, node_id: str = "local") -> None:
        self.node_id = node_id
        self.span = model.span
        self._runner = BlockRunner(model)
        self._model = model

    def forward(self, inputs: SpanInputs, *, request_id: str) -> torch.Tensor:
        return self._runner.forward(self.span, inputs)

    def backward(self, inputs: SpanInputs, grad_outputs: torch.Tensor, *, request_id: str) -> torch.Tensor:
        return self._runner.backward(self.span, inputs, grad_outputs)

    def open_session(self, *, max_length: int, batch_size: int, session_id: str) -> LocalSpanSession:
        session = Session(
            session_id=session_id,
            span=self.span,
            max_length=max_length,
            batch_size=batch_size,
            reserved_bytes=0,
            cache=self._model.new_cache(),
            client_id="local",
            last_used=time.monotonic(),
        )
        return LocalSpanSession(self._runner, session)
