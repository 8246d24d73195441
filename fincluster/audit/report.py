"""Compliance reports: which node saw which activations, under which attestation and policy.

:func:`build_report` turns a log file into a :class:`Report` value; the renderers (JSON here, HTML in
``render_html``, CSV in ``render_csv``) only format that value, so all three carry the same numbers.
Integrity comes first: the report embeds the result of :func:`~fincluster.audit.verify.verify` (or
says plainly that it was not checked when no trusted keys were given).

Exposure counts tokens: a transfer of ``n`` tokens to a node for blocks ``[a, b)`` adds ``n`` to that
node's cell of every block ``a..b-1``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from fincluster.audit.checkpoints import Checkpoint
from fincluster.audit.events import (
    AttestationFailureEvent,
    AuditEvent,
    DenialEvent,
    FailoverEvent,
    RoutingEvent,
    SessionCloseEvent,
    SessionOpenEvent,
    TransferEvent,
    event_nodes,
)
from fincluster.audit.fields import UtcTime
from fincluster.audit.keys import KeyRing
from fincluster.audit.reader import read_log
from fincluster.audit.signing import PublicKey
from fincluster.audit.verify import VerifyReport, verify
from fincluster.spans import BlockSpan
from fincluster.values import Clock, FrozenModel, utc_now

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


class ReportFilters(FrozenModel):
    session: str | None = None
    node: str | None = None
    since: UtcTime | None = None
    until: UtcTime | None = None


class Totals(FrozenModel):
    events: int
    sessions: int
    nodes: int
    transfers: int
    tokens: int
    failovers: int
    denials: int
    attestation_failures: int


class PlacementRow(FrozenModel):
    """Blocks ``block_span`` of one session ran on ``node_id`` (routed and/or transferred to)."""

    block_span: BlockSpan
    node_id: str
    node_tiers: tuple[str, ...]
    attestation_ids: tuple[str, ...]
    policy_decision_ids: tuple[str, ...]
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
    client_id: str | None
    classification: str | None
    model_id: str | None
    manifest_digest: str | None
    opened_at: UtcTime | None
    closed_at: UtcTime | None
    outcome: str | None
    transfers: int
    tokens: int
    placement: tuple[PlacementRow, ...]
    failovers: tuple[FailoverRow, ...]
    denials: tuple[DenialRow, ...]
    attestation_failures: tuple[AttestationFailureRow, ...]


class NodeReport(FrozenModel):
    node_id: str
    node_tiers: tuple[str, ...]
    attestation_ids: tuple[str, ...]
    sessions: tuple[str, ...]
    block_spans: tuple[BlockSpan, ...]
    transfers: int
    tokens: int
    failovers: int
    """Times this node failed mid-session."""
    denials: int
    attestation_failures: int


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
    exposure: ExposureMatrix
    denials_without_session: tuple[DenialRow, ...]
    attestation_failures_without_session: tuple[AttestationFailureRow, ...]


def build_report(
    db_path: Path | str,
    session: str | None = None,
    node: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    trusted_public_keys: Iterable[PublicKey] | KeyRing | None = None,
    anchor: Checkpoint | None = None,
    clock: Clock = utc_now,
) -> Report:
    """Report on the log at ``db_path``, optionally narrowed to one session, one node or a time window.

    ``since`` is inclusive and ``until`` exclusive. Without ``trusted_public_keys`` the integrity
    status is ``not_checked``.
    """
    filters = ReportFilters(session=session, node=node, since=since, until=until)
    contents = read_log(db_path)
    verified = None if trusted_public_keys is None else verify(db_path, trusted_public_keys, anchor=anchor)
    events = _select(contents.events, filters)
    sessions = _sessions(events, filters.node)
    nodes = _nodes(events, filters.node)
    return Report(
        title="fincluster audit report",
        origin=contents.origin,
        generated_at=clock(),
        filters=filters,
        integrity=_integrity(verified, contents.unreadable),
        totals=Totals(
            events=len(events),
            sessions=len(sessions),
            nodes=len(nodes),
            transfers=sum(s.transfers for s in sessions),
            tokens=sum(s.tokens for s in sessions),
            failovers=sum(len(s.failovers) for s in sessions),
            denials=sum(1 for e in events if isinstance(e, DenialEvent)),
            attestation_failures=sum(1 for e in events if isinstance(e, AttestationFailureEvent)),
        ),
        sessions=sessions,
        nodes=nodes,
        exposure=_exposure(events, filters.node),
        denials_without_session=tuple(
            _denial_row(e) for e in events if isinstance(e, DenialEvent) and e.session_id is None
        ),
        attestation_failures_without_session=tuple(
            _attestation_row(e)
            for e in events
            if isinstance(e, AttestationFailureEvent) and e.session_id is None
        ),
    )


def render_json(report: Report) -> str:
    return json.dumps(report.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"


# -- selection ------------------------------------------------------------------------------------


def _select(events: Sequence[AuditEvent], filters: ReportFilters) -> list[AuditEvent]:
    selected = [
        e
        for e in events
        if (filters.session is None or e.session_id == filters.session)
        and (filters.since is None or e.time >= filters.since)
        and (filters.until is None or e.time < filters.until)
    ]
    if filters.node is None:
        return selected
    # Keep the node's own events, and the open/close events of the sessions it took part in.
    touched = {e.session_id for e in selected if filters.node in event_nodes(e)}
    return [
        e
        for e in selected
        if filters.node in event_nodes(e)
        or (isinstance(e, SessionOpenEvent | SessionCloseEvent) and e.session_id in touched)
    ]


def _integrity(verified: VerifyReport | None, unreadable: tuple[int, ...]) -> Integrity:
    if verified is None:
        return Integrity(
            status="not_checked",
            summary="Integrity NOT CHECKED: no trusted public keys were given.",
            unreadable_records=unreadable,
        )
    last = verified.last_checkpoint
    if verified.ok:
        summary = (
            f"Integrity VERIFIED: {verified.tree_size} records, {verified.checkpoints_verified} signed "
            f"checkpoints, {verified.unanchored_records} records after the last checkpoint."
        )
    else:
        where = (
            "" if verified.first_bad_record is None else f" First bad record: {verified.first_bad_record}."
        )
        summary = f"Integrity FAILED: {verified.problem_count} problems.{where}"
    return Integrity(
        status="verified" if verified.ok else "failed",
        summary=summary,
        tree_size=verified.tree_size,
        root_hash=verified.root_hash,
        checkpoints_verified=verified.checkpoints_verified,
        last_checkpoint_size=last.tree_size if last else None,
        last_checkpoint_time=last.time if last else None,
        unanchored_records=verified.unanchored_records,
        first_bad_record=verified.first_bad_record,
        problems=tuple(p.detail for p in verified.problems),
        unreadable_records=unreadable,
    )


# -- per session ----------------------------------------------------------------------------------


class _PlacementTally:
    def __init__(self) -> None:
        self.tiers: set[str] = set()
        self.attestations: set[str] = set()
        self.decisions: set[str] = set()
        self.routed = self.transfers = self.tokens = self.receipts = 0

    def note(self, tier: str | None, attestation: str | None, decision: str | None) -> None:
        self.tiers.update(v for v in (tier,) if v)
        self.attestations.update(v for v in (attestation,) if v)
        self.decisions.update(v for v in (decision,) if v)


def _sessions(events: Sequence[AuditEvent], node: str | None) -> tuple[SessionReport, ...]:
    by_session: dict[str, list[AuditEvent]] = defaultdict(list)
    for e in events:
        if e.session_id is not None:
            by_session[e.session_id].append(e)
    return tuple(_session_report(sid, by_session[sid], node) for sid in sorted(by_session))


def _session_report(session_id: str, events: list[AuditEvent], node: str | None) -> SessionReport:
    opened = next((e for e in events if isinstance(e, SessionOpenEvent)), None)
    closed = next((e for e in events if isinstance(e, SessionCloseEvent)), None)
    transfers = [e for e in events if isinstance(e, TransferEvent)]
    first = transfers[0] if transfers else None
    source = opened or first
    tallies: dict[tuple[int, int, str], _PlacementTally] = defaultdict(_PlacementTally)
    for e in events:
        if isinstance(e, RoutingEvent):
            for hop in e.chain:
                if node is None or hop.node_id == node:
                    tally = tallies[(hop.block_span.start, hop.block_span.end, hop.node_id)]
                    tally.routed += 1
                    tally.note(hop.node_tier, hop.attestation_id, hop.policy_decision_id)
        elif isinstance(e, TransferEvent):
            tally = tallies[(e.block_span.start, e.block_span.end, e.node_id)]
            tally.transfers += 1
            tally.tokens += e.num_tokens
            tally.receipts += e.receipt is not None
            tally.note(e.node_tier, e.attestation_id, e.policy_decision_id)
    placement = tuple(
        PlacementRow(
            block_span=BlockSpan(start=start, end=end),
            node_id=node_id,
            node_tiers=tuple(sorted(t.tiers)),
            attestation_ids=tuple(sorted(t.attestations)),
            policy_decision_ids=tuple(sorted(t.decisions)),
            routed=t.routed,
            transfers=t.transfers,
            tokens=t.tokens,
            receipts=t.receipts,
        )
        for (start, end, node_id), t in sorted(tallies.items())
    )
    return SessionReport(
        session_id=session_id,
        client_id=source.client_id if source else None,
        classification=source.classification if source else None,
        model_id=source.model_id if source else None,
        manifest_digest=source.manifest_digest if source else None,
        opened_at=opened.time if opened else None,
        closed_at=closed.time if closed else None,
        outcome=closed.outcome if closed else None,
        transfers=len(transfers),
        tokens=sum(e.num_tokens for e in transfers),
        placement=placement,
        failovers=tuple(_failover_row(e) for e in events if isinstance(e, FailoverEvent)),
        denials=tuple(_denial_row(e) for e in events if isinstance(e, DenialEvent)),
        attestation_failures=tuple(
            _attestation_row(e) for e in events if isinstance(e, AttestationFailureEvent)
        ),
    )


def _failover_row(e: FailoverEvent) -> FailoverRow:
    return FailoverRow(
        time=e.time,
        session_id=e.session_id,
        block_span=e.block_span,
        failed_node_id=e.failed_node_id,
        replacement_node_id=e.replacement_node_id,
        reason=e.reason,
        replayed_steps=e.replayed_steps,
    )


def _denial_row(e: DenialEvent) -> DenialRow:
    return DenialRow(
        time=e.time,
        session_id=e.session_id,
        enforced_at=e.enforced_at,
        node_id=e.node_id,
        block_span=e.block_span,
        reasons=e.reasons,
        policy_decision_id=e.policy_decision_id,
    )


def _attestation_row(e: AttestationFailureEvent) -> AttestationFailureRow:
    return AttestationFailureRow(
        time=e.time,
        session_id=e.session_id,
        node_id=e.node_id,
        attestation_id=e.attestation_id,
        reason=e.reason,
    )


# -- per node -------------------------------------------------------------------------------------


def _nodes(events: Sequence[AuditEvent], only: str | None) -> tuple[NodeReport, ...]:
    node_ids = sorted({n for e in events for n in event_nodes(e) if only is None or n == only})
    return tuple(_node_report(node_id, events) for node_id in node_ids)


def _node_report(node_id: str, events: Sequence[AuditEvent]) -> NodeReport:
    transfers = [e for e in events if isinstance(e, TransferEvent) and e.node_id == node_id]
    hops = [hop for e in events if isinstance(e, RoutingEvent) for hop in e.chain if hop.node_id == node_id]
    tiers = {e.node_tier for e in transfers} | {hop.node_tier for hop in hops}
    attestations = {e.attestation_id for e in transfers} | {hop.attestation_id for hop in hops}
    spans = {(e.block_span.start, e.block_span.end) for e in transfers}
    return NodeReport(
        node_id=node_id,
        node_tiers=tuple(sorted(t for t in tiers if t)),
        attestation_ids=tuple(sorted(a for a in attestations if a)),
        sessions=tuple(sorted({e.session_id for e in transfers})),
        block_spans=tuple(BlockSpan(start=start, end=end) for start, end in sorted(spans)),
        transfers=len(transfers),
        tokens=sum(e.num_tokens for e in transfers),
        failovers=sum(1 for e in events if isinstance(e, FailoverEvent) and e.failed_node_id == node_id),
        denials=sum(1 for e in events if isinstance(e, DenialEvent) and e.node_id == node_id),
        attestation_failures=sum(
            1 for e in events if isinstance(e, AttestationFailureEvent) and e.node_id == node_id
        ),
    )


def _exposure(events: Sequence[AuditEvent], only: str | None) -> ExposureMatrix:
    transfers = [e for e in events if isinstance(e, TransferEvent) and (only is None or e.node_id == only)]
    block_count = max((e.block_span.end for e in transfers), default=0)
    cells: dict[str, list[int]] = {}
    for e in transfers:
        row = cells.setdefault(e.node_id, [0] * block_count)
        for block in range(e.block_span.start, e.block_span.end):
            row[block] += e.num_tokens
    return ExposureMatrix(
        blocks=tuple(range(block_count)),
        rows=tuple(ExposureRow(node_id=n, tokens=tuple(cells[n])) for n in sorted(cells)),
    )
