"""The one seam where activations leave the client: a ``SpanClient`` per hop.

``GrpcSpanClient`` talks to a block server over mTLS; ``fincluster.serving.local.LocalSpanClient``
runs a span in this process (local blocks, and fast in-process tests). Both speak in ``SpanInputs``
and tensors. Every call a gRPC span client completes is reported to its observer as a
:class:`CallRecord` that carries the hop's identity, so the audit trail needs nothing else.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from google.protobuf.message import Message

from fincluster.adapters.manifest import AdapterRef
from fincluster.audit import receipt_body, verify_receipt
from fincluster.audit.signing import PublicKey
from fincluster.errors import (
    AuditIntegrityError,
    InvalidResponseError,
    RemoteError,
    TrustError,
    TrustReason,
    UnavailableError,
    WireError,
)
from fincluster.net import explain_connection_failure
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import TrustTier, VerifiedClaims, new_nonce
from fincluster.trust.enforcement import CertificateCheck, check_possession
from fincluster.trust.policy import Decision
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.codec import (
    BlockPrefixes,
    SpanGradients,
    SpanInputs,
    inputs_to_wire,
    prefixes_from_wire,
    span_to_wire,
    wire_tokens,
)
from fincluster.wire.compression import WireCompression
from fincluster.wire.status import remote_error
from fincluster.wire.tensors import all_finite, decode, digest, digest_soon, encode, payload_size

T = TypeVar("T")


class SpanSessionClient(Protocol):
    session_id: str

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor: ...

    def close(self) -> None: ...


class SpanClient(Protocol):
    """One hop. ``session_id`` is shared by the hops of one pass or one inference session. ``tier``
    is the node's attested tier (None when it is not attested, e.g. blocks run by the client);
    ``adapter`` is the LoRA adapter the server applies to its blocks (None: the base weights)."""

    node_id: str
    span: BlockSpan
    tier: TrustTier | None
    compression: WireCompression
    """How hidden states of inference sessions travel (set by the client model before it opens one)."""

    def forward(
        self, inputs: SpanInputs, *, session_id: str, adapter: AdapterRef | None = None
    ) -> torch.Tensor: ...

    def backward(
        self,
        inputs: SpanInputs,
        grad_outputs: torch.Tensor,
        *,
        session_id: str,
        adapter: AdapterRef | None = None,
    ) -> SpanGradients: ...

    def open_session(
        self, *, max_length: int, batch_size: int, session_id: str, adapter: AdapterRef | None = None
    ) -> SpanSessionClient: ...


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
    receipt: pb.Receipt | None
    receipt_problem: str | None = None
    adapter_sha256: str | None = None


CallObserver = Callable[[CallRecord], None]


def _parses(receipt: pb.Receipt) -> bool:
    try:
        receipt_body(receipt)
    except AuditIntegrityError:
        return False
    return True


class GrpcSpanSession:
    """One inference stream: open (with a possession challenge) → steps → close, answered in order.

    Responses are read by a small reader thread, so that every exchange can wait at most
    ``step_timeout_seconds``: a server that hangs is treated like one that is gone.
    """

    def __init__(
        self,
        client: GrpcSpanClient,
        *,
        max_length: int,
        batch_size: int,
        session_id: str,
        adapter: AdapterRef | None = None,
    ) -> None:
        self._client = client
        self._adapter = adapter
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue()
        self._responses: queue.Queue[pb.InferenceResponse | grpc.RpcError | None] = queue.Queue()
        self._call = client.stub.Inference(iter(self._requests.get, None))
        self._ended: RemoteError | None = None  # set once the stream has failed or been abandoned
        threading.Thread(target=self._read, name="span-session-reader", daemon=True).start()
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
            compression=client.compression.wire,
            adapter_id=adapter.adapter_id if adapter is not None else "",
        )
        self.compression = client.compression
        opened = self._exchange(pb.InferenceRequest(open=open_request), "opened").opened
        try:
            if opened.compression != open_request.compression:
                raise InvalidResponseError(
                    f"server opened the session with compression {opened.compression}, "
                    f"not the {client.compression.value} asked for",
                    node_id=client.node_id,
                )
            if opened.session_id != session_id:
                raise TrustError(
                    TrustReason.MALFORMED,
                    f"opened session {opened.session_id!r}, not {session_id!r}",
                    node_id=client.node_id,
                )
            client.accept_proof(opened.proof, nonce=nonce, session_id=session_id)
        except (TrustError, InvalidResponseError):
            self.close()
            raise

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(None)
        except grpc.RpcError as error:
            self._responses.put(error)

    def _exchange(self, request: pb.InferenceRequest, expected: str) -> pb.InferenceResponse:
        if self._ended is not None:
            raise self._ended
        self._requests.put(request)
        timeout = self._client.step_timeout_seconds
        try:
            response = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise self._abandon(
                UnavailableError(f"no answer within {timeout:g} s", **self._context())
            ) from None
        if isinstance(response, grpc.RpcError):
            raise self._abandon(self._client.error_of(response, session_id=self.session_id)) from None
        if response is None or response.WhichOneof("kind") != expected:
            got = "end of stream" if response is None else repr(response.WhichOneof("kind"))
            raise self._abandon(
                InvalidResponseError(f"server answered {got} to {expected!r}", **self._context())
            )
        return response

    def _context(self) -> dict[str, Any]:
        return {"node_id": self._client.node_id, "span": self._client.span, "session_id": self.session_id}

    def _abandon(self, error: RemoteError) -> RemoteError:
        """End the stream for good: later exchanges fail at once with ``error``."""
        self._ended = error
        self._requests.put(None)
        self._call.cancel()
        return error

    def step(self, inputs: SpanInputs, *, replay: bool = False) -> torch.Tensor:
        """Send new tokens' hidden states (``replay``: inputs re-sent to rebuild a replacement's cache)."""
        self._client.check_still_trusted()
        request = pb.InferenceRequest()  # filled in place: the activations are copied once
        request.step.session_id, request.step.step = self.session_id, self.steps
        wire_inputs = inputs_to_wire(inputs, self.compression, into=request.step.inputs)
        # hashed while the server computes
        sent_digest = digest_soon(wire_inputs, payload_bytes=payload_size(wire_inputs.hidden_states))
        result = self._exchange(request, "step").step
        self._client.observe(
            "replay" if replay else "inference_step",
            self.session_id,
            self.steps,
            wire_inputs,
            result.hidden_states,
            result.receipt,
            input_sha256=sent_digest(),
            tokens=wire_inputs,
            adapter=self._adapter,
        )
        self.steps += 1
        return self._client.received(
            result.hidden_states, like=inputs.hidden_states, name="hidden_states", session_id=self.session_id
        )

    def close(self) -> None:
        if self._ended is not None:
            return  # the stream is gone, and the server's session with it
        try:
            self._exchange(pb.InferenceRequest(close=pb.CloseSession(session_id=self.session_id)), "closed")
        except RemoteError:
            pass  # the server already dropped the session (or is gone); nothing is left to free
        else:
            self._ended = RemoteError("session closed", **self._context())
            self._requests.put(None)  # end of the request stream; the server ends the call


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
        span: BlockSpan | None = None,
        step_timeout_seconds: float = 30.0,
    ) -> None:
        """``span``: the blocks this hop asks for (default: the whole announced span)."""
        self.node_id = record.node_id
        self.address = record.address
        self.span = span if span is not None else BlockSpan(record.span.start, record.span.end)
        self.step_timeout_seconds = step_timeout_seconds
        self.stub = pb_grpc.BlockServiceStub(channel)
        self.client_id = client_id
        self.classification = classification
        self.binding = binding
        self.tier = binding.claims.tier if binding.claims is not None else None
        self.certificates = certificates
        self.certificate: x509.Certificate | None = None
        self.compression = WireCompression.NONE
        self._observer = observer
        self._timeout = timeout_seconds

    def received(self, message: pb.Tensor, *, like: torch.Tensor, name: str, session_id: str) -> torch.Tensor:
        """Decode a tensor this node returned and check it before anyone else sees it: the shape and
        dtype of what was sent, and finite values. A failure names this node."""
        try:
            tensor = decode(message, name=name)  # host memory: the next hop sends it from there
        except WireError as error:
            raise InvalidResponseError(
                str(error), node_id=self.node_id, span=self.span, session_id=session_id
            ) from None
        return self._checked(tensor, like=like, name=name, session_id=session_id)

    def _checked(
        self, tensor: torch.Tensor, *, like: torch.Tensor, name: str, session_id: str
    ) -> torch.Tensor:
        problem = None
        if tensor.dtype != like.dtype:
            problem = f"{name}: dtype {tensor.dtype} returned, {like.dtype} sent"
        elif tuple(tensor.shape) != tuple(like.shape):
            problem = f"{name}: shape {tuple(tensor.shape)} returned, {tuple(like.shape)} sent"
        elif not all_finite(tensor):
            problem = f"{name}: non-finite values returned"
        if problem is not None:
            raise InvalidResponseError(problem, node_id=self.node_id, span=self.span, session_id=session_id)
        return tensor

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

    def check_still_trusted(self) -> None:
        """Trust holds for every call, not only at the proof: the node's certificate is still valid and
        not revoked, and its attestation (if routing relied on one) has not expired. TrustError
        otherwise, and the hop fails over to a node policy allows now."""
        if self.certificate is not None:
            self.certificates.check_current(self.certificate, node_id=self.node_id)
        claims = self.binding.claims
        if claims is not None and claims.expires_at <= self.certificates.clock():
            raise TrustError(
                TrustReason.EXPIRED,
                f"attestation {claims.attestation_id} expired at {claims.expires_at.isoformat()}",
                node_id=self.node_id,
            )

    def _ensure_proven(self) -> None:
        if self.certificate is not None:
            self.check_still_trusted()
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
        sent: Message,
        received: Message,
        receipt: pb.Receipt,
        *,
        tokens: pb.SpanInputs,
        adapter: AdapterRef | None,
        input_sha256: str | None = None,
    ) -> None:
        """Check the receipt against what was really sent and received (the SpanInputs and the Tensor
        returned; for a backward, the request's inputs and incoming gradient and the response less its
        receipt) and against the adapter asked for, then report the call — also when the receipt does
        not verify (the activations did leave the client); then raise.

        ``input_sha256``: the digest of ``sent``, when the caller already has it (each message is
        hashed once per side)."""
        input_sha256 = digest(sent) if input_sha256 is None else input_sha256
        output_sha256 = digest(received)
        problem: TrustError | None = None
        body: pb.ReceiptBody | None = None
        try:
            body = self._checked_receipt(receipt, session_id, step, input_sha256, output_sha256)
            self._check_adapter(body, adapter)
        except TrustError as error:
            problem = error
        fingerprint = body.cert_fingerprint if body is not None else self._proven_fingerprint()
        if self._observer is not None:
            self._observer(
                CallRecord(
                    operation=operation,
                    session_id=session_id,
                    step=step,
                    node_id=self.node_id,
                    span=self.span,
                    binding=self.binding,
                    cert_fingerprint=fingerprint,
                    num_tokens=wire_tokens(tokens),
                    input_sha256=input_sha256,
                    output_sha256=output_sha256,
                    receipt=receipt if problem is None or _parses(receipt) else None,
                    receipt_problem=str(problem) if problem is not None else None,
                    adapter_sha256=(body.adapter_sha256 or None) if body is not None else None,
                )
            )
        if problem is not None:
            raise problem

    def _proven_fingerprint(self) -> str:
        """The certificate the node proved its key with (what a refused receipt is recorded under)."""
        if self.certificate is None:
            return "sha256:" + "0" * 64
        return "sha256:" + self.certificate.fingerprint(hashes.SHA256()).hex()

    def _check_adapter(self, body: pb.ReceiptBody, adapter: AdapterRef | None) -> None:
        """The receipt must name an adapter exactly when one was asked for (its pinned digest, if any)."""
        problem = None
        if adapter is None and body.adapter_sha256:
            problem = f"receipt names adapter {body.adapter_sha256}, none was asked for"
        elif adapter is not None and not body.adapter_sha256:
            problem = f"receipt names no adapter, {adapter.adapter_id!r} was asked for"
        elif adapter is not None and adapter.sha256 is not None and body.adapter_sha256 != adapter.sha256:
            problem = (
                f"receipt names adapter {body.adapter_sha256}; {adapter.adapter_id!r} is {adapter.sha256}"
            )
        if problem is not None:
            raise TrustError(TrustReason.BAD_RECEIPT, problem, node_id=self.node_id)

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

    def forward(
        self, inputs: SpanInputs, *, session_id: str, adapter: AdapterRef | None = None
    ) -> torch.Tensor:
        self._ensure_proven()
        request = pb.ForwardRequest(
            span=span_to_wire(self.span),
            session_id=session_id,
            classification=self.classification,
            adapter_id=adapter.adapter_id if adapter is not None else "",
        )
        wire_inputs = inputs_to_wire(inputs, into=request.inputs)
        sent_digest = digest_soon(wire_inputs, payload_bytes=payload_size(wire_inputs.hidden_states))
        response = self._call(
            lambda: self.stub.Forward(request, timeout=self._timeout), session_id=session_id
        )
        self.observe(
            "forward",
            session_id,
            0,
            wire_inputs,
            response.hidden_states,
            response.receipt,
            input_sha256=sent_digest(),
            tokens=wire_inputs,
            adapter=adapter,
        )
        return self.received(
            response.hidden_states, like=inputs.hidden_states, name="hidden_states", session_id=session_id
        )

    def backward(
        self,
        inputs: SpanInputs,
        grad_outputs: torch.Tensor,
        *,
        session_id: str,
        adapter: AdapterRef | None = None,
    ) -> SpanGradients:
        self._ensure_proven()
        request = pb.BackwardRequest(
            span=span_to_wire(self.span),
            session_id=session_id,
            classification=self.classification,
            adapter_id=adapter.adapter_id if adapter is not None else "",
        )
        wire_inputs = inputs_to_wire(inputs, into=request.inputs)
        encode(grad_outputs, into=request.grad_outputs)
        sent = pb.BackwardRequest()  # what the receipt names: activations + incoming gradient
        sent.inputs.CopyFrom(wire_inputs)
        sent.grad_outputs.CopyFrom(request.grad_outputs)
        sent_digest = digest_soon(
            sent, payload_bytes=payload_size(wire_inputs.hidden_states, request.grad_outputs)
        )
        response = self._call(
            lambda: self.stub.Backward(request, timeout=self._timeout), session_id=session_id
        )
        returned = pb.BackwardResponse()
        returned.CopyFrom(response)
        returned.ClearField("receipt")
        self.observe(
            "backward",
            session_id,
            0,
            sent,
            returned,
            response.receipt,
            input_sha256=sent_digest(),
            tokens=wire_inputs,
            adapter=adapter,
        )
        grad_inputs = self.received(
            response.grad_inputs, like=inputs.hidden_states, name="grad_inputs", session_id=session_id
        )
        return SpanGradients(grad_inputs, self._received_prefixes(response, inputs, session_id))

    def _received_prefixes(
        self, response: pb.BackwardResponse, inputs: SpanInputs, session_id: str
    ) -> BlockPrefixes | None:
        """The deep prompts' gradients: present, with the shapes sent, exactly when prefixes were sent."""
        sent = inputs.prefixes
        if sent is None or not response.HasField("grad_prefixes"):
            if sent is not None or response.HasField("grad_prefixes"):
                raise InvalidResponseError(
                    "grad_prefixes: returned for a pass without prefixes, or missing for one with them",
                    node_id=self.node_id,
                    span=self.span,
                    session_id=session_id,
                )
            return None
        try:
            grads = prefixes_from_wire(response.grad_prefixes, name="grad_prefixes")
        except WireError as error:
            raise InvalidResponseError(
                str(error), node_id=self.node_id, span=self.span, session_id=session_id
            ) from None
        return BlockPrefixes(
            self._checked(grads.keys, like=sent.keys, name="grad_prefixes.keys", session_id=session_id),
            self._checked(grads.values, like=sent.values, name="grad_prefixes.values", session_id=session_id),
        )

    def open_session(
        self, *, max_length: int, batch_size: int, session_id: str, adapter: AdapterRef | None = None
    ) -> GrpcSpanSession:
        return GrpcSpanSession(
            self, max_length=max_length, batch_size=batch_size, session_id=session_id, adapter=adapter
        )
