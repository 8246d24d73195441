"""Prometheus metrics of block servers (and, optionally, of clients), and their HTTP endpoint.

Each server keeps its metrics in a registry of its own (several servers may share a process in tests
and the demo; nothing global is touched on import). ``server.metrics_port`` turns the endpoint on
(``GET /metrics``, Prometheus text format), bound to ``server.metrics_host`` (loopback by default).
The metrics are counts, sizes and timings only: no activation, token, prompt or session content
ever reaches them, and labels are low-cardinality names (operation, priority class, result).
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fincluster.errors import ConfigurationError

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def session_end(reason: str) -> str:
    """The label of how a session ended (``closed``, ``expired``, ``stream_ended``, ``shutdown`` or
    ``other``), from the reason the session manager recorded."""
    for label, start in (
        ("expired", "expired"),
        ("stream_ended", "closed: the stream ended"),
        ("shutdown", "closed: the server shut down"),
        ("closed", "closed"),
    ):
        if reason.startswith(start):
            return label
    return "other"


class ServerMetrics:
    """What one block server counts; the gauges read the server's state when scraped."""

    def __init__(
        self,
        *,
        sessions_open: Callable[[], float],
        cache_bytes_used: Callable[[], float],
        cache_bytes_total: Callable[[], float],
        queue_length: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        Gauge("fincluster_sessions_open", "Inference sessions open", registry=registry).set_function(
            sessions_open
        )
        Gauge(
            "fincluster_cache_bytes_used", "KV-cache bytes reserved by sessions", registry=registry
        ).set_function(cache_bytes_used)
        Gauge("fincluster_cache_bytes_total", "KV-cache budget in bytes", registry=registry).set_function(
            cache_bytes_total
        )
        Gauge(
            "fincluster_queue_length", "Computations waiting for the worker", registry=registry
        ).set_function(queue_length)
        self.sessions_closed = Counter(
            "fincluster_sessions_closed", "Inference sessions ended, by how", ["end"], registry=registry
        )
        self.steps = Counter(
            "fincluster_steps",
            "Computations served (inference_step, replay, forward, backward)",
            ["operation"],
            registry=registry,
        )
        self.tokens = Counter(
            "fincluster_tokens", "Tokens computed, by operation", ["operation"], registry=registry
        )
        self.compute_seconds = Histogram(
            "fincluster_compute_seconds",
            "Time of one computation on the worker, by priority class (interactive = session steps)",
            ["priority"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "fincluster_queue_wait_seconds",
            "Time a computation waited for the worker, by priority class",
            ["priority"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.policy_denials = Counter(
            "fincluster_policy_denials", "Calls the serve policy refused", registry=registry
        )
        self.announces = Counter(
            "fincluster_announces", "Announcements to the registry, by result", ["result"], registry=registry
        )
        self.span_moves = Counter(
            "fincluster_span_moves",
            "Times this server moved to other blocks (--blocks auto)",
            registry=registry,
        )

    def announced(self, ok: bool) -> None:
        self.announces.labels(result="ok" if ok else "failed").inc()

    def job_done(self, priority: str, waited: float, ran: float) -> None:
        self.queue_seconds.labels(priority=priority).observe(waited)
        self.compute_seconds.labels(priority=priority).observe(ran)


class ClientMetrics:
    """What a client counts (``Swarm(metrics=ClientMetrics())``); serve it with :class:`MetricsEndpoint`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.failovers = Counter(
            "fincluster_client_failovers",
            "Hops replaced after a node failed or refused, by error class",
            ["error"],
            registry=self.registry,
        )
        self.routes = Counter("fincluster_client_routes", "Chains planned", registry=self.registry)


class MetricsEndpoint:
    """``GET /metrics`` over plain HTTP for one metrics registry; no socket until :meth:`start`."""

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        self.registry, self.host, self.port = registry, host, port
        self._httpd: WSGIServer | None = None

    def start(self) -> int:
        """Bind and serve on a daemon thread; returns the bound port."""
        try:
            httpd, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as error:
            raise ConfigurationError(f"cannot serve metrics on {self.host}:{self.port}: {error}") from None
        self._httpd = httpd
        port: int = httpd.server_address[1]
        return port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
