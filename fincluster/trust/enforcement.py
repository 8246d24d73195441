"""The trust checks every party makes, in one place: verify a node's record and certificate, prove
and check possession of the attested key, and hold what a node needs for policy decisions.

Registry, client router and server all use :class:`TrustContext`; failures raise ``TrustError`` /
``PolicyError`` with the precise reason for the local log and audit trail, while remote peers get one
opaque status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fincluster.errors import ConfigurationError, TrustError
from fincluster.settings import TrustSettings
from fincluster.trust.attestation import (
    SIGNED_SOFTWARE_EVIDENCE,
    AuthorityKeys,
    VerifiedClaims,
    sign_possession_proof,
    verify_possession_proof,
)
from fincluster.trust.pki import Credential, RevocationList, SigningKey, load_certificate, spiffe_id_of
from fincluster.trust.policy import Classification, PolicyEngine
from fincluster.trust.verifiers import SignedSoftwareVerifier, VerifierSet
from fincluster.wire import fincluster_pb2 as pb


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TrustContext:
    """Policy engine, attestation verifiers, CA, revocation list and clearances of one party.

    ``clearances`` maps client SPIFFE ids to the highest classification they may send; an unlisted
    client is cleared for ``public`` only. It comes from the operator's settings, never from the peer.
    """

    policy: PolicyEngine
    verifiers: VerifierSet
    ca_certificate: x509.Certificate
    revocations: RevocationList | None = None
    clearances: Mapping[str, Classification] = field(default_factory=dict)
    clock: Callable[[], datetime] = utc_now

    def clearance_of(self, client_id: str) -> Classification:
        return self.clearances.get(client_id, Classification.PUBLIC)

    def verify_record(self, record: pb.ServerRecord) -> VerifiedClaims | None:
        """The record's verified attestation claims, None when it carries none; TrustError if invalid."""
        if not record.attestation:
            return None
        claims = self.verifiers.verify(
            record.evidence_kind or SIGNED_SOFTWARE_EVIDENCE, record.attestation.encode(), now=self.clock()
        )
        if claims.node_id != record.node_id:
            raise TrustError(f"key_mismatch: attestation names {claims.node_id}, record is {record.node_id}")
        return claims

    @property
    def certificates(self) -> CertificateCheck:
        return CertificateCheck(self.ca_certificate, self.revocations, self.clock)


@dataclass(frozen=True)
class CertificateCheck:
    """Is this certificate the swarm CA's, for this node, valid now and not revoked?"""

    ca_certificate: x509.Certificate
    revocations: RevocationList | None = None
    clock: Callable[[], datetime] = utc_now

    def verify(self, cert_pem: bytes, *, node_id: str) -> x509.Certificate:
        try:
            certificate = load_certificate(cert_pem)
            certificate.verify_directly_issued_by(self.ca_certificate)
        except Exception as error:  # malformed PEM, another issuer, or a forged signature
            raise TrustError(f"certificate of {node_id} is not from the swarm CA: {error!r}") from None
        if spiffe_id_of(certificate) != node_id:
            raise TrustError(f"certificate is for {spiffe_id_of(certificate)}, not {node_id}")
        now = self.clock()
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise TrustError(f"certificate of {node_id} is outside its validity period")
        if self.revocations is not None and self.revocations.is_revoked(certificate, now=now):
            raise TrustError(f"certificate of {node_id} is revoked")
        return certificate


def prove_possession(
    key: SigningKey, cert_pem: bytes, *, nonce: bytes, session_id: str, client_id: str
) -> pb.PossessionProof:
    """Server side: sign the client's challenge with the TLS key, and show the key's certificate."""
    signature = sign_possession_proof(key, nonce=nonce, session_id=session_id, client_id=client_id)
    return pb.PossessionProof(signature=signature, certificate_pem=cert_pem)


def check_possession(
    proof: pb.PossessionProof,
    *,
    certificates: CertificateCheck,
    node_id: str,
    claims: VerifiedClaims | None,
    nonce: bytes,
    session_id: str,
    client_id: str,
) -> x509.Certificate:
    """Client side: the node's certificate is valid, and for an attested node it holds the attested key."""
    certificate = certificates.verify(proof.certificate_pem, node_id=node_id)
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise TrustError(f"unsupported key type in the certificate of {node_id}")
    verify_possession_proof(
        proof.signature,
        claims=claims,
        tls_public_key=public_key,
        nonce=nonce,
        session_id=session_id,
        client_id=client_id,
    )
    return certificate


def trust_from_settings(settings: TrustSettings, credential: Credential) -> TrustContext | None:
    """The trust context an entry point builds from settings; None when no policy is configured."""
    if settings.policy_dir is None:
        if settings.attestation is not None or settings.authority_keys:
            raise ConfigurationError(
                "attestation settings need trust.policy_dir: policy decides who is trusted"
            )
        return None
    from fincluster.trust.policy_engine import open_policy_engine

    ca_pem, _, _ = credential.read()
    ca_certificate = load_certificate(ca_pem)
    policy = open_policy_engine(
        settings.policy_dir,
        data_file=settings.policy_data,
        opa_url=settings.opa_url,
        opa_timeout_s=settings.opa_timeout_seconds,
    )
    verifiers = VerifierSet(
        [SignedSoftwareVerifier(AuthorityKeys.from_files(settings.authority_keys))]
        if settings.authority_keys
        else []
    )
    try:
        clearances = {identity: Classification(level) for identity, level in settings.clearances.items()}
    except ValueError as error:
        raise ConfigurationError(f"trust.clearances: {error}") from None
    revocations = RevocationList(settings.crl, ca_certificate) if settings.crl is not None else None
    return TrustContext(
        policy=policy,
        verifiers=verifiers,
        ca_certificate=ca_certificate,
        revocations=revocations,
        clearances=clearances,
    )
