"""What a compliance officer reads: claims and policy per placement, which key verified the log, a
glossary, how server sessions ended, collapsed detail for many sessions, clients and departments,
readable node names, registry announcements, and the report and reconcile commands' answers."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sqlite3
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_scenario import BUNDLE, CLIENT, NODE_A, NODE_B, NODE_D, T0, ScenarioLogs, Swarm, cert_fingerprint
from cryptography.hazmat.primitives import serialization

from fincluster.audit import (
    AnnounceEvent,
    DenialEvent,
    SessionCloseEvent,
    build_report,
    render_csv,
    render_html,
)
from fincluster.audit.commands import register
from fincluster.audit.names import load_departments
from fincluster.errors import ConfigurationError, FinclusterError
from fincluster.spans import BlockSpan

GENERATED_AT = T0 + timedelta(days=1)
OTHER_CLIENT = "spiffe://bank.example/client/trader-7"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fincluster")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except FinclusterError as error:
        print(f"fincluster: error: {error}", file=sys.stderr)
        return 2
    return code


@pytest.fixture
def key_file(writer_key, tmp_path: Path) -> Path:
    path = tmp_path / "writer.pub"
    path.write_bytes(
        writer_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.fixture
def report(fixture_log: Path, writer_key):
    return build_report(
        fixture_log, trusted_public_keys=[writer_key.public_key()], clock=lambda: GENERATED_AT
    )


def server_log_events(swarm: Swarm, sessions: int) -> list[Any]:
    """A server's view of ``sessions`` sessions: generations closed by the client, every fifth a
    forward/backward pass, every seventh a stream that ended without a close, the last still open."""
    events: list[Any] = []
    for i in range(sessions):
        sid = f"sess-{i:02d}"
        stateless = i % 5 == 4
        for step, operation in enumerate(["forward", "backward"] if stateless else ["inference_step"] * 3):
            _, received = swarm.transfer_pair(
                session_id=sid,
                step=0 if stateless else step,
                node_id=NODE_A,
                span=(0, 4),
                num_tokens=1,
                operation=operation,
            )
            events.append(received)
        if stateless or i == sessions - 1:
            continue
        ended = i % 7 == 0
        events.append(
            SessionCloseEvent(
                time=swarm.clock(),
                observer="server",
                session_id=sid,
                client_id=CLIENT,
                outcome="error" if ended else "ok",
                reason="the stream ended without a close" if ended else "closed by the client",
            )
        )
    return events


# -- placement, keys, glossary, names ----------------------------------------------------------------


def test_each_placement_shows_the_attestation_claims_and_the_policy_decision(report) -> None:
    placement = report.sessions[0].placement[0]
    (claims,) = placement.attestations
    assert (claims.tier, claims.zone, claims.hardware, claims.software_version) == (
        "trusted",
        "eu-fra",
        "h100-cc",
        "fincluster-0.1.0",
    )
    assert placement.policy_decision_ids == ("dec-s-1-a",) and placement.policy_bundle_digests == (BUNDLE,)
    assert placement.cert_fingerprints == (cert_fingerprint(NODE_A),)
    html = render_html(report)
    assert "<b>trusted</b> · eu-fra · h100-cc · fincluster-0.1.0" in html
    assert "authority key <code>authority-key-20…</code> · valid until 2025-03-02 09:00:00 UTC" in html
    assert (
        'allowed: no requirement unmet<br><span class="sub">decision <code>dec-s-1-a</code> · bundle '
        f"<code>{BUNDLE[:16]}…" in html
    )
    rows = [r for r in render_csv(report).splitlines() if r.startswith("placement,s-1,")]
    assert "eu-fra" in rows[0] and "authority-key-2025" in rows[0] and BUNDLE in rows[0]


def test_the_report_says_which_key_verified_the_log_and_explains_its_terms(report, writer_key) -> None:
    assert report.integrity.verified_with == ("public key 62accd616bc3b857",)
    html = render_html(report)
    assert "<h4>Verified with</h4><ul><li><code>public key 62accd616bc3b857</code></li></ul>" in html
    glossary = html[html.index('<section id="glossary">') :]
    for term in (
        "Integrity",
        "Session",
        "Placement",
        "Attestation",
        "Policy decision",
        "Receipt",
        "Certificate",
    ):
        assert f"<dt>{term}</dt>" in glossary


def test_node_and_client_names_are_shown_next_to_their_spiffe_ids(report) -> None:
    html = render_html(report)
    assert f'<b>server a</b><br><code class="sub">{NODE_A}</code>' in html
    assert f'<span title="{CLIENT}">client analyst-1</span> · (no department)' in html


# -- sessions ----------------------------------------------------------------------------------------


def test_a_server_log_says_how_each_session_ended(write_log, swarm: Swarm) -> None:
    report = build_report(write_log(server_log_events(swarm, 11), origin="server-a"))
    states = {s.session_id: s.state for s in report.sessions}
    assert states["sess-01"].startswith("closed at 2025-03-01 09:00:00 UTC")
    assert states["sess-00"] == "ended at 2025-03-01 09:00:00 UTC: the stream ended without a close"
    assert states["sess-04"] == "stateless pass (forward/backward: nothing to close)"
    assert states["sess-10"] == "still open where the log ends"
    assert {s.session_id for s in report.sessions if s.failed} == {"sess-00", "sess-07"}
    assert report.totals.failed_sessions == 2 and report.sessions[0].observer == "server"
    assert "not closed in scope" not in render_html(report)


def test_many_sessions_are_one_line_each_with_their_detail_collapsed(write_log, swarm: Swarm) -> None:
    report = build_report(write_log(server_log_events(swarm, 26), origin="server-a"))
    html = render_html(report)
    assert html.count('<details class="session"') == 26
    assert html.count('<details class="session" id="session-sess-03">') == 1  # closed: no "open"
    assert html.index('id="failed"') < html.index('id="sessions"') < html.index("<h4>Placement</h4>")
    failed = html[html.index('id="failed"') : html.index('id="sessions"')]
    assert failed.count("the stream ended without a close") == 3  # 0, 7, 21 (14 is a stateless pass)
    assert render_html(report, expand=True).count('class="session" id="session-sess-03" open>') == 1


def test_a_few_sessions_show_their_detail_open(report) -> None:
    assert render_html(report).count(' open><summary class="session-row">') == 2


def test_clients_and_departments_are_summarised_from_the_policy_data(
    write_log, swarm: Swarm, scenario: ScenarioLogs, tmp_path: Path
) -> None:
    trader = [
        e.model_copy(update={"client_id": OTHER_CLIENT, "session_id": "t-1"})
        for e in scenario.client_events
        if e.kind == "transfer"
    ][:3]
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps({"fincluster": {"departments": {CLIENT: "treasury"}, "allowed_zones": ["eu-fra"]}})
    )
    report = build_report(write_log(scenario.client_events + trader), departments=load_departments(data))
    assert [(u.client_id, u.department, u.sessions, u.transfers) for u in report.users] == [
        (CLIENT, "treasury", 2, 12),
        (OTHER_CLIENT, "(no department)", 1, 3),
    ]
    assert [(d.department, d.clients, d.sessions, d.tokens) for d in report.departments] == [
        ("(no department)", 1, 1, sum(e.num_tokens for e in trader)),
        ("treasury", 1, 2, 52),
    ]
    assert '<section id="people"><h2>Clients and departments</h2>' in render_html(report)


def test_a_department_mapping_that_is_not_one_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"fincluster": {"departments": ["treasury"]}}))
    with pytest.raises(ConfigurationError, match=r"fincluster\.departments must map SPIFFE ids to names"):
        load_departments(data)
    data.write_text(json.dumps({"fincluster": {}}))
    assert load_departments(data) == {}


def test_the_shipped_policy_data_maps_clients_to_departments() -> None:
    shipped = Path(__file__).resolve().parents[2] / "policies" / "data.json"
    departments = load_departments(shipped)
    assert departments and all(k.startswith("spiffe://") for k in departments)


# -- registry ----------------------------------------------------------------------------------------


def test_a_registry_log_lists_accepted_and_refused_announcements(write_log, swarm: Swarm) -> None:
    accepted = AnnounceEvent(
        time=swarm.clock(),
        observer="registry",
        node_id=NODE_A,
        model_id="m",
        block_span=BlockSpan(0, 4),
        cert_fingerprint=cert_fingerprint(NODE_A),
        attestation=swarm.claims(NODE_A),
        policy_decision_id="dec-announce-a",
        policy_bundle_digest=BUNDLE,
    )
    refused = DenialEvent(
        time=swarm.clock(),
        observer="registry",
        enforced_at="registry",
        node_id=NODE_D,
        block_span=BlockSpan(0, 4),
        reasons=("node is not attested as trusted",),
        policy_decision_id="dec-announce-d",
    )
    report = build_report(write_log([accepted, refused], origin="registry-main"))
    assert [(a.node_id, a.outcome, a.reasons) for a in report.announcements] == [
        (NODE_A, "accepted", ()),
        (NODE_D, "refused", ("node is not attested as trusted",)),
    ]
    assert (report.totals.announcements, report.totals.denials) == (1, 1)
    assert report.denials_without_session == ()  # shown as an announcement, not twice
    assert {n.node_id: n.denials for n in report.nodes} == {NODE_A: 0, NODE_D: 1}
    html = render_html(report)
    section = html[html.index('id="announcements"') :]
    assert (
        '<span class="failed-mark">refused</span>' in section and "node is not attested as trusted" in section
    )


# -- the report command -----------------------------------------------------------------------------


def test_report_filters_that_match_nothing_are_an_error(fixture_log: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    base = ["audit", "report", str(fixture_log), "--format", "html", "--out", str(out)]
    assert run([*base, "--session", "s-9"]) == 2
    assert f"{fixture_log}: no session 's-9' in this log; no report written" in capsys.readouterr().err
    assert run([*base, "--node", "spiffe://bank.example/server/zz"]) == 2
    assert "no event of node 'spiffe://bank.example/server/zz' in this log" in capsys.readouterr().err
    assert not out.exists()


def test_report_of_a_tampered_log_says_failed_first_and_exits_1(
    fixture_log: Path, key_file: Path, tmp_path: Path, capsys
) -> None:
    with sqlite3.connect(fixture_log) as db:
        db.execute(
            "UPDATE records SET body = replace(body, '\"num_tokens\":7', '\"num_tokens\":6') WHERE idx = 3"
        )
    db.close()
    out = tmp_path / "r.html"
    assert (
        run(
            [
                "audit",
                "report",
                str(fixture_log),
                "--format",
                "html",
                "--out",
                str(out),
                "--key",
                str(key_file),
            ]
        )
        == 1
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"wrote html report to {out}: Integrity FAILED: 7 problems. First bad record: 3."
    assert out.read_text().index("Integrity: FAILED") < out.read_text().index('id="summary"')


def test_report_takes_departments_from_the_policy_data(fixture_log: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"fincluster": {"departments": {CLIENT: "treasury"}}}))
    out = tmp_path / "r.json"
    assert (
        run(
            [
                "audit",
                "report",
                str(fixture_log),
                "--format",
                "json",
                "--out",
                str(out),
                "--policy-data",
                str(data),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["departments"][0]["department"] == "treasury"


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium not installed (scripts/install-browser)"
)
def test_report_exports_a_pdf_that_opens(fixture_log: Path, key_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.pdf"
    argv = ["audit", "report", str(fixture_log), "--format", "pdf", "--out", str(out), "--key", str(key_file)]
    assert run(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote pdf report to {out}: Integrity VERIFIED")
    pdf = out.read_bytes()
    assert pdf.startswith(b"%PDF-1.") and pdf.rstrip().endswith(b"%%EOF")
    pages = re.findall(rb"/Type\s*/Page(?![s\w])", pdf)
    assert 1 <= len(pages) <= 10


def test_pdf_export_without_a_browser_says_how_to_get_one(fixture_log: Path, tmp_path: Path, capsys) -> None:
    argv = ["audit", "report", str(fixture_log), "--format", "pdf", "--out", str(tmp_path / "r.pdf")]
    assert run([*argv, "--browser", str(tmp_path / "no-such-chromium")]) == 2
    assert "--browser" in capsys.readouterr().err


# -- reconcile ---------------------------------------------------------------------------------------


def test_reconcile_takes_several_client_logs_and_directories(
    write_log, scenario: ScenarioLogs, swarm: Swarm, tmp_path: Path, capsys
) -> None:
    """Two analysts' logs (one given as a directory with the servers'), and one session whose
    client log nobody gave."""
    first = [e for e in scenario.client_events if e.session_id in (None, "s-1")]
    second = [e for e in scenario.client_events if e.session_id == "s-2"]
    _, stray = swarm.transfer_pair(session_id="s-9", step=0, node_id=NODE_B, span=(4, 8), num_tokens=2)
    (tmp_path / "logs").mkdir()
    write_log(first, name="logs/client-a.sqlite", origin="client-a")
    write_log([*scenario.server_events, stray], name="logs/server-all.sqlite", origin="server-all")
    second_log = write_log(second, name="client-b.db", origin="client-b")
    assert run(["audit", "reconcile", str(tmp_path / "logs"), str(second_log)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "matched 12, unmatched 1 (client only 0, server only 1, mismatched 0)"
    assert out[1] == (
        f"  client logs: {tmp_path / 'logs/client-a.sqlite'} (client-a, 1 sessions), "
        f"{second_log} (client-b, 1 sessions)"
    )
    assert out[2] == f"  server logs: {tmp_path / 'logs/server-all.sqlite'} (server-all, 3 sessions)"
    assert out[-1] == f"  s-9: 1 transfer(s) from {CLIENT} to server b"
    assert len(out) == 6
