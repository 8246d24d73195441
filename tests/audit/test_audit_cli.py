"""``fincluster audit``: verify, report, export, reconcile and prune, driven through argparse."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from audit_scenario import CLIENT, NODE_A, NODE_B, T0, ScenarioLogs, Swarm, ed25519_key
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from fincluster.audit import AuditLog, AuditSettings, canonical_json, verify
from fincluster.audit.commands import register
from fincluster.errors import FinclusterError

SCENARIO_RECORDS = 22
SCENARIO_TOKENS = 52


def run(argv: list[str]) -> int:
    """Parse and dispatch like ``fincluster.cli.main``: a FinclusterError is exit code 2."""
    parser = argparse.ArgumentParser(prog="fincluster")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except FinclusterError as error:
        print(f"fincluster: error: {error}", file=sys.stderr)
        return 2
    return code


def public_pem(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def private_pem(key: Ed25519PrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def certificate_pem(
    key: Ed25519PrivateKey, spiffe_id: str, path: Path, *, valid_from: datetime = T0 - timedelta(hours=1)
) -> Path:
    """A self-signed certificate naming ``spiffe_id``, valid for a day from ``valid_from`` (by default
    around the scenario's time): stands in for a node's TLS certificate."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.rsplit("/", 1)[-1])])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_from + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .sign(key, None)
    )
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def key_file(writer_key: Ed25519PrivateKey, tmp_path: Path) -> Path:
    return public_pem(writer_key, tmp_path / "writer.pub")


# -- verify ------------------------------------------------------------------------------------------


def test_verify_of_an_intact_log_exits_0(fixture_log: Path, key_file: Path, capsys) -> None:
    assert run(["audit", "verify", str(fixture_log), "--key", str(key_file)]) == 0
    assert f"OK, {SCENARIO_RECORDS} records" in capsys.readouterr().out


