"""Read the events back out of log files (read-only), for reports and reconciliation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fincluster.audit.events import AUDIT_EVENT_ADAPTER, AuditEvent, Observer, TransferEvent
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


@dataclass(frozen=True, slots=True)
class SortedLog:
    """One log given to ``reconcile``, with whose view of the transfers it holds."""

    path: Path
    origin: str | None
    events: tuple[AuditEvent, ...]
    observer: Observer | None
    """``client`` or ``server`` from the transfers it holds (or its origin when it holds none)."""

    @property
    def sessions(self) -> int:
        return len({e.session_id for e in self.events if e.session_id is not None})


@dataclass(frozen=True, slots=True)
class SortedLogs:
    client: tuple[SortedLog, ...]
    server: tuple[SortedLog, ...]
    other: tuple[SortedLog, ...]
    """Logs without transfers of either side (a registry's, an empty one)."""


LOG_SUFFIXES = (".sqlite", ".db")


def sort_logs(paths: Iterable[Path]) -> SortedLogs:
    """Read every log in ``paths`` (files, or directories of ``*.sqlite`` / ``*.db`` files) and sort
    them into client and server logs by what they hold; unreadable records raise :class:`AuditError`."""
    logs: list[SortedLog] = []
    for path in _log_files(paths):
        contents = read_log(path)
        if contents.unreadable:
            raise AuditError(f"audit log {path} has unreadable records {list(contents.unreadable[:10])}")
        events, contents_origin = contents.events, contents.origin
        observers = {e.observer for e in events if isinstance(e, TransferEvent)}
        if len(observers) > 1:
            raise AuditError(
                f"{path} holds transfers of both a client and a server; it is not one node's log"
            )
        observer = next(iter(observers), None) or _observer_of_origin(contents_origin)
        logs.append(SortedLog(path, contents_origin, events, observer))
    return SortedLogs(
        client=tuple(log for log in logs if log.observer == "client"),
        server=tuple(log for log in logs if log.observer == "server"),
        other=tuple(log for log in logs if log.observer not in ("client", "server")),
    )


def _log_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in LOG_SUFFIXES and p.is_file())
            if not found:
                raise AuditError(f"no audit logs (*.sqlite, *.db) in {path}")
            yield from found
        else:
            yield path


def _observer_of_origin(origin: str | None) -> Observer | None:
    """Node logs are named ``<role>-<name>`` (``audit.node``)."""
    for observer in ("client", "server"):
        if origin is not None and origin.startswith(f"{observer}-"):
            return observer  # type: ignore[return-value]
    return None
