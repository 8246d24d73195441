"""Lifecycle of the embedded registry service (``fincluster registry``, and inside ``fincluster demo``)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from fincluster.audit import AuditSink
from fincluster.errors import ClosedError
from fincluster.health import REGISTRY_SERVICE, AioHealth
from fincluster.logs import get_logger
from fincluster.net import join_host_port
from fincluster.registry.audit_trail import RegistryAuditTrail
from fincluster.registry.backend import InMemoryRegistry, Registry
from fincluster.registry.service import RegistryServicer
from fincluster.rpc import AioServerThread, run_on_loop
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Credential, load_certificate
from fincluster.trust.tls import server_credentials
from fincluster.wire import fincluster_pb2_grpc as pb_grpc

log = get_logger(__name__)


class RegistryServer:
    """mTLS gRPC registry over a backend (default: an ``InMemoryRegistry``); no socket until ``start()``."""

    def __init__(
        self,
        credential: Credential,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: Registry | None = None,
        trust: TrustContext | None = None,
        audit: AuditSink | None = None,
    ) -> None:
        """``audit`` receives the announcements accepted and refused (the CLI passes an ``AuditLog``)."""
        self.credential = credential
        self.host = host
        self.port = port
        self.backend = backend if backend is not None else InMemoryRegistry()
        if trust is None:
            trust = TrustContext.public_only(load_certificate(credential.read()[0]))
        self.trust = trust
        self._servicer = RegistryServicer(self.backend, trust=trust, audit=RegistryAuditTrail(audit))
        self._grpc: AioServerThread | None = None
        self._health = AioHealth(REGISTRY_SERVICE)
        self._closed = False
        self.address: str | None = None

    def start(self) -> str:
        if self._closed:
            raise ClosedError("this registry was stopped; create a new one")

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_RegistryServiceServicer_to_server(self._servicer, server)  # type: ignore[no-untyped-call]
            self._health.register(server)

        self._grpc = AioServerThread(
            register,
            address=f"{self.host}:{self.port}",
            credentials=server_credentials(self.credential),
            name="registry-rpc",
        )
        port = self._grpc.start()
        self._health.set(True)  # SERVING until stop()
        self.address = join_host_port(self.host, port)
        log.info("registry_started", address=self.address)
        return self.address

    def stop(self, grace_seconds: float = 1.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._grpc is not None:
            self._health.drain()
            run_on_loop(_call_soon(self._servicer.stop_watches), timeout=10)
            self._grpc.stop(grace_seconds)

    def wait(self) -> None:
        if self._grpc is not None:
            self._grpc.wait()

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _call_soon(function: Callable[[], None]) -> None:
    """Run ``function`` on the event loop (the watch hubs' queues belong to it)."""
    function()
