"""A block server's lifecycle: load a span, serve it over mTLS gRPC, announce it, shut down cleanly.

Constructing a ``BlockServer`` opens no socket; ``start()`` binds and starts the announce/reaper thread;
``stop()`` turns the health service to NOT_SERVING, withdraws the announcement, refuses new calls,
lets running calls finish within the grace period, then closes every session and frees its cache.
With ``blocks = "auto"`` a :class:`~fincluster.serving.rebalancer.Rebalancer` may move the server
to other blocks while it runs (:meth:`BlockServer.switch_to`); metrics (``fincluster.metrics``) and
the gRPC health service (``fincluster.health``) are kept here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from transformers import Cache

from fincluster.adapters.manifest import AdapterKeys
from fincluster.admission import DEFAULT_DEPARTMENT, Admission, Limits
from fincluster.audit import AuditSink
from fincluster.errors import ClosedError, ConfigurationError, MovedError
from fincluster.health import BLOCK_SERVICE, CLASSIFIED_DATA, AioHealth
from fincluster.logs import get_logger
from fincluster.metrics import MetricsEndpoint, ServerMetrics, session_end
from fincluster.net import check_advertised, join_host_port
from fincluster.registry.backend import Registry
from fincluster.rpc import AioServerThread, run_on_loop
from fincluster.serving.adapters import SpanAdapters
from fincluster.serving.announcer import Announcer
from fincluster.serving.audit_trail import ServerAuditTrail
from fincluster.serving.batching import step_batch_runner
from fincluster.serving.fast_step import StepEngine
from fincluster.serving.guard import Denial, ServeGuard
from fincluster.serving.quant import quantize, weight_bytes_per_block
from fincluster.serving.rebalancer import Rebalancer, block_rules
from fincluster.serving.runner import BlockRunner
from fincluster.serving.scheduler import ComputeQueue, Priority
from fincluster.serving.service import AuditWriter, BlockServicer, StreamLimits, Transfer, TransferHook
from fincluster.serving.sessions import CacheBudget, Session, SessionManager
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
from fincluster.values import Quantization, TensorDType
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
    quantization: Quantization = Quantization.NONE,
) -> SpanModel:
    """Load only ``span``'s weights from ``store`` (each file checked against the manifest), quantized
    as asked (``fincluster.serving.quant``); ``progress(done, total)`` is called after each block."""
    config = store.load_config()
    blocks = {}
    for done, index in enumerate(span.blocks, start=1):
        blocks[index] = store.load_block_state(index)
        if progress is not None:
            progress(done, len(span))
    torch_dtype = TensorDType(dtype).torch_dtype
    if quantization is Quantization.NONE:
        return SpanModel(config, span, blocks, dtype=torch_dtype, device=device)
    return quantize(SpanModel(config, span, blocks, dtype=torch_dtype), quantization, device)


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
        store: ModelStore | None = None,
        adapter_keys: AdapterKeys | None = None,
    ) -> None:
        """``trust`` is what the server enforces (default: public data only, no revocation list);
        ``attestation`` is the server's token, or the file it is in (re-read when it changes);
        ``audit`` receives a record of every transfer and refusal (the CLI passes the server's
        ``AuditLog``); ``on_transfer`` is an extra observer (tests). ``registry_address`` names the
        registry in logs and :attr:`announce_status`. ``store`` is where a server with
        ``blocks = "auto"`` loads the blocks it moves to (it needs a registry too). ``adapter_keys``:
        the adapter-signing keys whose LoRA adapters (from ``settings.adapter_store``) this server
        applies when a request names one."""
        if settings.blocks == "auto" and (store is None or registry is None):
            raise ConfigurationError('blocks = "auto" needs the model store and a registry to place against')
        self.store = store
        self._adapter_keys = adapter_keys
        self.model = model
        self.served = served
        self.settings = settings
        self.credential = credential
        self.node_id = credential.spiffe_id
        self.registry = registry
        self.budget = CacheBudget(settings.cache_budget_bytes)
        self.weight_bytes_per_block = weight_bytes_per_block(model)
        self.engine = self._engine_for(model)
        self.adapters = self._adapters(model)
        self.runner = BlockRunner(
            model,
            max_stateless_tokens=settings.max_session_length,
            engine=self.engine,
            adapters=self.adapters,
        )
        self.compute = ComputeQueue(
            weight_of=lambda client: self.admission.weight_of(client),
            on_job=lambda priority, waited, ran: self.metrics.job_done(priority.name.lower(), waited, ran),
            batch=step_batch_runner(self.runner) if self.engine.batches else None,
            max_batch=settings.max_batch_size,
        )
        self.sessions = SessionManager(
            self.budget,
            new_cache=self._new_cache,
            release_cache=lambda cache: self.engine.release(cache),
            bytes_per_token=lambda span: cache_bytes_per_token(model.config, span, model.dtype),
            max_session_length=settings.max_session_length,
            idle_timeout_seconds=settings.session_idle_timeout_seconds,
            wait_seconds=settings.cache_wait_seconds,
            on_close=self._session_closed,
        )
        self.metrics = ServerMetrics(
            sessions_open=lambda: len(self.sessions),
            cache_bytes_used=lambda: self.budget.total_bytes - self.budget.free_bytes,
            cache_bytes_total=lambda: self.budget.total_bytes,
            queue_length=lambda: self.compute.length,
        )
        self.health = AioHealth(BLOCK_SERVICE)
        self.moving_to: BlockSpan | None = None
        self.announcer = (
            Announcer(
                registry,
                self.record,
                ttl_seconds=settings.announce_ttl_seconds,
                registry_address=registry_address,
                on_result=lambda ok: self.metrics.announced(ok),
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
        self.model_ref = model_ref
        self.guard = ServeGuard(
            credential, model_ref, trust=trust, own_claims=self.claims, on_denial=self._denied
        )
        self._on_transfer = on_transfer
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
        self.address: str | None = None
        self._rebalancer: Rebalancer | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.metrics_port: int | None = None
        self._grpc: AioServerThread | None = None
        self._audit_writer: AuditWriter | None = None
        self._stopping = threading.Event()
        self._expiry_logged: str | None = None  # the attestation whose expiry was last logged
        self._background: threading.Thread | None = None
        self._closed = False

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
            quantization=self.model.quantization.value,
            weight_bytes_per_block=self.weight_bytes_per_block,
            step_strategy=self.engine.strategy.value,
            max_batch_size=self.settings.max_batch_size if self.engine.batches else 1,
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
            quantization=self.model.quantization.value,
            weight_bytes=sum(self.weight_bytes_per_block),
            queue_length=self.compute.length,
            cache_bytes_total=self.budget.total_bytes,
            network_rtt_seconds=self.announcer.rtt_seconds if self.announcer is not None else 0.0,
            moving_to=span_to_wire(self.moving_to) if self.moving_to is not None else None,
            open_sessions=len(self.sessions),
            auto_placed=self.settings.blocks == "auto",
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
        self.throughput = self.settings.throughput or measure_throughput(self.model)
        limit = self.settings.max_message_bytes
        settings = self.settings
        self.compute.start()
        self._audit_writer = AuditWriter(self._observe)
        servicer = BlockServicer(
            self.runner,
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

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_BlockServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
            self.health.register(server)

        self.health.set(self.announcer is None)  # NOT_SERVING until announced
        self.health.set_named(CLASSIFIED_DATA, self.announcer is None and self._attested_now())
        self._grpc = AioServerThread(
            register,
            address=f"{settings.host}:{settings.port}",
            credentials=server_credentials(self.credential),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
            name="block-rpc",
        )
        port = self._grpc.start()
        self.address = self.settings.public_address or join_host_port(self.settings.host, port)
        if settings.metrics_port is not None:
            self._metrics_endpoint = MetricsEndpoint(
                self.metrics.registry, host=settings.metrics_host, port=settings.metrics_port
            )
            self.metrics_port = self._metrics_endpoint.start()
            log.info("metrics_serving", address=join_host_port(settings.metrics_host, self.metrics_port))
        if settings.blocks == "auto" and self.store is not None and self.registry is not None:
            store = self.store
            self._rebalancer = Rebalancer(
                self,
                self.registry,
                model_id=self.served.model_id,
                rules=lambda: block_rules(
                    self.trust, self.model_ref, node_id=self.node_id, claims=self.claims
                ),
                load=lambda span: load_span_model(store, span, dtype=settings.dtype, device=settings.device),
                interval_seconds=settings.rebalance_seconds,
                min_gain=settings.rebalance_min_gain,
            )
            self._rebalancer.start()
        self._background = threading.Thread(target=self._maintain, name="server-maintenance", daemon=True)
        self._background.start()
        log.info("server_started", node=self.node_id, address=self.address, blocks=str(self.model.span))
        return self.address

    def _observe(self, transfer: Transfer) -> None:
        self.audit.transfer(transfer)
        self.metrics.steps.labels(operation=transfer.operation).inc()
        self.metrics.tokens.labels(operation=transfer.operation).inc(transfer.num_tokens)
        if self._on_transfer is not None:
            self._on_transfer(transfer)

    def _denied(self, denial: Denial) -> None:
        self.metrics.policy_denials.inc()
        self.audit.denial(denial)

    def _session_closed(self, session: Session, reason: str) -> None:
        self.metrics.sessions_closed.labels(end=session_end(reason)).inc()
        self.audit.session_closed(session, reason)

    def _engine_for(self, model: SpanModel) -> StepEngine:
        return StepEngine(
            model,
            self.settings.step_strategy,
            cache_bytes=self.settings.cache_budget_bytes,
            max_length=self.settings.max_session_length,
            max_batch=self.settings.max_batch_size,
        )

    def _adapters(self, model: SpanModel) -> SpanAdapters:
        """The adapters of this span: from the configured store, for the model served, signed by the
        server's adapter keys."""
        if self.settings.adapter_store is None:
            return SpanAdapters.none(model)
        from fincluster.adapters.store import AdapterStore

        return SpanAdapters(
            model,
            store=AdapterStore(self.settings.adapter_store),
            keys=self._adapter_keys or AdapterKeys([]),
            base_manifest_sha256=self.served.manifest_digest,
        )

    def _new_cache(self, span: BlockSpan, *, batch_size: int, max_length: int) -> Cache:
        model = self.model
        if not model.span.contains(span):  # moved between the open's span check and here
            raise MovedError(f"blocks {span} moved away; this server now serves blocks {model.span}")
        return self.engine.new_cache(span, batch_size=batch_size, max_length=max_length)

    # -- moving (blocks = "auto"; see fincluster.serving.rebalancer) ------------------------------

    def announce_intent(self, target: BlockSpan | None) -> bool:
        """Tell the registry this server is about to move to ``target`` (None: no longer)."""
        self.moving_to = target
        return self.announcer.announce_now() if self.announcer is not None else False

    def switch_to(self, model: SpanModel) -> None:
        """Serve ``model`` from now on: switch between two computations, then announce the new span.
        Sessions outside it end at their next step (MovedError: their clients fail over and close
        them). With a static KV pool every session ends at the switch: its slots are laid out for the
        old span's layers."""
        throughput = self.settings.throughput or measure_throughput(model)
        if self._grpc is None or self._closed:
            raise ClosedError("the server is not running")

        def switch() -> None:
            old = self.engine
            self.model = model
            self.engine = self._engine_for(model)
            self.weight_bytes_per_block = weight_bytes_per_block(model)
            self.adapters = self._adapters(model)
            self.runner.move_to(model, self.engine, self.adapters)
            if old.pool is not None:
                self.sessions.close_all(reason="closed: the server moved to other blocks")

        run_on_loop(
            self.compute.run(switch, client=self.node_id, tokens=1, priority=Priority.INTERACTIVE),
            timeout=60,
        )
        self.throughput, self.moving_to = throughput, None
        self.metrics.span_moves.inc()
        if self.announcer is not None:
            self.announcer.announce_now()

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
            healthy = self.announcer is None or self.announcer.announced
            healthy = healthy and (self._audit_writer is None or self._audit_writer.failure is None)
            self.health.set(healthy)
            self.health.set_named(CLASSIFIED_DATA, healthy and self._attested_now())
            self._stopping.wait(0.2)

    def _attested_now(self) -> bool:
        """Whether this server's own attestation is valid now (on the trust context's clock): what
        data above ``public`` needs. Its expiry is logged once."""
        claims = self.guard.own_claims
        if claims is None:
            return False
        if claims.expires_at > self.trust.clock():
            return True
        if self._expiry_logged != claims.attestation_id:
            self._expiry_logged = claims.attestation_id
            log.warning(
                "own_attestation_expired",
                node=self.node_id,
                attestation=claims.attestation_id,
                expired_at=claims.expires_at.isoformat(),
                action="data above public is refused until a valid attestation is in place; "
                "public data is still served",
            )
        return False

    def stop(self, grace_seconds: float | None = None) -> None:
        """Withdraw, drain running calls for the grace period, then close every session."""
        if self._closed:
            return
        self._closed = True
        if self._grpc is not None:
            self.health.drain()
        self._stopping.set()
        if self._rebalancer is not None:
            self._rebalancer.stop()
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
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
        log.info("server_stopped", node=self.node_id)

    def wait(self) -> None:
        if self._grpc is not None:
            self._grpc.wait()

    def __enter__(self) -> BlockServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
