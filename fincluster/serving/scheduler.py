"""The server's compute queue: one worker thread runs every computation, in a fair order.

gRPC handlers are coroutines (``grpc.aio``): an idle stream costs no thread, and waiting for compute
costs none either. Every computation (a session step, a forward, a backward, with its encoding,
digests and receipt) is a job on this queue. Jobs of the interactive class (inference steps) go
before batch jobs (stateless forward / backward); within a class, clients are served in
start-time fair queueing order by tokens (each client's share of the worker is proportional to its
weight, so one client with many requests cannot starve another with few).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fincluster.errors import UnavailableError
from fincluster.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class Priority(enum.IntEnum):
    """Lower runs first."""

    INTERACTIVE = 0  # inference steps: a person is waiting for the next token
    BATCH = 1  # stateless forward / backward: scoring, training


@dataclass(order=True)
class _Job:
    priority: int
    start_tag: float
    sequence: int
    work: Callable[[], Any] = field(compare=False)
    done: Callable[[BaseException | None, Any], None] = field(compare=False)
    queued_at: float = field(compare=False, default_factory=time.perf_counter)


class ComputeQueue:
    """Runs jobs on one worker thread; ``run`` is awaited from the gRPC event loop."""

    def __init__(
        self,
        *,
        weight_of: Callable[[str], float] = lambda _client: 1.0,
        on_job: Callable[[Priority, float, float], None] | None = None,
    ) -> None:
        """``on_job(priority, seconds waited, seconds run)`` hears of every finished job (metrics)."""
        self._weight_of = weight_of
        self._on_job = on_job
        self._heap: list[_Job] = []
        self._finish_tags: dict[str, float] = {}
        self._virtual_time = 0.0
        self._sequence = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        self._worker = threading.Thread(target=self._serve, name="compute", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Finish the running job, fail the queued ones, and end the worker."""
        with self._changed:
            self._stopping = True
            pending, self._heap = self._heap, []
            self._changed.notify_all()
        for job in pending:
            job.done(UnavailableError("server stopping"), None)
        if self._worker is not None:
            self._worker.join(timeout=30)

    @property
    def length(self) -> int:
        """Jobs waiting (announced to routing as the server's load)."""
        with self._changed:
            return len(self._heap)

    async def run(self, work: Callable[[], T], *, client: str, tokens: int, priority: Priority) -> T:
        """Run ``work`` on the worker in fair order; its exception, if any, is raised here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def done(error: BaseException | None, value: Any) -> None:
            def settle() -> None:
                if future.cancelled():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(value)

            loop.call_soon_threadsafe(settle)

        with self._changed:
            if self._stopping:
                raise UnavailableError("server stopping")
            start = max(self._virtual_time, self._finish_tags.get(client, 0.0))
            self._finish_tags[client] = start + max(tokens, 1) / max(self._weight_of(client), 1e-6)
            heapq.heappush(self._heap, _Job(int(priority), start, next(self._sequence), work, done))
            self._changed.notify()
        return await future

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._heap and not self._stopping:
                    self._changed.wait()
                if self._stopping and not self._heap:
                    return
                job = heapq.heappop(self._heap)
                self._virtual_time = max(self._virtual_time, job.start_tag)
            started = time.perf_counter()
            try:
                value = job.work()
            except BaseException as error:  # handed to the awaiting handler, which maps it to a status
                job.done(error, None)
            else:
                job.done(None, value)
            if self._on_job is not None:
                self._on_job(Priority(job.priority), started - job.queued_at, time.perf_counter() - started)
