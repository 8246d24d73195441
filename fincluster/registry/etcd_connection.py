"""The registry service's connection to etcd: mTLS channels to each member, failover and deadlines.

Only the registry service holds these credentials. etcd authenticates it by client certificate and,
with auth enabled, takes the certificate's common name as the etcd user whose role grants readwrite
on the registry's key prefix. Servers and clients hold no etcd credentials, so nobody can write
around the registry's announce checks.

Every call has a deadline and goes to one member at a time. When that member is down, has lost its
leader, or does not answer in time, the call moves on to the next member; every registry operation
may safely run twice, which is what makes that retry sound. When no member answered,
:class:`RegistryUnavailableError` names each endpoint and its failure; a refusal (``PERMISSION_DENIED``
from etcd's RBAC, say) is a :class:`RegistryError` at once. gRPC reconnects each channel by itself; the
short reconnect backoff below brings a restarted member back into use within about a second. The
certificate files are read again whenever they change, so a renewed client certificate needs no
restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from fincluster.errors import ClosedError, ConfigurationError, RegistryError, RegistryUnavailableError
from fincluster.logs import get_logger
from fincluster.registry.etcd_api import rpc_pb2 as etcd
from fincluster.registry.etcd_api import rpc_pb2_grpc as etcd_grpc

log = get_logger(__name__)

T = TypeVar("T")

# What a member that cannot serve right now answers: down, stopping, without a leader or too slow
# (UNAVAILABLE, DEADLINE_EXCEEDED), a stream reset while it shuts down (INTERNAL), or a call on a
# channel closed here because the certificate files changed (CANCELLED). Anything else is a refusal.
_TRY_NEXT_MEMBER = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    }
)
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # etcd answers pings more frequent than --grpc-keepalive-min-time (5 s) by closing the connection
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),  # a quiet watch stream is still checked
)
# etcd ends a watch stream whose member has lost its leader instead of leaving it silent
_REQUIRE_LEADER = (("hasleader", "true"),)


def parse_endpoint(endpoint: str) -> str:
    """``host:port`` of an etcd member given as ``host:port`` or ``https://host:port``."""
    address = endpoint.strip().removeprefix("https://").rstrip("/")
    if "://" in address:
        raise ConfigurationError(
            f"etcd endpoint {endpoint!r}: only TLS endpoints (host:port or https://host:port) are supported"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"etcd endpoint {endpoint!r} is not host:port")
    return address


class WatchStream(Protocol):
    """An open etcd watch stream (a gRPC call): iterate for responses, ``cancel()`` to end it."""

    def __iter__(self) -> Iterator[etcd.WatchResponse]: ...

    def __next__(self) -> etcd.WatchResponse: ...

    def cancel(self) -> bool: ...


@dataclass(frozen=True)
class _Member:
    endpoint: str
    channel: grpc.Channel
    kv: etcd_grpc.KVStub
    lease: etcd_grpc.LeaseStub
    watch: etcd_grpc.WatchStub


