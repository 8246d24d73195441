"""The compliance report as a value: what :func:`~fincluster.audit.report.build_report` computes and
every renderer (JSON, CSV, HTML, PDF) formats, so all of them carry the same numbers."""

from __future__ import annotations

from typing import Literal

from fincluster.audit.events import AttestationClaims
from fincluster.audit.fields import UtcTime
from fincluster.spans import BlockSpan
from fincluster.values import FrozenModel

IntegrityStatus = Literal["verified", "failed", "not_checked"]


class Integrity(FrozenModel):
    status: IntegrityStatus
    summary: str
    tree_size: int | None = None
    root_hash: str | None = None
    checkpoints_verified: int | None = None
    last_checkpoint_size: int | None = None
    last_checkpoint_time: UtcTime | None = None
    unanchored_records: int | None = None
    first_bad_record: int | None = None
    problems: tuple[str, ...] = ()
    unreadable_records: tuple[int, ...] = ()
    verified_with: tuple[str, ...] = ()
    """The keys and certificates that verified the log's signatures (one line each)."""


class ReportFilters(FrozenModel):
    session: str | None = None
    node: str | None = None
    since: UtcTime | None = None
    until: UtcTime | None = None


class Totals(FrozenModel):
    events: int
    sessions: int
    failed_sessions: int
    """Sessions that ended in an error (their denials and attestation failures say why)."""
    clients: int
    nodes: int
    transfers: int
    tokens: int
    failovers: int
    denials: int
    attestation_failures: int
    announcements: int
    """Announcements the registry accepted (refused ones count as denials)."""
    verifications: int
    """Outputs re-executed on other nodes and compared (``fincluster.client.verification``)."""
    verification_failures: int


class PlacementRow(FrozenModel):
    """Blocks ``block_span`` of one session ran on ``node_id`` (routed and/or transferred to), under
    these attestations and policy decisions."""

    block_span: BlockSpan
    node_id: str
    node_tiers: tuple[str, ...]
    attestations: tuple[AttestationClaims, ...]
    """The node's verified claims as recorded (more than one if it was re-attested mid-session)."""
    policy_decision_ids: tuple[str, ...]
    policy_bundle_digests: tuple[str, ...]
    cert_fingerprints: tuple[str, ...]
    """Certificates the node's receipts were signed under (several after a renewal or rotation)."""
    routed: int
    """Routing decisions that placed these blocks on this node."""
    transfers: int
    tokens: int
    receipts: int
    """Transfers that carry the node's signed receipt."""


class FailoverRow(FrozenModel):
    time: UtcTime
    session_id: str
    block_span: BlockSpan
    failed_node_id: str
    replacement_node_id: str | None
    reason: str
    replayed_steps: int


class VerificationRow(FrozenModel):
    """A re-execution that disagreed with the checked node's output (agreements are only counted)."""

    time: UtcTime
    session_id: str
    step: int
    block_span: BlockSpan
    checked_node_id: str
    verifier_node_ids: tuple[str, ...]
    referee_node_ids: tuple[str, ...]
    quarantined_node_id: str | None
    max_abs_diff: float | None
    checked_output_sha256: str
    verifier_output_sha256: str


class DenialRow(FrozenModel):
    time: UtcTime
    session_id: str | None
    enforced_at: str
    node_id: str | None
    block_span: BlockSpan | None
    reasons: tuple[str, ...]
    policy_decision_id: str | None


class AttestationFailureRow(FrozenModel):
    time: UtcTime
    session_id: str | None
    node_id: str
    attestation_id: str | None
    reason: str


class SessionReport(FrozenModel):
    session_id: str
    observer: str
    """Whose log this session is in: ``client`` (what it sent) or ``server`` (what it received)."""
    client_id: str | None
    department: str | None
    classification: str | None
    model_id: str | None
    manifest_digest: str | None
    opened_at: UtcTime | None
    closed_at: UtcTime | None
    outcome: str | None
    state: str
    """How the session stands in this log, in words (closed, stateless pass, still open, …)."""
    failed: bool
    """It ended in an error. Denials of other candidate nodes while placing it are not failures."""
    transfers: int
    tokens: int
    placement: tuple[PlacementRow, ...]
    failovers: tuple[FailoverRow, ...]
    denials: tuple[DenialRow, ...]
    attestation_failures: tuple[AttestationFailureRow, ...]
    #: Outputs of this session's hops re-executed elsewhere, and the ones that disagreed.
    verifications: int
    verification_failures: tuple[VerificationRow, ...]


class NodeReport(FrozenModel):
    node_id: str
    node_tiers: tuple[str, ...]
    attestations: tuple[AttestationClaims, ...]
    cert_fingerprints: tuple[str, ...]
    sessions: tuple[str, ...]
    block_spans: tuple[BlockSpan, ...]
    transfers: int
    tokens: int
    failovers: int
    """Times this node failed mid-session."""
    denials: int
    attestation_failures: int
    announcements: int
    outputs_checked: int
    """Outputs of this node re-executed elsewhere."""
    outputs_found_wrong: int
    """Comparisons after which this node (as the checked node or a verifier) was quarantined."""


class UserRow(FrozenModel):
    """One client identity's activity, with its department (from the policy data)."""

    client_id: str
    department: str
    sessions: int
    failed_sessions: int
    transfers: int
    tokens: int
    denials: int
    attestation_failures: int


class DepartmentRow(FrozenModel):
    department: str
    clients: int
    sessions: int
    failed_sessions: int
    transfers: int
    tokens: int
    denials: int


class AnnouncementRow(FrozenModel):
    """An announcement the registry accepted or refused (from a registry's log)."""

    time: UtcTime
    node_id: str
    block_span: BlockSpan | None
    outcome: Literal["accepted", "refused"]
    attestation: AttestationClaims | None
    reasons: tuple[str, ...]
    policy_decision_id: str | None
    policy_bundle_digest: str | None


class ExposureRow(FrozenModel):
    node_id: str
    tokens: tuple[int, ...]
    """Tokens whose activations this node processed, per block (aligned with ``ExposureMatrix.blocks``)."""


class ExposureMatrix(FrozenModel):
    blocks: tuple[int, ...]
    rows: tuple[ExposureRow, ...]


class Report(FrozenModel):
    title: str
    origin: str | None
    generated_at: UtcTime
    filters: ReportFilters
    integrity: Integrity
    totals: Totals
    sessions: tuple[SessionReport, ...]
    nodes: tuple[NodeReport, ...]
    users: tuple[UserRow, ...]
    departments: tuple[DepartmentRow, ...]
    announcements: tuple[AnnouncementRow, ...]
    exposure: ExposureMatrix
    denials_without_session: tuple[DenialRow, ...]
    """Denials at the router or a server outside any session (the registry's are announcements)."""
    attestation_failures_without_session: tuple[AttestationFailureRow, ...]
