"""The embedded registry as a gRPC service (mTLS), and its client.

Only a server may announce, and only under its own identity: the record's node id must equal the
SPIFFE id of the certificate that made the call. Then the trust context's announce recipe decides
(an attestation bound to the caller's key; the announce policy keeps, e.g., unattested nodes off the
sensitive blocks). Accepted and refused announcements go to the registry's audit trail.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc

from fincluster.errors import (
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
from fincluster.trust.pki import Role, parse_spiffe_id
from fincluster.trust.policy import Decision
from fincluster.trust.tls import RenewingChannel, peer_certificate, peer_identity
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.status import abort_for

log = get_logger(__name__)

MAX_TTL_SECONDS = 300
T = TypeVar("T")


@contextlib.contextmanager
def _storage(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    """A failing backend (etcd down) reaches the caller as a retryable UNAVAILABLE; the reason is logged."""
    try:
        yield
    except RegistryError as error:
        log.warning("registry_storage_failed", error=str(error))
        abort_for(context, UnavailableError("registry storage unavailable; retry later"), method=method)


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(
        self, backend: Registry, *, trust: TrustContext, audit: RegistryAuditTrail | None = None
    ) -> None:
        self._backend = backend
        self._trust = trust
        self._audit = audit or RegistryAuditTrail(None)
        self._stopping = threading.Event()

    def stop_watches(self) -> None:
        self._stopping.set()

    def Announce(self, request: pb.AnnounceRequest, context: grpc.ServicerContext) -> pb.AnnounceResponse:
        caller = peer_identity(context)
        _, role, _ = parse_spiffe_id(caller)
        if role is not Role.SERVER or request.record.node_id != caller:
            log.warning(
                "announce_refused", caller=caller, record_node=request.record.node_id, reason="identity"
            )
            self._audit.refused(
                caller, request.record, ("a server may announce only its own identity",), None
            )
            abort_for(context, RefusedError("a server may announce only its own identity"), method="Announce")
        if not 1 <= request.ttl_seconds <= MAX_TTL_SECONDS:
            abort_for(
                context,
                InvalidRequestError(f"ttl_seconds must be within 1..{MAX_TTL_SECONDS}"),
                method="Announce",
            )
        record = request.record
        if not record.address or not record.model_id or record.span.end <= record.span.start:
            abort_for(
                context,
                InvalidRequestError("record needs address, model_id and a non-empty span"),
                method="Announce",
            )
        peer = peer_certificate(context)
        try:
            claims, decision = self._trust.decide_announce(record, peer)
        except (PolicyError, TrustError) as error:
            self._refuse(context, caller, record, (str(error),), None)
        if not decision.allow:
            self._refuse(context, caller, record, decision.reasons, decision, claims)
        self._audit.accepted(record, peer, claims, decision)
        with _storage(context, "Announce"):
            expires = self._backend.announce(record, request.ttl_seconds)
        return pb.AnnounceResponse(expires_at_unix=expires)

    def _refuse(
        self,
        context: grpc.ServicerContext,
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
        abort_for(context, RefusedError("announcement refused by policy"), method="Announce")

    def Withdraw(self, request: pb.WithdrawRequest, context: grpc.ServicerContext) -> pb.WithdrawResponse:
        if request.node_id != peer_identity(context):
            abort_for(context, RefusedError("a server may withdraw only its own record"), method="Withdraw")
        with _storage(context, "Withdraw"):
            self._backend.withdraw(request.node_id)
        return pb.WithdrawResponse()

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        with _storage(context, "List"):
            return pb.ListResponse(records=self._backend.list(request.model_id))

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.RegistryEvent]:
        done = threading.Event()
        context.add_callback(done.set)
        stop = threading.Event()

        def relay() -> None:
            while not (done.wait(0.2) or self._stopping.is_set()):
                pass
            stop.set()

        threading.Thread(target=relay, daemon=True, name="registry-watch-relay").start()
        with _storage(context, "Watch"):
            yield from self._backend.watch(request.model_id, stop)


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
