"""The audit events: one pydantic model per kind, joined in the :data:`AuditEvent` union.

What is recorded is metadata and digests only. A transfer records the SHA-256 of the exact bytes
that left (and came back), the number of tokens and the block span; never the prompt, the token ids
or the activations. Models refuse unknown fields, so a caller cannot smuggle such data in either.

``observer`` says who wrote the record: the client (what it sent), the server (what it received
and from whom) or the registry (which announcements it accepted and refused). Client and server use
the same models, which is what lets :func:`reconcile` pair them.

Placements carry the node's verified attestation claims (:class:`AttestationClaims`: tier, zone,
hardware, software, attested weights, issuing authority key, validity) as the recorder saw them, so a
report can say under which attestation each block ran without the token. Fields a party may not have
(an unattested node's claims, a decision made without a policy bundle) are recorded as ``null``.

Version 3: claims instead of bare tier / attestation id, announcements, the reason a session closed.
Version 4: the client's verdict on each receipt (``receipt_problem``), and the LoRA adapter the node
applied (``adapter_sha256``, its manifest digest); for a backward, ``input_sha256`` covers the
activations and the incoming gradient, ``output_sha256`` the gradients returned (those of the deep
prompts included). Version 5: verification events (re-execution of a node's output elsewhere,
:mod:`fincluster.client.verification`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, TypeAdapter

from fincluster.audit.fields import CertFingerprint, Label, ReasonText, UtcTime
from fincluster.audit.receipts import ReceiptField
from fincluster.spans import BlockSpan
from fincluster.values import FrozenModel, OpaqueId, Sha256Hex, SpiffeId

if TYPE_CHECKING:
    from fincluster.trust.attestation import VerifiedClaims

Observer = Literal["client", "server", "registry"]
TransferOperation = Literal["inference_step", "forward", "backward", "replay"]
EnforcementPoint = Literal["registry", "router", "server"]


class _EventBase(FrozenModel):
    version: Literal[5] = 5
    time: UtcTime
    observer: Observer


class AttestationClaims(FrozenModel):
    """What a node's verified attestation said (``trust.attestation.VerifiedClaims``), for the record."""

    attestation_id: OpaqueId
    tier: Label
    zone: OpaqueId
    hardware: OpaqueId
    software_version: OpaqueId
    model_manifest_sha256: Sha256Hex
    authority_key_id: OpaqueId
    """The attestation authority's key that signed the token (RFC 7638 thumbprint)."""
    evidence_kind: OpaqueId
    issued_at: UtcTime
    expires_at: UtcTime

    @classmethod
    def of(cls, claims: VerifiedClaims | None) -> AttestationClaims | None:
        """The record of verified claims (None for an unattested node)."""
        if claims is None:
            return None
        return cls(
            attestation_id=claims.attestation_id,
            tier=claims.tier.value,
            zone=claims.zone,
            hardware=claims.hardware,
            software_version=claims.software_version,
            model_manifest_sha256=claims.model_manifest_sha256,
            authority_key_id=claims.authority_key_id,
            evidence_kind=claims.evidence_kind,
            issued_at=claims.issued_at,
            expires_at=claims.expires_at,
        )


class _Attested(FrozenModel):
    """Readers of a placement ask for the tier and attestation id; both come from the claims."""

    attestation: AttestationClaims | None = None

    @property
    def node_tier(self) -> str | None:
        return self.attestation.tier if self.attestation is not None else None

    @property
    def attestation_id(self) -> str | None:
        return self.attestation.attestation_id if self.attestation is not None else None


class TransferEvent(_Attested, _EventBase):
    """One activation transfer between a client and a node (either side's record of it)."""

    kind: Literal["transfer"] = "transfer"
    session_id: OpaqueId
    operation: TransferOperation
    step: int = Field(ge=0)
    client_id: SpiffeId
    classification: Label
    model_id: OpaqueId
    manifest_digest: Sha256Hex
    node_id: SpiffeId
    cert_fingerprint: CertFingerprint
    block_span: BlockSpan
    num_tokens: int = Field(ge=0)
    input_sha256: Sha256Hex
    output_sha256: Sha256Hex | None = None
    policy_decision_id: OpaqueId | None = None
    policy_bundle_digest: Sha256Hex | None = None
    receipt: ReceiptField | None = None
    #: Why the client refused the node's receipt (None: it verified). The transfer happened all the
    #: same: the activations left the client, so it is recorded.
    receipt_problem: ReasonText | None = None
    adapter_sha256: Sha256Hex | None = None
    """Manifest digest of the LoRA adapter applied to the blocks (None: the base weights alone)."""


class SessionOpenEvent(_EventBase):
    kind: Literal["session_open"] = "session_open"
    session_id: OpaqueId
    client_id: SpiffeId
    classification: Label
    model_id: OpaqueId
    manifest_digest: Sha256Hex


