"""Inference sessions and the KV-cache memory budget.

A session reserves the cache bytes for ``batch_size * max_length`` tokens when it opens, so a step can
never run out of memory half-way. When the budget is full, ``open`` waits a bounded time for another
session to end and then fails with ``CapacityError``. Sessions idle longer than the timeout are expired
and their memory released; the reaper runs in the server.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from transformers import DynamicCache
from transformers.cache_utils import Cache

from fincluster.errors import (
    CapacityError,
    InvalidRequestError,
    SessionError,
    SessionExistsError,
    SessionLengthError,
)
from fincluster.spans import BlockSpan
from fincluster.wire.compression import WireCompression

if TYPE_CHECKING:
    from fincluster.serving.adapters import LoadedAdapter

CLIENT_CLOSED = "closed"
"""The reason of a session its client closed (every other reason says what ended it)."""


class CacheBudget:
    """Bytes of KV cache a server may hold, shared by all of its sessions."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self._used = 0
        self._changed = threading.Condition()

    @property
    def free_bytes(self) -> int:
        with self._changed:
            return self.total_bytes - self._used

    def reserve(self, nbytes: int, *, wait_seconds: float) -> bool:
        """Reserve ``nbytes``, waiting up to ``wait_seconds`` for room; False when there is none."""
        if nbytes > self.total_bytes:
            return False
        with self._changed:
            fits = self._changed.wait_for(
                lambda: self._used + nbytes <= self.total_bytes, timeout=wait_seconds
            )
            if not fits:
                return False
            self._used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._changed:
            self._used -= nbytes
            self._changed.notify_all()


@dataclass
class Session:
    """Server-side state of one inference session: its span, limits and KV cache."""

    session_id: str
    span: BlockSpan
    max_length: int
    batch_size: int
    reserved_bytes: int
    cache: Cache
    client_id: str
    last_used: float
    position: int = 0
    prefix_length: int = 0
    """Deep-prompt positions the cache holds ahead of the tokens (set by the first step)."""
    adapter: LoadedAdapter | None = None
    """The LoRA adapter every step applies (a ``serving.adapters.LoadedAdapter``), chosen at open."""
    closed_reason: str | None = None
    compression: WireCompression = WireCompression.NONE
    """How this session's hidden states travel (negotiated at open)."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionManager:
    """Opens, looks up, expires and closes sessions; owns their memory reservations."""

    def __init__(
        self,
        budget: CacheBudget,
        *,
        new_cache: Callable[..., Cache],
        bytes_per_token: Callable[[BlockSpan], int],
        max_session_length: int,
        idle_timeout_seconds: float,
        wait_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[Session, str], None] | None = None,
        release_cache: Callable[[Cache], None] = lambda cache: None,
    ) -> None:
        """``new_cache(span, batch_size=, max_length=)`` makes a session's KV cache and
        ``release_cache`` gives its memory back when the session ends (a static pool's slots);
        ``on_close`` hears of every session that ends, with why (the server's audit trail)."""
        self._budget = budget
        self._new_cache = new_cache
        self._release_cache = release_cache
        self._bytes_per_token = bytes_per_token
        self._max_session_length = max_session_length
        self._idle_timeout = idle_timeout_seconds
        self._wait_seconds = wait_seconds
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._on_close = on_close

    def open(
        self,
        span: BlockSpan,
        *,
        max_length: int,
        batch_size: int,
        client_id: str,
        session_id: str | None = None,
    ) -> Session:
        """Reserve cache for a new session; ``session_id`` is the client's choice (one id on every hop)."""
        if max_length < 1 or max_length > self._max_session_length:
            raise SessionLengthError(
                f"max_length {max_length} outside 1..{self._max_session_length} allowed by this server"
            )
        if batch_size < 1:
            raise InvalidRequestError("batch_size must be at least 1")
        session_id = session_id or uuid.uuid4().hex
        with self._lock:
            if session_id in self._sessions:
                raise SessionExistsError("a session with this id is already open", session_id=session_id)
        nbytes = self._bytes_per_token(span) * max_length * batch_size
        if not self._budget.reserve(nbytes, wait_seconds=self._wait_seconds):
            raise CapacityError(
                f"KV-cache budget full: session needs {nbytes} bytes, {self._budget.free_bytes} of "
                f"{self._budget.total_bytes} free after waiting {self._wait_seconds:g} s",
                span=span,
            )
        try:
            cache = self._new_cache(span, batch_size=batch_size, max_length=max_length)
        except BaseException:
            self._budget.release(nbytes)
            raise
        session = Session(
            session_id=session_id,
            span=span,
            max_length=max_length,
            batch_size=batch_size,
            reserved_bytes=nbytes,
            cache=cache,
            client_id=client_id,
            last_used=self._clock(),
        )
        with self._lock:
            if session_id in self._sessions:  # opened concurrently under the same id
                self._budget.release(nbytes)
                self._release_cache(cache)
                raise SessionExistsError("a session with this id is already open", session_id=session_id)
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionError("unknown or closed session", session_id=session_id)
        if session.closed_reason is not None:
            raise SessionError(f"session {session.closed_reason}", session_id=session_id)
        session.last_used = self._clock()
        return session

    def close(self, session_id: str, reason: str = CLIENT_CLOSED) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return
        with session.lock:
            session.closed_reason = reason
            self._release_cache(session.cache)
            session.cache = DynamicCache()  # drop the cached keys and values now
        self._budget.release(session.reserved_bytes)
        if self._on_close is not None:
            self._on_close(session, reason)

    def expire_idle(self) -> list[str]:
        """Close sessions idle past the timeout; returns their ids."""
        now = self._clock()
        with self._lock:
            idle = [s.session_id for s in self._sessions.values() if now - s.last_used > self._idle_timeout]
        for session_id in idle:
            self.close(session_id, reason=f"expired after {self._idle_timeout:g} s idle")
        return idle

    def close_all(self, reason: str = "closed: the server shut down") -> None:
        with self._lock:
            ids = list(self._sessions)
        for session_id in ids:
            self.close(session_id, reason=reason)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
