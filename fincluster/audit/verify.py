"""Check an audit log file against the keys you trust, and name the first bad record.

``verify`` reads the file read-only and trusts nothing in it except what a trusted key signed:

1. the newest prune marker (signature, and that its subtree roots give its root);
2. every record in index order: no gaps or extras, the body parses as an event and is already in
   canonical form, the stored leaf hash is the recomputed one, and the seal over
   (origin, index, leaf hash) is valid under a trusted key that was valid at the record's time;
3. every checkpoint: canonical, signed by a trusted key valid at its time, times not going backwards,
   and its root equal to the root recomputed from the records (a checkpoint beyond the last record
   means truncation);
4. optionally an *anchor*, a checkpoint kept outside the file (e.g. shipped to the SIEM), which catches
   a truncation that also removed the checkpoints behind it.

Records after the last checkpoint are sealed (edits and insertions are caught) but a cut of that tail
can only be caught with an anchor; the report counts them as ``unanchored_records``.

Trusted keys are a :class:`~fincluster.audit.keys.KeyRing` (bare public keys, node certificates, the
CA's archive of every certificate it issued), so a log whose writer renewed or rotated its
certificate mid-way verifies with the certificates of each period. Signatures that no trusted key
can check are reported once per reason (a wrong key is one problem, not one per record), and the
report lists the certificates that did verify the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from fincluster.audit.canonical import canonical_json
from fincluster.audit.checkpoints import (
    Checkpoint,
    CheckpointBody,
    PruneMarker,
    PruneMarkerBody,
    seal_message,
    signed_by,
)
from fincluster.audit.events import AUDIT_EVENT_ADAPTER
from fincluster.audit.keys import KeyRing
from fincluster.audit.merkle import Frontier, leaf_hash
from fincluster.audit.signing import PublicKey, signature_is_valid
from fincluster.audit.store import SqliteStore, StoredRecord
from fincluster.errors import AuditIntegrityError
from fincluster.logs import get_logger
from fincluster.values import FrozenModel

log = get_logger(__name__)

ProblemCode = Literal[
    "bad_meta",
    "bad_prune_marker",
    "missing_record",
    "unexpected_record",
    "malformed_record",
    "non_canonical_record",
    "leaf_hash_mismatch",
    "bad_seal",
    "bad_checkpoint",
    "checkpoint_signature",
    "checkpoint_order",
    "checkpoint_root_mismatch",
    "checkpoint_beyond_log",
    "anchor_mismatch",
    "untrusted_signer",
    "no_checkpoint",
    "close_not_checkpointed",
]


class Problem(FrozenModel):
    code: ProblemCode
    detail: str
    record_index: int | None = None
    """The record concerned (for truncation: the first missing one)."""
    tree_size: int | None = None
    """The checkpoint or marker concerned."""


class VerifyReport(FrozenModel):
    path: str
    origin: str | None
    tree_size: int
    """Records ever appended, pruned ones included."""
    record_count: int
    """Records present in the file."""
    pruned_before: int
    root_hash: str | None
    """Root over all records, or None when a gap or a bad prune marker makes it uncomputable."""
    checkpoints_verified: int
    last_checkpoint: CheckpointBody | None
    """The newest checkpoint that verified."""
    unanchored_records: int
    first_bad_record: int | None
    problems: tuple[Problem, ...]
    """The first :data:`MAX_PROBLEMS` problems found, in the order found."""
    problem_count: int
    signers: tuple[str, ...] = ()
    """The trusted keys that verified signatures of this log, one line each (``TrustedKey.describe``)."""

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def raise_for_problems(self) -> None:
        if self.problems:
            first = self.problems[0]
            where = "" if self.first_bad_record is None else f"first bad record {self.first_bad_record}: "
            raise AuditIntegrityError(f"audit log {self.path} failed verification: {where}{first.detail}")


MAX_PROBLEMS = 100
"""Problems listed in a report; ``problem_count`` has the full number."""


@dataclass
class _Scan:
    """Mutable state of one verification pass."""

    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    bad_records: list[int] = field(default_factory=list)
    frontier: Frontier | None = field(default_factory=Frontier)
    roots: dict[int, bytes] = field(default_factory=dict)
    unverifiable: dict[str, tuple[list[int], list[int], set[str]]] = field(default_factory=dict)
    """reason -> (record indexes, checkpoint sizes, key ids) whose signer no trusted key answers for."""
    closes: list[int] = field(default_factory=list)
    """Indexes of session-close records (each must be covered by a checkpoint)."""

    def unverifiable_signer(
        self, reason: str, kid: str, *, record: int | None = None, size: int | None = None
    ) -> None:
        records, checkpoints, kids = self.unverifiable.setdefault(reason, ([], [], set()))
        kids.add(kid[:16])
        if record is not None:
            records.append(record)
            self.bad_records.append(record)
        if size is not None:
            checkpoints.append(size)

    def report_unverifiable(self) -> None:
        """One problem per reason, however many signatures it concerns."""
        for reason, (records, sizes, kids) in self.unverifiable.items():
            parts = []
            if records:
                parts.append(_count(records, "record") + f" ({_ranges(records)})")
            if sizes:
                parts.append(_count(sizes, "checkpoint"))
            code: ProblemCode = "untrusted_signer"
            if not sizes:
                code = "bad_seal"
            elif not records:
                code = "checkpoint_signature"
            self.problem_count += 1
            if len(self.problems) < MAX_PROBLEMS:
                self.problems.append(
                    Problem(
                        code=code,
                        detail=f"{' and '.join(parts)} cannot be verified: {reason} "
                        f"(key {', '.join(sorted(kids))})",
                        record_index=min(records) if records else None,
                        tree_size=min(sizes) if sizes else None,
                    )
                )

    def add(
        self, code: ProblemCode, detail: str, *, record: int | None = None, size: int | None = None
    ) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(code=code, detail=detail, record_index=record, tree_size=size))
        if record is not None:
            self.bad_records.append(record)


def verify(
    db_path: Path | str, trusted: Iterable[PublicKey] | KeyRing, *, anchor: Checkpoint | None = None
) -> VerifyReport:
    """Verify every record, the tree and every checkpoint of the log at ``db_path`` against
    ``trusted`` keys (public keys, or a :class:`KeyRing` of certificates and keys).

    Never raises for a damaged log (that is what the report is for); raises :class:`AuditError` only
    when the file cannot be opened as an audit log at all.
    """
    # a ring of its own, so that the keys it reports as used are this log's, whoever shares the ring
    keys = KeyRing(list(trusted.keys)) if isinstance(trusted, KeyRing) else KeyRing.of(trusted)
    store = SqliteStore(db_path, read_only=True)
    try:
        report = _verify_store(store, keys, anchor)
    finally:
        store.close()
    if report.ok:
        log.info("audit_verified", path=report.path, tree_size=report.tree_size, root_hash=report.root_hash)
    else:
        log.warning(
            "audit_verify_failed",
            path=report.path,
            first_bad_record=report.first_bad_record,
            problems=[problem.detail for problem in report.problems[:10]],
        )
    return report


def _verify_store(store: SqliteStore, keys: KeyRing, anchor: Checkpoint | None) -> VerifyReport:
    scan = _Scan()
    origin = store.meta("origin")
    if origin is None:
        scan.add("bad_meta", "the log names no origin")
        origin = ""
    start = _start_from_prune_marker(store, origin, keys, scan)
    checkpoints = _parse_checkpoints(store.checkpoints(), origin, scan)
    wanted_sizes = {cp.body.tree_size for cp in checkpoints}
    if anchor is not None:
        wanted_sizes.add(anchor.body.tree_size)
    if scan.frontier is not None:
        scan.roots[start] = scan.frontier.root()

    tree_size, record_count = start, 0
    for record in store.records():
        record_count += 1
        if record.index < tree_size:
            scan.add("unexpected_record", f"record {record.index} should not exist", record=record.index)
            continue
        if record.index > tree_size:
            gap = (
                f"record {tree_size} is"
                if record.index == tree_size + 1
                else f"records {tree_size}..{record.index - 1} are"
            )
            scan.add("missing_record", f"{gap} missing", record=tree_size)
            scan.frontier = None
            tree_size = record.index
        leaf = _check_record(record, origin, keys, scan)
        tree_size += 1
        if scan.frontier is not None:
            scan.frontier.append(leaf)
            if tree_size in wanted_sizes:
                scan.roots[tree_size] = scan.frontier.root()

    last_good, verified = _check_checkpoints(checkpoints, keys, origin, tree_size, start, scan)
    anchored_size = max(start, last_good.tree_size if last_good else 0)
    if anchor is not None and _check_anchor(anchor, origin, keys, tree_size, scan):
        anchored_size = max(anchored_size, anchor.body.tree_size)
    written = max((size for size, _ in store.checkpoints()), default=start)
    _check_anchoring(scan, tree_size=tree_size, start=start, checkpointed=max(written, anchored_size))
    scan.report_unverifiable()
    return VerifyReport(
        path=str(store.path),
        origin=origin or None,
        tree_size=tree_size,
        record_count=record_count,
        pruned_before=start,
        root_hash=scan.frontier.root().hex() if scan.frontier is not None else None,
        checkpoints_verified=verified,
        last_checkpoint=last_good,
        unanchored_records=tree_size - anchored_size,
        first_bad_record=min(scan.bad_records) if scan.bad_records else None,
        problems=tuple(scan.problems),
        problem_count=scan.problem_count,
        signers=tuple(key.describe() for key in keys.used.values()),
    )


def _start_from_prune_marker(store: SqliteStore, origin: str, keys: KeyRing, scan: _Scan) -> int:
    """The first index the file should hold; sets ``scan.frontier`` to the tree state there."""
    markers = store.prune_markers()
    if not markers:
        return 0
    size, body = markers[-1]
    try:
        marker = PruneMarker.model_validate_json(body)
        frontier = marker.frontier()
    except ValueError:
        marker, frontier = None, None
    if marker is None or frontier is None:
        why = "cannot be parsed"
    elif canonical_json(marker) != body or marker.body.pruned_size != size or marker.body.origin != origin:
        why = "is not the marker that was written"
    elif (unsigned := _unsigned(marker.body, marker.signature, keys, origin)) is not None:
        why = f"is not signed by a trusted key ({unsigned})"
    elif frontier.root().hex() != marker.body.root_hash:
        why = "does not hash to its root"
    else:
        scan.frontier = frontier
        return size
    scan.add(
        "bad_prune_marker",
        f"the prune marker at {size} {why}; records before it are unaccounted for",
        record=0,
        size=size,
    )
    scan.frontier = None
    return size


def _parse_checkpoints(rows: list[tuple[int, bytes]], origin: str, scan: _Scan) -> list[Checkpoint]:
    checkpoints = []
    for size, body in rows:
        try:
            checkpoint = Checkpoint.model_validate_json(body)
        except ValidationError:
            scan.add("bad_checkpoint", f"checkpoint {size} cannot be parsed", size=size)
            continue
        if canonical_json(checkpoint) != body or checkpoint.body.tree_size != size:
            scan.add("bad_checkpoint", f"checkpoint {size} is not the checkpoint that was written", size=size)
        elif checkpoint.body.origin != origin:
            scan.add(
                "bad_checkpoint", f"checkpoint {size} belongs to log {checkpoint.body.origin!r}", size=size
            )
        else:
            checkpoints.append(checkpoint)
    return checkpoints


def _check_anchoring(scan: _Scan, *, tree_size: int, start: int, checkpointed: int) -> None:
    """The writer signs a checkpoint at every session close and when it closes: records with no
    checkpoint at all, or a session close that no checkpoint covers, mean checkpoints were removed
    (or the writer died at that moment) — never a clean log. ``checkpointed``: the size of the newest
    checkpoint in the file (whether it verified is reported elsewhere)."""
    if tree_size > start and checkpointed == start:
        scan.add("no_checkpoint", f"the log has {tree_size - start} records and no checkpoint")
        return
    anchored_size = checkpointed
    uncovered = [index for index in scan.closes if index >= anchored_size]
    if uncovered:
        scan.add(
            "close_not_checkpointed",
            f"session close at record {uncovered[0]} is not covered by any checkpoint "
            f"({len(uncovered)} such close(s)): checkpoints after record {anchored_size - 1} are missing",
            record=uncovered[0],
        )


def _check_record(record: StoredRecord, origin: str, keys: KeyRing, scan: _Scan) -> bytes:
    """Report the first thing wrong with one record; return its recomputed leaf hash."""
    index, leaf = record.index, leaf_hash(record.body)
    try:
        event = AUDIT_EVENT_ADAPTER.validate_json(record.body)
    except ValidationError:
        scan.add("malformed_record", f"record {index} is not a valid audit event", record=index)
        return leaf
    if event.kind == "session_close":
        scan.closes.append(index)
    if canonical_json(event) != record.body:
        scan.add("non_canonical_record", f"record {index} is not in canonical form", record=index)
    elif leaf != record.leaf_hash:
        scan.add("leaf_hash_mismatch", f"record {index} does not hash to its stored leaf hash", record=index)
    else:
        found = keys.lookup(
            record.key_id, at=event.time, cert_fingerprint=record.cert_fingerprint, log_origin=origin
        )
        if found.key is None:
            scan.unverifiable_signer(found.reason, record.key_id, record=index)
        elif not signature_is_valid(found.key.public_key, record.seal, seal_message(origin, index, leaf)):
            scan.add(
                "bad_seal", f"record {index} has an invalid seal (edited, moved or inserted)", record=index
            )
    return leaf


def _unsigned(
    body: CheckpointBody | PruneMarkerBody, signature: str, keys: KeyRing, origin: str
) -> str | None:
    """None when a trusted key, valid at the body's time, signed it; otherwise why not."""
    found = keys.lookup(body.key_id, at=body.time, cert_fingerprint=body.cert_fingerprint, log_origin=origin)
    if found.key is None:
        return found.reason
    if not signed_by(body, signature, found.key.public_key):
        return "the signature does not verify"
    return None


