"""Read the events back out of a log file (read-only), for reports and reconciliation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fincluster.audit.events import AUDIT_EVENT_ADAPTER, AuditEvent
from fincluster.audit.store import SqliteStore
from fincluster.errors import AuditError


@dataclass(frozen=True, slots=True)
class LogContents:
    origin: str | None
    events: tuple[AuditEvent, ...]
    """Every record that parses, in index order."""
    unreadable: tuple[int, ...]
    """Indices of records that do not parse as events (``verify`` says why)."""


def read_log(db_path: Path | str) -> LogContents:
    """All parseable events; unreadable records are listed, not fatal (a damaged log still reports)."""
    store = SqliteStore(db_path, read_only=True)
    events: list[AuditEvent] = []
    unreadable: list[int] = []
    try:
        origin = store.meta("origin")
        for record in store.records():
            try:
                events.append(AUDIT_EVENT_ADAPTER.validate_json(record.body))
            except ValidationError:
                unreadable.append(record.index)
    finally:
        store.close()
    return LogContents(origin=origin, events=tuple(events), unreadable=tuple(unreadable))


def read_events(db_path: Path | str) -> tuple[AuditEvent, ...]:
    """All events of a log; raises :class:`AuditError` if any record does not parse."""
    contents = read_log(db_path)
    if contents.unreadable:
        raise AuditError(f"audit log {db_path} has unreadable records {list(contents.unreadable[:10])}")
    return contents.events
