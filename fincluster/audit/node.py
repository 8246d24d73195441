"""Opening a node's own audit log: one SQLite file per identity, signed with the node's TLS key."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from fincluster.audit.log import AuditLog, AuditSettings
from fincluster.errors import CertificateError
from fincluster.trust.pki import Credential, parse_spiffe_id


def open_node_audit_log(
    directory: Path, credential: Credential, *, retention_days: int | None = None
) -> AuditLog:
    """``directory/<role>-<name>.sqlite``, origin ``<role>-<name>``, checkpoints signed with the TLS key."""
    _, role, name = parse_spiffe_id(credential.spiffe_id)
    _, _, key_pem = credential.read()
    key = load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CertificateError(f"unsupported key type {type(key).__name__} for signing an audit log")
    directory.mkdir(parents=True, exist_ok=True)
    origin = f"{role.value}-{name}"
    return AuditLog(
        directory / f"{origin}.sqlite",
        signing_key=key,
        settings=AuditSettings(origin=origin, retention_days=retention_days),
    )