def test_verify_accepts_the_writers_certificate_as_the_key(
    fixture_log: Path, writer_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    cert = certificate_pem(writer_key, CLIENT, tmp_path / "client.pem")
    assert run(["audit", "verify", str(fixture_log), "--key", str(cert)]) == 0


def test_verify_of_an_edited_record_exits_1_and_names_the_record(
    fixture_log: Path, key_file: Path, capsys
) -> None:
    with sqlite3.connect(fixture_log) as db:
        (body,) = db.execute("SELECT body FROM records WHERE idx = 5").fetchone()
        edited = body.replace(b'"num_tokens":1', b'"num_tokens":9')
        assert edited != body
        db.execute("UPDATE records SET body = ? WHERE idx = 5", (edited,))
    db.close()

    assert run(["audit", "verify", str(fixture_log), "--key", str(key_file)]) == 1
    out = capsys.readouterr().out
    assert "FAILED verification" in out
    assert "first bad record: 5" in out
    assert "leaf_hash_mismatch: record 5 does not hash to its stored leaf hash" in out


def test_verify_with_a_key_that_did_not_write_the_log_exits_1(
    fixture_log: Path, tmp_path: Path, capsys
) -> None:
    stranger = public_pem(ed25519_key("stranger"), tmp_path / "stranger.pub")
    assert run(["audit", "verify", str(fixture_log), "--key", str(stranger)]) == 1
    assert "first bad record: 0" in capsys.readouterr().out


def test_verify_with_an_anchor_catches_a_cut_tail(
    write_log, scenario: ScenarioLogs, writer_key: Ed25519PrivateKey, key_file: Path, tmp_path: Path, capsys
) -> None:
    """Records after the last checkpoint, removed with that checkpoint: only the anchor notices."""
    path = write_log(scenario.client_events)
    anchor = tmp_path / "anchor.json"
    with AuditLog(path, signing_key=writer_key, origin="client.analyst-1", settings=AuditSettings()) as log:
        assert log.last_checkpoint is not None
        anchor.write_bytes(canonical_json(log.last_checkpoint))
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM records WHERE idx >= 20")
        db.execute("DELETE FROM checkpoints WHERE tree_size > 20")
    db.close()

    assert run(["audit", "verify", str(path), "--key", str(key_file)]) == 0
    capsys.readouterr()
    assert run(["audit", "verify", str(path), "--key", str(key_file), "--anchor", str(anchor)]) == 1
    assert "first bad record: 20" in capsys.readouterr().out


def test_verify_of_a_missing_file_or_a_bad_key_is_an_error(
    fixture_log: Path, key_file: Path, tmp_path: Path, capsys
) -> None:
    assert run(["audit", "verify", str(tmp_path / "none.db"), "--key", str(key_file)]) == 2
    assert "no audit log at" in capsys.readouterr().err
    not_a_key = tmp_path / "junk.pem"
    not_a_key.write_text("hello")
    assert run(["audit", "verify", str(fixture_log), "--key", str(not_a_key)]) == 2
    assert "neither a PEM public key nor a PEM certificate" in capsys.readouterr().err


# -- report ------------------------------------------------------------------------------------------


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


def test_report_writes_json_csv_and_html_that_parse(
    fixture_log: Path, key_file: Path, tmp_path: Path, capsys
) -> None:
    outputs = {fmt: tmp_path / f"report.{fmt}" for fmt in ("json", "csv", "html")}
    for fmt, out in outputs.items():
        argv = ["audit", "report", str(fixture_log), "--format", fmt, "--out", str(out)]
        assert run([*argv, "--key", str(key_file)]) == 0
        assert f"wrote {fmt} report to {out}: Integrity VERIFIED" in capsys.readouterr().out

    data = json.loads(outputs["json"].read_text())
    assert data["integrity"]["status"] == "verified"
    assert (data["totals"]["sessions"], data["totals"]["tokens"]) == (2, SCENARIO_TOKENS)

    rows = list(csv.DictReader(io.StringIO(outputs["csv"].read_text())))
    sections = {row["section"] for row in rows}
    assert {"integrity", "placement"} <= sections
    assert next(r for r in rows if r["section"] == "integrity")["detail"].startswith("verified")

    parser = _Text()
    parser.feed(outputs["html"].read_text())
    text = " ".join(parser.chunks)
    assert "VERIFIED" in text and NODE_A in text and str(SCENARIO_TOKENS) in text


def test_report_without_keys_says_integrity_was_not_checked(
    fixture_log: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "report.json"
    assert run(["audit", "report", str(fixture_log), "--format", "json", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["integrity"]["status"] == "not_checked"
    assert "NOT CHECKED" in capsys.readouterr().out


def test_report_filters_by_session_node_and_time(fixture_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    base = ["audit", "report", str(fixture_log), "--format", "json", "--out", str(out)]

    assert run([*base, "--session", "s-2"]) == 0
    data = json.loads(out.read_text())
    assert [s["session_id"] for s in data["sessions"]] == ["s-2"]
    assert data["filters"]["session"] == "s-2"

    assert run([*base, "--node", NODE_B]) == 0
    assert [n["node_id"] for n in json.loads(out.read_text())["nodes"]] == [NODE_B]

    assert run([*base, "--since", "2030-01-01T00:00Z"]) == 0
    assert json.loads(out.read_text())["totals"]["events"] == 0
    assert run([*base, "--until", "2030-01-01T00:00:00+01:00"]) == 0
    assert json.loads(out.read_text())["totals"]["events"] == SCENARIO_RECORDS


def test_report_refuses_a_time_without_a_zone(fixture_log: Path, tmp_path: Path, capsys) -> None:
    argv = ["audit", "report", str(fixture_log), "--format", "csv", "--out", str(tmp_path / "r.csv")]
    assert run([*argv, "--since", "2025-03-01T09:00"]) == 2
    assert "--since: give a time zone" in capsys.readouterr().err


# -- export ------------------------------------------------------------------------------------------


def test_export_to_stdout_writes_one_json_object_per_line(fixture_log: Path, capsys) -> None:
    assert run(["audit", "export", str(fixture_log)]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records = [item for item in items if item["type"] == "record"]
    assert [r["index"] for r in records] == list(range(SCENARIO_RECORDS))
    assert any(item["type"] == "checkpoint" for item in items)


def test_export_to_a_file_reports_the_line_count(fixture_log: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "audit.jsonl"
    assert run(["audit", "export", str(fixture_log), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert f"exported {len(lines)} lines to {out}" in capsys.readouterr().out


# -- reconcile ---------------------------------------------------------------------------------------


@pytest.fixture
def server_logs(write_log, scenario: ScenarioLogs) -> list[Path]:
    """The servers' records in two logs: node a's, and everyone else's."""
    of_a = [e for e in scenario.server_events if e.node_id == NODE_A]
    others = [e for e in scenario.server_events if e.node_id != NODE_A]
    return [
        write_log(of_a, name="server-a.db", origin="server.a"),
        write_log(others, name="server-others.db", origin="server.others"),
    ]


def test_reconcile_of_matching_logs_exits_0(fixture_log: Path, server_logs: list[Path], capsys) -> None:
    assert run(["audit", "reconcile", str(fixture_log), *map(str, server_logs)]) == 0
    assert capsys.readouterr().out.startswith("matched 12, unmatched 0")


def test_reconcile_lists_a_transfer_only_a_server_recorded_and_exits_1(
    fixture_log: Path, write_log, scenario: ScenarioLogs, swarm: Swarm, capsys
) -> None:
    _, extra = swarm.transfer_pair(session_id="s-9", step=0, node_id=NODE_B, span=(4, 8), num_tokens=3)
    server = write_log([*scenario.server_events, extra], name="server.db", origin="server.all")

    assert run(["audit", "reconcile", str(fixture_log), str(server)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("matched 12, unmatched 1 (client only 0, server only 1, mismatched 0)")
    assert f"client logs: {fixture_log} (client.analyst-1, 2 sessions)" in out
    assert "1 session(s) with 1 server transfer(s) are in none of the client logs given" in out
    assert f"  s-9: 1 transfer(s) from {CLIENT} to server b\n" in out


def test_reconcile_checks_receipts_against_the_node_certificates(
    fixture_log: Path, server_logs: list[Path], swarm: Swarm, tmp_path: Path, capsys
) -> None:
    logs = [str(fixture_log), *map(str, server_logs)]
    certs = [
        certificate_pem(key, node, tmp_path / f"node-{i}.pem")
        for i, (node, key) in enumerate(swarm.node_keys.items())
    ]
    assert run(["audit", "reconcile", *logs, *(f"--node-cert={c}" for c in certs)]) == 0

    impostor = certificate_pem(ed25519_key("impostor"), NODE_A, tmp_path / "impostor.pem")
    forged = [impostor if "node-0" in c.name else c for c in certs]
    capsys.readouterr()
    assert run(["audit", "reconcile", *logs, *(f"--node-cert={c}" for c in forged)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("matched 6, unmatched 6 (client only 0, server only 0, mismatched 6)")
    assert f"node {NODE_A}" in out
    assert (
        "the receipt's signer cannot be checked: signed by a key that is not among the trusted keys and "
        "certificates (key 937966944d6d587a)" in out
    )


# -- prune -------------------------------------------------------------------------------------------


def test_prune_deletes_old_checkpointed_records_and_the_log_still_verifies(
    fixture_log: Path, writer_key: Ed25519PrivateKey, key_file: Path, tmp_path: Path, capsys
) -> None:
    """The scenario is dated 2025-03-01, so with a 1-day retention everything checkpointed is old."""
    private = private_pem(writer_key, tmp_path / "writer.key")
    assert run(["audit", "prune", str(fixture_log), "--key-file", str(private), "--retention-days", "1"]) == 0
    assert f"records before {SCENARIO_RECORDS} pruned" in capsys.readouterr().out

    report = verify(fixture_log, [writer_key.public_key()])
    assert report.ok and report.pruned_before == SCENARIO_RECORDS and report.record_count == 0
    assert run(["audit", "verify", str(fixture_log), "--key", str(key_file)]) == 0
    assert f"records before {SCENARIO_RECORDS} were pruned" in capsys.readouterr().out


def test_prune_keeps_records_younger_than_the_retention(
    fixture_log: Path, writer_key: Ed25519PrivateKey, tmp_path: Path, capsys
) -> None:
    private = private_pem(writer_key, tmp_path / "writer.key")
    days = str((datetime.now(UTC) - datetime(2025, 1, 1, tzinfo=UTC)).days + 30)
    assert (
        run(["audit", "prune", str(fixture_log), "--key-file", str(private), "--retention-days", days]) == 0
    )
    assert "nothing is older than" in capsys.readouterr().out
    assert verify(fixture_log, [writer_key.public_key()]).record_count == SCENARIO_RECORDS


def test_prune_refuses_a_key_that_did_not_write_the_log(fixture_log: Path, tmp_path: Path, capsys) -> None:
    private = private_pem(ed25519_key("stranger"), tmp_path / "stranger.key")
    assert run(["audit", "prune", str(fixture_log), "--key-file", str(private), "--retention-days", "1"]) == 2
    assert "not with the key given to prune it" in capsys.readouterr().err
