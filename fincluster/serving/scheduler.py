"""The server's compute queue: one worker thread runs every computation, in a fair order.

gRPC handlers are coroutines (``grpc.aio``): an idle stream costs no thread, and waiting for compute
costs none either. Every computation (a session step, a forward, a backward, with its encoding,
digests and receipt) is a job on this queue. Jobs of the interactive class (inference steps) go
before batch jobs (stateless forward / backward); within a class, clients are served in
start-time fair queueing order by tokens (each client's share of the worker is proportional to its
weight, so one client with many requests cannot starve another with few).

Batching: a job may carry a batch key and an item (a one-token session step, keyed by its span).
When the worker takes such a job it also takes every queued job with the same key (up to
``max_batch``) and hands their items to the batch runner in one call — a decode step reads every
weight of the span once, whatever the number of sessions in it. A job taken alone runs as usual.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Hashable, Sequence
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
    batch_key: Hashable | None = field(default=None, compare=False)
    item: Any = field(default=None, compare=False)
    queued_at: float = field(compare=False, default_factory=time.perf_counter)


BatchRunner = Callable[[Sequence[Any]], Sequence[tuple[BaseException | None, Any]]]
"""Items of jobs with one batch key -> (error, value) for each, in order."""


class ComputeQueue:
    """Runs jobs on one worker thread; ``run`` is awaited from the gRPC event loop."""

    def __init__(
        self,
        *,
        weight_of: Callable[[str], float] = lambda _client: 1.0,
        on_job: Callable[[Priority, float, float], None] | None = None,
        batch: BatchRunner | None = None,
        max_batch: int = 32,
    ) -> None:
        """``on_job(priority, seconds waited, seconds run)`` hears of every finished job (metrics);
        ``batch`` runs the items of jobs with one batch key together (see the module docstring)."""
        self._weight_of = weight_of
        self._on_job = on_job
        self._batch = batch
        self._max_batch = max_batch
        self.batches_run = 0
        """Batches of more than one job run so far (for tests and metrics)."""
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

    async def run(
        self,
        work: Callable[[], T],
        *,
        client: str,
        tokens: int,
        priority: Priority,
        batch: tuple[Hashable, Any] | None = None,
    ) -> T:
        """Run ``work`` on the worker in fair order; its exception, if any, is raised here.

        ``batch``: (key, item) — the job may instead run with other jobs of that key, through the
        batch runner, which then gives this job's value."""
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
            key, item = batch if batch is not None and self._batch is not None else (None, None)
            heapq.heappush(
                self._heap, _Job(int(priority), start, next(self._sequence), work, done, key, item)
            )
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
                jobs = [job, *self._take_batch(job)]
            if len(jobs) > 1:
                self._run_batch(jobs)
                continue
            started = time.perf_counter()
            try:
                value = job.work()
            except BaseException as error:  # handed to the awaiting handler, which maps it to a status
                job.done(error, None)
            else:
                job.done(None, value)
            if self._on_job is not None:
                self._on_job(Priority(job.priority), started - job.queued_at, time.perf_counter() - started)

    def _take_batch(self, first: _Job) -> list[_Job]:
        """Queued jobs with ``first``'s batch key, taken off the heap (caller holds the lock)."""
        if first.batch_key is None:
            return []
        same = [job for job in self._heap if job.batch_key == first.batch_key][: self._max_batch - 1]
        if same:
            taken = {id(job) for job in same}
            self._heap = [job for job in self._heap if id(job) not in taken]
            heapq.heapify(self._heap)
        return sorted(same)

    def _run_batch(self, jobs: list[_Job]) -> None:
        runner = self._batch
        if runner is None:  # pragma: no cover - jobs carry a batch key only when there is a runner
            raise RuntimeError("a batch of jobs without a batch runner")
        self.batches_run += 1
        started = time.perf_counter()
        try:
            results = list(runner([job.item for job in jobs]))
        except BaseException as failure:  # the whole batch failed: every job gets the error
            results = [(failure, None)] * len(jobs)
        ran = time.perf_counter() - started
        for job, (error, value) in zip(jobs, results, strict=True):
            job.done(error, value)
            if self._on_job is not None:
                self._on_job(Priority(job.priority), started - job.queued_at, ran)
