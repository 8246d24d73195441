"""The registry interface and its in-memory backend.

The registry is a bulletin board of ``ServerRecord``s with a time-to-live: a server that stops
refreshing its announcement disappears once its TTL passes. Readers verify what they rely on
(identities via mTLS, attestations via the trust layer); the registry itself is no authority.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from fincluster.logs import get_logger
from fincluster.wire import fincluster_pb2 as pb

log = get_logger(__name__)


class Registry(Protocol):
    """What servers and clients need from a registry, whatever backs it (embedded service, etcd)."""

    def announce(self, record: pb.ServerRecord, ttl_seconds: int) -> float:
        """Publish or refresh ``record`` for ``ttl_seconds``; returns the expiry (unix time)."""
        ...

    def withdraw(self, node_id: str) -> None: ...

    def list(self, model_id: str) -> list[pb.ServerRecord]:
        """Live records of servers of ``model_id``, ordered by node id."""
        ...

    def watch(self, model_id: str, stop: threading.Event) -> Iterator[pb.RegistryEvent]:
        """Current records as PUT events, then changes, until ``stop`` is set."""
        ...


@dataclass
class _Entry:
    record: pb.ServerRecord
    expires_at: float


class InMemoryRegistry:
    """Registry state held in one process (behind the embedded registry service)."""

    def __init__(self, *, clock: Callable[[], float] = time.time, sweep_seconds: float = 0.5) -> None:
        self._clock = clock
        self._sweep_seconds = sweep_seconds
        self._entries: dict[str, _Entry] = {}
        self._events: list[pb.RegistryEvent] = []
        self._dropped = 0  # events trimmed from the front; cursors are absolute sequence numbers
        self._changed = threading.Condition()

    def announce(self, record: pb.ServerRecord, ttl_seconds: int) -> float:
        expires_at = self._clock() + ttl_seconds
        with self._changed:
            self._expire_locked()
            previous = self._entries.get(record.node_id)
            self._entries[record.node_id] = _Entry(record=record, expires_at=expires_at)
            if previous is None or previous.record != record:
                self._publish_locked(pb.RegistryEvent.PUT, record)
                log.info(
                    "server_listed" if previous is None else "server_record_changed",
                    node=record.node_id,
                    address=record.address,
                    blocks=f"{record.span.start}:{record.span.end}",
                    ttl_s=ttl_seconds,
                )
        return expires_at

    def withdraw(self, node_id: str) -> None:
        with self._changed:
            entry = self._entries.pop(node_id, None)
            if entry is not None:
                self._publish_locked(pb.RegistryEvent.REMOVED, entry.record)
                log.info("server_withdrawn", node=node_id)

    def list(self, model_id: str) -> list[pb.ServerRecord]:
        with self._changed:
            self._expire_locked()
            return [
                entry.record
                for node_id, entry in sorted(self._entries.items())
                if entry.record.model_id == model_id
            ]

    def watch(self, model_id: str, stop: threading.Event) -> Iterator[pb.RegistryEvent]:
        with self._changed:
            self._expire_locked()
            cursor = self._dropped + len(self._events)
            current = [e.record for e in self._entries.values() if e.record.model_id == model_id]
        for record in current:
            yield pb.RegistryEvent(kind=pb.RegistryEvent.PUT, record=record)
        while not stop.is_set():
            with self._changed:
                self._changed.wait(timeout=self._sweep_seconds)
                self._expire_locked()
                fresh = self._events[max(0, cursor - self._dropped) :]
                cursor = self._dropped + len(self._events)
            for event in fresh:
                if event.record.model_id == model_id:
                    yield event

    def _expire_locked(self) -> None:
        now = self._clock()
        for node_id in [n for n, e in self._entries.items() if e.expires_at <= now]:
            self._publish_locked(pb.RegistryEvent.REMOVED, self._entries.pop(node_id).record)
            log.warning("server_expired", node=node_id, note="no announcement within its TTL")

    def _publish_locked(self, kind: pb.RegistryEvent.Kind.ValueType, record: pb.ServerRecord) -> None:
        self._events.append(pb.RegistryEvent(kind=kind, record=record))
        excess = max(0, len(self._events) - 10_000)
        del self._events[:excess]
        self._dropped += excess
        self._changed.notify_all()
