"""Where events go: the sink interface, and an in-memory recorder for tests.

The client and server hand each event to :func:`record_event`, which writes it to their configured
sink (normally an :class:`~fincluster.audit.log.AuditLog`) and to every recorder opened by
:func:`capture_audit_events`. That lets a user's own test assert on the audit trail of a call without
a database::

    with capture_audit_events() as captured:
        model.generate(input_ids, max_new_tokens=4)
    assert {e.node_id for e in captured.of_kind(TransferEvent)} == {"spiffe://bank/server/a"}
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

from fincluster.audit.events import AuditEvent

E = TypeVar("E")


class AuditSink(Protocol):
    """Where a node's audit events go: an :class:`~fincluster.audit.log.AuditLog`, or a recorder."""

    def record(self, event: AuditEvent) -> None:
        """Write one event durably."""
        ...

    def record_many(self, events: Sequence[AuditEvent]) -> None:
        """Write several events durably, in order, in one transaction."""
        ...

    def checkpoint(self) -> object:
        """Sign the state so far (the client calls it at session close)."""
        ...

    def checkpoint_if_due(self) -> object:
        """Sign the state if the sink's schedule says so (servers call it periodically)."""
        ...


class AuditRecorder:
    """A thread-safe, in-memory :class:`AuditSink`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        with self._lock:
            self._events.append(event)

    def record_many(self, events: Sequence[AuditEvent]) -> None:
        with self._lock:
            self._events.extend(events)

    def checkpoint(self) -> None:
        """Nothing to sign in memory."""

    def checkpoint_if_due(self) -> None:
        """Nothing to sign in memory."""

    @property
    def events(self) -> tuple[AuditEvent, ...]:
        with self._lock:
            return tuple(self._events)

    def of_kind(self, model: type[E]) -> list[E]:
        """The recorded events of one model, e.g. ``of_kind(TransferEvent)``, in order."""
        return [event for event in self.events if isinstance(event, model)]

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


_captures_lock = threading.Lock()
_captures: list[AuditRecorder] = []


@contextmanager
def capture_audit_events() -> Iterator[AuditRecorder]:
    """Collect every event passed to :func:`record_event` (from any thread) while the block runs."""
    recorder = AuditRecorder()
    with _captures_lock:
        _captures.append(recorder)
    try:
        yield recorder
    finally:
        with _captures_lock:
            _captures.remove(recorder)


def record_event(sink: AuditSink | None, event: AuditEvent) -> None:
    """The one call sites make: write ``event`` to ``sink`` (if any), then to active captures.

    The sink comes first so that a failing audit write propagates before anyone observes the event.
    """
    if sink is not None:
        sink.record(event)
    with _captures_lock:
        captures = tuple(_captures)
    for recorder in captures:
        recorder.record(event)


def record_events(sink: AuditSink | None, events: Sequence[AuditEvent]) -> None:
    """Several events at once, in one durable write, then to active captures."""
    if not events:
        return
    if sink is not None:
        sink.record_many(events)
    with _captures_lock:
        captures = tuple(_captures)
    for recorder in captures:
        recorder.record_many(events)
