"""Opening a node's own audit log: one SQLite file per identity, signed with the node's TLS key."""

from __future__ import annotations

from pathlib import Path

from fincluster.audit.log import AuditLog, AuditSettings
from fincluster.trust.pki import Credential, load_signing_key, parse_spiffe_id


def open_node_audit_log(
    directory: Path, credential: Credential, *, retention_days: int | None = None
) -> AuditLog:
    """``directory/<role>-<name>.sqlite``, origin ``<role>-<name>``, checkpoints signed with the TLS key."""
    _, role, name = parse_spiffe_id(credential.spiffe_id)
    _, _, key_pem = credential.read()
    key = load_signing_key(key_pem)
    directory.mkdir(parents=True, exist_ok=True)
    origin = f"{role.value}-{name}"
    return AuditLog(
        directory / f"{origin}.sqlite",
        signing_key=key,
        settings=AuditSettings(origin=origin, retention_days=retention_days),
    )
