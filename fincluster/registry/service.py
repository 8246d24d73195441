"""The embedded registry as a gRPC service (mTLS), and its client.

Only a server may announce, and only under its own identity: the record's node id must equal the
SPIFFE id of the certificate that made the call. Then the trust context's announce recipe decides
(an attestation bound to the caller's key; the announce policy keeps, e.g., unattested nodes off the
sensitive blocks). Accepted and refused announcements go to the registry's audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import grpc
from cryptography import x509

from fincluster.admission import Admission, Limits
from fincluster.backoff import Backoff
from fincluster.errors import (
    CertificateError,
    InvalidRequestError,
    PolicyError,
    RefusedError,
    RegistryError,
    TrustError,
    UnavailableError,
)
from fincluster.logs import get_logger
from fincluster.net import explain_connection_failure
from fincluster.registry.audit_trail import RegistryAuditTrail
from fincluster.registry.backend import Registry
from fincluster.trust.attestation import VerifiedClaims
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Role, parse_spiffe_id, spiffe_id_of
from fincluster.trust.policy import Decision
from fincluster.trust.tls import RenewingChannel, check_certificate_current, peer_certificate
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.status import answer_for

log = get_logger(__name__)

MAX_TTL_SECONDS = 300
T = TypeVar("T")


@dataclass(frozen=True)
class RegistryLimits:
    """What one peer may hold open on the registry: its heartbeats and lists must never starve."""

    max_watches: int = 256
    max_watches_per_peer: int = 4
    max_calls_per_peer: int = 16


class _WatchHub:
    """One backend watch per model, fanned out to every Watch stream of that model: a stream is a
    queue, not a thread. The hub's thread ends when its last subscriber leaves."""

    def __init__(self, backend: Registry, model_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self._backend = backend
        self._model_id = model_id
        self._loop = loop
        self._subscribers: set[asyncio.Queue[pb.RegistryEvent | None]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"registry-watch-{model_id}", daemon=True)
        self._thread.start()

    def subscribe(self) -> asyncio.Queue[pb.RegistryEvent | None]:
        queue: asyncio.Queue[pb.RegistryEvent | None] = asyncio.Queue(maxsize=1024)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[pb.RegistryEvent | None]) -> bool:
        """Forget ``queue``; True when no subscriber is left (the hub then stops)."""
        self._subscribers.discard(queue)
        if not self._subscribers:
            self._stop.set()
            return True
        return False

    def stop(self) -> None:
        self._stop.set()
        for queue in list(self._subscribers):
            self._deliver(queue, None)

    def _deliver(self, queue: asyncio.Queue[pb.RegistryEvent | None], event: pb.RegistryEvent | None) -> None:
        def put() -> None:
            if queue.full():  # a reader that does not read loses its stream, not the others' events
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)
                return
            queue.put_nowait(event)

        self._loop.call_soon_threadsafe(put)

    def _pump(self) -> None:
        waits = Backoff(initial=0.5, maximum=5.0)
        while not self._stop.is_set():
            try:
                for event in self._backend.watch(self._model_id, self._stop):
                    for queue in list(self._subscribers):
                        self._deliver(queue, event)
                    waits.reset()
            except RegistryError as error:
                log.warning("registry_watch_failed", model=self._model_id, error=str(error))
                self._stop.wait(waits.next_delay())


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """The registry's handlers (``grpc.aio``): every call authenticated (revocation, expiry) and
    bounded per peer; backend calls run off the event loop; watches share one backend watch."""

    def __init__(
        self,
        backend: Registry,
        *,
        trust: TrustContext,
        audit: RegistryAuditTrail | None = None,
        limits: RegistryLimits | None = None,
    ) -> None:
        self._backend = backend
        self._trust = trust
        self._audit = audit or RegistryAuditTrail(None)
        self._limits = limits or RegistryLimits()
        self._admission = Admission(
            Limits(
                max_streams=self._limits.max_watches,
                max_streams_per_client=self._limits.max_watches_per_peer,
                max_calls_per_client=self._limits.max_calls_per_peer,
                stream_kind="watch streams",
            )
        )
        self._hubs: dict[str, _WatchHub] = {}

    def stop_watches(self) -> None:
        for hub in list(self._hubs.values()):
            hub.stop()
        self._hubs.clear()

    def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[str, x509.Certificate]:
        try:
            certificate = peer_certificate(context)  # type: ignore[arg-type]
            check_certificate_current(certificate, self._trust.revocations, now=self._trust.clock())
            return spiffe_id_of(certificate), certificate
        except (CertificateError, TrustError) as error:
            log.warning("peer_rejected", peer=context.peer(), reason=str(error))
            raise _Unauthenticated() from None

    async def _answer(self, context: grpc.aio.ServicerContext, method: str, work: Awaitable[T]) -> T:
        try:
            return await work
        except _Unauthenticated:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "peer certificate not accepted")
        except RegistryError as error:  # etcd down: a retryable UNAVAILABLE; the reason is logged
            log.warning("registry_storage_failed", error=str(error))
            await context.abort(
                *answer_for(UnavailableError("registry storage unavailable; retry later"), method=method)
            )
        except Exception as error:
            await context.abort(*answer_for(error, method=method))
        raise AssertionError("context.abort returned")  # pragma: no cover - grpc always raises

    async def Announce(
        self, request: pb.AnnounceRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnnounceResponse:
        async def work() -> pb.AnnounceResponse:
            caller, peer = self._authenticate(context)
            with self._admission.call(caller):
                return await asyncio.to_thread(self._announce, request, caller, peer)

        return await self._answer(context, "Announce", work())

    def _announce(
        self, request: pb.AnnounceRequest, caller: str, peer: x509.Certificate
    ) -> pb.AnnounceResponse:
        _, role, _ = parse_spiffe_id(caller)
        record = request.record
        if role is not Role.SERVER or record.node_id != caller:
            log.warning("announce_refused", caller=caller, record_node=record.node_id, reason="identity")
            self._audit.refused(caller, record, ("a server may announce only its own identity",), None)
            raise RefusedError("a server may announce only its own identity")
        if not 1 <= request.ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidRequestError(f"ttl_seconds must be within 1..{MAX_TTL_SECONDS}")
        if not record.address or not record.model_id or record.span.end <= record.span.start:
            raise InvalidRequestError("record needs address, model_id and a non-empty span")
        try:
            claims, decision = self._trust.decide_announce(record, peer)
        except (PolicyError, TrustError) as error:
            self._refuse(caller, record, (str(error),), None)
        if not decision.allow:
            self._refuse(caller, record, decision.reasons, decision, claims)
        self._audit.accepted(record, peer, claims, decision)
        return pb.AnnounceResponse(expires_at_unix=self._backend.announce(record, request.ttl_seconds))

    def _refuse(
        self,
        caller: str,
        record: pb.ServerRecord,
        reasons: tuple[str, ...],
        decision: Decision | None,
        claims: VerifiedClaims | None = None,
    ) -> NoReturn:
        log.warning(
            "announce_refused",
            node=caller,
            reasons=list(reasons),
            decision=decision.decision_id if decision is not None else None,
        )
        self._audit.refused(caller, record, reasons, decision, claims)
        raise RefusedError("announcement refused by policy")

    async def Withdraw(
        self, request: pb.WithdrawRequest, context: grpc.aio.ServicerContext
    ) -> pb.WithdrawResponse:
        async def work() -> pb.WithdrawResponse:
            caller, _ = self._authenticate(context)
            if request.node_id != caller:
                raise RefusedError("a server may withdraw only its own record")
            with self._admission.call(caller):
                await asyncio.to_thread(self._backend.withdraw, request.node_id)
            return pb.WithdrawResponse()

        return await self._answer(context, "Withdraw", work())

    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext) -> pb.ListResponse:
        async def work() -> pb.ListResponse:
            caller, _ = self._authenticate(context)
            with self._admission.call(caller):
                records = await asyncio.to_thread(self._backend.list, request.model_id)
            return pb.ListResponse(records=records)

        return await self._answer(context, "List", work())

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RegistryEvent]:
        hub: _WatchHub | None = None
        with contextlib.ExitStack() as held:
            try:
                caller, _ = self._authenticate(context)
                held.enter_context(self._admission.stream(caller))
                hub = self._hubs.get(request.model_id)
                if hub is None:
                    hub = self._hubs[request.model_id] = _WatchHub(
                        self._backend, request.model_id, asyncio.get_running_loop()
                    )
                queue = hub.subscribe()
                current = await asyncio.to_thread(self._backend.list, request.model_id)
            except _Unauthenticated:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "peer certificate not accepted")
            except Exception as error:
                await context.abort(*answer_for(error, method="Watch"))
            try:
                for record in current:
                    yield pb.RegistryEvent(kind=pb.RegistryEvent.PUT, record=record)
                while (event := await queue.get()) is not None:
                    yield event
            finally:
                if hub is not None and hub.unsubscribe(queue):
                    self._hubs.pop(request.model_id, None)


