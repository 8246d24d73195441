"""Compliance reports: the JSON known answer, agreement of JSON/CSV/HTML, integrity first, filters."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from audit_scenario import NODE_A, NODE_B, NODE_C, NODE_D, T0, check_vector

from fincluster.audit import build_report, render_csv, render_html, render_json

GENERATED_AT = T0 + timedelta(days=1)


@pytest.fixture
def report(fixture_log: Path, writer_key):
    return build_report(
        fixture_log, trusted_public_keys=[writer_key.public_key()], clock=lambda: GENERATED_AT
    )


def test_the_json_report_of_the_fixture_log_matches_the_known_answer(report) -> None:
    check_vector("report.json", json.loads(render_json(report)))


def test_the_report_counts_what_the_scenario_did(report) -> None:
    totals = report.totals
    assert (totals.sessions, totals.transfers, totals.tokens) == (2, 12, 52)
    assert (totals.failovers, totals.denials, totals.attestation_failures) == (1, 1, 1)
    assert report.integrity.status == "verified"
    s1 = report.sessions[0]
    assert [
        (p.node_id, p.block_span.start, p.block_span.end, p.transfers, p.tokens) for p in s1.placement
    ] == [
        (NODE_A, 0, 4, 4, 10),
        (NODE_B, 4, 8, 2, 8),
        (NODE_C, 4, 8, 4, 10),
    ]
    assert s1.failovers[0].failed_node_id == NODE_B and s1.failovers[0].replacement_node_id == NODE_C
    assert report.sessions[1].denials[0].reasons == ("tier standard may not serve restricted data",)
    assert report.attestation_failures_without_session[0].node_id == NODE_D
    exposure = {row.node_id: row.tokens for row in report.exposure.rows}
    assert exposure[NODE_A] == (34, 34, 34, 34, 24, 24, 24, 24)
    assert exposure[NODE_B] == (0, 0, 0, 0, 8, 8, 8, 8)


def test_json_and_csv_carry_the_same_numbers(report) -> None:
    data = json.loads(render_json(report))
    rows = list(csv.DictReader(io.StringIO(render_csv(report))))
    by_section: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)

    assert by_section["integrity"][0]["detail"].startswith(data["integrity"]["status"])
    json_placement = {
        (s["session_id"], p["node_id"], p["block_span"]["start"], p["block_span"]["end"]): (
            p["routed"],
            p["transfers"],
            p["tokens"],
            p["receipts"],
        )
        for s in data["sessions"]
        for p in s["placement"]
    }
    csv_placement = {
        (r["session_id"], r["node_id"], int(r["block_start"]), int(r["block_end"])): (
            int(r["routed"]),
            int(r["transfers"]),
            int(r["tokens"]),
            int(r["receipts"]),
        )
        for r in by_section["placement"]
    }
    assert csv_placement == json_placement
    json_nodes = {n["node_id"]: (n["transfers"], n["tokens"]) for n in data["nodes"]}
    csv_nodes = {r["node_id"]: (int(r["transfers"]), int(r["tokens"])) for r in by_section["node"]}
    assert csv_nodes == json_nodes
    json_cells = {
        (row["node_id"], block): tokens
        for row in data["exposure"]["rows"]
        for block, tokens in zip(data["exposure"]["blocks"], row["tokens"], strict=True)
    }
    csv_cells = {(r["node_id"], int(r["block_start"])): int(r["tokens"]) for r in by_section["exposure"]}
    assert csv_cells == json_cells
    assert len(by_section["failover"]) == data["totals"]["failovers"]
    assert len(by_section["denial"]) == data["totals"]["denials"]
    assert len(by_section["attestation_failure"]) == data["totals"]["attestation_failures"]


class _Structure(HTMLParser):
    VOID = {"meta", "br", "rect", "link", "img", "input", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.sections: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "section":
            self.sections.append(dict(attrs).get("id") or "")
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"unexpected </{tag}> with {self.open[-3:]} open")
        else:
            self.open.pop()


def test_html_shows_integrity_first_and_is_well_formed(report) -> None:
    html = render_html(report)
    parser = _Structure()
    parser.feed(html)
    assert parser.problems == [] and parser.open == []
    assert parser.sections[0] == "integrity"
    assert parser.sections[1:] == [
        "summary",
        "sessions",
        "people",
        "nodes",
        "unattributed",
        "glossary",
    ]
    assert "Integrity: VERIFIED" in html


def test_html_is_self_contained(report) -> None:
    html = render_html(report).lower()
    for forbidden in ("<script", "http://", "https://", "<link", "src=", "@import", "url("):
        assert forbidden not in html
    assert "<style>" in html and "<svg" in html


def test_html_shows_every_exposure_number_and_the_session_details(report) -> None:
    html = render_html(report)
    for row in report.exposure.rows:
        for block, tokens in zip(report.exposure.blocks, row.tokens, strict=True):
            assert f"{row.node_id}, block {block}: {tokens} tokens" in html
    for session in report.sessions:
        assert session.manifest_digest in html and session.classification in html
    assert "connection reset" in html and "tier standard may not serve restricted data" in html


def test_a_tampered_log_reports_failed_integrity_first(fixture_log: Path, writer_key) -> None:
    with sqlite3.connect(fixture_log) as db:
        db.execute(
            "UPDATE records SET body = replace(body, '\"num_tokens\":7', '\"num_tokens\":6') WHERE idx = 3"
        )
    report = build_report(fixture_log, trusted_public_keys=[writer_key.public_key()])
    assert report.integrity.status == "failed" and report.integrity.first_bad_record == 3
    html = render_html(report)
    assert html.index("Integrity: FAILED") < html.index('id="summary"')
    assert "First bad record: 3" in html


def test_without_trusted_keys_integrity_is_not_checked(fixture_log: Path) -> None:
    report = build_report(fixture_log)
    assert report.integrity.status == "not_checked"
    assert "Integrity: NOT CHECKED" in render_html(report)


def test_a_session_filter_keeps_only_that_session(fixture_log: Path) -> None:
    report = build_report(fixture_log, session="s-2")
    assert [s.session_id for s in report.sessions] == ["s-2"]
    assert [n.node_id for n in report.nodes] == [NODE_A, NODE_B]  # b only through the denial
    assert report.attestation_failures_without_session == ()


def test_a_node_filter_shows_what_that_node_saw(fixture_log: Path) -> None:
    report = build_report(fixture_log, node=NODE_C)
    assert [n.node_id for n in report.nodes] == [NODE_C]
    assert [s.session_id for s in report.sessions] == ["s-1"]
    assert {p.node_id for p in report.sessions[0].placement} == {NODE_C}
    assert report.sessions[0].classification == "confidential"
    assert [row.node_id for row in report.exposure.rows] == [NODE_C]
    assert report.totals.tokens == 10


def test_a_time_window_selects_events_by_their_time(fixture_log: Path) -> None:
    everything = build_report(fixture_log)
    first_open = everything.sessions[1].opened_at
    assert first_open is not None
    later = build_report(fixture_log, since=first_open)
    assert [s.session_id for s in later.sessions] == ["s-2"]
    earlier = build_report(fixture_log, until=first_open)
    assert [s.session_id for s in earlier.sessions] == ["s-1"]
