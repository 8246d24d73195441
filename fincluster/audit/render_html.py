"""The report as one self-contained HTML file: inline CSS and inline SVG, no script, no fetches.

It opens from disk in any browser and prints cleanly. Summaries come before detail:

1. integrity (status, the keys and certificates that verified the log), then the totals;
2. sessions that failed, with the refusals and attestation failures that made them fail;
3. one line per session, then each session's detail collapsed (``<details>``): placement with the
   attestation claims and policy decisions, failovers, verification failures (an output another
   node recomputed differently), denials, attestation failures;
4. clients and departments, nodes (with their attestations and certificates), the exposure matrix
   (an SVG heat map whose cells show the exact token counts), announcements a registry accepted or
   refused, events outside any session, and a glossary.

``expand=True`` renders every session's detail open (for printing and the PDF).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape

from fincluster.audit.events import AttestationClaims
from fincluster.audit.names import node_name
from fincluster.audit.report_model import (
    AnnouncementRow,
    AttestationFailureRow,
    DenialRow,
    DepartmentRow,
    ExposureMatrix,
    FailoverRow,
    Integrity,
    NodeReport,
    PlacementRow,
    Report,
    SessionReport,
    UserRow,
    VerificationRow,
)
from fincluster.spans import BlockSpan

_CSS = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --bad: #cf222e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0 auto; padding: 24px; max-width: 1280px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 18px 0 6px; } h4 { font-size: 13px; margin: 14px 0 4px; color: var(--muted); }
.meta, .empty, .sub { color: var(--muted); }
.sub { font-size: 12px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
              overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.nowrap { white-space: nowrap; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 6px 0; }
dt { color: var(--muted); } dd { margin: 0; }
.integrity { border: 2px solid; border-radius: 8px; padding: 12px 16px; }
.integrity h2 { margin-top: 0; }
.status-verified { background: #e9f6ec; border-color: #1a7f37; }
.status-failed { background: #fdecea; border-color: var(--bad); }
.status-not_checked { background: #fff8e5; border-color: #9a6700; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.card b { display: block; font-size: 20px; font-variant-numeric: tabular-nums; }
.card.alert { border-color: var(--bad); color: var(--bad); }
.failed-mark { color: var(--bad); font-weight: 600; }
.session-row { display: grid; grid-template-columns: 1.2em 11em 14em 7.5em 13.5em 1fr 8em; gap: 8px;
               align-items: baseline; padding: 5px 12px; }
.session-row.head { font-weight: 600; color: var(--muted); border-bottom: 1px solid var(--line); }
.session-row > span:last-child { text-align: right; font-variant-numeric: tabular-nums; }
details.session { border-bottom: 1px solid var(--line); }
details.session[open] { padding: 0 12px 10px; background: #fbfcfd; }
details.session[open] > summary { margin: 0 -12px; }
details.session > summary { cursor: pointer; list-style: none; }
details.session > summary::-webkit-details-marker { display: none; }
details.session > summary .marker::before { content: "▸"; color: var(--muted); }
details.session[open] > summary .marker::before { content: "▾"; }
details.session > summary:hover { background: #f6f8fa; }
.claims { margin: 0; padding-left: 16px; } .claims li { margin: 0; }
.scroll { overflow-x: auto; }
svg text { font: 11px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; fill: var(--ink); }
svg text.light { fill: #ffffff; }
@media print {
  body { padding: 0; } .scroll { overflow: visible; }
  body { font-size: 11px; } code, .mono { font-size: 10px; }
  summary, dl, h2, h3, h4 { break-inside: avoid; } h2, h3, h4, summary { break-after: avoid; }
  .session-row.head { display: none; }
  details.session > summary.session-row { display: block; font-weight: 600; }
  .session-row > span { display: inline; margin-right: 12px; }
}
@media screen and (max-width: 900px) { .session-row { grid-template-columns: 1.2em 1fr 1fr; } }
"""

_STATUS_TITLE = {"verified": "VERIFIED", "failed": "FAILED", "not_checked": "NOT CHECKED"}
_EXPAND_UP_TO = 3
"""Reports with this few sessions show every session's detail open."""

