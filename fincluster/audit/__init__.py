"""Tamper-evident audit log of every activation transfer, with receipts, verification and reports.

High-level entry points:

* :class:`AuditLog` — append events, checkpoint, prune, prove (one SQLite file per writer);
* :func:`verify` — check a log file against trusted keys and name the first bad record;
* :func:`sign_receipt` / :func:`verify_receipt` — servers' signed receipts;
* :func:`reconcile` — pair client and server transfer records;
* :func:`build_report` and ``render_*`` — compliance reports in HTML, JSON and CSV;
* :func:`capture_audit_events` — collect events in users' own tests.

The Merkle tree, canonical form and signature helpers live in submodules for those who need them.
"""

from fincluster.audit.canonical import canonical_json, sha256_hex
from fincluster.audit.checkpoints import Checkpoint, CheckpointBody, PruneMarker
from fincluster.audit.events import (
    AnnounceEvent,
    AttestationClaims,
    AttestationFailureEvent,
    AuditEvent,
    DenialEvent,
    FailoverEvent,
    RouteHop,
    RoutingEvent,
    SessionCloseEvent,
    SessionOpenEvent,
    TransferEvent,
    VerificationEvent,
)
from fincluster.audit.export import export_jsonl
from fincluster.audit.log import AuditLog, AuditSettings
from fincluster.audit.reader import read_events, read_log
from fincluster.audit.receipts import receipt_body, receipt_is_valid, sign_receipt, verify_receipt
from fincluster.audit.reconcile import ReconcileReport, TransferKey, reconcile
from fincluster.audit.recorder import (
    AuditRecorder,
    AuditSink,
    capture_audit_events,
    record_event,
    record_events,
)
from fincluster.audit.render_csv import render_csv
from fincluster.audit.render_html import render_html
from fincluster.audit.report import build_report, render_json
from fincluster.audit.report_model import Report
from fincluster.audit.verify import Problem, VerifyReport, verify

__all__ = [
    "AnnounceEvent",
    "AttestationClaims",
    "AttestationFailureEvent",
    "AuditEvent",
    "AuditLog",
    "AuditRecorder",
    "AuditSettings",
    "AuditSink",
    "Checkpoint",
    "CheckpointBody",
    "DenialEvent",
    "FailoverEvent",
    "Problem",
    "PruneMarker",
    "ReconcileReport",
    "Report",
    "RouteHop",
    "RoutingEvent",
    "SessionCloseEvent",
    "SessionOpenEvent",
    "TransferEvent",
    "TransferKey",
    "VerificationEvent",
    "VerifyReport",
    "build_report",
    "canonical_json",
    "capture_audit_events",
    "export_jsonl",
    "read_events",
    "read_log",
    "receipt_body",
    "receipt_is_valid",
    "reconcile",
    "record_event",
    "record_events",
    "render_csv",
    "render_html",
    "render_json",
    "sha256_hex",
    "sign_receipt",
    "verify",
    "verify_receipt",
]
