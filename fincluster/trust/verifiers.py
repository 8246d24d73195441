"""Evidence verifiers: one interface in front of every way a node can prove what it runs.

Today a node presents an authority-signed token (:class:`SignedSoftwareVerifier`). Hardware
evidence (NVIDIA confidential computing, Intel TDX quotes, AMD SEV-SNP reports) plugs in as another
:class:`EvidenceVerifier` that turns verified evidence into the same :class:`VerifiedClaims`, so
policy, routing and audit never change; ``docs/attestation.md`` says how to write one.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from fincluster.errors import ConfigurationError, TrustError, TrustReason
from fincluster.trust.attestation import (
    DEFAULT_LEEWAY,
    SIGNED_SOFTWARE_EVIDENCE,
    AuthorityKeys,
    VerifiedClaims,
    verify_attestation,
)

__all__ = ["EvidenceVerifier", "SignedSoftwareVerifier", "VerifierSet"]


@runtime_checkable
class EvidenceVerifier(Protocol):
    """Verifies one kind of attestation evidence.

    ``verify`` must check authenticity (signature chain up to a configured root), freshness against
    ``now``, and that the evidence names the node's TLS key (``VerifiedClaims.tls_key_sha256``); on
    any failure it raises :class:`~fincluster.errors.TrustError` with a precise reason.
    """

    @property
    def evidence_kind(self) -> str:
        """The name registry records use for this evidence, e.g. ``signed-software``."""
        ...

    def verify(self, evidence: bytes, *, now: datetime) -> VerifiedClaims: ...


class SignedSoftwareVerifier:
    """Verifies attestation tokens signed by the security team's authority key."""

    def __init__(self, authority_keys: AuthorityKeys, *, leeway: timedelta = DEFAULT_LEEWAY) -> None:
        self._authority_keys = authority_keys
        self._leeway = leeway

    @property
    def evidence_kind(self) -> str:
        return SIGNED_SOFTWARE_EVIDENCE

    def verify(self, evidence: bytes, *, now: datetime) -> VerifiedClaims:
        try:
            token = evidence.decode("ascii")
        except UnicodeDecodeError as error:
            raise TrustError(TrustReason.MALFORMED, "attestation token is not ASCII") from error
        return verify_attestation(token, authority_keys=self._authority_keys, now=now, leeway=self._leeway)


class VerifierSet:
    """Dispatches evidence to the verifier configured for its kind; unknown kinds are rejected."""

    def __init__(self, verifiers: Iterable[EvidenceVerifier]) -> None:
        self._by_kind: dict[str, EvidenceVerifier] = {}
        for verifier in verifiers:
            if verifier.evidence_kind in self._by_kind:
                raise ConfigurationError(f"two verifiers for evidence kind {verifier.evidence_kind!r}")
            self._by_kind[verifier.evidence_kind] = verifier

    @property
    def kinds(self) -> tuple[str, ...]:
        """The evidence kinds this set can verify (empty: no attestation can be verified)."""
        return tuple(self._by_kind)

    def verify(self, evidence_kind: str, evidence: bytes, *, now: datetime) -> VerifiedClaims:
        verifier = self._by_kind.get(evidence_kind)
        if verifier is None:
            raise TrustError(TrustReason.UNKNOWN_EVIDENCE, f"no verifier configured for {evidence_kind!r}")
        claims = verifier.verify(evidence, now=now)
        if claims.evidence_kind != evidence_kind:
            raise TrustError(
                TrustReason.MALFORMED,
                f"{evidence_kind!r} verifier returned claims of kind {claims.evidence_kind!r}",
            )
        return claims
