"""The report as one CSV table (long format), for spreadsheets and SIEM imports.

Every row names its ``section``: ``integrity``, ``placement`` (one per session, block span and
node), ``failover``, ``denial``, ``attestation_failure``, ``node`` and ``exposure`` (one per node and
block). Several values in one cell are joined with ``|``. The numbers are those of the JSON report.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator

from fincluster.audit.fields import format_utc
from fincluster.audit.report import AttestationFailureRow, DenialRow, Report
from fincluster.spans import BlockSpan

COLUMNS = (
    "section",
    "session_id",
    "client_id",
    "classification",
    "model_id",
    "manifest_digest",
    "node_id",
    "node_tiers",
    "block_start",
    "block_end",
    "attestation_ids",
    "policy_decision_ids",
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
            "classification": s.classification,
            "model_id": s.model_id,
            "manifest_digest": s.manifest_digest,
        }
        for p in s.placement:
            yield {
                "section": "placement",
                **session_columns,
                "node_id": p.node_id,
                "node_tiers": _join(p.node_tiers),
                **_span(p.block_span),
                "attestation_ids": _join(p.attestation_ids),
                "policy_decision_ids": _join(p.policy_decision_ids),
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
        yield from _denials(s.denials)
        yield from _attestation_failures(s.attestation_failures)
    yield from _denials(report.denials_without_session)
    yield from _attestation_failures(report.attestation_failures_without_session)
    for n in report.nodes:
        yield {
            "section": "node",
            "session_id": _join(n.sessions),
            "node_id": n.node_id,
            "node_tiers": _join(n.node_tiers),
            "attestation_ids": _join(n.attestation_ids),
            "transfers": n.transfers,
            "tokens": n.tokens,
            "detail": f"block_spans={_join(str(span) for span in n.block_spans)}; failovers={n.failovers}; "
            f"denials={n.denials}; attestation_failures={n.attestation_failures}",
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


def _span(span: BlockSpan) -> Row:
    return {"block_start": span.start, "block_end": span.end}


def _join(values: Iterable[str]) -> str:
    return "|".join(values)