GLOSSARY = (
    (
        "Integrity",
        "Whether every record, seal and signed checkpoint of this log verified under the keys "
        "and certificates listed in the integrity box. FAILED means the log was edited, cut or is signed by "
        "a key nobody vouched for; nothing below can then be relied on.",
    ),
    (
        "Session",
        "One call group of a client: every hop of an inference session, or one stateless forward "
        "or backward pass. Client and server logs name the same session id.",
    ),
    (
        "Placement",
        "Which node ran which blocks of a session. Blocks are the model's transformer layers; "
        "the first ones (the sensitive prefix) see activations closest to the prompt.",
    ),
    (
        "Attestation",
        "A token signed by the security team's attestation authority that binds a node's tier "
        "(trusted / standard), zone, hardware, software and model weights (manifest digest) to its TLS key, "
        "valid until its expiry. The authority key id names the key that signed it.",
    ),
    (
        "Policy decision",
        "The answer of the Rego policies (route at the client, serve at the server, "
        "announce at the registry) with its id, and the digest of the policy bundle that gave it. Allowed "
        "decisions have no unmet requirement; denials list the requirements that were not met.",
    ),
    (
        "Receipt",
        "The node's signature over what it received and returned (digests only), kept by both "
        "sides; reconciliation pairs them.",
    ),
    (
        "Certificate",
        "The node's TLS certificate from the swarm CA; renewed daily (same key) or rotated "
        "(new key). Signatures are checked under the certificate valid when they were made.",
    ),
    (
        "Denial / attestation failure",
        "A request refused by policy (router, server or registry), or a node "
        "whose attestation, key or certificate did not check out (expired, revoked, key mismatch).",
    ),
    ("Exposure", "Tokens whose activations each node processed, per block."),
)


def render_html(report: Report, *, expand: bool = False) -> str:
    expand = expand or len(report.sessions) <= _EXPAND_UP_TO
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title><style>{_CSS}</style></head><body>",
        _header(report),
        _integrity(report.integrity),
        _summary(report),
        _failed(report.sessions),
        '<section id="sessions"><h2>Sessions</h2>',
        _session_index(report.sessions),
        *[_session(s, expand) for s in report.sessions],
        "</section>",
        _people(report.users, report.departments),
        _nodes(report.nodes, report.exposure),
        _announcements(report.announcements),
        '<section id="unattributed"><h2>Events outside any session</h2>',
        "<h3>Denials</h3>",
        _denials(report.denials_without_session),
        "<h3>Attestation failures</h3>",
        _attestation_failures(report.attestation_failures_without_session),
        "</section>",
        _glossary(),
        '<footer class="meta"><p>Generated by fincluster from the audit log; contains digests and metadata '
        "only, never prompts, tokens or activations.</p></footer>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _header(report: Report) -> str:
    f = report.filters
    scope = [
        f"session {f.session}" if f.session else None,
        f"node {f.node}" if f.node else None,
        f"since {_time(f.since)}" if f.since else None,
        f"until {_time(f.until)}" if f.until else None,
    ]
    scope_text = ", ".join(s for s in scope if s) or "whole log"
    return (
        f'<header><h1>{_e(report.title)}</h1><p class="meta">Log {_e(report.origin or "(unnamed)")} · '
        f"scope: {_e(scope_text)} · generated {_e(_time(report.generated_at))}</p></header>"
    )


