"""``fincluster audit``: verify a log, write compliance reports, export, reconcile, usage, prune.

Handlers return the exit code: 0 when the answer is good, 1 when the log failed verification (also
for ``report``, which still writes the report) or the logs do not reconcile, so scripts and CI can
act on it. Unusable input (a missing file, a key that is
not a key) raises :class:`~fincluster.errors.FinclusterError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import ValidationError

from fincluster.audit.checkpoints import Checkpoint
from fincluster.audit.export import export_jsonl
from fincluster.audit.keys import KeyRing
from fincluster.audit.log import AuditLog, AuditSettings
from fincluster.audit.names import load_departments, node_name
from fincluster.audit.reader import SortedLog, sort_logs
from fincluster.audit.reconcile import TransferKey, reconcile
from fincluster.audit.render_csv import render_csv
from fincluster.audit.render_html import render_html
from fincluster.audit.render_pdf import render_pdf
from fincluster.audit.report import build_report, matched_nothing, render_json
from fincluster.audit.signing import PrivateKey, PublicKey, algorithm_of, key_id, public_key_of
from fincluster.audit.store import SqliteStore
from fincluster.audit.usage import UsageRow, usage
from fincluster.audit.verify import verify
from fincluster.errors import AuditError, ConfigurationError

__all__ = ["register"]

_RENDERERS = {"html": render_html, "json": render_json, "csv": render_csv}


def cmd_audit_verify(args: argparse.Namespace) -> int:
    keys = _key_ring(args.key, args)
    if keys is None:
        raise ConfigurationError(
            "give the writer's key or certificate (--key) or a certificate archive (--archive)"
        )
    report = verify(args.db, keys, anchor=_anchor(args.anchor))
    if report.ok:
        print(
            f"{report.path}: OK, {report.tree_size} records (root {report.root_hash}), "
            f"{report.checkpoints_verified} checkpoints verified"
        )
        for signer in report.signers:
            print(f"  signed by {signer}")
        if report.pruned_before:
            print(f"  records before {report.pruned_before} were pruned under a signed marker")
        if report.unanchored_records:
            print(
                f"  the last {report.unanchored_records} records are after the last checkpoint: "
                "a cut there is only caught with --anchor"
            )
        return 0
    where = "none (no single record)" if report.first_bad_record is None else str(report.first_bad_record)
    print(f"{report.path}: FAILED verification, {report.problem_count} problem(s)")
    print(f"  first bad record: {where}")
    for problem in report.problems:
        print(f"  - {problem.code}: {problem.detail}")
    if report.problem_count > len(report.problems):
        print(f"  ... and {report.problem_count - len(report.problems)} more")
    if any(problem.code == "untrusted_signer" for problem in report.problems):
        print("  give the writer's certificate (--key CERT) or the CA's archive (--archive CA_DIR/issued)")
    return 1


def cmd_audit_report(args: argparse.Namespace) -> int:
    report = build_report(
        args.db,
        session=args.session,
        node=args.node,
        since=_instant(args.since, "--since"),
        until=_instant(args.until, "--until"),
        trusted_public_keys=_key_ring(args.key, args),
        anchor=_anchor(args.anchor),
        departments=load_departments(args.policy_data) if args.policy_data else None,
    )
    if (nothing := matched_nothing(report)) is not None:
        raise ConfigurationError(f"{args.db}: {nothing}; no report written")
    if args.format == "pdf":
        render_pdf(report, args.out, browser=args.browser)
    else:
        _write_text(args.out, _RENDERERS[args.format](report))
    print(f"wrote {args.format} report to {args.out}: {report.integrity.summary}")
    return 1 if report.integrity.status == "failed" else 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    if args.out is None:
        export_jsonl(args.db, sys.stdout)
        return 0
    try:
        with args.out.open("w", encoding="utf-8", newline="\n") as out:
            lines = export_jsonl(args.db, out)
    except OSError as error:
        raise AuditError(f"cannot write {args.out}: {error.strerror}") from error
    print(f"exported {lines} lines to {args.out}")
    return 0


def cmd_audit_reconcile(args: argparse.Namespace) -> int:
    keys = _key_ring(args.node_cert, args)
    logs = sort_logs(args.logs)
    if not logs.client:
        raise ConfigurationError("no client log among the logs given (a client log holds client transfers)")
    if not logs.server:
        raise ConfigurationError("no server log among the logs given (a server log holds server transfers)")
    client_events = [event for log in logs.client for event in log.events]
    server_events = [event for log in logs.server for event in log.events]
    result = reconcile(client_events, server_events, node_keys=keys)
    unmatched = len(result.client_only) + len(result.server_only) + len(result.mismatched)
    print(
        f"matched {result.matched}, unmatched {unmatched} (client only {len(result.client_only)}, "
        f"server only {len(result.server_only)}, mismatched {len(result.mismatched)})"
    )
    print(f"  client logs: {_log_list(logs.client)}")
    print(f"  server logs: {_log_list(logs.server)}")
    if keys is None:
        print("  receipt signatures NOT checked: give --archive CA_DIR/issued or --node-cert")
    gaps = result.sessions_without_client_log
    without_log = {gap.session_id for gap in gaps}
    if gaps:
        transfers = sum(gap.transfers for gap in gaps)
        print(
            f"{len(gaps)} session(s) with {transfers} server transfer(s) are in none of the client logs "
            "given (their client's log is elsewhere, or no client log was kept):"
        )
        _print_capped(
            [
                f"  {gap.session_id}: {gap.transfers} transfer(s) from {gap.client_id} to "
                f"{', '.join(node_name(n) for n in gap.nodes)}"
                for gap in gaps
            ],
            args.all,
        )
    lines = [f"  client only: {_transfer(t)}" for t in result.client_only]
    lines += [f"  server only: {_transfer(t)}" for t in result.server_only if t.session_id not in without_log]
    lines += [f"  mismatched:  {_transfer(m.transfer)}: {m.reason}" for m in result.mismatched]
    _print_capped(lines, args.all)
    return 0 if result.ok else 1


def cmd_audit_usage(args: argparse.Namespace) -> int:
    logs = sort_logs(args.logs)
    side = logs.server if args.observer == "server" else logs.client
    if not side:
        other = "client" if args.observer == "server" else "server"
        raise ConfigurationError(
            f"no {args.observer} log among the logs given (a {args.observer} log holds "
            f"{args.observer} transfers); --observer {other} counts the {other}s' records"
        )
    rows = usage(
        (event for log in side for event in log.events),
        observer=args.observer,
        departments=load_departments(args.policy_data) if args.policy_data else {},
        since=_instant(args.since, "--since"),
        until=_instant(args.until, "--until"),
    )
    if args.format == "json":
        text = json.dumps([row.model_dump(mode="json") for row in rows], indent=2) + "\n"
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(UsageRow.model_fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows(row.model_dump(mode="json") for row in rows)
        text = out.getvalue()
    else:
        text = _usage_table(rows)
    if args.out is None:
        sys.stdout.write(text)
    else:
        _write_text(args.out, text)
        print(f"wrote usage of {len(rows)} client/node pairs to {args.out}")
    return 0


def _usage_table(rows: Sequence[UsageRow]) -> str:
    if not rows:
        return "no transfers in these logs (and window)\n"
    header = ("department", "client", "node", "transfers", "tokens", "token-blocks")
    cells = [
        (
            r.department,
            node_name(r.client_id),
            node_name(r.node_id),
            str(r.transfers),
            str(r.tokens),
            str(r.token_blocks),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *cells)) for i in range(len(header))]
    lines = []
    for row in (header, *cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    by_department: dict[str, int] = {}
    for r in rows:
        by_department[r.department] = by_department.get(r.department, 0) + r.token_blocks
    lines.append("")
    lines += [f"{department}: {blocks} token-blocks" for department, blocks in sorted(by_department.items())]
    return "\n".join(lines) + "\n"


def cmd_audit_prune(args: argparse.Namespace) -> int:
    signing_key = _private_key(args.key_file)
    origin = _writer_origin(args.db, signing_key)
    settings = AuditSettings(retention_days=args.retention_days)
    with AuditLog(args.db, signing_key=signing_key, origin=origin, settings=settings) as log:
        marker = log.prune()
    if marker is None:
        print(f"{args.db}: nothing is older than {args.retention_days} days under a checkpoint")
    else:
        print(f"{args.db}: records before {marker.body.pruned_size} pruned; a signed marker keeps their root")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``audit`` command group to the ``fincluster`` parser's subcommands."""
    audit = commands.add_parser("audit", help="audit logs: verify, report, export, reconcile, usage, prune")
    group = audit.add_subparsers(dest="audit_command", required=True)
    key_help = "trusted writer key: PEM public key or X.509 certificate (repeatable)"
    anchor_help = "a checkpoint kept outside the log (JSON), to catch truncation"

    check = group.add_parser("verify", help="check every record and checkpoint; exit 1 if any is bad")
    check.add_argument("db", type=Path, help="audit log (SQLite)")
    _add_trusted_keys(check, key_help)
    check.add_argument("--anchor", type=Path, help=anchor_help)
    check.set_defaults(handler=cmd_audit_verify)

    report = group.add_parser(
        "report",
        help="write a compliance report (integrity status first); exit 1 if integrity FAILED",
        description="Write a compliance report of one log. Exit 1 when its integrity FAILED (the report "
        "is still written, and says so first); an error when a --session or --node filter matches nothing.",
    )
    report.add_argument("db", type=Path, help="audit log (SQLite)")
    report.add_argument("--format", required=True, choices=[*sorted(_RENDERERS), "pdf"])
    report.add_argument("--out", required=True, type=Path, help="report file to write")
    report.add_argument("--session", help="only this session")
    report.add_argument("--node", help="only this node (SPIFFE id)")
    report.add_argument("--since", help="from this time on, ISO 8601 with a zone, e.g. 2025-03-01T09:00Z")
    report.add_argument("--until", help="before this time, ISO 8601 with a zone")
    _add_trusted_keys(report, f"{key_help}; without keys integrity is NOT CHECKED")
    report.add_argument(
        "--policy-data",
        type=Path,
        help="the swarm's policy data (policies/data.json): its fincluster.departments map clients to "
        "departments for the per-department summary",
    )
    report.add_argument("--browser", type=Path, help="Chromium for --format pdf (default: chromium on PATH)")
    report.add_argument("--anchor", type=Path, help=anchor_help)
    report.set_defaults(handler=cmd_audit_report)

    export = group.add_parser("export", help="export the log as JSON Lines (for a SIEM)")
    export.add_argument("db", type=Path, help="audit log (SQLite)")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export.set_defaults(handler=cmd_audit_export)

    pair = group.add_parser(
        "reconcile",
        help="pair client and server transfer records; exit 1 on gaps",
        description="Pair the transfers of one or more client logs with the servers' logs. Give log "
        "files or directories of logs (*.sqlite, *.db), in any order: each log is a client's or a "
        "server's by what it holds.",
    )
    pair.add_argument("logs", nargs="+", type=Path, metavar="LOG_OR_DIR", help="audit logs or directories")
    pair.add_argument(
        "--node-cert",
        action="append",
        type=Path,
        help="a server's certificate, to verify its receipts (repeatable)",
    )
    _add_archive(pair)
    pair.add_argument("--all", action="store_true", help=f"list every gap, not only the first {_LISTED}")
    pair.set_defaults(handler=cmd_audit_reconcile)

    spent = group.add_parser(
        "usage",
        help="tokens per client, department and node, from audit logs",
        description="Count the work each node did for each client (transfers, tokens, token-blocks: "
        "tokens times blocks, what department quotas are charged in), from the servers' logs (default) "
        "or the clients' (--observer client). Give log files or directories of logs.",
    )
    spent.add_argument("logs", nargs="+", type=Path, metavar="LOG_OR_DIR", help="audit logs or directories")
    spent.add_argument(
        "--observer", choices=["server", "client"], default="server", help="whose records count"
    )
    spent.add_argument(
        "--policy-data",
        type=Path,
        help="policy data (policies/data.json) whose fincluster.departments name departments",
    )
    spent.add_argument("--since", help="from this time on, ISO 8601 with a zone, e.g. 2025-03-01T09:00Z")
    spent.add_argument("--until", help="before this time, ISO 8601 with a zone")
    spent.add_argument("--format", choices=["table", "json", "csv"], default="table")
    spent.add_argument("--out", type=Path, help="file to write (default: standard output)")
    spent.set_defaults(handler=cmd_audit_usage)

    prune = group.add_parser(
        "prune", help="delete records older than the retention period (stop the log's writer first)"
    )
    prune.add_argument("db", type=Path, help="audit log (SQLite)")
    prune.add_argument("--key-file", required=True, type=Path, help="the writer's private key (PEM)")
    prune.add_argument("--retention-days", required=True, type=int, help="keep at least this many days")
    prune.set_defaults(handler=cmd_audit_prune)


