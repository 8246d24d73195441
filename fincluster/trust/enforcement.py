"""The trust checks every party makes, in one place.

:class:`TrustContext` holds what one party enforces with (policy engine, attestation verifiers, the
swarm CA, the revocation list, clearances, the clock) and offers the three recipes that every
enforcement point calls — :meth:`~TrustContext.decide_route` (client router),
:meth:`~TrustContext.decide_serve` (every server, every call) and :meth:`~TrustContext.decide_announce`
(registry) — plus the certificate and possession-proof checks. A context without a policy engine
(:meth:`TrustContext.public_only`) allows public data only; that rule lives here and nowhere else.

Failures raise ``TrustError`` (with a :class:`~fincluster.errors.TrustReason`) or return a denying
:class:`~fincluster.trust.policy.Decision`; the precise reasons go to the local log and audit trail,
while remote peers get one opaque status.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fincluster.errors import TrustError, TrustReason
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import (
    SIGNED_SOFTWARE_EVIDENCE,
    VerifiedClaims,
    require_key_binding,
    sign_possession_proof,
    verify_possession_proof,
)
from fincluster.trust.pki import (
    RevocationList,
    Role,
    SigningKey,
    load_certificate,
    parse_spiffe_id,
    spiffe_id_of,
)
from fincluster.trust.policy import (
    Classification,
    ClientIdentity,
    Decision,
    DecisionKind,
    ModelRef,
    NodeRef,
    PolicyEngine,
    PolicyInput,
)
from fincluster.trust.verifiers import VerifierSet
from fincluster.values import Clock, utc_now
from fincluster.wire import fincluster_pb2 as pb

NO_POLICY_REASON = "no policy engine is configured, so only public data may be handled"


@dataclass(frozen=True)
class CertificateCheck:
    """Is this certificate the swarm CA's, for this node, valid now and not revoked?"""

    ca_certificate: x509.Certificate
    revocations: RevocationList | None = None
    clock: Clock = utc_now

    def verify(self, cert_pem: bytes, *, node_id: str) -> x509.Certificate:
        try:
            certificate = load_certificate(cert_pem)
            certificate.verify_directly_issued_by(self.ca_certificate)
        except Exception as error:  # malformed PEM, another issuer, or a forged signature
            raise TrustError(
                TrustReason.NOT_FROM_CA, f"certificate is not from the swarm CA: {error!r}", node_id=node_id
            ) from None
        if spiffe_id_of(certificate) != node_id:
            raise TrustError(
                TrustReason.WRONG_NODE, f"certificate is for {spiffe_id_of(certificate)}", node_id=node_id
            )
        self.check_current(certificate, node_id=node_id)
        return certificate

    def check_current(self, certificate: x509.Certificate, *, node_id: str) -> None:
        """TrustError unless ``certificate`` is inside its validity period now and not revoked (clients
        check this at every step, not only when the node proved its key)."""
        now = self.clock()
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise TrustError(
                TrustReason.OUTSIDE_VALIDITY, "certificate is outside its validity period", node_id=node_id
            )
        if self.revocations is not None and self.revocations.is_revoked(certificate, now=now):
            raise TrustError(TrustReason.REVOKED, "certificate is revoked", node_id=node_id)


