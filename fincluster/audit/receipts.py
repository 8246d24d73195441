"""Server receipts: a server's signed statement of what it received and what it returned.

A receipt is the protobuf message ``fincluster.v1.Receipt``: ``body`` is a serialized ``ReceiptBody``
(session id, step, block span, SHA-256 of the exact request and response bytes, node id, time, the
signer's key id and certificate fingerprint) and ``signature`` is the server's TLS key over
:data:`RECEIPT_DOMAIN` followed by exactly those body bytes. The server builds it once; the same bytes
travel in the response, go into the server's own audit record and into the client's, and verifiers
parse them, never re-encode them. ``tests/vectors/audit/receipt.json`` pins the encoding.

Both logs holding the same receipt is what lets :mod:`fincluster.audit.reconcile` pair them, and
neither side deny a transfer the other recorded.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any

from google.protobuf.message import DecodeError
from pydantic import PlainSerializer, PlainValidator

from fincluster.audit.signing import (
    PrivateKey,
    PublicKey,
    algorithm_of,
    key_id,
    public_key_of,
    sign,
    signature_is_valid,
)
from fincluster.errors import AuditIntegrityError
from fincluster.spans import BlockSpan
from fincluster.wire import fincluster_pb2 as pb

RECEIPT_DOMAIN = b"fincluster-receipt-v2\n"
MAX_BODY_BYTES = 4096
MAX_SIGNATURE_BYTES = 160


def sign_receipt(
    private_key: PrivateKey,
    *,
    session_id: str,
    step: int,
    span: BlockSpan,
    input_sha256: str,
    output_sha256: str,
    node_id: str,
    cert_fingerprint: str,
    issued_at: datetime,
    adapter_sha256: str = "",
) -> pb.Receipt:
    """Sign a receipt with the server's key (ECDSA P-256 or Ed25519); ``adapter_sha256`` names the
    LoRA adapter applied ("" for none, which leaves the signed bytes as they were before adapters)."""
    public_key = public_key_of(private_key)
    body = pb.ReceiptBody(
        session_id=session_id,
        step=step,
        span=pb.BlockSpan(start=span.start, end=span.end),
        input_sha256=input_sha256,
        output_sha256=output_sha256,
        node_id=node_id,
        issued_at_us=_microseconds(issued_at),
        key_id=key_id(public_key),
        cert_fingerprint=cert_fingerprint,
        algorithm=algorithm_of(public_key),
        adapter_sha256=adapter_sha256,
    ).SerializeToString(deterministic=True)
    return pb.Receipt(body=body, signature=sign(private_key, RECEIPT_DOMAIN + body))


def receipt_body(receipt: pb.Receipt) -> pb.ReceiptBody:
    """The parsed body of ``receipt`` (not yet verified); AuditIntegrityError if it does not parse."""
    if len(receipt.body) > MAX_BODY_BYTES or len(receipt.signature) > MAX_SIGNATURE_BYTES:
        raise AuditIntegrityError("receipt is larger than any receipt fincluster signs")
    body = pb.ReceiptBody()
    try:
        body.ParseFromString(receipt.body)
    except DecodeError as error:
        raise AuditIntegrityError(f"receipt body does not parse: {error}") from None
    return body


def receipt_is_valid(receipt: pb.Receipt, public_key: PublicKey) -> bool:
    """True when ``receipt`` was signed by ``public_key``; never raises for a bad receipt."""
    try:
        body = receipt_body(receipt)
    except AuditIntegrityError:
        return False
    if body.key_id != key_id(public_key) or body.algorithm != algorithm_of(public_key):
        return False
    return signature_is_valid(public_key, receipt.signature, RECEIPT_DOMAIN + receipt.body)


def verify_receipt(receipt: pb.Receipt, public_key: PublicKey) -> pb.ReceiptBody:
    """The body of ``receipt``; AuditIntegrityError unless ``public_key`` signed it."""
    body = receipt_body(receipt)
    if not receipt_is_valid(receipt, public_key):
        raise AuditIntegrityError(
            f"receipt for session {body.session_id} step {body.step} from {body.node_id} "
            "has an invalid signature"
        )
    return body


def issued_at(body: pb.ReceiptBody) -> datetime:
    return datetime.fromtimestamp(body.issued_at_us / 1_000_000, UTC)


def _microseconds(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("issued_at must be timezone-aware")
    delta = value.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _receipt_from_record(value: Any) -> pb.Receipt:
    if isinstance(value, pb.Receipt):
        receipt = value
    elif isinstance(value, str):
        try:
            receipt = pb.Receipt.FromString(base64.b64decode(value, validate=True))
        except (binascii.Error, DecodeError, ValueError):
            raise ValueError("receipt is not a base64-encoded fincluster receipt") from None
    else:
        raise ValueError("receipt must be a fincluster receipt")
    receipt_body(receipt)  # a record can hold a receipt, nothing else
    return receipt


def _receipt_to_record(receipt: pb.Receipt) -> str:
    return base64.b64encode(receipt.SerializeToString(deterministic=True)).decode("ascii")


ReceiptField = Annotated[
    pb.Receipt,
    PlainValidator(_receipt_from_record),
    PlainSerializer(_receipt_to_record, return_type=str, when_used="json"),
]
"""A receipt inside an audit record: kept byte for byte, stored as base64 of the protobuf message."""
