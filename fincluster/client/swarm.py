"""A client's connection to one swarm: the registry, mTLS channels to servers, and routing."""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal, Protocol

import grpc

from fincluster.audit import AuditLog, AuditSettings, AuditSink
from fincluster.audit.node import open_node_audit_log
from fincluster.client.audit_trail import ClientAuditTrail
from fincluster.client.chain import FailoverPolicy
from fincluster.client.failover import Bans
from fincluster.client.placement import PlacementGuard, PlacementRequest, Verdict
from fincluster.client.routing import Hop, plan_route
from fincluster.client.transport import CallObserver, GrpcSpanClient, NodeBinding, SpanClient
from fincluster.client.verification import SpanRunner, SpotChecker, VerificationPolicy
from fincluster.errors import (
    CapacityError,
    ClosedError,
    MovedError,
    RefusedError,
    RegistryError,
    RemoteError,
    RoutingError,
    SessionError,
)
from fincluster.logs import get_logger
from fincluster.metrics import ClientMetrics
from fincluster.registry.backend import Registry
from fincluster.registry.service import RegistryClient
from fincluster.settings import ClientSettings
from fincluster.spans import BlockSpan
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Credential, load_certificate
from fincluster.trust.policy import Classification
from fincluster.trust.tls import channel_credentials, expected_server_identity
from fincluster.wire import fincluster_pb2 as pb

DEFAULT_AUDIT_DIRECTORY = Path("fincluster-audit")
MAX_REPLANS = 8
log = get_logger(__name__)


class ChainPlanner(Protocol):
    """What a model needs from a swarm: span clients that cover ``blocks``, and replacements for one
    that failed."""

    @property
    def audit(self) -> AuditSink | None: ...

    @property
    def trail(self) -> ClientAuditTrail | None: ...

    @property
    def failover(self) -> FailoverPolicy: ...

    @property
    def closed(self) -> bool: ...

    @property
    def verifies_attestations(self) -> bool:
        """Whether node tiers can be known (attestations are verified): tier pins need it."""
        ...

    @property
    def max_batch_tokens(self) -> int | None:
        """Tokens one stateless request may carry before a pass is split into micro-batches."""
        ...

    def plan_chain(
        self,
        request: PlacementRequest,
        blocks: BlockSpan,
        *,
        session_id: str,
        exclude: frozenset[str] = frozenset(),
        at_random: bool = False,
    ) -> Sequence[SpanClient]: ...

    def node_failed(self, node: SpanClient, error: BaseException, *, span: BlockSpan) -> None: ...

    def spot_checker(self, classification: Classification, run_elsewhere: SpanRunner) -> SpotChecker | None:
        """What re-executes a sample of nodes' outputs for ``classification`` (None: nothing is)."""
        ...


class LocalSwarm:
    """Span clients fixed in advance (in-process spans, or a given chain): no registry, no routing."""

    audit: AuditSink | None = None  # nothing leaves the process
    trail: ClientAuditTrail | None = None
    failover = FailoverPolicy(attempts=0)
    closed = False
    verifies_attestations = False  # in-process spans carry no attestation
    max_batch_tokens: int | None = None

    def __init__(self, clients: Sequence[SpanClient]) -> None:
        self.clients = list(clients)

    def node_failed(self, node: SpanClient, error: BaseException, *, span: BlockSpan) -> None:
        """In-process spans are never avoided (there is nothing else)."""

    def spot_checker(self, classification: Classification, run_elsewhere: SpanRunner) -> None:
        """In-process spans are not attested, so nothing is re-executed."""

    def plan_chain(
        self,
        request: PlacementRequest,
        blocks: BlockSpan,
        *,
        session_id: str,
        exclude: frozenset[str] = frozenset(),
        at_random: bool = False,
    ) -> Sequence[SpanClient]:
        if exclude:
            raise RoutingError(f"in-process spans have no replacement for blocks {blocks}")
        covered = [c.span for c in self.clients]
        if (
            not covered
            or covered[0].start != blocks.start
            or covered[-1].end != blocks.end
            or any(a.end != b.start for a, b in itertools.pairwise(covered))
        ):
            raise RoutingError(f"local spans {[str(s) for s in covered]} do not chain over blocks {blocks}")
        return self.clients


