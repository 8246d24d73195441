"""Compliance reports: which node saw which activations, under which attestation and policy.

:func:`build_report` turns a log file into a :class:`~fincluster.audit.report_model.Report`, in steps
that read top to bottom:

    read -> verify (integrity first) -> select (filters) -> sessions -> nodes -> users and departments
         -> announcements -> exposure

The renderers (JSON here, HTML in ``render_html``, CSV in ``render_csv``, PDF in ``render_pdf``) only
format that value, so all of them carry the same numbers. Without trusted keys the integrity status
says plainly that it was not checked.

Exposure counts tokens: a transfer of ``n`` tokens to a node for blocks ``[a, b)`` adds ``n`` to that
node's cell of every block ``a..b-1``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from fincluster.audit.checkpoints import Checkpoint
from fincluster.audit.events import (
    AnnounceEvent,
    AttestationClaims,
    AttestationFailureEvent,
    AuditEvent,
    DenialEvent,
    FailoverEvent,
    RoutingEvent,
    SessionCloseEvent,
    SessionOpenEvent,
    TransferEvent,
    VerificationEvent,
    event_nodes,
)
from fincluster.audit.fields import format_utc
from fincluster.audit.keys import KeyRing
from fincluster.audit.names import UNASSIGNED
from fincluster.audit.reader import read_log
from fincluster.audit.report_model import (
    AnnouncementRow,
    AttestationFailureRow,
    DenialRow,
    DepartmentRow,
    ExposureMatrix,
    ExposureRow,
    FailoverRow,
    Integrity,
    NodeReport,
    PlacementRow,
    Report,
    ReportFilters,
    SessionReport,
    Totals,
    UserRow,
    VerificationRow,
)
from fincluster.audit.signing import PublicKey
from fincluster.audit.verify import VerifyReport, verify
from fincluster.spans import BlockSpan
from fincluster.values import Clock, utc_now

_STATELESS = frozenset({"forward", "backward"})


def build_report(
    db_path: Path | str,
    session: str | None = None,
    node: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    trusted_public_keys: Iterable[PublicKey] | KeyRing | None = None,
    anchor: Checkpoint | None = None,
    departments: Mapping[str, str] | None = None,
    clock: Clock = utc_now,
) -> Report:
    """Report on the log at ``db_path``, optionally narrowed to one session, one node or a time window.

    ``since`` is inclusive and ``until`` exclusive. Without ``trusted_public_keys`` the integrity
    status is ``not_checked``. ``departments`` maps client SPIFFE ids to departments
    (``names.load_departments``).
    """
    filters = ReportFilters(session=session, node=node, since=since, until=until)
    contents = read_log(db_path)
    verified = None if trusted_public_keys is None else verify(db_path, trusted_public_keys, anchor=anchor)
    events = _select(contents.events, filters)
    sessions = _sessions(events, filters, departments or {})
    nodes = _nodes(events, filters.node)
    users = _users(sessions, departments or {})
    announcements = _announcements(events)
    return Report(
        title="fincluster audit report",
        origin=contents.origin,
        generated_at=clock(),
        filters=filters,
        integrity=_integrity(verified, contents.unreadable),
        totals=Totals(
            events=len(events),
            sessions=len(sessions),
            failed_sessions=sum(s.failed for s in sessions),
            clients=len(users),
            nodes=len(nodes),
            transfers=sum(s.transfers for s in sessions),
            tokens=sum(s.tokens for s in sessions),
            failovers=sum(len(s.failovers) for s in sessions),
            denials=sum(1 for e in events if isinstance(e, DenialEvent)),
            attestation_failures=sum(1 for e in events if isinstance(e, AttestationFailureEvent)),
            announcements=sum(1 for a in announcements if a.outcome == "accepted"),
            verifications=sum(1 for e in events if isinstance(e, VerificationEvent)),
            verification_failures=sum(1 for e in events if isinstance(e, VerificationEvent) and not e.agreed),
        ),
        sessions=sessions,
        nodes=nodes,
        users=users,
        departments=_departments(users),
        announcements=announcements,
        exposure=_exposure(events, filters.node),
        denials_without_session=tuple(
            _denial_row(e)
            for e in events
            if isinstance(e, DenialEvent) and e.session_id is None and e.enforced_at != "registry"
        ),
        attestation_failures_without_session=tuple(
            _attestation_row(e)
            for e in events
            if isinstance(e, AttestationFailureEvent) and e.session_id is None
        ),
    )


def render_json(report: Report) -> str:
    return json.dumps(report.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"


def matched_nothing(report: Report) -> str | None:
    """Why a filtered report is empty (a session or node the log does not have), or None."""
    f = report.filters
    if f.session is not None and not report.sessions:
        return f"no session {f.session!r} in this log{_window(f)}"
    if f.node is not None and not report.nodes:
        return f"no event of node {f.node!r} in this log{_window(f)}"
    return None


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


def _window(filters: ReportFilters) -> str:
    if filters.since is None and filters.until is None:
        return ""
    return f" between {format_utc(filters.since) if filters.since else 'the start'} and " + (
        format_utc(filters.until) if filters.until else "the end"
    )


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
        verified_with=verified.signers,
    )


# -- per session ----------------------------------------------------------------------------------


class _PlacementTally:
    def __init__(self) -> None:
        self.attestations: dict[str, AttestationClaims] = {}
        self.decisions: set[str] = set()
        self.bundles: set[str] = set()
        self.certificates: set[str] = set()
        self.routed = self.transfers = self.tokens = self.receipts = 0

    def note(self, claims: AttestationClaims | None, decision: str | None, bundle: str | None) -> None:
        if claims is not None:
            self.attestations.setdefault(claims.attestation_id, claims)
        self.decisions.update(v for v in (decision,) if v)
        self.bundles.update(v for v in (bundle,) if v)

    def row(self, span: BlockSpan, node_id: str) -> PlacementRow:
        claims = tuple(sorted(self.attestations.values(), key=lambda c: c.issued_at))
        return PlacementRow(
            block_span=span,
            node_id=node_id,
            node_tiers=tuple(sorted({c.tier for c in claims})),
            attestations=claims,
            policy_decision_ids=tuple(sorted(self.decisions)),
            policy_bundle_digests=tuple(sorted(self.bundles)),
            cert_fingerprints=tuple(sorted(self.certificates)),
            routed=self.routed,
            transfers=self.transfers,
            tokens=self.tokens,
            receipts=self.receipts,
        )


def _sessions(
    events: Sequence[AuditEvent], filters: ReportFilters, departments: Mapping[str, str]
) -> tuple[SessionReport, ...]:
    by_session: dict[str, list[AuditEvent]] = defaultdict(list)
    for e in events:
        if e.session_id is not None:
            by_session[e.session_id].append(e)
    reports = [_session_report(sid, by_session[sid], filters, departments) for sid in by_session]
    return tuple(
        sorted(reports, key=lambda s: (s.opened_at is None, s.opened_at or s.closed_at, s.session_id))
    )


def _session_report(
    session_id: str, events: list[AuditEvent], filters: ReportFilters, departments: Mapping[str, str]
) -> SessionReport:
    opened = next((e for e in events if isinstance(e, SessionOpenEvent)), None)
    closed = next((e for e in events if isinstance(e, SessionCloseEvent)), None)
    transfers = [e for e in events if isinstance(e, TransferEvent)]
    first = transfers[0] if transfers else None
    client_id = (
        opened.client_id if opened else first.client_id if first else closed.client_id if closed else None
    )
    tallies: dict[tuple[int, int, str], _PlacementTally] = defaultdict(_PlacementTally)
    for e in events:
        if isinstance(e, RoutingEvent):
            for hop in e.chain:
                if filters.node is None or hop.node_id == filters.node:
                    tally = tallies[(hop.block_span.start, hop.block_span.end, hop.node_id)]
                    tally.routed += 1
                    tally.note(hop.attestation, hop.policy_decision_id, e.policy_bundle_digest)
        elif isinstance(e, TransferEvent):
            tally = tallies[(e.block_span.start, e.block_span.end, e.node_id)]
            tally.transfers += 1
            tally.tokens += e.num_tokens
            tally.receipts += e.receipt is not None
            tally.certificates.add(e.cert_fingerprint)
            tally.note(e.attestation, e.policy_decision_id, e.policy_bundle_digest)
    denials = tuple(_denial_row(e) for e in events if isinstance(e, DenialEvent))
    failures = tuple(_attestation_row(e) for e in events if isinstance(e, AttestationFailureEvent))
    source = opened or first
    return SessionReport(
        session_id=session_id,
        observer=events[0].observer,
        client_id=client_id,
        department=departments.get(client_id, UNASSIGNED) if client_id else None,
        classification=source.classification if source else None,
        model_id=source.model_id if source else None,
        manifest_digest=source.manifest_digest if source else None,
        opened_at=opened.time if opened else first.time if first else None,
        closed_at=closed.time if closed else None,
        outcome=closed.outcome if closed else None,
        state=_state(closed, transfers, filters),
        failed=closed is not None and closed.outcome == "error",
        transfers=len(transfers),
        tokens=sum(e.num_tokens for e in transfers),
        placement=tuple(
            t.row(BlockSpan(start=start, end=end), node_id)
            for (start, end, node_id), t in sorted(tallies.items())
        ),
        failovers=tuple(_failover_row(e) for e in events if isinstance(e, FailoverEvent)),
        denials=denials,
        attestation_failures=failures,
        verifications=sum(1 for e in events if isinstance(e, VerificationEvent)),
        verification_failures=tuple(
            _verification_row(e) for e in events if isinstance(e, VerificationEvent) and not e.agreed
        ),
    )


def _state(closed: SessionCloseEvent | None, transfers: list[TransferEvent], filters: ReportFilters) -> str:
    """What "closed" means depends on who wrote the log: a client closes its sessions; a server sees
    the close, or the stream end, or an idle expiry; a forward or backward pass has nothing to close."""
    if closed is not None:
        when = f"{closed.time:%Y-%m-%d %H:%M:%S} UTC"
        if closed.outcome == "ok":
            return f"closed at {when}"
        return f"ended at {when}: {closed.reason or 'error'}"
    if transfers and all(e.operation in _STATELESS for e in transfers):
        return "stateless pass (forward/backward: nothing to close)"
    if filters.since is not None or filters.until is not None:
        return "no close within the time window"
    return "still open where the log ends"


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


def _verification_row(e: VerificationEvent) -> VerificationRow:
    return VerificationRow(
        time=e.time,
        session_id=e.session_id,
        step=e.step,
        block_span=e.block_span,
        checked_node_id=e.checked_node_id,
        verifier_node_ids=e.verifier_node_ids,
        referee_node_ids=e.referee_node_ids,
        quarantined_node_id=e.quarantined_node_id,
        max_abs_diff=e.max_abs_diff,
        checked_output_sha256=e.checked_output_sha256,
        verifier_output_sha256=e.verifier_output_sha256,
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
    announced = [e for e in events if isinstance(e, AnnounceEvent) and e.node_id == node_id]
    hops = [hop for e in events if isinstance(e, RoutingEvent) for hop in e.chain if hop.node_id == node_id]
    claims: dict[str, AttestationClaims] = {}
    refused = [e for e in events if isinstance(e, DenialEvent) and e.node_id == node_id]
    verifications = [e for e in events if isinstance(e, VerificationEvent)]
    for placed in (*transfers, *hops, *announced, *refused):
        if placed.attestation is not None:
            claims.setdefault(placed.attestation.attestation_id, placed.attestation)
    served: list[TransferEvent | AnnounceEvent] = [*transfers, *announced]
    spans = {(e.block_span.start, e.block_span.end) for e in served}
    return NodeReport(
        node_id=node_id,
        node_tiers=tuple(sorted({c.tier for c in claims.values()})),
        attestations=tuple(sorted(claims.values(), key=lambda c: c.issued_at)),
        cert_fingerprints=tuple(sorted({e.cert_fingerprint for e in served})),
        sessions=tuple(sorted({e.session_id for e in transfers})),
        block_spans=tuple(BlockSpan(start=start, end=end) for start, end in sorted(spans)),
        transfers=len(transfers),
        tokens=sum(e.num_tokens for e in transfers),
        failovers=sum(1 for e in events if isinstance(e, FailoverEvent) and e.failed_node_id == node_id),
        denials=len(refused),
        attestation_failures=sum(
            1 for e in events if isinstance(e, AttestationFailureEvent) and e.node_id == node_id
        ),
        announcements=len(announced),
        outputs_checked=sum(1 for e in verifications if e.checked_node_id == node_id),
        outputs_found_wrong=sum(1 for e in verifications if e.quarantined_node_id == node_id),
    )


# -- per user and department ------------------------------------------------------------------------


def _users(sessions: Sequence[SessionReport], departments: Mapping[str, str]) -> tuple[UserRow, ...]:
    by_client: dict[str, list[SessionReport]] = defaultdict(list)
    for s in sessions:
        if s.client_id is not None:
            by_client[s.client_id].append(s)
    return tuple(
        UserRow(
            client_id=client_id,
            department=departments.get(client_id, UNASSIGNED),
            sessions=len(rows),
            failed_sessions=sum(s.failed for s in rows),
            transfers=sum(s.transfers for s in rows),
            tokens=sum(s.tokens for s in rows),
            denials=sum(len(s.denials) for s in rows),
            attestation_failures=sum(len(s.attestation_failures) for s in rows),
        )
        for client_id, rows in sorted(by_client.items())
    )


def _departments(users: Sequence[UserRow]) -> tuple[DepartmentRow, ...]:
    by_department: dict[str, list[UserRow]] = defaultdict(list)
    for user in users:
        by_department[user.department].append(user)
    return tuple(
        DepartmentRow(
            department=department,
            clients=len(rows),
            sessions=sum(u.sessions for u in rows),
            failed_sessions=sum(u.failed_sessions for u in rows),
            transfers=sum(u.transfers for u in rows),
            tokens=sum(u.tokens for u in rows),
            denials=sum(u.denials for u in rows),
        )
        for department, rows in sorted(by_department.items())
    )


# -- registry -------------------------------------------------------------------------------------


def _announcements(events: Sequence[AuditEvent]) -> tuple[AnnouncementRow, ...]:
    rows = []
    for e in events:
        if isinstance(e, AnnounceEvent):
            rows.append(
                AnnouncementRow(
                    time=e.time,
                    node_id=e.node_id,
                    block_span=e.block_span,
                    outcome="accepted",
                    attestation=e.attestation,
                    reasons=(),
                    policy_decision_id=e.policy_decision_id,
                    policy_bundle_digest=e.policy_bundle_digest,
                )
            )
        elif isinstance(e, DenialEvent) and e.enforced_at == "registry" and e.node_id is not None:
            rows.append(
                AnnouncementRow(
                    time=e.time,
                    node_id=e.node_id,
                    block_span=e.block_span,
                    outcome="refused",
                    attestation=e.attestation,
                    reasons=e.reasons,
                    policy_decision_id=e.policy_decision_id,
                    policy_bundle_digest=e.policy_bundle_digest,
                )
            )
    return tuple(rows)


# -- exposure -------------------------------------------------------------------------------------


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
