"""A block server's lifecycle: load a span, serve it over mTLS gRPC, announce it, shut down cleanly.

Constructing a ``BlockServer`` opens no socket; ``start()`` binds and starts the announce/reaper thread;
``stop()`` withdraws the announcement, refuses new calls, lets running calls finish within the grace
period, then closes every session and frees its cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fincluster.adapters.manifest import AdapterKeys
from fincluster.audit import AuditSink
from fincluster.errors import ClosedError, ConfigurationError
from fincluster.logs import get_logger
from fincluster.net import check_advertised, join_host_port
from fincluster.registry.backend import Registry
from fincluster.rpc import AioServerThread
from fincluster.serving.adapters import SpanAdapters
from fincluster.serving.admission import DEFAULT_DEPARTMENT, Admission, Limits
from fincluster.serving.announcer import Announcer
from fincluster.serving.audit_trail import ServerAuditTrail
from fincluster.serving.guard import ServeGuard
from fincluster.serving.runner import BlockRunner
from fincluster.serving.scheduler import ComputeQueue
from fincluster.serving.service import AuditWriter, BlockServicer, StreamLimits, Transfer, TransferHook
from fincluster.serving.sessions import CacheBudget, SessionManager
from fincluster.serving.span_model import SpanModel, cache_bytes_per_token
from fincluster.settings import ServerSettings
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.attestation import SIGNED_SOFTWARE_EVIDENCE
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.own_attestation import OwnAttestation
from fincluster.trust.pki import Credential, load_certificate
from fincluster.trust.policy import ModelRef
from fincluster.trust.tls import server_credentials
from fincluster.values import TensorDType
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.codec import span_to_wire
from fincluster.wire.tensors import wire_dtype

log = get_logger(__name__)


def load_span_model(
    store: ModelStore,
    span: BlockSpan,
    *,
    dtype: TensorDType,
    device: str,
    progress: Callable[[int, int], None] | None = None,
) -> SpanModel:
    """Load only ``span``'s weights from ``store`` (each file checked against the manifest);
    ``progress(done, total)`` is called after each block."""
    config = store.load_config()
    blocks = {}
    for done, index in enumerate(span.blocks, start=1):
        blocks[index] = store.load_block_state(index)
        if progress is not None:
            progress(done, len(span))
    return SpanModel(config, span, blocks, dtype=TensorDType(dtype).torch_dtype, device=device)


def measure_throughput(model: SpanModel, repeats: int = 3) -> float:
    """Blocks per second for a one-token forward pass (announced to help routing)."""
    hidden = torch.zeros(1, 1, model.config.hidden_size, dtype=model.dtype, device=model.device)
    mask = torch.ones(1, 1, dtype=torch.int64, device=model.device)
    with torch.inference_mode():
        model(hidden, mask, mask - 1)
        started = time.perf_counter()
        for _ in range(repeats):
            model(hidden, mask, mask - 1)
        elapsed = (time.perf_counter() - started) / repeats
    return len(model.span) / max(elapsed, 1e-9)


@dataclass(frozen=True)
class ServedModel:
    """Identity of what a server serves."""

    model_id: str
    manifest_digest: str
    num_blocks: int

    @classmethod
    def of(cls, store: ModelStore) -> ServedModel:
        return cls(store.model_id, store.manifest_digest, store.num_blocks)


class BlockServer:
    def __init__(
        self,
        model: SpanModel,
        served: ServedModel,
        settings: ServerSettings,
        credential: Credential,
        *,
        registry: Registry | None = None,
        registry_address: str | None = None,
        trust: TrustContext | None = None,
        attestation: str | Path | None = None,
        audit: AuditSink | None = None,
        on_transfer: TransferHook | None = None,
        adapter_keys: AdapterKeys | None = None,
    ) -> None:
        """``trust`` is what the server enforces (default: public data only, no revocation list);
        ``attestation`` is the server's token, or the file it is in (re-read when it changes);
        ``audit`` receives a record of every transfer and refusal (the CLI passes the server's
        ``AuditLog``); ``on_transfer`` is an extra observer (tests). ``registry_address`` names the
        registry in logs and :attr:`announce_status`. ``adapter_keys``: the adapter-signing keys whose
        LoRA adapters (from ``settings.adapter_store``) this server applies when a request names one."""
        self.model = model
        self.served = served
        self.settings = settings
        self.credential = credential
        self.node_id = credential.spiffe_id
        self.registry = registry
        self.announcer = (
            Announcer(
                registry,
                self.record,
                ttl_seconds=settings.announce_ttl_seconds,
                registry_address=registry_address,
            )
            if registry is not None
            else None
        )
        if trust is None:
            trust = TrustContext.public_only(load_certificate(credential.read()[0]))
        self.trust = trust
        if attestation and trust.policy is None:
            raise ConfigurationError(
                "an attestation needs the trust settings (authority keys, policy) to check it"
            )
        self._own = None
        if attestation:
            token, path = (attestation, None) if isinstance(attestation, str) else (None, attestation)
            self._own = OwnAttestation(credential, trust, token=token, path=path)
        self.attestation = self._own.token if self._own else None
        self.claims = self._own.claims if self._own else None
        model_ref = ModelRef(
            id=served.model_id, num_blocks=served.num_blocks, manifest_sha256=served.manifest_digest
        )
        self.audit = ServerAuditTrail(audit, node_id=self.node_id, model=model_ref, claims=self.claims)
        self.guard = ServeGuard(
            credential, model_ref, trust=trust, own_claims=self.claims, on_denial=self.audit.denial
        )
        self._on_transfer = on_transfer
        self.adapters = self._adapters(model, settings, adapter_keys)
        self.budget = CacheBudget(settings.cache_budget_bytes)
        self.sessions = SessionManager(
            self.budget,
            new_cache=model.new_cache,
            bytes_per_token=lambda span: cache_bytes_per_token(model.config, span, model.dtype),
            max_session_length=settings.max_session_length,
            idle_timeout_seconds=settings.session_idle_timeout_seconds,
            wait_seconds=settings.cache_wait_seconds,
            on_close=self.audit.session_closed,
        )
        self.throughput = 0.0
        self.admission = Admission(
            Limits(
                max_streams=settings.max_streams,
                max_streams_per_client=settings.max_streams_per_client,
                max_calls_per_client=settings.max_calls_per_client,
            ),
            department_of=lambda client: settings.departments.get(client, DEFAULT_DEPARTMENT),
            quotas=settings.quotas,
        )
        self.compute = ComputeQueue(weight_of=self.admission.weight_of)
        self.address: str | None = None
        self._grpc: AioServerThread | None = None
        self._audit_writer: AuditWriter | None = None
        self._stopping = threading.Event()
        self._background: threading.Thread | None = None
        self._closed = False

    def _adapters(self, model: SpanModel, settings: ServerSettings, keys: AdapterKeys | None) -> SpanAdapters:
        """The adapters of this span: from the configured store, for the model served, signed by ``keys``."""
        if settings.adapter_store is None:
            return SpanAdapters.none(model)
        from fincluster.adapters.store import AdapterStore

        return SpanAdapters(
            model,
            store=AdapterStore(settings.adapter_store),
            keys=keys or AdapterKeys([]),
            base_manifest_sha256=self.served.manifest_digest,
        )

    @property
    def announced(self) -> bool:
        """Whether the registry holds this server's current record (its last announce succeeded)."""
        return self.announcer is not None and self.announcer.announced

    @property
    def announce_status(self) -> str:
        return self.announcer.status if self.announcer is not None else "no registry configured"

    def info(self) -> pb.ServerInfo:
        return pb.ServerInfo(
            node_id=self.node_id,
            model_id=self.served.model_id,
            manifest_digest=self.served.manifest_digest,
            span=span_to_wire(self.model.span),
            hidden_size=self.model.config.hidden_size,
            dtype=wire_dtype(self.model.dtype),
            cache_bytes_total=self.budget.total_bytes,
            cache_bytes_free=self.budget.free_bytes,
            max_session_length=self.settings.max_session_length,
            max_message_bytes=self.settings.max_message_bytes,
        )

    def record(self) -> pb.ServerRecord:
        if self.address is None:
            raise ClosedError("the server has not been started")
        return pb.ServerRecord(
            node_id=self.node_id,
            address=self.address,
            model_id=self.served.model_id,
            manifest_digest=self.served.manifest_digest,
            span=span_to_wire(self.model.span),
            throughput=self.throughput,
            cache_bytes_free=self.budget.free_bytes,
            num_blocks=self.served.num_blocks,
            attestation=self.attestation or "",
            evidence_kind=SIGNED_SOFTWARE_EVIDENCE if self.attestation else "",
        )

    def start(self) -> str:
        """Bind, serve, announce; returns the address clients should dial."""
        if self._closed:
            raise ClosedError("this server was stopped; create a new one")
        _, cert_pem, _ = self.credential.read()
        check_advertised(
            self.settings.public_address,
            self.settings.host,
            load_certificate(cert_pem),
            flag="--public-address (server.public_address)",
            registry_address=self.announcer.registry_address if self.announcer is not None else None,
        )
        self.throughput = measure_throughput(self.model)
        limit = self.settings.max_message_bytes
        settings = self.settings
        self.compute.start()
        self._audit_writer = AuditWriter(self._observe)
        servicer = BlockServicer(
            BlockRunner(self.model, max_stateless_tokens=settings.max_session_length, adapters=self.adapters),
            self.sessions,
            self.guard,
            self.info,
            compute=self.compute,
            admission=self.admission,
            limits=StreamLimits(
                first_message_seconds=settings.first_message_seconds,
                idle_seconds=settings.session_idle_timeout_seconds,
            ),
            revocations=self.trust.revocations,
            audit=self._audit_writer,
            clock=self.trust.clock,
        )
        self._grpc = AioServerThread(
            lambda server: pb_grpc.add_BlockServiceServicer_to_server(servicer, server),  # type: ignore[no-untyped-call]
            address=f"{settings.host}:{settings.port}",
            credentials=server_credentials(self.credential),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
            name="block-rpc",
        )
        port = self._grpc.start()
        self.address = self.settings.public_address or join_host_port(self.settings.host, port)
        self._background = threading.Thread(target=self._maintain, name="server-maintenance", daemon=True)
        self._background.start()
        log.info("server_started", node=self.node_id, address=self.address, blocks=str(self.model.span))
        return self.address

    def _observe(self, transfer: Transfer) -> None:
        self.audit.transfer(transfer)
        if self._on_transfer is not None:
            self._on_transfer(transfer)

    def _maintain(self) -> None:
        """Refresh the announcement (TTL heartbeat) and expire idle sessions until stopped."""
        while not self._stopping.is_set():
            if self._own is not None and self._own.refresh():  # a new token, or one no longer valid
                self.attestation, self.claims = self._own.token, self._own.claims
                self.guard.own_claims = self.audit.claims = self.claims
                if self.announcer is not None:
                    self.announcer.soon()
            for session_id in self.sessions.expire_idle():
                log.info("session_expired", session=session_id)
            if self.audit.sink is not None:
                self.audit.sink.checkpoint_if_due()
            if self.announcer is not None:
                self.announcer.tick()
            self._stopping.wait(0.2)

    def stop(self, grace_seconds: float | None = None) -> None:
        """Withdraw, drain running calls for the grace period, then close every session."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._background is not None:
            self._background.join()
        if self.announcer is not None:
            self.announcer.withdraw(self.node_id)
        grace = self.settings.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        if self._grpc is not None:
            self._grpc.stop(grace)
        self.compute.stop()
        if self._audit_writer is not None:
            self._audit_writer.close()
        self.sessions.close_all()
        log.info("server_stopped", node=self.node_id)

    def wait(self) -> None:
        if self._grpc is not None:
            self._grpc.wait()

    def __enter__(self) -> BlockServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