def _check_checkpoints(
    checkpoints: list[Checkpoint], keys: KeyRing, origin: str, tree_size: int, start: int, scan: _Scan
) -> tuple[CheckpointBody | None, int]:
    """Return the newest checkpoint that verified and how many did."""
    last_good: CheckpointBody | None = None
    verified = 0
    previous_time: datetime | None = None
    for checkpoint in checkpoints:
        body = checkpoint.body
        size = body.tree_size
        unsigned = _unsigned(body, checkpoint.signature, keys, origin)
        if unsigned == "the signature does not verify":
            scan.add("checkpoint_signature", f"checkpoint {size} has an invalid signature", size=size)
            continue
        if unsigned is not None:
            scan.unverifiable_signer(unsigned, body.key_id, size=size)
            continue
        if previous_time is not None and body.time < previous_time:
            scan.add("checkpoint_order", f"checkpoint {size} is older than the one before it", size=size)
        previous_time = body.time
        if size > tree_size:
            scan.add(
                "checkpoint_beyond_log",
                f"checkpoint {size} covers records {tree_size}..{size - 1}, which are missing (truncated)",
                record=tree_size,
                size=size,
            )
            continue
        root = scan.roots.get(size)
        if root is None:
            continue  # before the pruned prefix, or after a gap already reported
        if root.hex() != body.root_hash:
            proven = last_good.tree_size if last_good else start
            explained = any(proven <= index < size for index in scan.bad_records)
            scan.add(
                "checkpoint_root_mismatch",
                f"checkpoint {size} does not match the records before it",
                record=None if explained else proven,
                size=size,
            )
            continue
        verified += 1
        last_good = body
    return last_good, verified


def _check_anchor(anchor: Checkpoint, origin: str, keys: KeyRing, tree_size: int, scan: _Scan) -> bool:
    size = anchor.body.tree_size
    if anchor.body.origin != origin or _unsigned(anchor.body, anchor.signature, keys, origin) is not None:
        scan.add(
            "anchor_mismatch", "the anchor checkpoint is not a trusted checkpoint of this log", size=size
        )
        return False
    if size > tree_size:
        scan.add(
            "anchor_mismatch",
            f"the anchor covers records {tree_size}..{size - 1}, which are missing",
            record=tree_size,
            size=size,
        )
        return False
    root = scan.roots.get(size)
    if root is not None and root.hex() != anchor.body.root_hash:
        scan.add("anchor_mismatch", f"the log's first {size} records do not match the anchor", size=size)
        return False
    return root is not None


def _count(items: Sequence[int], noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _ranges(indexes: Sequence[int]) -> str:
    """``0..21, 30`` for the sorted indexes 0, 1, ..., 21, 30 (at most five ranges, then "…")."""
    runs: list[tuple[int, int]] = []
    for index in sorted(indexes):
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    text = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs[:5])
    return text + (", …" if len(runs) > 5 else "")
