"""No raw data: prompts, token ids and activations never reach the audit log or its outputs."""

from __future__ import annotations

import io
import struct

from audit_scenario import CLIENT, MANIFEST, MODEL, NODE_A, T0

from fincluster.audit import (
    AuditLog,
    AuditSettings,
    SessionOpenEvent,
    TransferEvent,
    build_report,
    export_jsonl,
    render_csv,
    render_html,
    render_json,
    sha256_hex,
)
from fincluster.spans import BlockSpan

PROMPT = "Move 250000 EUR from account DE44500105175407324931 to the Cayman trust of J. Doe"


def fake_tokenize(text: str) -> list[int]:
    return [1000 + sum(map(ord, word)) for word in text.split()]


def test_events_built_from_a_prompt_leave_no_trace_of_it_on_disk(tmp_path, writer_key, clock) -> None:
    token_ids = fake_tokenize(PROMPT)
    activations = struct.pack(f"<{len(token_ids) * 8}f", *(float(t % 97) / 7 for t in token_ids * 8))
    path = tmp_path / "audit.db"
    with AuditLog(path, signing_key=writer_key, settings=AuditSettings(), clock=clock) as log:
        log.append(
            SessionOpenEvent(
                time=T0,
                observer="client",
                session_id="s-1",
                client_id=CLIENT,
                classification="confidential",
                model_id=MODEL,
                manifest_digest=MANIFEST,
            )
        )
        log.append(
            TransferEvent(
                time=T0,
                observer="client",
                session_id="s-1",
                operation="forward",
                step=0,
                client_id=CLIENT,
                classification="confidential",
                model_id=MODEL,
                manifest_digest=MANIFEST,
                node_id=NODE_A,
                cert_fingerprint="sha256:" + sha256_hex(b"cert"),
                block_span=BlockSpan(start=0, end=4),
                num_tokens=len(token_ids),
                input_sha256=sha256_hex(activations),
            )
        )
    jsonl = io.StringIO()
    export_jsonl(path, jsonl)
    report = build_report(path, trusted_public_keys=[writer_key.public_key()])
    outputs = {
        "database": b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("audit.db")),
        "jsonl": jsonl.getvalue().encode(),
        "html": render_html(report).encode(),
        "json": render_json(report).encode(),
        "csv": render_csv(report).encode(),
    }
    ids_json = ",".join(map(str, token_ids)).encode()
    ids_python = ", ".join(map(str, token_ids)).encode()
    for name, data in outputs.items():
        assert PROMPT.encode() not in data, name
        assert b"Cayman" not in data and b"DE44500105175407324931" not in data, name
        assert ids_json[:40] not in data and ids_python[:40] not in data, name
        assert activations[:16] not in data, name
    assert sha256_hex(activations).encode() in outputs["database"]