# -- inputs ----------------------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read {what} {path}: {error.strerror}") from error


def _public_key(path: Path) -> PublicKey:
    """A PEM public key, or the public key of a PEM certificate (a node's TLS certificate)."""
    pem = _read(path, "key")
    key: object
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as error:
        raise ConfigurationError(f"{path} is neither a PEM public key nor a PEM certificate") from error
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ConfigurationError(f"{path}: audit keys are Ed25519 or ECDSA P-256, not {type(key).__name__}")
    algorithm_of(key)
    return key


def _add_trusted_keys(parser: argparse.ArgumentParser, key_help: str) -> None:
    parser.add_argument("--key", action="append", type=Path, help=key_help)
    _add_archive(parser)


def _add_archive(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--archive",
        action="append",
        type=Path,
        help="directory of certificates, e.g. the CA's issued/ archive: each one is trusted for its own "
        "node's log and receipts, while it was valid (repeatable)",
    )
    parser.add_argument("--ca", type=Path, help="only trust --archive certificates this CA issued (ca.pem)")


def _key_ring(pinned_paths: Sequence[Path] | None, args: argparse.Namespace) -> KeyRing | None:
    """Keys and certificates named one by one (``--key``, ``--node-cert``) are pinned: chosen for this
    log; ``--archive`` certificates speak only for their own node. None when nothing was given."""
    from fincluster.trust.archive import load_certificates

    pinned = [_trusted_item(path) for path in pinned_paths or ()]
    archived: list[x509.Certificate] = []
    if args.archive:
        issuer = x509.load_pem_x509_certificate(_read(args.ca, "CA certificate")) if args.ca else None
        archived = load_certificates(args.archive, issued_by=issuer)
        if not archived:
            raise ConfigurationError(f"no certificates in {', '.join(map(str, args.archive))}")
    if not pinned and not archived:
        return None
    return KeyRing.of(pinned) + KeyRing.of(archived, pinned=False)


