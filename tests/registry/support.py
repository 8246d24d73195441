"""Records, a watch consumer, an announcing loop and a bounded wait, shared by the registry tests."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from fincluster.errors import RegistryError
from fincluster.registry.backend import Registry
from fincluster.wire import fincluster_pb2 as pb

PUT = pb.RegistryEvent.PUT
REMOVED = pb.RegistryEvent.REMOVED
T = TypeVar("T")


def record(node: str, *, model: str = "m", address: str = "127.0.0.1:7001", span: tuple[int, int] = (0, 2)):
    return pb.ServerRecord(
        node_id=node,
        address=address,
        model_id=model,
        span=pb.BlockSpan(start=span[0], end=span[1]),
        num_blocks=6,
    )


def eventually(check: Callable[[], T], *, within: float, what: str) -> T:
    """``check()``'s first truthy result, polling until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within} s (last: {result!r})")
        time.sleep(0.05)


class Watcher:
    """Consumes ``registry.watch(model)`` in a thread; ``next()`` returns ``(kind, record)`` in order."""

    def __init__(self, registry: Registry, model: str = "m") -> None:
        self.stop = threading.Event()
        self._events: queue.Queue[tuple[int, pb.ServerRecord]] = queue.Queue()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._consume, args=(registry, model), daemon=True)
        self._thread.start()

    def _consume(self, registry: Registry, model: str) -> None:
        try:
            for event in registry.watch(model, self.stop):
                self._events.put((event.kind, event.record))
        except BaseException as error:  # reported by the test through next()/close()
            self.failure = error

    def next(self, timeout: float = 5.0) -> tuple[int, pb.ServerRecord]:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no watch event within {timeout} s (failure: {self.failure!r})") from None

    def take(self, count: int, timeout: float = 5.0) -> list[tuple[int, pb.ServerRecord]]:
        return [self.next(timeout) for _ in range(count)]

    def close(self, timeout: float = 5.0) -> bool:
        """Set ``stop``; True when the watch ended within ``timeout`` seconds."""
        self.stop.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Announcer:
    """Announces ``record`` every ``interval`` seconds in a thread, as a block server does, counting
    the announcements that failed (and were retried) while the registry could not store them."""

    def __init__(self, registry: Registry, announced: pb.ServerRecord, *, ttl: int, interval: float) -> None:
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(registry, announced, ttl, interval), daemon=True
        )
        self._thread.start()

    def _run(self, registry: Registry, announced: pb.ServerRecord, ttl: int, interval: float) -> None:
        while not self._stop.is_set():
            try:
                registry.announce(announced, ttl)
            except RegistryError:
                self.failures += 1
            self._stop.wait(interval)

    def __enter__(self) -> Announcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
