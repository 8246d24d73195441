"""A node's own audit log: one SQLite file per identity, signed with the node's TLS key as it is now.

The key and certificate are re-read when their files change, so records, checkpoints and receipts
made after a renewal name the new certificate, and after a rotation are signed with the new key.
"""

from __future__ import annotations

import threading

import structlog

from fincluster.audit.log import AuditLog, AuditSettings
from fincluster.audit.signing import SignerIdentity
from fincluster.errors import CertificateError
from fincluster.trust.pki import Credential, certificate_fingerprint, load_signing_key, parse_spiffe_id

log = structlog.get_logger(__name__)


class CredentialSigner:
    """The node's TLS key and certificate as a :class:`~fincluster.audit.signing.Signer`.

    While a renewal or rotation is being written (key and certificate briefly do not match), the
    identity read before stays in use and the files are read again at the next call.
    """

    def __init__(self, credential: Credential) -> None:
        self.credential = credential
        self._lock = threading.Lock()
        self._state: object = None
        self._identity: SignerIdentity | None = None
        self._cert_pem = b""

    def identity(self) -> SignerIdentity:
        return self.current()[0]

    def current(self) -> tuple[SignerIdentity, bytes]:
        """The identity and the PEM certificate it names (possession proofs show it)."""
        with self._lock:
            state = self.credential.file_state()
            if self._identity is not None and state == self._state:
                return self._identity, self._cert_pem
            try:
                _, cert_pem, key_pem = self.credential.read()
            except CertificateError as error:
                if self._identity is None:
                    raise
                log.warning(
                    "signing_identity_reload_deferred", node=self.credential.spiffe_id, reason=str(error)
                )
                return self._identity, self._cert_pem
            previous = self._identity
            self._identity = SignerIdentity.of(
                load_signing_key(key_pem, source=self.credential.key_path),
                cert_fingerprint=certificate_fingerprint(cert_pem),
            )
            self._state, self._cert_pem = state, cert_pem
            if previous is not None and previous.cert_fingerprint != self._identity.cert_fingerprint:
                log.info(
                    "signing_identity_changed",
                    node=self.credential.spiffe_id,
                    certificate=self._identity.cert_fingerprint,
                    new_key=previous.key_id != self._identity.key_id,
                )
            return self._identity, cert_pem


def open_node_audit_log(settings: AuditSettings, credential: Credential) -> AuditLog:
    """``<settings.directory>/<role>-<name>.sqlite``, origin ``<role>-<name>``, signed with the TLS key."""
    _, role, name = parse_spiffe_id(credential.spiffe_id)
    settings.directory.mkdir(parents=True, exist_ok=True)
    origin = f"{role.value}-{name}"
    return AuditLog(
        settings.directory / f"{origin}.sqlite",
        signing_key=CredentialSigner(credential),
        origin=origin,
        settings=settings,
    )
