"""``fincluster audit``: verify a log, write compliance reports, export, reconcile, prune.

Handlers return the exit code: 0 when the answer is good, 1 when the log failed verification or the
logs do not reconcile, so scripts and CI can act on it. Unusable input (a missing file, a key that is
not a key) raises :class:`~fincluster.errors.FinclusterError`, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import ValidationError

from fincluster.audit.checkpoints import Checkpoint
from fincluster.audit.export import export_jsonl
from fincluster.audit.log import AuditLog, AuditSettings
from fincluster.audit.reader import read_events
from fincluster.audit.reconcile import TransferKey, reconcile
from fincluster.audit.render_csv import render_csv
from fincluster.audit.render_html import render_html
from fincluster.audit.report import build_report, render_json
from fincluster.audit.signing import PrivateKey, PublicKey, algorithm_of, key_id, public_key_of
from fincluster.audit.store import SqliteStore
from fincluster.audit.verify import verify
from fincluster.errors import AuditError, ConfigurationError

__all__ = ["register"]

_RENDERERS = {"html": render_html, "json": render_json, "csv": render_csv}


def cmd_audit_verify(args: argparse.Namespace) -> int:
    report = verify(args.db, _public_keys(args.key), anchor=_anchor(args.anchor))
    if report.ok:
        print(
            f"{report.path}: OK, {report.tree_size} records (root {report.root_hash}), "
            f"{report.checkpoints_verified} checkpoints verified"
        )
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
    return 1


def cmd_audit_report(args: argparse.Namespace) -> int:
    report = build_report(
        args.db,
        session=args.session,
        node=args.node,
        since=_instant(args.since, "--since"),
        until=_instant(args.until, "--until"),
        trusted_public_keys=_public_keys(args.key) if args.key else None,
        anchor=_anchor(args.anchor),
    )
    _write_text(args.out, _RENDERERS[args.format](report))
    print(f"wrote {args.format} report to {args.out}: {report.integrity.summary}")
    return 0


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
    node_keys = _node_keys(args.node_cert) if args.node_cert else None
    client_events = read_events(args.client_db)
    server_events = [event for path in args.server_dbs for event in read_events(path)]
    result = reconcile(client_events, server_events, node_keys=node_keys)
    unmatched = len(result.client_only) + len(result.server_only) + len(result.mismatched)
    print(
        f"matched {result.matched}, unmatched {unmatched} (client only {len(result.client_only)}, "
        f"server only {len(result.server_only)}, mismatched {len(result.mismatched)})"
    )
    for transfer in result.client_only:
        print(f"  client only: {_transfer(transfer)}")
    for transfer in result.server_only:
        print(f"  server only: {_transfer(transfer)}")
    for mismatch in result.mismatched:
        print(f"  mismatched:  {_transfer(mismatch.transfer)}: {mismatch.reason}")
    return 0 if result.ok else 1


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
    audit = commands.add_parser("audit", help="audit logs: verify, report, export, reconcile, prune")
    group = audit.add_subparsers(dest="audit_command", required=True)
    key_help = "trusted writer key: PEM public key or X.509 certificate (repeatable)"
    anchor_help = "a checkpoint kept outside the log (JSON), to catch truncation"

    check = group.add_parser("verify", help="check every record and checkpoint; exit 1 if any is bad")
    check.add_argument("db", type=Path, help="audit log (SQLite)")
    check.add_argument("--key", required=True, action="append", type=Path, help=key_help)
    check.add_argument("--anchor", type=Path, help=anchor_help)
    check.set_defaults(handler=cmd_audit_verify)

    report = group.add_parser("report", help="write a compliance report (integrity status first)")
    report.add_argument("db", type=Path, help="audit log (SQLite)")
    report.add_argument("--format", required=True, choices=sorted(_RENDERERS))
    report.add_argument("--out", required=True, type=Path, help="report file to write")
    report.add_argument("--session", help="only this session")
    report.add_argument("--node", help="only this node (SPIFFE id)")
    report.add_argument("--since", help="from this time on, ISO 8601 with a zone, e.g. 2025-03-01T09:00Z")
    report.add_argument("--until", help="before this time, ISO 8601 with a zone")
    report.add_argument(
        "--key", action="append", type=Path, help=f"{key_help}; without it integrity is NOT CHECKED"
    )
    report.add_argument("--anchor", type=Path, help=anchor_help)
    report.set_defaults(handler=cmd_audit_report)

    export = group.add_parser("export", help="export the log as JSON Lines (for a SIEM)")
    export.add_argument("db", type=Path, help="audit log (SQLite)")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export.set_defaults(handler=cmd_audit_export)

    pair = group.add_parser("reconcile", help="pair client and server transfer records; exit 1 on gaps")
    pair.add_argument("client_db", type=Path, help="the client's audit log")
    pair.add_argument("server_dbs", nargs="+", type=Path, metavar="server_db", help="the servers' logs")
    pair.add_argument(
        "--node-cert",
        action="append",
        type=Path,
        help="a server's certificate, to verify its receipts (give every server's, repeatable)",
    )
    pair.set_defaults(handler=cmd_audit_reconcile)

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


def _public_keys(paths: Iterable[Path]) -> list[PublicKey]:
    return [_public_key(path) for path in paths]


def _private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"{path} is not an unencrypted PEM private key") from error
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{path}: audit keys are Ed25519 or ECDSA P-256, not {type(key).__name__}")
    algorithm_of(key)
    return key


def _node_keys(paths: Sequence[Path]) -> dict[str, PublicKey]:
    """SPIFFE id -> public key, from each node's certificate."""
    from fincluster.trust.pki import load_certificate, spiffe_id_of

    keys: dict[str, PublicKey] = {}
    for path in paths:
        certificate = load_certificate(_read(path, "node certificate"))
        keys[spiffe_id_of(certificate)] = _public_key(path)
    return keys


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
