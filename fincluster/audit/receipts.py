"""Server receipts: a server's signed statement of what it received and what it returned.

The server signs, with its TLS key, the session id, step, block span and the SHA-256 of the exact
request and response bytes. The client stores the receipt in its own transfer record, and the server
logs the same receipt in its own audit log, so the two logs can be reconciled later
(:mod:`fincluster.audit.reconcile`) and neither side can deny a transfer the other recorded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from fincluster.audit.canonical import canonical_json
from fincluster.audit.fields import (
    BlockSpan,
    FrozenModel,
    HexSignature,
    OpaqueId,
    Sha256Hex,
    SpiffeId,
    UtcTime,
)
from fincluster.audit.signing import (
    Algorithm,
    PrivateKey,
    PublicKey,
    algorithm_of,
    key_id,
    public_key_of,
    sign,
    signature_is_valid,
)
from fincluster.errors import AuditIntegrityError

RECEIPT_DOMAIN = b"fincluster-audit-receipt-v1\n"


class ReceiptBody(FrozenModel):
    """The signed part of a receipt."""

    version: Literal[1] = 1
    session_id: OpaqueId
    step: int = Field(ge=0)
    block_span: BlockSpan
    input_sha256: Sha256Hex
    output_sha256: Sha256Hex
    node_id: SpiffeId
    issued_at: UtcTime
    key_id: Sha256Hex
    algorithm: Algorithm


class Receipt(FrozenModel):
    """A signed :class:`ReceiptBody`; ``signature`` is hex."""

    body: ReceiptBody
    signature: HexSignature


def _message(body: ReceiptBody) -> bytes:
    return RECEIPT_DOMAIN + canonical_json(body)


def sign_receipt(
    private_key: PrivateKey,
    *,
    session_id: str,
    step: int,
    block_span: BlockSpan,
    input_sha256: str,
    output_sha256: str,
    node_id: str,
    issued_at: datetime,
) -> Receipt:
    """Sign a receipt with the server's key (Ed25519 or ECDSA P-256)."""
    public_key = public_key_of(private_key)
    body = ReceiptBody(
        session_id=session_id,
        step=step,
        block_span=block_span,
        input_sha256=input_sha256,
        output_sha256=output_sha256,
        node_id=node_id,
        issued_at=issued_at,
        key_id=key_id(public_key),
        algorithm=algorithm_of(public_key),
    )
    return Receipt(body=body, signature=sign(private_key, _message(body)).hex())


def receipt_is_valid(receipt: Receipt, public_key: PublicKey) -> bool:
    """True when ``receipt`` was signed by ``public_key``; never raises for a bad receipt."""
    body = receipt.body
    if body.key_id != key_id(public_key) or body.algorithm != algorithm_of(public_key):
        return False
    return signature_is_valid(public_key, bytes.fromhex(receipt.signature), _message(body))


def verify_receipt(receipt: Receipt, public_key: PublicKey) -> None:
    """Raise :class:`AuditIntegrityError` unless ``receipt`` was signed by ``public_key``."""
    if not receipt_is_valid(receipt, public_key):
        raise AuditIntegrityError(
            f"receipt for session {receipt.body.session_id} step {receipt.body.step} "
            f"from {receipt.body.node_id} has an invalid signature"
        )
