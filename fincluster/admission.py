"""Who may start how much on this server: per-client caps, and department quotas.

Every swarm certificate can open connections, so every resource a call holds is bounded per client
and in total: concurrent inference streams, concurrent unary calls, and (through the KV-cache budget)
sessions. Clients belong to departments; each department may hold a share of the server's sessions
and spend a number of tokens per minute on it. A call over a limit is refused at once with
``RESOURCE_EXHAUSTED`` and a message that says which limit (and when to retry); other clients and
departments are not affected.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from fincluster.errors import CapacityError
from fincluster.settings import DepartmentQuota

DEFAULT_DEPARTMENT = "default"


@dataclass(frozen=True)
class Limits:
    max_streams: int
    max_streams_per_client: int
    max_calls_per_client: int
    stream_kind: str = "inference streams"


class Admission:
    """Counts what each client and department holds; refuses what is over a limit."""

    def __init__(
        self,
        limits: Limits,
        *,
        department_of: Callable[[str], str] = lambda _client: DEFAULT_DEPARTMENT,
        quotas: Mapping[str, DepartmentQuota] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._department_of = department_of
        self._quotas = dict(quotas or {})
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: Counter[str] = Counter()
        self._calls: Counter[str] = Counter()
        self._department_streams: Counter[str] = Counter()
        self._spent: dict[str, deque[tuple[float, int]]] = {}

    def department_of(self, client: str) -> str:
        return self._department_of(client)

    def quota_of(self, client: str) -> DepartmentQuota:
        return self._quotas.get(self._department_of(client), DepartmentQuota())

    def weight_of(self, client: str) -> float:
        return self.quota_of(client).weight

    @contextlib.contextmanager
    def stream(self, client: str) -> Iterator[None]:
        """Hold one long-lived stream (inference session, registry watch) for ``client`` while the block
        runs."""
        department = self._department_of(client)
        share = self.quota_of(client).session_share
        kind = self._limits.stream_kind
        with self._lock:
            total = sum(self._streams.values())
            if total >= self._limits.max_streams:
                raise CapacityError(f"server is at its limit of {self._limits.max_streams} {kind}")
            if self._streams[client] >= self._limits.max_streams_per_client:
                raise CapacityError(
                    f"this client already holds {self._limits.max_streams_per_client} {kind} "
                    "on this server (its limit); close one first"
                )
            allowed = max(1, math.floor(share * self._limits.max_streams))
            if self._department_streams[department] >= allowed:
                raise CapacityError(
                    f"department {department!r} holds {allowed} {kind} on this server, its "
                    f"share ({share:g}) of {self._limits.max_streams}"
                )
            self._streams[client] += 1
            self._department_streams[department] += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams[client] -= 1
                self._department_streams[department] -= 1

    @contextlib.contextmanager
    def call(self, client: str) -> Iterator[None]:
        """Hold one unary call (forward, backward, proof, info) for ``client`` while the block runs."""
        with self._lock:
            if self._calls[client] >= self._limits.max_calls_per_client:
                raise CapacityError(
                    f"this client already has {self._limits.max_calls_per_client} calls running on this "
                    "server (its limit)"
                )
            self._calls[client] += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls[client] -= 1

    def charge(self, client: str, tokens: int) -> None:
        """Spend ``tokens`` of the client's department's quota; CapacityError (and nothing spent) when
        the department has used its tokens of the last minute."""
        quota = self.quota_of(client)
        if quota.tokens_per_minute is None:
            return
        department = self._department_of(client)
        now = self._clock()
        with self._lock:
            spent = self._spent.setdefault(department, deque())
            while spent and spent[0][0] <= now - 60:
                spent.popleft()
            used = sum(n for _, n in spent)
            if used + tokens > quota.tokens_per_minute:
                retry = 60 - (now - spent[0][0]) if spent else 60.0
                raise CapacityError(
                    f"department {department!r} is over its quota of {quota.tokens_per_minute} tokens per "
                    f"minute on this server ({used} used); retry in {math.ceil(retry)} s"
                )
            spent.append((now, tokens))