def _integrity(integrity: Integrity) -> str:
    facts = [
        ("Records (tree size)", integrity.tree_size),
        ("Root hash", integrity.root_hash),
        ("Checkpoints verified", integrity.checkpoints_verified),
        ("Last checkpoint", _checkpoint_text(integrity)),
        ("Records after last checkpoint", integrity.unanchored_records),
        ("First bad record", integrity.first_bad_record),
    ]
    problems = "".join(f"<li>{_e(p)}</li>" for p in integrity.problems)
    unreadable = (
        f"<p>Unreadable records: {_e(', '.join(map(str, integrity.unreadable_records)))}</p>"
        if integrity.unreadable_records
        else ""
    )
    signers = "".join(f"<li><code>{_e(s)}</code></li>" for s in integrity.verified_with)
    verified_with = f"<h4>Verified with</h4><ul>{signers}</ul>" if signers else ""
    return (
        f'<section id="integrity" class="integrity status-{integrity.status}">'
        f"<h2>Integrity: {_STATUS_TITLE[integrity.status]}</h2><p>{_e(integrity.summary)}</p>"
        f"{_dl((label, value) for label, value in facts if value is not None)}"
        f"{f'<ul>{problems}</ul>' if problems else ''}{unreadable}{verified_with}</section>"
    )


def _checkpoint_text(integrity: Integrity) -> str | None:
    if integrity.last_checkpoint_size is None or integrity.last_checkpoint_time is None:
        return None
    return f"{integrity.last_checkpoint_size} records at {_time(integrity.last_checkpoint_time)}"


def _summary(report: Report) -> str:
    t = report.totals
    cards = [
        ("Events", t.events, False),
        ("Sessions", t.sessions, False),
        ("Failed sessions", t.failed_sessions, t.failed_sessions > 0),
        ("Clients", t.clients, False),
        ("Nodes", t.nodes, False),
        ("Transfers", t.transfers, False),
        ("Tokens", t.tokens, False),
        ("Failovers", t.failovers, False),
        ("Denials", t.denials, t.denials > 0),
        ("Attestation failures", t.attestation_failures, t.attestation_failures > 0),
        ("Announcements", t.announcements, False),
        ("Outputs verified", t.verifications, False),
        ("Verification failures", t.verification_failures, t.verification_failures > 0),
    ]
    body = "".join(
        f'<div class="card{" alert" if alert else ""}"><b>{value}</b>{_e(label)}</div>'
        for label, value, alert in cards
    )
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div></section>'


def _failed(sessions: Sequence[SessionReport]) -> str:
    failed = [s for s in sessions if s.failed]
    if not failed:
        return ""
    rows = []
    for s in failed:
        why = [
            f"{d.enforced_at} refused"
            + (f" on {node_name(d.node_id)}" if d.node_id else "")
            + ": "
            + "; ".join(d.reasons)
            for d in s.denials
        ]
        why += [f"attestation of {node_name(a.node_id)}: {a.reason}" for a in s.attestation_failures]
        why.insert(0, s.state)
        rows.append(
            [
                f'<a href="#session-{_e(s.session_id)}"><code>{_e(s.session_id)}</code></a>',
                _client_line(s.client_id, s.department),
                "<br>".join(_e(w) for w in why),
            ]
        )
    table = _table(["Session", "Client", "Why it failed"], rows)
    return f'<section id="failed"><h2>Failed sessions</h2>{table}</section>'


def _session_index(sessions: Sequence[SessionReport]) -> str:
    """The header of the session list; each session's own line is its ``<summary>``."""
    if not sessions:
        return '<p class="empty">No sessions in scope.</p>'
    labels = ("", "Session", "Client", "Classification", "First seen", "State", "Transfers / tokens")
    return '<div class="session-row head">' + "".join(f"<span>{_e(x)}</span>" for x in labels) + "</div>"


