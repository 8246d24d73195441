"""The report as a PDF, for officers who file PDFs: the HTML report printed by headless Chromium.

Chromium is what ``scripts/install-browser`` installs (Debian's ``chromium``); nothing is fetched:
the page is the self-contained HTML report with every session's detail open, loaded from a private
temporary directory with a throwaway browser profile. The PDF has A4 pages and no browser header or
footer (the report carries its own title, scope and time), in landscape so that the placement and
node tables keep their columns readable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from fincluster.audit.render_html import render_html
from fincluster.audit.report_model import Report
from fincluster.errors import AuditError, ConfigurationError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PDF_MAGIC = b"%PDF-"
_PRINT_CSS = "<style>@page { size: A4 landscape; margin: 12mm; } body { max-width: none; }</style></head>"


def find_browser(given: Path | None = None) -> str:
    """``given``, or the first headless-capable Chromium on ``PATH``."""
    if given is not None:
        if not os.access(given, os.X_OK):
            raise ConfigurationError(f"--browser {given} is not an executable")
        return str(given)
    for name in BROWSERS:
        found = shutil.which(name)
        if found is not None:
            return found
    raise ConfigurationError(
        "PDF export needs headless Chromium, which is not installed: run scripts/install-browser "
        "(Debian's chromium package) or give --browser PATH"
    )


def render_pdf(
    report: Report, out: Path, *, browser: Path | None = None, timeout_seconds: float = 60
) -> None:
    """Write ``report`` to ``out`` as a PDF; :class:`AuditError` if Chromium fails."""
    executable = find_browser(browser)
    html = render_html(report, expand=True).replace("</head>", _PRINT_CSS, 1)
    with tempfile.TemporaryDirectory(prefix="fincluster-pdf-") as work:
        page = Path(work) / "report.html"
        page.write_text(html, encoding="utf-8")
        target = Path(work) / "report.pdf"
        command = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={Path(work) / 'profile'}",
            "--no-pdf-header-footer",
            f"--print-to-pdf={target}",
            page.as_uri(),
        ]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            _, stderr = process.communicate(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise AuditError(f"{executable} did not print the report within {timeout_seconds:g} s") from None
        if process.returncode != 0 or not target.is_file() or target.read_bytes()[:5] != PDF_MAGIC:
            last = stderr.strip().splitlines()[-1:] or ["no output"]
            raise AuditError(f"{executable} could not print the report ({process.returncode}): {last[0]}")
        try:
            shutil.copyfile(target, out)
        except OSError as error:
            raise AuditError(f"cannot write {out}: {error.strerror}") from error
