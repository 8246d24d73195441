"""Opening a node's own audit log: one SQLite file per identity, signed with the node's TLS key."""

from __future__ import annotations

from fincluster.audit.log import AuditLog, AuditSettings
from fincluster.trust.pki import Credential, load_signing_key, parse_spiffe_id


def open_node_audit_log(settings: AuditSettings, credential: Credential) -> AuditLog:
    """``<settings.directory>/<role>-<name>.sqlite``, origin ``<role>-<name>``, signed with the TLS key."""
    _, role, name = parse_spiffe_id(credential.spiffe_id)
    _, _, key_pem = credential.read()
    key = load_signing_key(key_pem, source=credential.key_path)
    settings.directory.mkdir(parents=True, exist_ok=True)
    origin = f"{role.value}-{name}"
    return AuditLog(
        settings.directory / f"{origin}.sqlite", signing_key=key, origin=origin, settings=settings
    )
