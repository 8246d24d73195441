"""Lifecycle of the embedded registry service (``fincluster registry``, and inside ``fincluster demo``)."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2_grpc

from fincluster.audit import AuditSink
from fincluster.errors import ClosedError
from fincluster.health import REGISTRY_SERVICE, sync_health
from fincluster.logs import get_logger
from fincluster.registry.audit_trail import RegistryAuditTrail
from fincluster.registry.backend import InMemoryRegistry, Registry
from fincluster.registry.service import RegistryServicer
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Credential, load_certificate
from fincluster.trust.tls import PeerCheckInterceptor, server_credentials
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
        self._grpc: grpc.Server | None = None
        self._closed = False
        self.address: str | None = None

    def start(self) -> str:
        if self._closed:
            raise ClosedError("this registry was stopped; create a new one")
        interceptors = []
        if self.trust.revocations is not None:
            interceptors.append(PeerCheckInterceptor(self.trust.revocations))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="registry-rpc"),
            interceptors=interceptors,
        )
        pb_grpc.add_RegistryServiceServicer_to_server(self._servicer, server)
        self._health = sync_health(REGISTRY_SERVICE)  # SERVING until stop()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        port = server.add_secure_port(f"{self.host}:{self.port}", server_credentials(self.credential))
        server.start()
        self._grpc = server
        self.address = f"{self.host}:{port}"
        log.info("registry_started", address=self.address)
        return self.address

    def stop(self, grace_seconds: float = 1.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._grpc is not None:
            self._health.enter_graceful_shutdown()
        self._servicer.stop_watches()
        if self._grpc is not None:
            self._grpc.stop(grace_seconds).wait()

    def wait(self) -> None:
        if self._grpc is not None:
            self._grpc.wait_for_termination()

    def __enter__(self) -> RegistryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
