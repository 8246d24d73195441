"""Keeping one server's record in the registry, and knowing whether it is there.

The record is refreshed every third of its TTL. When the registry cannot be reached or refuses, the
announcer says so (``server_not_announced``, with the reason and the next attempt) and retries with
exponential backoff and jitter instead of hammering it; the first success after that is logged as
``server_announced``. :attr:`Announcer.announced` is the state clients of the server can check. The
round trip of the last announcement is kept (:attr:`Announcer.rtt_seconds`): it goes into the record
as the server's network time, which placement weighs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fincluster.backoff import Backoff
from fincluster.errors import RegistryError
from fincluster.logs import get_logger
from fincluster.registry.backend import Registry
from fincluster.wire import fincluster_pb2 as pb

log = get_logger(__name__)


class Announcer:
    """Announce ``record()`` to ``registry`` whenever :meth:`tick` finds it due."""

    def __init__(
        self,
        registry: Registry,
        record: Callable[[], pb.ServerRecord],
        *,
        ttl_seconds: int,
        registry_address: str | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        """``on_result`` hears of every announcement attempt, True when it succeeded (metrics)."""
        self.registry = registry
        self.registry_address = registry_address
        self.ttl_seconds = ttl_seconds
        self._record = record
        self._backoff = backoff or Backoff(initial=1.0, maximum=30.0)
        self._clock = clock
        self._next = 0.0
        self.announced = False
        self.last_error: str | None = None
        self.attempts_failed = 0
        self.rtt_seconds = 0.0
        self._on_result = on_result
        self._lock = threading.Lock()  # the maintenance thread ticks; placement announces at once

    @property
    def status(self) -> str:
        """One line for operators: announced, or not and why."""
        registry = self.registry_address or "the registry"
        if self.announced:
            return f"announced to {registry}"
        if self.last_error is None:
            return f"not yet announced to {registry}"
        return f"NOT announced to {registry} ({self.attempts_failed} failed attempts): {self.last_error}"

    def tick(self) -> None:
        """Announce now if it is due (refresh or retry)."""
        with self._lock:
            if self._clock() >= self._next:
                self._announce()

    def announce_now(self) -> bool:
        """Announce the current record at once (it changed); returns whether the registry took it."""
        with self._lock:
            self._announce()
            return self.announced

    def _announce(self) -> None:
        now = self._clock()
        record = self._record()
        started = time.perf_counter()
        try:
            self.registry.announce(record, self.ttl_seconds)
        except RegistryError as error:
            if self._on_result is not None:
                self._on_result(False)
            delay = self._backoff.next_delay()
            self._next = now + delay
            self.attempts_failed += 1
            self.last_error = str(error)
            self.announced = False
            log.warning(
                "server_not_announced",
                registry=self.registry_address,
                address=record.address,
                attempt=self.attempts_failed,
                retry_in_s=round(delay, 1),
                error=self.last_error,
            )
            return
        self.rtt_seconds = time.perf_counter() - started
        if self._on_result is not None:
            self._on_result(True)
        if not self.announced:
            log.info(
                "server_announced",
                registry=self.registry_address,
                address=record.address,
                blocks=f"{record.span.start}:{record.span.end}",
                ttl_s=self.ttl_seconds,
                after_failed_attempts=self.attempts_failed,
            )
        self.announced, self.last_error, self.attempts_failed = True, None, 0
        self._backoff.reset()
        self._next = now + max(self.ttl_seconds / 3, 0.2)

    def soon(self) -> None:
        """Announce at the next tick (the record changed, e.g. a new attestation)."""
        self._next = 0.0

    def withdraw(self, node_id: str) -> None:
        with self._lock:
            if not self.announced:
                return
            self.announced = False
            self._next = float("inf")  # no heartbeat brings the record back
        try:
            self.registry.withdraw(node_id)
        except RegistryError as error:
            log.warning("withdraw_failed", error=str(error), note="the record expires with its TTL")
