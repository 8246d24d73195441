"""A server's own attestation, kept current while it runs: re-read and re-verified on every change.

The security team re-issues a node's token (before it expires, and after every key rotation) and the
operator replaces the token file; the node's certificate is renewed or rotated under it. Either
change makes the server check again, against its *current* TLS key:

* a valid token for the current key is adopted (``attestation_reloaded``) and announced at once;
* a token that fails — above all one still bound to the key the node had before a rotation — is
  refused with a log line that names the node and says what to do (``attestation_refused``), and
  the server goes on unattested: it announces no token and its serve policy sees no claims, so it
  handles only what an unattested node may, until a good token arrives. Fail closed, no restart.

At start the token must be valid (the server refuses to start otherwise), as before.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from fincluster.errors import CertificateError, ConfigurationError, TrustError, TrustReason
from fincluster.trust.attestation import SIGNED_SOFTWARE_EVIDENCE, VerifiedClaims, require_key_binding
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Credential, load_certificate

log = structlog.get_logger(__name__)

_ROTATED_HINT = (
    "the node's TLS key changed since it was attested: issue a new attestation for its current certificate"
)


def verify_own_attestation(token: str, credential: Credential, trust: TrustContext) -> VerifiedClaims:
    """The claims of ``token`` if it is valid and bound to the node's current TLS key; TrustError if not."""
    claims = trust.verifiers.verify(SIGNED_SOFTWARE_EVIDENCE, token.encode(), now=trust.clock())
    _, cert_pem, _ = credential.read()
    if claims.node_id != credential.spiffe_id:
        raise TrustError(
            TrustReason.WRONG_NODE, f"the attestation is for {claims.node_id}", node_id=credential.spiffe_id
        )
    require_key_binding(claims, load_certificate(cert_pem).public_key())
    return claims


class OwnAttestation:
    """The token a server announces and the claims its serve policy uses, from a token or a file.

    A fixed token (``token=``) is checked again whenever the node's certificate files change; a file
    (``path=``) also whenever the file changes. :meth:`refresh` says whether anything changed.
    """

    def __init__(
        self,
        credential: Credential,
        trust: TrustContext,
        *,
        token: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.credential = credential
        self.trust = trust
        self.path = path
        self._fixed = token
        self.token: str | None = None
        self.claims: VerifiedClaims | None = None
        self._state: object = None
        self._state = self._files()
        try:
            self.token = self._read()
        except OSError as error:
            raise ConfigurationError(f"cannot read the attestation token {path}: {error.strerror}") from None
        self.claims = verify_own_attestation(self.token, credential, trust)  # at start: valid or no start

    def refresh(self) -> bool:
        """Check again if the token file or the certificate changed; True when token or claims changed."""
        state = self._files()
        if state == self._state:
            return False
        try:
            token = self._read()
            claims = verify_own_attestation(token, self.credential, self.trust)
        except CertificateError as error:  # key and certificate being replaced right now: look again soon
            log.info("attestation_check_deferred", node=self.credential.spiffe_id, reason=str(error))
            return False
        except (TrustError, OSError) as error:
            self._state = state
            log.warning(
                "attestation_refused",
                node=self.credential.spiffe_id,
                reason=str(error),
                action=_ROTATED_HINT
                if isinstance(error, TrustError) and error.reason is TrustReason.KEY_MISMATCH
                else "the server runs unattested until a valid token for it is in place",
            )
            changed = self.token is not None
            self.token, self.claims = None, None
            return changed
        self._state = state
        if claims.attestation_id == (self.claims.attestation_id if self.claims else None):
            return False
        log.info(
            "attestation_reloaded",
            node=self.credential.spiffe_id,
            attestation=claims.attestation_id,
            tier=claims.tier.value,
            expires=claims.expires_at.isoformat(),
        )
        self.token, self.claims = token, claims
        return True

    def _read(self) -> str:
        if self.path is None:
            return self._fixed or ""
        return self.path.read_text(encoding="ascii", errors="replace").strip()

    def _files(self) -> object:
        """What changes when the token file or the node's certificate files are replaced."""
        seen: object = None
        if self.path is not None:
            try:
                info = self.path.stat()
                seen = (info.st_mtime_ns, info.st_ino, info.st_size)
            except OSError:
                seen = "no file"
        try:
            return seen, self.credential.file_state()
        except CertificateError:
            return seen, "no certificate"
