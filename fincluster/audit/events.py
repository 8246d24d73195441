"""The audit events: one pydantic model per kind, joined in the :data:`AuditEvent` union.

What is recorded is metadata and digests only. A transfer records the SHA-256 of the exact bytes
that left (and came back), the number of tokens and the block span; never the prompt, the token ids
or the activations. Models refuse unknown fields, so a caller cannot smuggle such data in either.

``observer`` says who wrote the record: the client (what it sent) or the server (what it received
and from whom). Both sides use the same models, which is what lets :func:`reconcile` pair them.
Fields the trust and policy layers may not provide yet (attestation id, policy decision id, bundle
digest, tier) are optional and recorded as ``null`` when absent.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from fincluster.audit.fields import CertFingerprint, Label, ReasonText, UtcTime
from fincluster.audit.receipts import ReceiptField
from fincluster.spans import BlockSpan
from fincluster.values import FrozenModel, OpaqueId, Sha256Hex, SpiffeId

Observer = Literal["client", "server"]
TransferOperation = Literal["inference_step", "forward", "backward", "replay"]
EnforcementPoint = Literal["registry", "router", "server"]


class _EventBase(FrozenModel):
    version: Literal[2] = 2
    time: UtcTime
    observer: Observer


class TransferEvent(_EventBase):
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
    node_tier: Label | None = None
    cert_fingerprint: CertFingerprint
    attestation_id: OpaqueId | None = None
    block_span: BlockSpan
    num_tokens: int = Field(ge=0)
    input_sha256: Sha256Hex
    output_sha256: Sha256Hex | None = None
    policy_decision_id: OpaqueId | None = None
    policy_bundle_digest: Sha256Hex | None = None
    receipt: ReceiptField | None = None


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


class RouteHop(FrozenModel):
    """One placement decision: these blocks go to this node, under this attestation and policy."""

    block_span: BlockSpan
    node_id: SpiffeId
    node_tier: Label | None = None
    attestation_id: OpaqueId | None = None
    policy_decision_id: OpaqueId | None = None


class RoutingEvent(_EventBase):
    """The chain the router chose for a request (or re-chose after a failover)."""

    kind: Literal["routing"] = "routing"
    session_id: OpaqueId
    client_id: SpiffeId
    chain: tuple[RouteHop, ...] = Field(min_length=1)
    policy_bundle_digest: Sha256Hex | None = None


class DenialEvent(_EventBase):
    """A policy denial at one of the three enforcement points."""

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


class FailoverEvent(_EventBase):
    """A node failed mid-session and its blocks moved to a replacement; replays follow as transfers."""

    kind: Literal["failover"] = "failover"
    session_id: OpaqueId
    block_span: BlockSpan
    failed_node_id: SpiffeId
    replacement_node_id: SpiffeId | None = None
    reason: ReasonText
    replayed_steps: int = Field(ge=0)


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
    | AttestationFailureEvent,
    Field(discriminator="kind"),
]
"""Any audit event; the ``kind`` field selects the model."""

AUDIT_EVENT_ADAPTER: TypeAdapter[AuditEvent] = TypeAdapter(AuditEvent)


def event_nodes(event: AuditEvent) -> tuple[str, ...]:
    """Every node an event concerns (used for per-node filtering and indexing)."""
    match event:
        case TransferEvent() | AttestationFailureEvent():
            return (event.node_id,)
        case RoutingEvent():
            return tuple(dict.fromkeys(hop.node_id for hop in event.chain))
        case DenialEvent():
            return (event.node_id,) if event.node_id else ()
        case FailoverEvent():
            return tuple(n for n in (event.failed_node_id, event.replacement_node_id) if n)
        case _:
            return ()
