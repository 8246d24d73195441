"""When a hop fails: which errors move its blocks to another node, how long the failed node is avoided,
and how long to wait between attempts (``fincluster.backoff``).

A node that cannot be reached, does not answer in time, lost the session, is full, is now refused by
policy, moved to other blocks (``MovedError``), or sent something that does not verify is *failed*:
routing is asked, under the same policy and pins, for other nodes to take its blocks, and an
unhealthy one is banned for a while (a full, refusing or moved node is only left out of that
replacement). Blocks a server never served (OUT_OF_RANGE) are not a node failure: the client asked
for what the server's record did not offer. Errors that say the
request itself is wrong (a malformed request, a session past its length) are not node failures and
are raised to the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from fincluster.errors import (
    AdapterRefusedError,
    CapacityError,
    InvalidRequestError,
    InvalidResponseError,
    MovedError,
    OutOfRangeError,
    RefusedError,
    RemoteError,
    SessionError,
    SessionLengthError,
    TrustError,
    UnavailableError,
)


def is_node_failure(error: BaseException) -> bool:
    """Whether ``error`` from a hop means "use another node for these blocks"."""
    if isinstance(error, SessionLengthError | InvalidRequestError | OutOfRangeError | AdapterRefusedError):
        return False  # the request itself (or the adapter it names) is wrong, not the node
    if isinstance(error, RefusedError) and error.status is grpc.StatusCode.UNAUTHENTICATED:
        return False  # this client's own certificate is refused: no other node will take it
    return isinstance(
        error,
        UnavailableError
        | SessionError
        | CapacityError
        | RefusedError
        | TrustError
        | InvalidResponseError
        | MovedError,
    ) or (isinstance(error, RemoteError) and error.status is not None)


class Bans:
    """Nodes the client does not route to for a while; each new failure doubles the time (up to 8x)."""

    def __init__(self, ban_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ban_seconds = ban_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self._reasons: dict[str, str] = {}

    def ban(self, node_id: str, reason: str, *, seconds: float | None = None) -> float:
        """Ban ``node_id`` for ``reason`` (for ``seconds``, or the doubling ban time); returns the seconds
        it stays banned. A longer ban in force (a quarantine) is never shortened."""
        with self._lock:
            strikes = self._strikes.get(node_id, 0) + 1
            self._strikes[node_id] = strikes
            if seconds is None:
                seconds = self._ban_seconds * min(2 ** (strikes - 1), 8)
            now = self._clock()
            current = self._until.get(node_id, now)
            if now + seconds >= current:
                self._until[node_id] = now + seconds
                self._reasons[node_id] = reason
            return max(current, now + seconds) - now

    def is_banned(self, node_id: str) -> bool:
        with self._lock:
            until = self._until.get(node_id)
            if until is None:
                return False
            if self._clock() >= until:
                del self._until[node_id]
                return False
            return True

    def reason(self, node_id: str) -> str:
        with self._lock:
            return self._reasons.get(node_id, "")

    def forgive(self, node_id: str) -> None:
        """A node that served again after its ban starts over with one strike less."""
        with self._lock:
            if node_id in self._strikes and node_id not in self._until:
                self._strikes[node_id] = max(self._strikes[node_id] - 1, 0)
