"""The audit log writer: one pipeline, read top to bottom in :meth:`AuditLog.append`.

    validate -> canonicalise -> leaf hash -> seal -> store -> tree -> checkpoint (when due)

* **validate**: the event is re-validated against the :data:`AuditEvent` union, so an object built
  with ``model_construct`` or carrying extra fields cannot reach the disk. There is no redaction step
  because there is nothing to redact: the models have no field for raw content (see ``fields``).
* **canonicalise**: RFC 8785 bytes.   **leaf hash**: ``SHA-256(0x00 || bytes)`` (RFC 9162).
* **seal**: the writer signs (origin, index, leaf hash) with its current key, and the record names that
  key and its certificate, so every record is individually attributable, across renewals and rotations.
* **store**: one SQLite transaction per record (WAL, ``synchronous=FULL``).
* **tree**: the in-memory :class:`Frontier` advances only after the row is durable.
* **checkpoint**: a signed (size, root, time) every ``checkpoint_every_records`` records, when
  ``checkpoint_every_seconds`` have passed (checked on append and by :meth:`checkpoint_if_due`),
  when a ``session_close`` event is appended, and on :meth:`close`.

One writer per file: appends from many threads of one process are serialised by a lock; a second
writer (another process) is detected at the next append and refused.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType

from pydantic import Field, ValidationError

from fincluster.audit.canonical import canonical_json
from fincluster.audit.checkpoints import (
    Checkpoint,
    PruneMarker,
    seal_message,
    sign_checkpoint,
    sign_prune_marker,
)
from fincluster.audit.events import AUDIT_EVENT_ADAPTER, AuditEvent
from fincluster.audit.merkle import Frontier, consistency_proof, inclusion_proof, leaf_hash
from fincluster.audit.signing import FixedSigner, PrivateKey, Signer, sign
from fincluster.audit.store import SqliteStore, StoredRecord
from fincluster.errors import AuditError, AuditIntegrityError, ClosedError
from fincluster.logs import get_logger
from fincluster.values import Clock, FrozenModel, utc_now

log = get_logger(__name__)


class AuditSettings(FrozenModel):
    """Where a node keeps its audit log (``<directory>/<role>-<name>.sqlite``), when to checkpoint and
    how long to keep records. The ``audit`` section of the settings tree."""

    directory: Path = Path("fincluster-audit")
    checkpoint_every_records: int | None = Field(default=256, ge=1)
    checkpoint_every_seconds: float | None = Field(default=60.0, gt=0)
    checkpoint_on_session_close: bool = True
    retention_days: int | None = Field(default=None, ge=1)
    """Records are deleted by :meth:`AuditLog.prune` only once a checkpoint covering them is older."""


class AuditLog:
    """Append-only, Merkle-tree audit log in one SQLite file, signed with the writer's key."""

    def __init__(
        self,
        path: Path | str,
        *,
        signing_key: PrivateKey | Signer,
        origin: str = "fincluster-audit",
        settings: AuditSettings | None = None,
        clock: Clock = utc_now,
    ) -> None:
        """``origin`` names the log inside every signature (the writer, e.g. ``server-a``).
        ``signing_key`` is a fixed key, or a :class:`Signer` that follows the writer's key and certificate
        (a node's, ``audit.node``)."""
        self._settings = settings or AuditSettings()
        self._signer: Signer = (
            FixedSigner(signing_key) if isinstance(signing_key, PrivateKey) else signing_key
        )
        self._clock = clock
        self._lock = threading.Lock()
        store = SqliteStore(path)
        self.path = store.path
        try:
            self.origin = store.set_meta_once("origin", origin)
            if self.origin != origin:
                raise AuditError(f"{self.path} is the log of {self.origin!r}, not {origin!r}")
            self._frontier = self._frontier_from(store)
            checkpoints = store.checkpoints()
            last = Checkpoint.model_validate_json(checkpoints[-1][1]) if checkpoints else None
        except ValidationError as exc:
            store.close()
            raise AuditIntegrityError(f"audit log {self.path} is damaged; run verify: {exc}") from exc
        except BaseException:
            store.close()
            raise
        self._store: SqliteStore | None = store
        self._last_checkpoint = last
        self._last_checkpoint_time = last.body.time if last else clock()
        log.info("audit_log_opened", path=str(self.path), origin=self.origin, tree_size=self.tree_size)

    @staticmethod
    def _frontier_from(store: SqliteStore, stop: int | None = None) -> Frontier:
        """The tree over the stored leaf hashes (after the latest prune marker) up to ``stop``."""
        markers = store.prune_markers()
        frontier = PruneMarker.model_validate_json(markers[-1][1]).frontier() if markers else Frontier()
        for record in store.records(start=frontier.size, stop=stop):
            if record.index != frontier.size:
                raise AuditIntegrityError(f"audit log {store.path} is missing record {frontier.size}")
            frontier.append(record.leaf_hash)
        return frontier

    # -- the pipeline -------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> int:
        """Write one event durably and return its index in the log."""
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[AuditEvent]) -> list[int]:
        """Write events durably in one transaction (one disk sync), in order; return their indexes."""
        bodies = [canonical_json(self._validated(event)) for event in events]
        leaves = [leaf_hash(body) for body in bodies]
        with self._lock:
            store = self._open_store()
            signer = self._signer.identity()
            first = self._frontier.size
            records = [
                StoredRecord(
                    first + i,
                    body,
                    leaf,
                    signer.key_id,
                    sign(signer.key, seal_message(self.origin, first + i, leaf)),
                    signer.cert_fingerprint,
                )
                for i, (body, leaf) in enumerate(zip(bodies, leaves, strict=True))
            ]
            store.append_records(records)
            for leaf in leaves:
                self._frontier.append(leaf)
            if any(self._checkpoint_due(event) for event in events):
                self._checkpoint_locked(store)
        return [record.index for record in records]

    def record(self, event: AuditEvent) -> None:
        """:class:`~fincluster.audit.recorder.AuditSink` interface: same as :meth:`append`."""
        self.append(event)

    def record_many(self, events: Sequence[AuditEvent]) -> None:
        """Batch form of :meth:`record`: one durable transaction."""
        self.append_many(events)

    @staticmethod
    def _validated(event: AuditEvent) -> AuditEvent:
        try:
            return AUDIT_EVENT_ADAPTER.validate_python(
                event.model_dump(mode="python", round_trip=True, warnings=False)
            )
        except (ValidationError, AttributeError) as exc:
            raise AuditError(f"refusing an invalid audit event: {exc}") from exc

    def _checkpoint_due(self, event: AuditEvent) -> bool:
        settings = self._settings
        since_checkpoint = self._frontier.size - (
            self._last_checkpoint.body.tree_size if self._last_checkpoint else 0
        )
        if since_checkpoint == 0:
            return False
        if settings.checkpoint_on_session_close and event.kind == "session_close":
            return True
        if (
            settings.checkpoint_every_records is not None
            and since_checkpoint >= settings.checkpoint_every_records
        ):
            return True
        return self._seconds_elapsed()

    def _seconds_elapsed(self) -> bool:
        every = self._settings.checkpoint_every_seconds
        return every is not None and self._clock() - self._last_checkpoint_time >= timedelta(seconds=every)

    # -- checkpoints, retention, proofs -------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """Sign the current tree head (a no-op returning the last one if nothing was appended)."""
        with self._lock:
            return self._checkpoint_locked(self._open_store())

    def checkpoint_if_due(self) -> Checkpoint | None:
        """For a periodic task: checkpoint if the time schedule says so and records are pending."""
        with self._lock:
            store = self._open_store()
            last_size = self._last_checkpoint.body.tree_size if self._last_checkpoint else 0
            if self._frontier.size > last_size and self._seconds_elapsed():
                return self._checkpoint_locked(store)
        return None

    def _checkpoint_locked(self, store: SqliteStore) -> Checkpoint:
        last = self._last_checkpoint
        if last is not None and last.body.tree_size == self._frontier.size:
            return last
        now = self._clock()
        checkpoint = sign_checkpoint(
            self._signer.identity(), origin=self.origin, frontier=self._frontier, time=now
        )
        store.add_checkpoint(checkpoint.body.tree_size, canonical_json(checkpoint))
        self._last_checkpoint, self._last_checkpoint_time = checkpoint, now
        log.info(
            "audit_checkpoint",
            path=str(self.path),
            tree_size=checkpoint.body.tree_size,
            root_hash=checkpoint.body.root_hash,
        )
        return checkpoint

    def prune(self) -> PruneMarker | None:
        """Delete the oldest records under ``retention_days``, whole checkpointed prefixes only.

        The cut is the largest checkpoint older than the retention period; a signed marker keeps that
        checkpoint's size, root and subtree roots so that ``verify`` still checks everything after it.
        Returns the marker, or None when nothing is old enough.
        """
        retention_days = self._settings.retention_days
        if retention_days is None:
            return None
        with self._lock:
            store = self._open_store()
            cutoff = self._clock() - timedelta(days=retention_days)
            pruned = store.pruned_size()
            eligible = [
                cp
                for cp in (Checkpoint.model_validate_json(body) for _, body in store.checkpoints())
                if pruned < cp.body.tree_size and cp.body.time < cutoff
            ]
            if not eligible:
                return None
            cut = eligible[-1]
            frontier = self._frontier_from(store, stop=cut.body.tree_size)
            if frontier.root().hex() != cut.body.root_hash:
                raise AuditIntegrityError(
                    f"refusing to prune {self.path}: records before {cut.body.tree_size} do not match "
                    "their checkpoint"
                )
            marker = sign_prune_marker(
                self._signer.identity(),
                origin=self.origin,
                frontier=frontier,
                retention_days=retention_days,
                time=self._clock(),
            )
            deleted = store.prune(frontier.size, canonical_json(marker))
        log.info("audit_pruned", path=str(self.path), pruned_size=frontier.size, deleted=deleted)
        return marker

    def inclusion_proof(self, index: int, tree_size: int | None = None) -> list[bytes]:
        """RFC 9162 audit path of record ``index`` in the tree of ``tree_size`` (default: now)."""
        leaves = self._leaf_hashes(self.tree_size if tree_size is None else tree_size)
        try:
            return inclusion_proof(index, leaves)
        except ValueError as exc:
            raise AuditError(str(exc)) from exc

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 proof that the tree of ``old_size`` is a prefix of the tree of ``new_size``."""
        leaves = self._leaf_hashes(self.tree_size if new_size is None else new_size)
        try:
            return consistency_proof(old_size, leaves)
        except ValueError as exc:
            raise AuditError(str(exc)) from exc

    def _leaf_hashes(self, size: int) -> list[bytes]:
        with self._lock:
            store = self._open_store()
            if store.pruned_size() > 0:
                raise AuditError("proofs need every leaf; this log has a pruned prefix")
            if not 0 <= size <= self._frontier.size:
                raise AuditError(f"the log has {self._frontier.size} records, not {size}")
            return [record.leaf_hash for record in store.records(stop=size)]

    # -- state and lifecycle ------------------------------------------------------------------

    @property
    def tree_size(self) -> int:
        return self._frontier.size

    @property
    def root_hash(self) -> bytes:
        return self._frontier.root()

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        return self._last_checkpoint

    def _open_store(self) -> SqliteStore:
        if self._store is None:
            raise ClosedError(f"audit log {self.path} is closed")
        return self._store

    def close(self) -> None:
        """Checkpoint anything pending, then close the file; closing twice is harmless."""
        with self._lock:
            if self._store is None:
                return
            self._checkpoint_locked(self._store)
            self._store.close()
            self._store = None
        log.info("audit_log_closed", path=str(self.path))

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
