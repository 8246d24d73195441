"""KV-cache budget and session lifecycle, with an injected clock."""

from __future__ import annotations

import threading
import time

import pytest

from fincluster.errors import CapacityError, InvalidRequestError, SessionError
from fincluster.serving.sessions import CacheBudget, SessionManager
from fincluster.spans import BlockSpan


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def manager(total: int = 1000, wait: float = 0.0, clock: Clock | None = None) -> SessionManager:
    return SessionManager(
        CacheBudget(total),
        new_cache=lambda span, **_: None,
        bytes_per_token=lambda span: 10,  # type: ignore[arg-type,return-value]
        max_session_length=50,
        idle_timeout_seconds=30,
        wait_seconds=wait,
        clock=clock or Clock(),
    )


def test_open_reserves_batch_times_max_length() -> None:
    sessions = manager()
    sessions.open(BlockSpan(0, 2), max_length=20, batch_size=3, client_id="c")
    assert sessions._budget.free_bytes == 1000 - 10 * 20 * 3


def test_full_budget_raises_capacity_error_and_close_frees() -> None:
    sessions = manager()
    first = sessions.open(BlockSpan(0, 2), max_length=50, batch_size=1, client_id="c")
    sessions.open(BlockSpan(0, 2), max_length=50, batch_size=1, client_id="c")
    with pytest.raises(CapacityError, match="needs 500 bytes, 0 of 1000 free"):
        sessions.open(BlockSpan(0, 2), max_length=50, batch_size=1, client_id="c")
    sessions.close(first.session_id)
    sessions.open(BlockSpan(0, 2), max_length=50, batch_size=1, client_id="c")


def test_open_waits_a_bounded_time_for_room() -> None:
    sessions = manager(total=500, wait=5.0)
    first = sessions.open(BlockSpan(0, 2), max_length=50, batch_size=1, client_id="c")
    threading.Timer(0.2, lambda: sessions.close(first.session_id)).start()
    started = time.monotonic()
    sessions.open(BlockSpan(0, 2), max_length=50, batch_size=1, client_id="c")
    assert 0.1 < time.monotonic() - started < 4.0


def test_limits_on_length_and_batch() -> None:
    sessions = manager()
    with pytest.raises(SessionError, match=r"max_length 51 outside 1\.\.50"):
        sessions.open(BlockSpan(0, 2), max_length=51, batch_size=1, client_id="c")
    with pytest.raises(InvalidRequestError, match="batch_size must be at least 1"):
        sessions.open(BlockSpan(0, 2), max_length=5, batch_size=0, client_id="c")


def test_idle_sessions_expire_and_release_memory() -> None:
    clock = Clock()
    sessions = manager(clock=clock)
    idle = sessions.open(BlockSpan(0, 2), max_length=10, batch_size=1, client_id="c")
    clock.now = 20
    busy = sessions.open(BlockSpan(0, 2), max_length=10, batch_size=1, client_id="c")
    clock.now = 31
    sessions.get(busy.session_id)  # a step refreshes last use
    assert sessions.expire_idle() == [idle.session_id]
    assert idle.closed_reason == "expired after 30 s idle"
    assert sessions._budget.free_bytes == 1000 - 100
    with pytest.raises(SessionError, match="unknown or closed session"):
        sessions.get(idle.session_id)
