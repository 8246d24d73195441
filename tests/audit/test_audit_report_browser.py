"""The HTML report in a real browser: it renders, shows the report's numbers, and logs no page errors.

Headless Chromium (Debian's ``chromium``; ``scripts/install-browser`` installs it). Without it these
tests skip, unless ``FINCLUSTER_REQUIRE_BROWSER=1`` (CI sets it), where a missing browser fails.

Chromium writes every message of the page's console to stderr under ``--enable-logging=stderr``, one
line each, whatever its level, e.g.::

    [22063:22063:1122/180019.387768:INFO:CONSOLE:1] "Uncaught Error: boom", source: file:///r.html (1)

(older builds write ``INFO:CONSOLE(1)``). The report has no script at all, so any such line is a bug.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from audit_scenario import CLIENT, MANIFEST, MODEL, NODE_C, NODE_D, T0, ScenarioLogs, Swarm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fincluster.audit import SessionCloseEvent, SessionOpenEvent, build_report, render_html, render_json

CHROMIUM_TIMEOUT_S = 30
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WINDOW = (1280, 2000)
# A page console message in Chromium's log, in the current and the older line format.
CONSOLE_LINE = re.compile(r":CONSOLE(?::\d+|\(\d+\))\]")


def _find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found is None and os.access("/usr/bin/chromium", os.X_OK):
        found = "/usr/bin/chromium"
    return found


@pytest.fixture(scope="module")
def chromium() -> str:
    found = _find_chromium()
    if found is None:
        if os.environ.get("FINCLUSTER_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "chromium not installed but FINCLUSTER_REQUIRE_BROWSER=1 (run scripts/install-browser)"
            )
        pytest.skip("chromium not installed (CI installs it from .ci/run)")
    return found


@dataclass(frozen=True)
class Browser:
    executable: str
    workdir: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One headless Chromium run with a fresh profile; killed (whole process group) after 30 s."""
        command = [
            self.executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={self.workdir / 'profile'}",
            *args,
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s: {' '.join(args)}")
        assert process.returncode == 0, f"chromium failed ({process.returncode}):\n{stderr[-4000:]}"
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def console_messages(self, page: Path) -> list[str]:
        """The page's console lines (errors, uncaught exceptions, any log) after it loaded."""
        result = self.run("--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
        return [
            line for line in result.stderr.splitlines() if CONSOLE_LINE.search(line) or "Uncaught" in line
        ]


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Browser:
    return Browser(chromium, tmp_path)


@dataclass(frozen=True)
class RenderedReport:
    html: Path
    data: dict[str, Any]
    """The JSON rendering of the same report: the numbers the page must show."""


@pytest.fixture
def rendered_report(
    write_log, scenario: ScenarioLogs, swarm: Swarm, writer_key: Ed25519PrivateKey, tmp_path: Path
) -> RenderedReport:
    """Three sessions on four nodes: the scenario's two, and a third split between d and c."""
    opened = SessionOpenEvent(
        time=swarm.clock(),
        observer="client",
        session_id="s-3",
        client_id=CLIENT,
        classification="confidential",
        model_id=MODEL,
        manifest_digest=MANIFEST,
    )
    extra: list[Any] = [opened]
    for step in range(6):
        for node, span in ((NODE_D, (0, 4)), (NODE_C, (4, 8))):
            client, _ = swarm.transfer_pair(
                session_id="s-3", step=step, node_id=node, span=span, num_tokens=5 if step == 0 else 1
            )
            extra.append(client)
    extra.append(
        SessionCloseEvent(
            time=swarm.clock(), observer="client", session_id="s-3", client_id=CLIENT, outcome="ok"
        )
    )
    log = write_log(scenario.client_events + extra)
    report = build_report(
        log, trusted_public_keys=[writer_key.public_key()], clock=lambda: T0 + timedelta(days=1)
    )
    html = tmp_path / "report.html"
    html.write_text(render_html(report), encoding="utf-8")
    return RenderedReport(html, json.loads(render_json(report)))


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_MAGIC, "not a PNG file"
    assert png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


class _VisibleText(HTMLParser):
    """Text a reader sees: everything outside <style>, <script> and <title>."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._hidden += tag in ("style", "script", "title")

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in ("style", "script", "title")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)


def test_the_report_renders_to_a_full_page_screenshot(
    browser: Browser, rendered_report: RenderedReport
) -> None:
    screenshot = browser.workdir / "page.png"
    browser.run(
        f"--screenshot={screenshot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", rendered_report.html.as_uri()
    )
    png = screenshot.read_bytes()
    assert _png_size(png) == WINDOW
    assert len(png) > 10_000, f"a {len(png)}-byte screenshot is too small to hold the report"


def test_the_browser_dom_shows_integrity_first_and_the_reports_numbers(
    browser: Browser, rendered_report: RenderedReport
) -> None:
    dom = browser.run("--dump-dom", rendered_report.html.as_uri()).stdout
    parser = _VisibleText()
    parser.feed(dom)
    text = " ".join(" ".join(parser.chunks).split())
    data = rendered_report.data

    assert data["integrity"]["status"] == "verified"
    assert text.index("Integrity: VERIFIED") < text.index("Summary") < text.index("Sessions")
    assert data["integrity"]["summary"] in text
    assert data["integrity"]["root_hash"] in text
    totals = data["totals"]
    assert (totals["sessions"], totals["nodes"], totals["tokens"]) == (3, 4, 72)
    for key, label in (
        ("events", "Events"),
        ("sessions", "Sessions"),
        ("failed_sessions", "Failed sessions"),
        ("nodes", "Nodes"),
        ("transfers", "Transfers"),
        ("tokens", "Tokens"),
        ("failovers", "Failovers"),
        ("denials", "Denials"),
        ("attestation_failures", "Attestation failures"),
    ):
        assert f"{totals[key]} {label}" in text
    for node in data["nodes"]:
        assert node["node_id"] in text
    for session in data["sessions"]:
        name = session["client_id"].rsplit("/", 1)[1]
        assert f"{session['session_id']} client {name} · {session['department']}" in text  # its line
        assert f"Transfers / tokens {session['transfers']} / {session['tokens']}" in text


def test_the_report_page_logs_no_console_errors(browser: Browser, rendered_report: RenderedReport) -> None:
    assert browser.console_messages(rendered_report.html) == []


def test_the_console_check_catches_a_page_that_throws(browser: Browser, tmp_path: Path) -> None:
    """Guards the check above: a deliberate uncaught error and console.error are both seen."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><html><body><p>broken</p><script>\n"
        'console.error("deliberate console error");\n'
        'throw new Error("deliberate failure");\n'
        "</script></body></html>\n",
        encoding="utf-8",
    )
    messages = browser.console_messages(page)
    assert any("deliberate console error" in line for line in messages)
    assert any("Uncaught Error: deliberate failure" in line for line in messages)
