"""The one seam where activations leave the client: a ``SpanClient`` per hop.

``GrpcSpanClient`` talks to a block server over mTLS; ``fincluster.serving.local.LocalSpanClient``
runs a span in this process (local blocks, and fast in-process tests). Both speak in ``SpanInputs``
and tensors. Every call a gRPC span client completes is reported to its observer as a
:class:`CallRecord` that carries the hop's identity, so the audit trail needs nothing else.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
import torch
from cryptography import x509

from fincluster.audit import verify_receipt
from fincluster.audit.signing import PublicKey
from fincluster.errors import AuditIntegrityError, RemoteError, TrustError, TrustReason
from fincluster.net import explain_connection_failure
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import VerifiedClaims, new_nonce
from fincluster.trust.enforcement import CertificateCheck, check_possession
from fincluster.trust.policy import Decision
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.codec import SpanInputs, inputs_to_wire, span_to_wire, wire_tokens
from fincluster.wire.status import remote_error
from fincluster.wire.tensors import decode, digest, encode

T = TypeVar("T")


class SpanSessionClient(Protocol):
    session_id: str

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor: ...

    def close(self) -> None: ...


class SpanClient(Protocol):
    """One hop. ``session_id`` is shared by the hops of one pass or one inference session."""

    node_id: str
    span: BlockSpan

    def forward(self, inputs: SpanInputs, *, session_id: str) -> torch.Tensor: ...

    def backward(
        self, inputs: SpanInputs, grad_outputs: torch.Tensor, *, session_id: str
    ) -> torch.Tensor: ...

    def open_session(self, *, max_length: int, batch_size: int, session_id: str) -> SpanSessionClient: ...


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
    step: int
    node_id: str
    span: BlockSpan
    binding: NodeBinding
    cert_fingerprint: str
    num_tokens: int
    input_sha256: str
    output_sha256: str
    receipt: pb.Receipt


CallObserver = Callable[[CallRecord], None]


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
            span=span_to_wire(client.span),
            max_length=max_length,
            batch_size=batch_size,
            nonce=nonce,
            classification=client.classification,
            session_id=session_id,
        )
        opened = self._exchange(pb.InferenceRequest(open=open_request), "opened").opened
        try:
            if opened.session_id != session_id:
                raise TrustError(
                    TrustReason.MALFORMED,
                    f"opened session {opened.session_id!r}, not {session_id!r}",
                    node_id=client.node_id,
                )
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
            raise self._client.error_of(error, session_id=self.session_id) from None
        if response.WhichOneof("kind") != expected:
            raise RemoteError(
                f"server answered {response.WhichOneof('kind')!r} to {expected!r}",
                node_id=self._client.node_id,
                span=self._client.span,
                session_id=self.session_id,
            )
        return response

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor:
        """Send new tokens' hidden states (``replay``: inputs re-sent to rebuild a replacement's cache)."""
        wire_inputs = inputs_to_wire(inputs)
        request = pb.SessionStep(session_id=self.session_id, inputs=wire_inputs, step=self.steps)
        result = self._exchange(pb.InferenceRequest(step=request), "step").step
        self._client.observe(
            "replay" if replay else "inference_step",
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
        self.stub = pb_grpc.BlockServiceStub(channel)
        self.client_id = client_id
        self.classification = classification
        self.binding = binding
        self.certificates = certificates
        self.certificate: x509.Certificate | None = None
        self._observer = observer
        self._timeout = timeout_seconds

    def error_of(self, error: grpc.RpcError, *, session_id: str | None = None) -> RemoteError:
        """The fincluster error for a failed call to this node, with its context."""
        code = error.code()
        details = error.details() or code.name
        if code is grpc.StatusCode.UNAVAILABLE:
            details = explain_connection_failure(details, peer="server", address=self.address) or details
        return remote_error(code, details, node_id=self.node_id, span=self.span, session_id=session_id)

    def _call(self, call: Callable[[], T], *, session_id: str | None = None) -> T:
        try:
            return call()
        except grpc.RpcError as error:
            raise self.error_of(error, session_id=session_id) from None

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
        step: int,
        sent: pb.SpanInputs,
        received: pb.Tensor,
        receipt: pb.Receipt,
    ) -> None:
        """Check the receipt against what was really sent and received, then report the call."""
        input_sha256, output_sha256 = digest(sent), digest(received)
        body = self._checked_receipt(receipt, session_id, step, input_sha256, output_sha256)
        if self._observer is not None:
            self._observer(
                CallRecord(
                    operation=operation,
                    session_id=session_id,
                    step=step,
                    node_id=self.node_id,
                    span=self.span,
                    binding=self.binding,
                    cert_fingerprint=body.cert_fingerprint,
                    num_tokens=wire_tokens(sent),
                    input_sha256=input_sha256,
                    output_sha256=output_sha256,
                    receipt=receipt,
                )
            )

    def _checked_receipt(
        self, receipt: pb.Receipt, session_id: str, step: int, input_sha256: str, output_sha256: str
    ) -> pb.ReceiptBody:
        if self.certificate is None:
            raise TrustError(
                TrustReason.BAD_RECEIPT, "receipt before the node proved its key", node_id=self.node_id
            )
        public_key: PublicKey = self.certificate.public_key()  # type: ignore[assignment]
        try:
            body = verify_receipt(receipt, public_key)
        except AuditIntegrityError as error:
            raise TrustError(TrustReason.BAD_RECEIPT, str(error), node_id=self.node_id) from None
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
            body.span.start,
            body.span.end,
            body.input_sha256,
            body.output_sha256,
            body.node_id,
        )
        if got != expected:
            raise TrustError(
                TrustReason.BAD_RECEIPT,
                f"receipt does not match the transfer: {got} != {expected}",
                node_id=self.node_id,
            )
        if not body.cert_fingerprint.startswith("sha256:"):
            raise TrustError(TrustReason.BAD_RECEIPT, "receipt names no certificate", node_id=self.node_id)
        return body

    def info(self) -> pb.ServerInfo:
        info: pb.ServerInfo = self._call(lambda: self.stub.Info(pb.InfoRequest(), timeout=self._timeout))
        return info

    def forward(self, inputs: SpanInputs, *, session_id: str) -> torch.Tensor:
        self._ensure_proven()
        wire_inputs = inputs_to_wire(inputs)
        request = pb.ForwardRequest(
            span=span_to_wire(self.span),
            inputs=wire_inputs,
            session_id=session_id,
            classification=self.classification,
        )
        response = self._call(
            lambda: self.stub.Forward(request, timeout=self._timeout), session_id=session_id
        )
        self.observe("forward", session_id, 0, wire_inputs, response.hidden_states, response.receipt)
        return decode(response.hidden_states, name="hidden_states")

    def backward(self, inputs: SpanInputs, grad_outputs: torch.Tensor, *, session_id: str) -> torch.Tensor:
        self._ensure_proven()
        wire_inputs = inputs_to_wire(inputs)
        request = pb.BackwardRequest(
            span=span_to_wire(self.span),
            inputs=wire_inputs,
            grad_outputs=encode(grad_outputs),
            session_id=session_id,
            classification=self.classification,
        )
        response = self._call(
            lambda: self.stub.Backward(request, timeout=self._timeout), session_id=session_id
        )
        self.observe("backward", session_id, 0, wire_inputs, response.grad_inputs, response.receipt)
        return decode(response.grad_inputs, name="grad_inputs")

    def open_session(self, *, max_length: int, batch_size: int, session_id: str) -> GrpcSpanSession:
        return GrpcSpanSession(self, max_length=max_length, batch_size=batch_size, session_id=session_id)