def _session(s: SessionReport, expand: bool) -> str:
    facts = [
        ("Session", s.session_id),
        ("Recorded by", f"the {s.observer}"),
        ("Client", f"{s.client_id} ({s.department})" if s.client_id else None),
        ("Classification", s.classification),
        ("Model", s.model_id),
        ("Weights (manifest) digest", s.manifest_digest),
        ("Opened", _time(s.opened_at) if s.opened_at else None),
        ("State", s.state),
        ("Transfers / tokens", f"{s.transfers} / {s.tokens}"),
        ("Outputs verified elsewhere", f"{s.verifications} ({len(s.verification_failures)} disagreed)"),
    ]
    failed = ' <span class="failed-mark">failed</span>' if s.failed else ""
    short = s.session_id if len(s.session_id) <= 18 else s.session_id[:16] + "…"
    cells = (
        f'<code title="{_e(s.session_id)}">{_e(short)}</code>{failed}',
        _client_line(s.client_id, s.department),
        _e(s.classification or "-"),
        _e(_time(s.opened_at) if s.opened_at else "-"),
        _e(s.state),
        f"{s.transfers} / {s.tokens}",
    )
    return (
        f'<details class="session" id="session-{_e(s.session_id)}"{" open" if expand else ""}>'
        f'<summary class="session-row"><span class="marker"></span>'
        + "".join(f"<span>{cell}</span>" for cell in cells)
        + "</summary>"
        f"{_dl((label, value) for label, value in facts if value is not None)}"
        f"<h4>Placement</h4>{_placement(s.placement)}<h4>Failovers</h4>{_failovers(s.failovers)}"
        f"<h4>Verification failures</h4>{_verification_failures(s.verification_failures)}"
        f"<h4>Denials</h4>{_denials(s.denials)}<h4>Attestation failures</h4>"
        f"{_attestation_failures(s.attestation_failures)}</details>"
    )


def _placement(rows: Sequence[PlacementRow]) -> str:
    return _table(
        [
            "Blocks",
            "Node",
            "Attestation",
            "Policy",
            "Certificates",
            "Routed",
            "Transfers",
            "Tokens",
            "Receipts",
        ],
        (
            [
                _span(p.block_span),
                _node(p.node_id),
                _claims(p.attestations),
                _policy(p.policy_decision_ids, p.policy_bundle_digests),
                "<br>".join(_code(_short_digest(c)) for c in p.cert_fingerprints) or "-",
                p.routed,
                p.transfers,
                p.tokens,
                p.receipts,
            ]
            for p in rows
        ),
        numeric_from=5,
    )


def _claims(claims: Sequence[AttestationClaims]) -> str:
    if not claims:
        return '<span class="sub">unattested</span>'
    items = [
        f"<li><b>{_e(c.tier)}</b> · {_e(c.zone)} · {_e(c.hardware)} · {_e(c.software_version)}<br>"
        f'<span class="sub">weights {_code(c.model_manifest_sha256[:16] + "…")} · authority key '
        f"{_code(c.authority_key_id[:16] + '…')} · valid until {_e(_time(c.expires_at))} · "
        f"id {_code(c.attestation_id)}</span></li>"
        for c in claims
    ]
    return f'<ul class="claims">{"".join(items)}</ul>'


def _policy(decisions: Sequence[str], bundles: Sequence[str]) -> str:
    if not decisions:
        return '<span class="sub">no decision recorded in this log</span>'
    bundle = ", ".join(_code(b[:16] + "…") for b in bundles) or "none (no policy engine)"
    ids = ", ".join(_code(d) for d in decisions)
    return f'allowed: no requirement unmet<br><span class="sub">decision {ids} · bundle {bundle}</span>'


def _failovers(rows: Sequence[FailoverRow]) -> str:
    return _table(
        ["Time", "Blocks", "Failed node", "Replacement", "Replayed steps", "Reason"],
        (
            [
                _e(_time(f.time)),
                _span(f.block_span),
                _node(f.failed_node_id),
                _node(f.replacement_node_id) if f.replacement_node_id else "-",
                f.replayed_steps,
                _e(f.reason),
            ]
            for f in rows
        ),
    )


def _verification_failures(rows: Sequence[VerificationRow]) -> str:
    return _table(
        [
            "Time",
            "Step",
            "Blocks",
            "Checked node",
            "Recomputed by",
            "Referee",
            "Quarantined",
            "Max difference",
            "Output digests",
        ],
        (
            [
                _e(_time(v.time)),
                v.step,
                _span(v.block_span),
                _node(v.checked_node_id),
                "<br>".join(_node(n) for n in v.verifier_node_ids),
                "<br>".join(_node(n) for n in v.referee_node_ids) or "-",
                _node(v.quarantined_node_id) if v.quarantined_node_id else "-",
                _e("-" if v.max_abs_diff is None else f"{v.max_abs_diff:.3g}"),
                f"{_code(_short_digest(v.checked_output_sha256))} vs "
                f"{_code(_short_digest(v.verifier_output_sha256))}",
            ]
            for v in rows
        ),
    )


