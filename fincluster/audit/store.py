"""SQLite storage of an audit log: rows in, rows out, nothing clever.

The database holds what the writer produced and nothing derived from it that a verifier would have to
trust: canonical record bytes with their leaf hash, seal, and the signer's key id and certificate
fingerprint (lookup hints: the seal itself is what is checked); signed checkpoints; signed prune
markers; and the log's origin. WAL with ``synchronous=FULL`` makes every committed append durable.
One :class:`SqliteStore` is used by one writer in a process (the :class:`~fincluster.audit.log.AuditLog`
serialises access with a lock); readers open their own read-only connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fincluster.errors import AuditError

FORMAT = "fincluster-audit/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    idx INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    key_id TEXT NOT NULL,
    seal BLOB NOT NULL,
    cert_fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (tree_size INTEGER PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS prune_markers (pruned_size INTEGER PRIMARY KEY, body BLOB NOT NULL);
"""


def _as_bytes(value: object) -> bytes:
    """Column values as bytes, whatever SQLite type an edit of the file may have left there."""
    if isinstance(value, bytes):
        return value
    return b"" if value is None else str(value).encode()


@dataclass(frozen=True, slots=True)
class StoredRecord:
    index: int
    body: bytes
    leaf_hash: bytes
    key_id: str
    seal: bytes
    cert_fingerprint: str | None = None


class SqliteStore:
    """Rows of one audit log file; not thread-safe by itself."""

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = Path(path)
        try:
            if read_only:
                if not self.path.is_file():
                    raise AuditError(f"no audit log at {self.path}")
                self._db = sqlite3.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._add_signer_column()
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
            fmt = self.meta("format")
        except sqlite3.Error as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        if fmt != FORMAT:
            self._db.close()
            raise AuditError(f"{self.path} is not a {FORMAT} log (format: {fmt!r})")

    def close(self) -> None:
        self._db.close()

    def _add_signer_column(self) -> None:
        """Logs written before records named their signer's certificate get the (empty) column."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        if "cert_fingerprint" not in columns:
            self._db.execute("ALTER TABLE records ADD COLUMN cert_fingerprint TEXT")

    def _has_signer_column(self) -> bool:
        return any(row[1] == "cert_fingerprint" for row in self._db.execute("PRAGMA table_info(records)"))

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta_once(self, key: str, value: str) -> str:
        """Store ``value`` unless ``key`` is already set; return what is stored."""
        self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
        stored = self.meta(key)
        if stored is None:
            raise AuditError(f"cannot write {key!r} to audit log {self.path}")
        return stored

    def append_record(self, record: StoredRecord) -> None:
        """Insert the next record; refuse if another writer has appended behind our back."""
        self.append_records([record])

    def append_records(self, records: Sequence[StoredRecord]) -> None:
        """Insert the next records in one durable transaction (one sync for all of them)."""
        if not records:
            return
        with self._transaction():
            (next_index,) = self._db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM records").fetchone()
            pruned = self.pruned_size()
            if max(next_index, pruned) != records[0].index:
                raise AuditError(
                    f"audit log {self.path} has another writer: expected index {records[0].index}, "
                    f"the file is at {max(next_index, pruned)}"
                )
            self._db.executemany(
                "INSERT INTO records (idx, body, leaf_hash, key_id, seal, cert_fingerprint) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(r.index, r.body, r.leaf_hash, r.key_id, r.seal, r.cert_fingerprint) for r in records],
            )

    def add_checkpoint(self, tree_size: int, body: bytes) -> None:
        with self._transaction():
            self._db.execute("INSERT INTO checkpoints VALUES (?, ?)", (tree_size, body))

    def prune(self, pruned_size: int, marker_body: bytes) -> int:
        """Atomically record the marker and delete records and checkpoints before ``pruned_size``."""
        with self._transaction():
            self._db.execute("INSERT INTO prune_markers VALUES (?, ?)", (pruned_size, marker_body))
            deleted = self._db.execute("DELETE FROM records WHERE idx < ?", (pruned_size,)).rowcount
            self._db.execute("DELETE FROM checkpoints WHERE tree_size < ?", (pruned_size,))
        return deleted

    def records(self, start: int = 0, stop: int | None = None) -> Iterator[StoredRecord]:
        """Records in index order, ``start <= index < stop``."""
        signer = "cert_fingerprint" if self._has_signer_column() else "NULL"
        query = f"SELECT idx, body, leaf_hash, key_id, seal, {signer} FROM records WHERE idx >= ?"  # noqa: S608
        args: tuple[int, ...] = (start,)
        if stop is not None:
            query += " AND idx < ?"
            args = (start, stop)
        with self._reading():
            for idx, body, leaf, kid, seal, cert in self._db.execute(query + " ORDER BY idx", args):
                fingerprint = None if cert is None else str(cert)
                yield StoredRecord(
                    int(idx), _as_bytes(body), _as_bytes(leaf), str(kid), _as_bytes(seal), fingerprint
                )

    def checkpoints(self) -> list[tuple[int, bytes]]:
        with self._reading():
            rows = self._db.execute("SELECT tree_size, body FROM checkpoints ORDER BY tree_size")
            return [(int(size), _as_bytes(body)) for size, body in rows]

    def prune_markers(self) -> list[tuple[int, bytes]]:
        with self._reading():
            rows = self._db.execute("SELECT pruned_size, body FROM prune_markers ORDER BY pruned_size")
            return [(int(size), _as_bytes(body)) for size, body in rows]

    def pruned_size(self) -> int:
        (size,) = self._db.execute("SELECT COALESCE(MAX(pruned_size), 0) FROM prune_markers").fetchone()
        return int(size)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise AuditError(f"cannot read audit log {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; SQLite failures become :class:`AuditError`."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise AuditError(f"cannot write audit log {self.path}: {exc}") from exc
