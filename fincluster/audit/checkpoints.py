"""Signed statements about the tree: checkpoints, prune markers, and the per-record seal.

Each names its signer by key id and certificate fingerprint (``None`` for a bare key), which the
verifier's key ring (``audit.keys``) resolves at the signing time.

* A **checkpoint** signs (origin, tree size, root hash, time). Verifiers recompute the root at every
  checkpointed size, which is stronger than checking consistency proofs between them.
* A **prune marker** signs "records before N were deleted under the retention rule; the tree of N
  leaves had root R and these perfect-subtree roots". From those roots a verifier carries on
  computing the tree over the records that remain.
* A **seal** signs (origin, index, leaf hash) of one record. Seals are what let ``verify`` name the
  exact first bad record: an attacker who edits, inserts, deletes-and-renumbers or swaps records
  cannot produce a seal for the new position, and so the first changed index stands out, even if the
  attacker recomputes every hash in the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from fincluster.audit.canonical import canonical_json
from fincluster.audit.fields import CertFingerprint, HexSignature, UtcTime
from fincluster.audit.merkle import Frontier
from fincluster.audit.signing import (
    Algorithm,
    PublicKey,
    SignerIdentity,
    algorithm_of,
    sign,
    signature_is_valid,
)
from fincluster.values import FrozenModel, OpaqueId, Sha256Hex

CHECKPOINT_DOMAIN = b"fincluster-audit-checkpoint-v1\n"
PRUNE_MARKER_DOMAIN = b"fincluster-audit-prune-marker-v1\n"
SEAL_DOMAIN = b"fincluster-audit-record-v1\n"


class CheckpointBody(FrozenModel):
    version: Literal[2] = 2
    origin: OpaqueId
    tree_size: int = Field(ge=0)
    root_hash: Sha256Hex
    time: UtcTime
    key_id: Sha256Hex
    algorithm: Algorithm
    cert_fingerprint: CertFingerprint | None = None


class Checkpoint(FrozenModel):
    body: CheckpointBody
    signature: HexSignature


class PruneMarkerBody(FrozenModel):
    version: Literal[2] = 2
    origin: OpaqueId
    pruned_size: int = Field(gt=0)
    root_hash: Sha256Hex
    subtree_roots: tuple[Sha256Hex, ...]
    retention_days: int = Field(ge=1)
    time: UtcTime
    key_id: Sha256Hex
    algorithm: Algorithm
    cert_fingerprint: CertFingerprint | None = None


class PruneMarker(FrozenModel):
    body: PruneMarkerBody
    signature: HexSignature

    def frontier(self) -> Frontier:
        """The tree state at ``pruned_size``; raises ValueError if the roots do not fit the size."""
        roots = [bytes.fromhex(h) for h in self.body.subtree_roots]
        return Frontier(self.body.pruned_size, roots)


def sign_checkpoint(signer: SignerIdentity, *, origin: str, frontier: Frontier, time: datetime) -> Checkpoint:
    body = CheckpointBody(
        origin=origin,
        tree_size=frontier.size,
        root_hash=frontier.root().hex(),
        time=time,
        key_id=signer.key_id,
        algorithm=signer.algorithm,
        cert_fingerprint=signer.cert_fingerprint,
    )
    return Checkpoint(body=body, signature=sign(signer.key, CHECKPOINT_DOMAIN + canonical_json(body)).hex())


def sign_prune_marker(
    signer: SignerIdentity, *, origin: str, frontier: Frontier, retention_days: int, time: datetime
) -> PruneMarker:
    body = PruneMarkerBody(
        origin=origin,
        pruned_size=frontier.size,
        root_hash=frontier.root().hex(),
        subtree_roots=tuple(root.hex() for root in frontier.subtree_roots),
        retention_days=retention_days,
        time=time,
        key_id=signer.key_id,
        algorithm=signer.algorithm,
        cert_fingerprint=signer.cert_fingerprint,
    )
    return PruneMarker(
        body=body, signature=sign(signer.key, PRUNE_MARKER_DOMAIN + canonical_json(body)).hex()
    )


def signed_by(body: CheckpointBody | PruneMarkerBody, signature: str, key: PublicKey) -> bool:
    """True when ``key`` made ``signature`` over ``body`` (the caller chose ``key`` by its id)."""
    if algorithm_of(key) != body.algorithm:
        return False
    domain = CHECKPOINT_DOMAIN if isinstance(body, CheckpointBody) else PRUNE_MARKER_DOMAIN
    return signature_is_valid(key, bytes.fromhex(signature), domain + canonical_json(body))


def seal_message(origin: str, index: int, leaf: bytes) -> bytes:
    return SEAL_DOMAIN + origin.encode() + b"\n" + index.to_bytes(8, "big") + leaf