def _denials(rows: Sequence[DenialRow]) -> str:
    return _table(
        ["Time", "Enforced at", "Node", "Blocks", "Policy decision", "Reasons"],
        (
            [
                _e(_time(d.time)),
                _e(d.enforced_at),
                _node(d.node_id) if d.node_id else "-",
                _span(d.block_span) if d.block_span else "-",
                _code(d.policy_decision_id or "-"),
                "<br>".join(_e(r) for r in d.reasons),
            ]
            for d in rows
        ),
    )


def _attestation_failures(rows: Sequence[AttestationFailureRow]) -> str:
    return _table(
        ["Time", "Node", "Attestation", "Reason"],
        ([_e(_time(a.time)), _node(a.node_id), _code(a.attestation_id or "-"), _e(a.reason)] for a in rows),
    )


def _people(users: Sequence[UserRow], departments: Sequence[DepartmentRow]) -> str:
    if not users:
        return ""
    by_user = _table(
        [
            "Client",
            "Department",
            "Sessions",
            "Failed",
            "Transfers",
            "Tokens",
            "Denials",
            "Attestation failures",
        ],
        (
            [
                _node(u.client_id),
                _e(u.department),
                u.sessions,
                u.failed_sessions,
                u.transfers,
                u.tokens,
                u.denials,
                u.attestation_failures,
            ]
            for u in users
        ),
        numeric_from=2,
    )
    by_department = _table(
        ["Department", "Clients", "Sessions", "Failed", "Transfers", "Tokens", "Denials"],
        (
            [_e(d.department), d.clients, d.sessions, d.failed_sessions, d.transfers, d.tokens, d.denials]
            for d in departments
        ),
        numeric_from=1,
    )
    return f'<section id="people"><h2>Clients and departments</h2>{by_department}{by_user}</section>'


def _nodes(nodes: Sequence[NodeReport], exposure: ExposureMatrix) -> str:
    table = _table(
        [
            "Node",
            "Attestation",
            "Certificates",
            "Block spans",
            "Sessions",
            "Transfers",
            "Tokens",
            "Failed",
            "Denials",
            "Attestation failures",
            "Outputs verified",
            "Found wrong",
        ],
        (
            [
                _node(n.node_id),
                _claims(n.attestations),
                "<br>".join(_code(_short_digest(c)) for c in n.cert_fingerprints) or "-",
                _e(", ".join(str(span) for span in n.block_spans) or "-"),
                len(n.sessions),
                n.transfers,
                n.tokens,
                n.failovers,
                n.denials,
                n.attestation_failures,
                n.outputs_checked,
                n.outputs_found_wrong,
            ]
            for n in nodes
        ),
        numeric_from=4,
    )
    return (
        f'<section id="nodes"><h2>Nodes</h2>{table}<h3>Exposure matrix (tokens per node and block)</h3>'
        f'<div class="scroll">{_exposure_svg(exposure)}</div></section>'
    )


def _announcements(rows: Sequence[AnnouncementRow]) -> str:
    if not rows:
        return ""
    table = _table(
        ["Time", "Node", "Blocks", "Outcome", "Attestation", "Policy decision", "Reasons"],
        (
            [
                _e(_time(a.time)),
                _node(a.node_id),
                _span(a.block_span) if a.block_span else "-",
                _e(a.outcome) if a.outcome == "accepted" else '<span class="failed-mark">refused</span>',
                _claims((a.attestation,) if a.attestation else ()),
                _code(a.policy_decision_id or "-"),
                "<br>".join(_e(r) for r in a.reasons) or "-",
            ]
            for a in rows
        ),
    )
    return f'<section id="announcements"><h2>Registry announcements</h2>{table}</section>'


def _glossary() -> str:
    return f'<section id="glossary"><h2>Glossary</h2>{_dl(GLOSSARY)}</section>'