@dataclass(frozen=True)
class TrustContext:
    """Policy engine, attestation verifiers, CA, revocation list and clearances of one party.

    ``clearances`` maps client SPIFFE ids to the highest classification they may send; an unlisted
    client is cleared for ``public`` only. It comes from the operator's settings, never from the peer.
    ``policy=None`` means no policy engine: only public data, and attestations are not consulted.
    """

    ca_certificate: x509.Certificate
    policy: PolicyEngine | None = None
    verifiers: VerifierSet = field(default_factory=lambda: VerifierSet([]))
    revocations: RevocationList | None = None
    clearances: Mapping[str, Classification] = field(default_factory=dict)
    clock: Clock = utc_now

    @classmethod
    def public_only(
        cls, ca_certificate: x509.Certificate, *, revocations: RevocationList | None = None
    ) -> TrustContext:
        """A context with no policy engine: public data only."""
        return cls(ca_certificate=ca_certificate, revocations=revocations)

    @property
    def verifies_attestations(self) -> bool:
        """Whether this context can know a node's tier: a policy engine and at least one verifier."""
        return self.policy is not None and bool(self.verifiers.kinds)

    @property
    def certificates(self) -> CertificateCheck:
        return CertificateCheck(self.ca_certificate, self.revocations, self.clock)

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
            raise TrustError(
                TrustReason.WRONG_NODE, f"attestation names {claims.node_id}", node_id=record.node_id
            )
        return claims

    # -- the three recipes --------------------------------------------------------------------

    def decide_route(
        self,
        record: pb.ServerRecord,
        span: BlockSpan,
        *,
        client_id: str,
        classification: Classification,
        model: ModelRef,
    ) -> tuple[VerifiedClaims | None, Decision]:
        """May the client router send ``span`` of this request to the node of ``record``?

        Verifies the record's attestation first (TrustError if it is invalid), then asks the route
        policy with the verified claims.
        """
        if self.policy is None:
            return None, _public_only(DecisionKind.ROUTE, classification)
        claims = self.verify_record(record)
        decision = self.policy.decide(
            DecisionKind.ROUTE,
            PolicyInput(
                client=ClientIdentity(id=client_id, clearance=self.clearance_of(client_id)),
                classification=classification,
                model=model,
                span=span,
                node=NodeRef(id=record.node_id, claims=claims),
            ),
        )
        return claims, decision

    def decide_serve(
        self,
        *,
        client_id: str,
        classification: str,
        model: ModelRef,
        span: BlockSpan,
        node_id: str,
        claims: VerifiedClaims | None,
    ) -> Decision:
        """May this server (``node_id``, with its own verified ``claims``) serve this call?

        Claims past their expiry count as none (the node is unattested from that moment), so a server
        stops serving classified data when its attestation expires, also inside open sessions (servers
        decide again during sessions). Without a policy engine, only client workloads get public data.
        """
        try:
            level = Classification(classification)
        except ValueError:
            return _local_decision(
                DecisionKind.SERVE, allow=False, reasons=(f"unknown classification {classification[:64]!r}",)
            )
        if claims is not None and claims.expires_at <= self.clock():
            claims = None
        if self.policy is None:
            if not _is_client(client_id):
                return _local_decision(
                    DecisionKind.SERVE, allow=False, reasons=("caller is not a client workload",)
                )
            return _public_only(DecisionKind.SERVE, level)
        return self.policy.decide(
            DecisionKind.SERVE,
            PolicyInput(
                client=ClientIdentity(id=client_id, clearance=self.clearance_of(client_id)),
                classification=level,
                model=model,
                span=span,
                node=NodeRef(id=node_id, claims=claims),
            ),
        )

    def decide_announce(
        self, record: pb.ServerRecord, peer: x509.Certificate
    ) -> tuple[VerifiedClaims | None, Decision]:
        """May the caller holding ``peer`` announce ``record``? Its attestation must be valid and bound
        to the caller's key (TrustError otherwise), and the announce policy must allow the span.
        Returns the verified claims (for the registry's audit trail) with the decision."""
        if self.policy is None:
            return None, _local_decision(DecisionKind.ANNOUNCE, allow=True, reasons=())
        claims = self.verify_record(record)
        if claims is not None:
            require_key_binding(claims, peer.public_key())
        if record.num_blocks < 1 or record.span.end <= record.span.start:
            return claims, _local_decision(
                DecisionKind.ANNOUNCE, allow=False, reasons=("record has no model size or no blocks",)
            )
        return claims, self.policy.decide(
            DecisionKind.ANNOUNCE,
            PolicyInput(
                model=ModelRef(
                    id=record.model_id, num_blocks=record.num_blocks, manifest_sha256=record.manifest_digest
                ),
                span=BlockSpan(record.span.start, record.span.end),
                node=NodeRef(id=record.node_id, claims=claims),
            ),
        )

    def announceable_blocks(
        self, model: ModelRef, *, node_id: str, claims: VerifiedClaims | None
    ) -> tuple[bool, ...]:
        """For each block of ``model``, whether the announce policy lets node ``node_id`` with verified
        ``claims`` announce it (asked block by block). Placement stays where the registry will list
        it; asked with ``claims=None`` it learns which blocks are sensitive (closed to unattested
        nodes) without knowing how the policy decides. Without a policy engine every block is open."""
        if self.policy is None:
            return (True,) * model.num_blocks
        node = NodeRef(id=node_id, claims=claims)
        return tuple(
            self.policy.decide(
                DecisionKind.ANNOUNCE, PolicyInput(model=model, span=BlockSpan(block, block + 1), node=node)
            ).allow
            for block in range(model.num_blocks)
        )


def _is_client(identity: str) -> bool:
    try:
        return parse_spiffe_id(identity)[1] is Role.CLIENT
    except TrustError:
        return False


def _local_decision(kind: DecisionKind, *, allow: bool, reasons: tuple[str, ...]) -> Decision:
    """A decision made without a policy engine (no bundle digest)."""
    return Decision(
        kind=kind, allow=allow, reasons=reasons, decision_id=f"local-{uuid.uuid4().hex}", bundle_digest=None
    )


def _public_only(kind: DecisionKind, classification: Classification) -> Decision:
    allowed = classification is Classification.PUBLIC
    return _local_decision(kind, allow=allowed, reasons=() if allowed else (NO_POLICY_REASON,))


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
        raise TrustError(TrustReason.MALFORMED, "unsupported key type in the certificate", node_id=node_id)
    verify_possession_proof(
        proof.signature,
        claims=claims,
        tls_public_key=public_key,
        nonce=nonce,
        session_id=session_id,
        client_id=client_id,
    )
    return certificate