class Swarm:
    """Servers of a swarm as seen by one client identity.

    ``registry`` is the registry's ``host:port`` (reached over mTLS with ``credential``) or any
    ``Registry`` object. ``trust`` enables attestation checks and route policy (without it only public
    data may leave the client: :meth:`TrustContext.public_only`). ``audit`` is where the client's audit
    trail goes: by default an ``AuditLog`` in ``./fincluster-audit/client-<name>.sqlite`` signed with
    the client's TLS key; ``None`` turns it off, which only public data allows. ``metrics`` counts
    routes and failovers (Prometheus; serve them with ``fincluster.metrics.MetricsEndpoint``).
    Channels are cached per address and closed, with a default audit log, by ``close()``.
    """

    def __init__(
        self,
        *,
        registry: str | Registry,
        credential: Credential,
        settings: ClientSettings | None = None,
        trust: TrustContext | None = None,
        audit: AuditSink | Literal["default"] | None = "default",
        metrics: ClientMetrics | None = None,
    ) -> None:
        self.credential = credential
        self.metrics = metrics
        self.client_id = credential.spiffe_id
        self.settings = settings or ClientSettings()
        if trust is None:
            trust = TrustContext.public_only(load_certificate(credential.read()[0]))
        self.trust = trust
        self._owned_log: AuditLog | None = None
        self.last_guard: PlacementGuard | None = None
        self.last_route: list[tuple[Hop, Verdict]] = []
        self.bans = Bans(self.settings.ban_seconds)
        self.verification = (
            VerificationPolicy.from_policy_data(trust.policy.bundle.data)
            if trust.policy is not None
            else VerificationPolicy()
        )
        # which outputs are re-executed must not be predictable by the nodes (tests may seed one)
        self.rng: random.Random = random.SystemRandom()
        self.failover = FailoverPolicy(
            attempts=self.settings.failover_attempts,
            backoff_seconds=self.settings.failover_backoff_seconds,
            backoff_max_seconds=self.settings.failover_backoff_max_seconds,
        )
        self._credentials = channel_credentials(credential)
        self._channels: dict[str, grpc.Channel] = {}
        self._rtt: dict[str, tuple[float, float]] = {}  # address -> (measured at, seconds)
        self._lock = threading.Lock()
        self._closed = False
        if isinstance(registry, str):
            client = RegistryClient(
                self._channel(registry),
                timeout_seconds=self.settings.request_timeout_seconds,
                address=registry,
            )
            try:
                client.check()  # a wrong address or CA is told now, in words, not at the first generate
            except RegistryError:
                self.close()
                raise
            self.registry: Registry = client
        else:
            self.registry = registry
        if audit == "default":
            self._owned_log = open_node_audit_log(
                AuditSettings(directory=DEFAULT_AUDIT_DIRECTORY), credential
            )
            audit = self._owned_log
        self.audit: AuditSink | None = audit
        self.trail = ClientAuditTrail(self.audit, client_id=self.client_id)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def verifies_attestations(self) -> bool:
        return self.trust.verifies_attestations

    @property
    def max_batch_tokens(self) -> int | None:
        return self.settings.max_batch_tokens

    def _channel(self, address: str, identity: str | None = None) -> grpc.Channel:
        """Channel to ``address``; with ``identity``, the TLS handshake must prove that server identity."""
        if self._closed:
            raise ClosedError("swarm connection is closed")
        key = f"{identity or ''}@{address}"
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                limit = self.settings.max_message_bytes
                options: list[tuple[str, object]] = [
                    ("grpc.max_receive_message_length", limit),
                    ("grpc.max_send_message_length", limit),
                ]
                if identity is not None:
                    options.extend(expected_server_identity(identity))
                channel = grpc.secure_channel(address, self._credentials, options=options)
                self._channels[key] = channel
            return channel

    def span_client(
        self,
        record: pb.ServerRecord,
        *,
        classification: str = "public",
        binding: NodeBinding | None = None,
        observer: CallObserver | None = None,
        span: BlockSpan | None = None,
    ) -> GrpcSpanClient:
        return GrpcSpanClient(
            record,
            self._channel(record.address, record.node_id),
            timeout_seconds=self.settings.request_timeout_seconds,
            step_timeout_seconds=self.settings.step_timeout_seconds,
            client_id=self.client_id,
            classification=classification,
            binding=binding or NodeBinding(record.node_id, None, None),
            certificates=self.trust.certificates,
            observer=observer,
            span=span,
        )

    def rtt(self, record: pb.ServerRecord) -> float:
        """Measured round trip of an Info call to ``record``'s server (cached per address for
        ``rtt_refresh_seconds``); infinite (never routed to) for a banned or unreachable node."""
        if self.bans.is_banned(record.node_id):
            return math.inf
        now = time.monotonic()
        cached = self._rtt.get(record.address)
        if cached is None or now - cached[0] > self.settings.rtt_refresh_seconds:
            client = self.span_client(record)
            started = time.perf_counter()
            try:
                client.info()
            except RemoteError:
                return math.inf  # unreachable now: not routed to, and measured again next time
            cached = (now, time.perf_counter() - started)
            self._rtt[record.address] = cached
        return cached[1]

    def _random_cost(self, record: pb.ServerRecord) -> float:
        """A random cost for every reachable node: routing then picks any allowed node, still
        preferring fewer hops."""
        return math.inf if math.isinf(self.rtt(record)) else self.rng.random()

    def route(
        self,
        request: PlacementRequest,
        blocks: BlockSpan,
        *,
        session_id: str,
        exclude: frozenset[str] = frozenset(),
        at_random: bool = False,
    ) -> list[tuple[Hop, Verdict]]:
        """The cheapest chain over ``blocks`` of nodes that attestation, policy and pins allow
        (``at_random``: a random one among them, for verifiers a checked node cannot predict).

        The decision (or the denials that made it impossible) goes to the audit trail.
        """
        listed = self.registry.list(request.model.id)
        records = [r for r in listed if r.node_id not in exclude]
        banned = sorted(r.node_id for r in records if self.bans.is_banned(r.node_id))
        guard = PlacementGuard(self.trust, self.client_id, request)
        self.last_guard = guard
        try:
            for _ in range(MAX_REPLANS):
                hops = plan_route(
                    records, blocks, rtt=self._random_cost if at_random else self.rtt, allow=guard.allows
                )
                if not guard.confirm([(hop.record, hop.span) for hop in hops]):
                    break
            else:
                raise RoutingError(f"cannot route blocks {blocks}: policy kept refusing the planned hops")
        except RoutingError as error:
            self.trail.judged(guard, session_id)
            avoided = "".join(
                f"; not used: {node} failed ({self.bans.reason(node)})" for node in banned
            ) + "".join(f"; not used for this request: {node}" for node in sorted(exclude))
            refused = guard.explain(error.missing_blocks)
            raise RoutingError(
                f"{error}{f'; refused: {refused}' if refused else ''}{avoided}",
                missing_blocks=error.missing_blocks,
            ) from None
        chosen = [(hop, guard.judge(hop.record, hop.span)) for hop in hops]
        self.last_route = chosen
        log.debug(
            "route_planned",
            session=session_id,
            blocks=str(blocks),
            hops=[
                {
                    "node": hop.record.node_id,
                    "blocks": str(hop.span),
                    **(hop.cost.as_log() if hop.cost else {}),
                }
                for hop in hops
            ],
        )
        if self.metrics is not None:
            self.metrics.routes.inc()
        self.trail.judged(guard, session_id)
        self.trail.routing(session_id, [(hop.span, verdict) for hop, verdict in chosen])
        return chosen

    def plan_chain(
        self,
        request: PlacementRequest,
        blocks: BlockSpan,
        *,
        session_id: str,
        exclude: frozenset[str] = frozenset(),
        at_random: bool = False,
    ) -> list[SpanClient]:
        observer = partial(self.trail.transfer, request)
        return [
            self.span_client(
                hop.record,
                classification=request.classification.value,
                binding=NodeBinding(hop.record.node_id, verdict.claims, verdict.decision),
                observer=observer,
                span=hop.span,
            )
            for hop, verdict in self.route(
                request, blocks, session_id=session_id, exclude=exclude, at_random=at_random
            )
        ]

    def node_failed(self, node: SpanClient, error: BaseException, *, span: BlockSpan) -> None:
        """A node that is unhealthy (unreachable, too slow, lost the session, misbehaved) is banned for
        a while; one that refused this request (policy, full) or lost its session (expired, restarted)
        is only left out of its replacement, like one that moved to other blocks."""
        if self.metrics is not None:
            self.metrics.failovers.labels(error=type(error).__name__).inc()
        if isinstance(error, RefusedError | CapacityError | SessionError | MovedError):
            return
        seconds = self.bans.ban(node.node_id, str(error))
        log.warning("node_banned", node=node.node_id, seconds=seconds, blocks=str(span), reason=str(error))

    def quarantine(self, node_id: str, reason: str) -> None:
        """Verification found ``node_id``'s output wrong: route around it for ``quarantine_seconds``."""
        seconds = self.bans.ban(node_id, f"quarantined: {reason}", seconds=self.settings.quarantine_seconds)
        log.warning("node_quarantined", node=node_id, seconds=seconds, reason=reason)

    def spot_checker(self, classification: Classification, run_elsewhere: SpanRunner) -> SpotChecker | None:
        sampling = self.verification.sampling(classification)
        if sampling.rate <= 0 or not sampling.tiers:
            return None
        return SpotChecker(
            sampling,
            self.verification.tolerance_for,
            run_elsewhere=run_elsewhere,
            quarantine=self.quarantine,
            record=self.trail.verification,
            rng=self.rng,
        )

    def pinned_hop(
        self, request: PlacementRequest, span: BlockSpan, node_id: str, *, session_id: str
    ) -> GrpcSpanClient:
        """A span client for ``node_id`` computing ``span``, judged like any routed hop."""
        records = [r for r in self.registry.list(request.model.id) if r.node_id == node_id]
        if not records or not BlockSpan(records[0].span.start, records[0].span.end).contains(span):
            raise RoutingError(f"{node_id} does not announce blocks {span}")
        guard = PlacementGuard(self.trust, self.client_id, request)
        verdict = guard.judge(records[0], span)
        self.trail.judged(guard, session_id)
        if not verdict.allowed:
            raise RoutingError(f"cannot move blocks {span} to {node_id}: {guard.explain(span.blocks)}")
        return self.span_client(
            records[0],
            classification=request.classification.value,
            binding=NodeBinding(node_id, verdict.claims, verdict.decision),
            observer=partial(self.trail.transfer, request),
            span=span,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
        if self._owned_log is not None:
            self._owned_log.close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