class SessionCloseEvent(_EventBase):
    kind: Literal["session_close"] = "session_close"
    session_id: OpaqueId
    client_id: SpiffeId
    outcome: Literal["ok", "error"]
    reason: ReasonText | None = None
    """Why it closed, when that is more than "the client closed it": a server's stream that ended
    without a close, an idle expiry, a shutdown, the client's error."""


class RouteHop(_Attested):
    """One placement decision: these blocks go to this node, under this attestation and policy."""

    block_span: BlockSpan
    node_id: SpiffeId
    policy_decision_id: OpaqueId | None = None


class RoutingEvent(_EventBase):
    """The chain the router chose for a request (or re-chose after a failover)."""

    kind: Literal["routing"] = "routing"
    session_id: OpaqueId
    client_id: SpiffeId
    chain: tuple[RouteHop, ...] = Field(min_length=1)
    policy_bundle_digest: Sha256Hex | None = None


class DenialEvent(_Attested, _EventBase):
    """A policy denial at one of the three enforcement points (with the node's verified claims, when
    the refusal was the policy's and not the token's)."""

    kind: Literal["denial"] = "denial"
    enforced_at: EnforcementPoint
    session_id: OpaqueId | None = None
    client_id: SpiffeId | None = None
    node_id: SpiffeId | None = None
    block_span: BlockSpan | None = None
    classification: Label | None = None
    reasons: tuple[ReasonText, ...] = Field(min_length=1, max_length=16)
    policy_decision_id: OpaqueId | None = None
    policy_bundle_digest: Sha256Hex | None = None


class AnnounceEvent(_Attested, _EventBase):
    """The registry accepted a node's announcement (recorded when it is new or changed, not for every
    heartbeat). Refused ones are :class:`DenialEvent` with ``enforced_at="registry"``."""

    kind: Literal["announce"] = "announce"
    node_id: SpiffeId
    model_id: OpaqueId
    manifest_digest: Sha256Hex | None = None
    block_span: BlockSpan
    cert_fingerprint: CertFingerprint
    policy_decision_id: OpaqueId | None = None
    policy_bundle_digest: Sha256Hex | None = None

    @property
    def session_id(self) -> None:
        return None


class FailoverEvent(_EventBase):
    """A node failed mid-session and its blocks moved to a replacement; replays follow as transfers."""

    kind: Literal["failover"] = "failover"
    session_id: OpaqueId
    block_span: BlockSpan
    failed_node_id: SpiffeId
    replacement_node_id: SpiffeId | None = None
    reason: ReasonText
    replayed_steps: int = Field(ge=0)


class VerificationEvent(_EventBase):
    """A node's output re-executed on other allowed nodes and compared. ``checked_output_sha256`` is
    the wire digest its signed receipt covers, so a wrong output is attributable to the node's key;
    ``max_abs_diff`` is None when the shapes differ or the difference is not finite."""

    kind: Literal["verification"] = "verification"
    observer: Literal["client"] = "client"
    session_id: OpaqueId
    step: int = Field(ge=0)
    block_span: BlockSpan
    checked_node_id: SpiffeId
    verifier_node_ids: tuple[SpiffeId, ...] = Field(min_length=1)
    checked_output_sha256: Sha256Hex
    verifier_output_sha256: Sha256Hex
    max_abs_diff: float | None = Field(default=None, ge=0)
    agreed: bool
    referee_node_ids: tuple[SpiffeId, ...] = ()
    quarantined_node_id: SpiffeId | None = None


class AttestationFailureEvent(_EventBase):
    """A node's attestation or proof of possession did not verify; the node was not used."""

    kind: Literal["attestation_failure"] = "attestation_failure"
    session_id: OpaqueId | None = None
    node_id: SpiffeId
    cert_fingerprint: CertFingerprint | None = None
    attestation_id: OpaqueId | None = None
    reason: ReasonText


AuditEvent = Annotated[
    TransferEvent
    | SessionOpenEvent
    | SessionCloseEvent
    | RoutingEvent
    | DenialEvent
    | FailoverEvent
    | AttestationFailureEvent
    | AnnounceEvent
    | VerificationEvent,
    Field(discriminator="kind"),
]
"""Any audit event; the ``kind`` field selects the model."""

AUDIT_EVENT_ADAPTER: TypeAdapter[AuditEvent] = TypeAdapter(AuditEvent)


def event_nodes(event: AuditEvent) -> tuple[str, ...]:
    """Every node an event concerns (used for per-node filtering and indexing)."""
    match event:
        case TransferEvent() | AttestationFailureEvent() | AnnounceEvent():
            return (event.node_id,)
        case RoutingEvent():
            return tuple(dict.fromkeys(hop.node_id for hop in event.chain))
        case DenialEvent():
            return (event.node_id,) if event.node_id else ()
        case FailoverEvent():
            return tuple(n for n in (event.failed_node_id, event.replacement_node_id) if n)
        case VerificationEvent():
            return (event.checked_node_id, *event.verifier_node_ids, *event.referee_node_ids)
        case _:
            return ()
