"""The report as one CSV table (long format), for spreadsheets and SIEM imports.

Every row names its ``section``: ``integrity``, ``session``, ``placement`` (one per session, block
span and node, with the attestation claims and policy decisions), ``failover``,
``verification_failure`` (an output another node recomputed differently), ``denial``,
``attestation_failure``, ``announcement`` (a registry's log), ``node``, ``user``, ``department`` and
``exposure`` (one per node and block). Several values in one cell are joined with ``|``. The numbers
are those of the JSON report.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator

from fincluster.audit.events import AttestationClaims
from fincluster.audit.fields import format_utc
from fincluster.audit.report_model import AttestationFailureRow, DenialRow, Report
from fincluster.spans import BlockSpan

COLUMNS = (
    "section",
    "session_id",
    "client_id",
    "department",
    "classification",
    "model_id",
    "manifest_digest",
    "node_id",
    "node_tiers",
    "block_start",
    "block_end",
    "attestation_ids",
    "attestation_zones",
    "attestation_hardware",
    "attestation_software",
    "attestation_authority_keys",
    "attestation_expires",
    "policy_decision_ids",
    "policy_bundle_digests",
    "cert_fingerprints",
    "sessions",
    "failed_sessions",
    "routed",
    "transfers",
    "tokens",
    "receipts",
    "time",
    "detail",
)

Row = dict[str, str | int | None]


def render_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(report))
    return out.getvalue()


def _rows(report: Report) -> Iterator[Row]:
    integrity = report.integrity
    yield {
        "section": "integrity",
        "time": format_utc(report.generated_at),
        "detail": f"{integrity.status}: {integrity.summary}",
    }
    for s in report.sessions:
        session_columns: Row = {
            "session_id": s.session_id,
            "client_id": s.client_id,
            "department": s.department,
            "classification": s.classification,
            "model_id": s.model_id,
            "manifest_digest": s.manifest_digest,
        }
        yield {
            "section": "session",
            **session_columns,
            "transfers": s.transfers,
            "tokens": s.tokens,
            "time": format_utc(s.opened_at) if s.opened_at else None,
            "detail": f"observer={s.observer}; state={s.state}; failed={'yes' if s.failed else 'no'}",
        }
        for p in s.placement:
            yield {
                "section": "placement",
                **session_columns,
                "node_id": p.node_id,
                "node_tiers": _join(p.node_tiers),
                **_span(p.block_span),
                **_claims(p.attestations),
                "policy_decision_ids": _join(p.policy_decision_ids),
                "policy_bundle_digests": _join(p.policy_bundle_digests),
                "cert_fingerprints": _join(p.cert_fingerprints),
                "routed": p.routed,
                "transfers": p.transfers,
                "tokens": p.tokens,
                "receipts": p.receipts,
            }
        for f in s.failovers:
            yield {
                "section": "failover",
                "session_id": f.session_id,
                "node_id": f.failed_node_id,
                **_span(f.block_span),
                "time": format_utc(f.time),
                "detail": f"replacement={f.replacement_node_id or '-'}; replayed_steps={f.replayed_steps}; "
                f"reason={f.reason}",
            }
        for v in s.verification_failures:
            yield {
                "section": "verification_failure",
                "session_id": v.session_id,
                "node_id": v.checked_node_id,
                **_span(v.block_span),
                "time": format_utc(v.time),
                "detail": f"step={v.step}; verifiers={_join(v.verifier_node_ids)}; "
                f"referees={_join(v.referee_node_ids) or '-'}; quarantined={v.quarantined_node_id or '-'}; "
                f"max_abs_diff={'-' if v.max_abs_diff is None else f'{v.max_abs_diff:.6g}'}; "
                f"checked_output_sha256={v.checked_output_sha256}; "
                f"verifier_output_sha256={v.verifier_output_sha256}",
            }
        yield from _denials(s.denials)
        yield from _attestation_failures(s.attestation_failures)
    yield from _denials(report.denials_without_session)
    yield from _attestation_failures(report.attestation_failures_without_session)
    for a in report.announcements:
        yield {
            "section": "announcement",
            "node_id": a.node_id,
            **(_span(a.block_span) if a.block_span else {}),
            **_claims((a.attestation,) if a.attestation else ()),
            "policy_decision_ids": a.policy_decision_id,
            "policy_bundle_digests": a.policy_bundle_digest,
            "time": format_utc(a.time),
            "detail": f"{a.outcome}; reasons={_join(a.reasons)}",
        }
    for n in report.nodes:
        yield {
            "section": "node",
            "session_id": _join(n.sessions),
            "node_id": n.node_id,
            "node_tiers": _join(n.node_tiers),
            **_claims(n.attestations),
            "cert_fingerprints": _join(n.cert_fingerprints),
            "transfers": n.transfers,
            "tokens": n.tokens,
            "detail": f"block_spans={_join(str(span) for span in n.block_spans)}; failovers={n.failovers}; "
            f"denials={n.denials}; attestation_failures={n.attestation_failures}; "
            f"announcements={n.announcements}; outputs_checked={n.outputs_checked}; "
            f"outputs_found_wrong={n.outputs_found_wrong}",
        }
    for u in report.users:
        yield {
            "section": "user",
            "client_id": u.client_id,
            "department": u.department,
            "sessions": u.sessions,
            "failed_sessions": u.failed_sessions,
            "transfers": u.transfers,
            "tokens": u.tokens,
            "detail": f"denials={u.denials}; attestation_failures={u.attestation_failures}",
        }
    for d in report.departments:
        yield {
            "section": "department",
            "department": d.department,
            "sessions": d.sessions,
            "failed_sessions": d.failed_sessions,
            "transfers": d.transfers,
            "tokens": d.tokens,
            "detail": f"clients={d.clients}; denials={d.denials}",
        }
    for row in report.exposure.rows:
        for block, tokens in zip(report.exposure.blocks, row.tokens, strict=True):
            yield {
                "section": "exposure",
                "node_id": row.node_id,
                "block_start": block,
                "block_end": block + 1,
                "tokens": tokens,
            }


def _denials(rows: Iterable[DenialRow]) -> Iterator[Row]:
    for d in rows:
        yield {
            "section": "denial",
            "session_id": d.session_id,
            "node_id": d.node_id,
            **(_span(d.block_span) if d.block_span else {}),
            "policy_decision_ids": d.policy_decision_id,
            "time": format_utc(d.time),
            "detail": f"enforced_at={d.enforced_at}; reasons={_join(d.reasons)}",
        }


def _attestation_failures(rows: Iterable[AttestationFailureRow]) -> Iterator[Row]:
    for a in rows:
        yield {
            "section": "attestation_failure",
            "session_id": a.session_id,
            "node_id": a.node_id,
            "attestation_ids": a.attestation_id,
            "time": format_utc(a.time),
            "detail": a.reason,
        }


def _claims(claims: Iterable[AttestationClaims]) -> Row:
    claims = tuple(claims)
    return {
        "attestation_ids": _join(c.attestation_id for c in claims),
        "attestation_zones": _join(c.zone for c in claims),
        "attestation_hardware": _join(c.hardware for c in claims),
        "attestation_software": _join(c.software_version for c in claims),
        "attestation_authority_keys": _join(c.authority_key_id for c in claims),
        "attestation_expires": _join(format_utc(c.expires_at) for c in claims),
    }


def _span(span: BlockSpan) -> Row:
    return {"block_start": span.start, "block_end": span.end}


def _join(values: Iterable[str]) -> str:
    return "|".join(values)
