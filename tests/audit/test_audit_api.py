"""The public names of fincluster.audit are deliberate: this list changes only on purpose."""

from __future__ import annotations

import fincluster.audit as audit


def test_public_api_is_pinned() -> None:
    assert sorted(audit.__all__) == [
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
    assert all(hasattr(audit, name) for name in audit.__all__)