class _Unauthenticated(Exception):
    """The caller's certificate is not (or no longer) accepted."""


class RegistryClient:
    """``Registry`` over gRPC, for servers and clients; a :class:`RenewingChannel` follows the
    caller's certificate renewals and rotations."""

    def __init__(
        self,
        channel: grpc.Channel | RenewingChannel,
        *,
        timeout_seconds: float = 10.0,
        address: str | None = None,
    ) -> None:
        """``address`` (the channel's target) names the registry in connection errors."""
        self._source = channel
        self._stubs: tuple[grpc.Channel, pb_grpc.RegistryServiceStub] | None = None
        self._timeout = timeout_seconds
        self.address = address

    @property
    def _stub(self) -> pb_grpc.RegistryServiceStub:
        channel = self._source.current() if isinstance(self._source, RenewingChannel) else self._source
        if self._stubs is None or self._stubs[0] is not channel:
            self._stubs = (channel, pb_grpc.RegistryServiceStub(channel))
        return self._stubs[1]

    def _rpc(self, name: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            plain = explain_connection_failure(details, peer="registry", address=self.address or "?")
            if code is grpc.StatusCode.UNAVAILABLE and plain is not None and self.address is not None:
                raise RegistryError(f"registry {name} failed: {plain} [{code.name}]") from None
            raise RegistryError(f"registry {name} failed: {code.name}: {details}") from None

    def check(self, timeout_seconds: float = 10.0) -> None:
        """Fail now, with the reason in words, when the registry cannot be reached (a cheap List)."""
        timeout = min(timeout_seconds, self._timeout)
        self._rpc("check", lambda: self._stub.List(pb.ListRequest(model_id=""), timeout=timeout))

    def announce(self, record: pb.ServerRecord, ttl_seconds: int) -> float:
        request = pb.AnnounceRequest(record=record, ttl_seconds=ttl_seconds)
        response: pb.AnnounceResponse = self._rpc(
            "announce", lambda: self._stub.Announce(request, timeout=self._timeout)
        )
        return response.expires_at_unix

    def withdraw(self, node_id: str) -> None:
        self._rpc(
            "withdraw",
            lambda: self._stub.Withdraw(pb.WithdrawRequest(node_id=node_id), timeout=self._timeout),
        )

    def list(self, model_id: str) -> list[pb.ServerRecord]:
        response: pb.ListResponse = self._rpc(
            "list", lambda: self._stub.List(pb.ListRequest(model_id=model_id), timeout=self._timeout)
        )
        return list(response.records)

    def watch(self, model_id: str, stop: threading.Event) -> Iterator[pb.RegistryEvent]:
        call = self._stub.Watch(pb.WatchRequest(model_id=model_id))
        threading.Thread(target=lambda: (stop.wait(), call.cancel()), daemon=True).start()
        try:
            yield from call
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                raise RegistryError(
                    f"registry watch failed: {error.code().name}: {error.details()}"
                ) from None