def _exposure_svg(exposure: ExposureMatrix) -> str:
    """Nodes-by-blocks heat map; each cell is labelled with its exact token count."""
    if not exposure.rows:
        return '<p class="empty">No transfers in scope.</p>'
    peak = max(max(row.tokens) for row in exposure.rows) or 1
    cell_w = max(28, 7 * len(str(peak)) + 10)
    cell_h, top = 24, 30
    labels = [_short(row.node_id) for row in exposure.rows]
    label_w = 7 * max(len(label) for label in labels) + 16
    width = label_w + cell_w * len(exposure.blocks) + 8
    height = top + cell_h * len(exposure.rows) + 8
    parts = [
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Exposure matrix: tokens per node and block">',
        f'<text x="{label_w - 8}" y="14" text-anchor="end">block →</text>',
    ]
    for column, block in enumerate(exposure.blocks):
        x = label_w + column * cell_w + cell_w // 2
        parts.append(f'<text x="{x}" y="{top - 8}" text-anchor="middle">{block}</text>')
    for r, (row, label) in enumerate(zip(exposure.rows, labels, strict=True)):
        y = top + r * cell_h
        parts.append(
            f'<text x="{label_w - 8}" y="{y + cell_h // 2 + 4}" text-anchor="end">'
            f"<title>{_e(row.node_id)}</title>"
            f"{_e(label)}</text>"
        )
        for column, (block, tokens) in enumerate(zip(exposure.blocks, row.tokens, strict=True)):
            x = label_w + column * cell_w
            shade = tokens / peak
            text_class = ' class="light"' if shade > 0.55 else ""
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" '
                f'fill="{_colour(shade, tokens)}">'
                f"<title>{_e(row.node_id)}, block {block}: {tokens} tokens</title></rect>"
                f'<text x="{x + cell_w // 2}" y="{y + cell_h // 2 + 4}" text-anchor="middle"{text_class}>'
                f"{tokens}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _colour(shade: float, tokens: int) -> str:
    if tokens == 0:
        return "#f3f4f6"
    low, high = (219, 233, 251), (23, 70, 150)
    r, g, b = (round(lo + (hi - lo) * shade) for lo, hi in zip(low, high, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _short(node_id: str, limit: int = 48) -> str:
    """``spiffe://bank/server/a`` reads as ``bank/server/a``; very long ids are cut with an ellipsis."""
    text = node_id.removeprefix("spiffe://")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_digest(fingerprint: str) -> str:
    return fingerprint[:23] + "…" if len(fingerprint) > 24 else fingerprint


def _node(node_id: str) -> str:
    """The readable name, with the SPIFFE id under it."""
    name = node_name(node_id)
    if name == node_id:
        return _code(node_id)
    return f'<b>{_e(name)}</b><br><code class="sub">{_e(node_id)}</code>'


def _client_line(client_id: str | None, department: str | None) -> str:
    """Name and department on one line; the SPIFFE id is in the tooltip and the session's detail."""
    if client_id is None:
        return "-"
    return f'<span title="{_e(client_id)}">{_e(node_name(client_id))}</span> · {_e(department or "")}'


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[str | int]], *, numeric_from: int | None = None
) -> str:
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            numeric = numeric_from is not None and i >= numeric_from
            cells.append(f'<td class="num">{value}</td>' if numeric else f"<td>{value}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    if not body:
        return '<p class="empty">None recorded.</p>'
    head = "".join(
        f'<th class="num">{_e(h)}</th>'
        if numeric_from is not None and i >= numeric_from
        else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _dl(items: Iterable[tuple[str, object]]) -> str:
    return (
        "<dl>" + "".join(f"<dt>{_e(label)}</dt><dd>{_e(str(value))}</dd>" for label, value in items) + "</dl>"
    )


def _span(span: BlockSpan) -> str:
    return _e(str(span))


def _code(text: str) -> str:
    return f"<code>{_e(text)}</code>"


def _e(text: str) -> str:
    return escape(text, quote=True)


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")
