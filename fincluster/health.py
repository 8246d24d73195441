"""The standard gRPC health service (``grpc.health.v1.Health``) on block servers and the registry.

Load balancers, orchestrators and ``fincluster status`` ask it, over the same mTLS port as the
node's own service. A block server answers SERVING only while it is announced to its registry (or
has none) and not draining; the port opens once its weights are loaded, so a refused connection
means it is still loading. Both the overall status (service ``""``) and the named service
(``fincluster.v1.BlockService`` / ``fincluster.v1.RegistryService``) are kept. A block server also
keeps ``fincluster.v1.BlockService/classified``: SERVING only while it is SERVING and its own
attestation is valid, i.e. while it may serve data above ``public``.
"""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fincluster.rpc import run_on_loop

BLOCK_SERVICE = "fincluster.v1.BlockService"
REGISTRY_SERVICE = "fincluster.v1.RegistryService"
CLASSIFIED_DATA = "fincluster.v1.BlockService/classified"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class AioHealth:
    """The health service of a ``grpc.aio`` server (block servers, the registry), set from plain threads."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.servicer = health.aio.HealthServicer()
        self.serving: bool | None = None
        self._named: dict[str, bool] = {}
        self._draining = False
        self._lock = threading.Lock()

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service to ``server`` (inside the ``AioServerThread`` register callback)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def set(self, serving: bool) -> None:
        """SERVING or NOT_SERVING, for both names; does nothing when unchanged."""
        with self._lock:
            if serving == self.serving:
                return
            self.serving = serving
            status = SERVING if serving else NOT_SERVING
            for name in ("", self.service):
                run_on_loop(self.servicer.set(name, status), timeout=5)

    def set_named(self, name: str, serving: bool) -> None:
        """SERVING or NOT_SERVING for one more service name (e.g. :data:`CLASSIFIED_DATA`); ignored
        once draining, like :meth:`set`."""
        with self._lock:
            if self._draining or self._named.get(name) == serving:
                return
            self._named[name] = serving
            run_on_loop(self.servicer.set(name, SERVING if serving else NOT_SERVING), timeout=5)

    def drain(self) -> None:
        """NOT_SERVING from now on (the server is stopping); later :meth:`set` calls are ignored."""
        with self._lock:
            self.serving, self._draining = False, True
            run_on_loop(self.servicer.enter_graceful_shutdown(), timeout=5)


def check(channel: grpc.Channel, *, service: str = "", timeout: float = 2.0) -> str:
    """Ask a node's health service: ``SERVING``, ``NOT_SERVING``, … or ``UNREACHABLE`` / the failing
    status name when the call itself fails."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as error:
        code = error.code()
        return (
            "UNREACHABLE"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            else (code.name)
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