def _trusted_item(path: Path) -> PublicKey | x509.Certificate:
    pem = _read(path, "key")
    if b"-----BEGIN CERTIFICATE-----" in pem:
        try:
            return x509.load_pem_x509_certificate(pem)
        except ValueError as error:
            raise ConfigurationError(f"{path} is not a PEM certificate") from error
    return _public_key(path)


def _private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"{path} is not an unencrypted PEM private key") from error
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{path}: audit keys are Ed25519 or ECDSA P-256, not {type(key).__name__}")
    algorithm_of(key)
    return key


def _anchor(path: Path | None) -> Checkpoint | None:
    if path is None:
        return None
    try:
        return Checkpoint.model_validate_json(_read(path, "anchor checkpoint"))
    except ValidationError as error:
        raise ConfigurationError(f"{path} is not a checkpoint: {error.errors()[0]['msg']}") from error


def _instant(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as error:
        raise ConfigurationError(f"{option}: not an ISO 8601 time: {text!r}") from error
    if value.tzinfo is None:
        raise ConfigurationError(f"{option}: give a time zone, e.g. {text}Z or {text}+01:00")
    return value


def _writer_origin(db: Path, signing_key: PrivateKey) -> str:
    """The log's origin, after checking that ``signing_key`` is the key its newest record was sealed with.

    Pruning signs a marker (and may sign a checkpoint): with any other key the log would no longer
    verify under the writer's key.
    """
    store = SqliteStore(db, read_only=True)
    try:
        origin = store.meta("origin")
        newest = next(iter(deque(store.records(), maxlen=1)), None)
    finally:
        store.close()
    if origin is None:
        raise AuditError(f"{db} names no origin; run audit verify")
    if newest is not None and newest.key_id != key_id(public_key_of(signing_key)):
        raise ConfigurationError(
            f"{db} is written with key {newest.key_id[:16]}, not with the key given to prune it"
        )
    return origin


# -- outputs ---------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8", newline="\n")
    except OSError as error:
        raise AuditError(f"cannot write {path}: {error.strerror}") from error


def _transfer(key: TransferKey) -> str:
    return (
        f"session {key.session_id} step {key.step} node {key.node_id} blocks {key.block_span} "
        f"input {key.input_sha256[:16]}"
    )


_LISTED = 20


def _print_capped(lines: Sequence[str], everything: bool) -> None:
    shown = lines if everything else lines[:_LISTED]
    for line in shown:
        print(line)
    if len(lines) > len(shown):
        print(f"  ... and {len(lines) - len(shown)} more (--all lists them)")


def _log_list(logs: Sequence[SortedLog]) -> str:
    return ", ".join(f"{log.path} ({log.origin or 'no origin'}, {log.sessions} sessions)" for log in logs)