class EtcdConnection:
    """Calls into one etcd cluster; TLS files are read at once, connections made at the first call."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_cert: Path,
        cert: Path,
        key: Path,
        timeout_seconds: float = 2.0,
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise ConfigurationError("etcd needs a list of one or more endpoints (host:port)")
        if timeout_seconds <= 0:
            raise ConfigurationError("the etcd call timeout must be positive")
        self.endpoints = tuple(parse_endpoint(endpoint) for endpoint in endpoints)
        self.timeout_seconds = timeout_seconds
        self._tls_files = (ca_cert, cert, key)
        self._lock = threading.Lock()
        self._members: list[_Member] = []
        self._tls_state: tuple[tuple[int, int, int], ...] | None = None
        self._preferred = 0
        self._closed = False
        self._current_members()  # unreadable certificate files fail here, not at the first announce

    # calls ---------------------------------------------------------------------------------------
    def range(self, request: etcd.RangeRequest) -> etcd.RangeResponse:
        response: etcd.RangeResponse = self._call(
            "range", lambda member: member.kv.Range(request, timeout=self.timeout_seconds)
        )
        return response

    def txn(self, request: etcd.TxnRequest) -> etcd.TxnResponse:
        response: etcd.TxnResponse = self._call(
            "txn", lambda member: member.kv.Txn(request, timeout=self.timeout_seconds)
        )
        return response

    def grant(self, ttl_seconds: int) -> etcd.LeaseGrantResponse:
        request = etcd.LeaseGrantRequest(TTL=ttl_seconds)
        response: etcd.LeaseGrantResponse = self._call(
            "lease grant", lambda member: member.lease.LeaseGrant(request, timeout=self.timeout_seconds)
        )
        return response

    def keep_alive(self, lease_id: int) -> int:
        """Renew lease ``lease_id`` once; its time-to-live in seconds, 0 when etcd no longer has it."""

        def renew(member: _Member) -> int:
            request = etcd.LeaseKeepAliveRequest(ID=lease_id)
            call = member.lease.LeaseKeepAlive(iter((request,)), timeout=self.timeout_seconds)
            try:
                response: etcd.LeaseKeepAliveResponse = next(call)
            except StopIteration:
                return 0
            finally:
                call.cancel()
            return max(0, response.TTL)

        return self._call("lease keep-alive", renew)

    def watch(self, create: etcd.WatchCreateRequest, ended: threading.Event) -> WatchStream:
        """A watch stream on the member that answered last; the caller cancels it (``.cancel()``) and
        sets ``ended`` when done with it. Failures show up while iterating, as ``grpc.RpcError``."""
        members = self._current_members()
        member = members[self._preferred % len(members)]

        def requests() -> Iterator[etcd.WatchRequest]:
            yield etcd.WatchRequest(create_request=create)
            ended.wait()  # keeps the stream open; returning would half-close it

        stream: WatchStream = member.watch.Watch(requests(), metadata=_REQUIRE_LEADER)
        return stream

    def fail_over(self) -> None:
        """Prefer the next member from now on (the current one broke a stream)."""
        self._preferred = (self._preferred + 1) % len(self.endpoints)

    @property
    def preferred_endpoint(self) -> str:
        return self.endpoints[self._preferred % len(self.endpoints)]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            members, self._members = self._members, []
        for member in members:
            member.channel.close()

    def __enter__(self) -> EtcdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # failover ------------------------------------------------------------------------------------
    def _call(self, what: str, invoke: Callable[[_Member], T]) -> T:
        members = self._current_members()
        failures: list[str] = []
        start = self._preferred
        for attempt in range(len(members)):
            index = (start + attempt) % len(members)
            member = members[index]
            try:
                result = invoke(member)
            except grpc.RpcError as error:
                code, details = error.code(), error.details()
                if code not in _TRY_NEXT_MEMBER:
                    raise RegistryError(
                        f"etcd refused {what} at {member.endpoint}: {code.name}: {details} "
                        "(check the etcd user's role: readwrite on the registry's key prefix)"
                    ) from None
                log.info("etcd_member_failed", endpoint=member.endpoint, call=what, code=code.name)
                failures.append(f"{member.endpoint}: {code.name}: {details}")
                continue
            self._preferred = index
            return result
        raise RegistryUnavailableError(
            f"etcd {what} failed on every endpoint ({'; '.join(failures)}); check that etcd is running "
            "and that the registry's etcd endpoints and certificates are right"
        )

    def _current_members(self) -> list[_Member]:
        state = tuple(_file_signature(path) for path in self._tls_files)
        with self._lock:
            if self._closed:
                raise ClosedError("this etcd connection was closed; create a new registry backend")
            if self._members and state == self._tls_state:
                return self._members
            stale, self._members = self._members, self._open_members()
            self._tls_state = state
            members = self._members
        if stale:
            log.info("etcd_certificates_reloaded", endpoints=list(self.endpoints))
        for member in stale:
            member.channel.close()
        return members

    def _open_members(self) -> list[_Member]:
        ca_pem, cert_pem, key_pem = (_read(path) for path in self._tls_files)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        members = []
        for endpoint in self.endpoints:
            channel = grpc.secure_channel(endpoint, credentials, options=_CHANNEL_OPTIONS)
            members.append(
                _Member(
                    endpoint=endpoint,
                    channel=channel,
                    kv=etcd_grpc.KVStub(channel),
                    lease=etcd_grpc.LeaseStub(channel),
                    watch=etcd_grpc.WatchStub(channel),
                )
            )
        return members


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read the etcd TLS file {path}: {error.strerror}") from None


def _file_signature(path: Path) -> tuple[int, int, int]:
    try:
        status = path.stat()
    except OSError as error:
        raise ConfigurationError(f"cannot read the etcd TLS file {path}: {error.strerror}") from None
    return status.st_ino, status.st_size, status.st_mtime_ns
