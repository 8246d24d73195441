"""``fincluster status``: the swarm as the registry lists it and as its nodes answer now.

For every listed node: its span (and the span it is moving to), attested tier (verified when the
authority key is given, else "unverified"), health (a gRPC health check), load (queue, KV cache,
sessions), and the route cost a client would see — measured round trip, compute, queue wait, load
penalty (``fincluster.client.routing.hop_cost``) — for its whole span. Then how many serving nodes
cover each block, with the gaps (blocks no serving node covers) called out. As a table, or JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import grpc

from fincluster.bootstrap import trust_from_settings
from fincluster.client.routing import hop_cost, load_warnings
from fincluster.errors import TrustError
from fincluster.health import CLASSIFIED_DATA, check
from fincluster.registry.service import RegistryClient
from fincluster.settings import TrustSettings
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Credential
from fincluster.trust.tls import channel_credentials, expected_server_identity
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc

SERVING = "SERVING"


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    name: str
    address: str
    blocks: str
    moving_to: str | None
    auto_placed: bool
    tier: str
    health: str
    classified_health: str  # ``fincluster.health.CLASSIFIED_DATA``: may it serve data above public now
    throughput_blocks_per_s: float
    rtt_ms: float | None
    queue_length: int
    cache_bytes_free: int
    cache_bytes_total: int
    open_sessions: int
    warnings: list[str]
    cost_ms: dict[str, float]


@dataclass(frozen=True)
class CoverageRun:
    """Consecutive blocks covered by the same number of serving nodes (0: a gap)."""

    blocks: str
    serving_nodes: int
    listed_nodes: int


@dataclass(frozen=True)
class SwarmStatus:
    model_id: str
    num_blocks: int
    nodes: list[NodeStatus]
    coverage: list[CoverageRun]
    gaps: list[str] = field(default_factory=list)


def _tier(record: pb.ServerRecord, trust: TrustContext) -> str:
    if not trust.verifies_attestations:
        return "unverified" if record.attestation else "unattested"
    try:
        claims = trust.verify_record(record)
    except TrustError:
        return "INVALID"
    return claims.tier.value if claims is not None else "unattested"


def _probe(channel: grpc.Channel, timeout: float) -> tuple[str, str, float | None]:
    """Health overall and for classified data, and the round trip of an Info call in seconds (None
    when it fails)."""
    health = check(channel, timeout=timeout)
    classified = check(channel, service=CLASSIFIED_DATA, timeout=timeout)
    started = time.perf_counter()
    try:
        pb_grpc.BlockServiceStub(channel).Info(pb.InfoRequest(), timeout=timeout)
    except grpc.RpcError:
        return health, classified, None
    return health, classified, time.perf_counter() - started


def node_status(
    record: pb.ServerRecord, *, health: str, rtt: float | None, tier: str, classified_health: str
) -> NodeStatus:
    blocks = record.span.end - record.span.start
    cost = hop_cost(record, blocks, rtt if rtt is not None else 0.0)
    warnings = load_warnings(record)
    if record.attestation and health == SERVING and classified_health == "NOT_SERVING":
        warnings.append("public data only: its own attestation is not valid now")
    return NodeStatus(
        node_id=record.node_id,
        name=record.node_id.rsplit("/", 1)[-1],
        address=record.address,
        blocks=f"{record.span.start}:{record.span.end}",
        moving_to=f"{record.moving_to.start}:{record.moving_to.end}"
        if record.HasField("moving_to")
        else None,
        auto_placed=record.auto_placed,
        tier=tier,
        health=health,
        classified_health=classified_health,
        throughput_blocks_per_s=round(record.throughput, 1),
        rtt_ms=round(rtt * 1000, 3) if rtt is not None else None,
        queue_length=record.queue_length,
        cache_bytes_free=record.cache_bytes_free,
        cache_bytes_total=record.cache_bytes_total,
        open_sessions=record.open_sessions,
        warnings=warnings,
        cost_ms=cost.as_log() if rtt is not None else {},
    )


def coverage_of(nodes: list[NodeStatus], num_blocks: int) -> tuple[list[CoverageRun], list[str]]:
    """Runs of blocks by how many serving (and listed) nodes cover them, and the gaps."""
    serving, listed = [0] * num_blocks, [0] * num_blocks
    for node in nodes:
        start, end = (int(part) for part in node.blocks.split(":"))
        for block in range(start, min(end, num_blocks)):
            listed[block] += 1
            serving[block] += node.health == SERVING
    runs: list[CoverageRun] = []
    start = 0
    for block in range(1, num_blocks + 1):
        if block == num_blocks or (serving[block], listed[block]) != (serving[start], listed[start]):
            runs.append(CoverageRun(f"{start}:{block}", serving[start], listed[start]))
            start = block
    return runs, [run.blocks for run in runs if run.serving_nodes == 0]


def gather_status(
    registry_address: str,
    model_id: str,
    *,
    credential: Credential,
    trust_settings: TrustSettings,
    timeout_seconds: float = 2.0,
) -> SwarmStatus:
    """List the model's servers and ask each of them (health, round trip) over mTLS."""
    trust = trust_from_settings(trust_settings, credential)
    credentials = channel_credentials(credential)
    channels: list[grpc.Channel] = []
    try:
        channel = grpc.secure_channel(registry_address, credentials)
        channels.append(channel)
        registry = RegistryClient(channel, timeout_seconds=timeout_seconds * 5, address=registry_address)
        records = registry.list(model_id)
        nodes = []
        for record in records:
            node_channel = grpc.secure_channel(
                record.address, credentials, options=expected_server_identity(record.node_id)
            )
            channels.append(node_channel)
            health, classified, rtt = _probe(node_channel, timeout_seconds)
            nodes.append(
                node_status(
                    record, health=health, rtt=rtt, tier=_tier(record, trust), classified_health=classified
                )
            )
    finally:
        for open_channel in channels:
            open_channel.close()
    num_blocks = max((r.num_blocks for r in records), default=0)
    coverage, gaps = coverage_of(nodes, num_blocks)
    if not records:
        gaps = ["all (no node is listed for this model)"]
    return SwarmStatus(model_id, num_blocks, nodes, coverage, gaps)


def render_json(status: SwarmStatus) -> str:
    return json.dumps(asdict(status), indent=2)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f}"


def render_table(status: SwarmStatus) -> str:
    """Nodes, then coverage; a gap is marked ``GAP`` and listed below."""
    serving = sum(node.health == SERVING for node in status.nodes)
    lines = [
        f"swarm of {status.model_id}: {status.num_blocks} blocks, {len(status.nodes)} nodes listed, "
        f"{serving} serving"
    ]
    header: tuple[str, ...] = ("NODE", "ADDRESS", "BLOCKS", "TIER", "HEALTH", "BLOCKS/S", "RTT MS", "QUEUE")
    header += ("CACHE MIB", "SESSIONS", "COST MS/TOKEN (rtt+compute+queue+load)")
    rows: list[tuple[str, ...]] = [header]
    for node in status.nodes:
        blocks = (
            node.blocks
            + (f" -> {node.moving_to}" if node.moving_to else "")
            + (" auto" if node.auto_placed else "")
        )
        cost = node.cost_ms
        terms = (
            f"{cost['total_ms']:.1f} = {cost['rtt_ms']:.1f}+{cost['compute_ms']:.1f}+{cost['queue_ms']:.1f}"
            f"+{cost['load_ms']:.0f}"
            if cost
            else "-"
        )
        rows.append(
            (
                node.name,
                node.address,
                blocks,
                node.tier,
                node.health,
                f"{node.throughput_blocks_per_s:.0f}",
                f"{node.rtt_ms:.1f}" if node.rtt_ms is not None else "-",
                str(node.queue_length),
                f"{_mib(node.cache_bytes_free)}/{_mib(node.cache_bytes_total)} free",
                str(node.open_sessions),
                terms + (f"  ({', '.join(node.warnings)})" if node.warnings else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("")
    lines.append("coverage (serving nodes per block; listed in brackets when they differ):")
    for run in status.coverage:
        count = "GAP" if run.serving_nodes == 0 else f"x{run.serving_nodes}"
        listed = f" [{run.listed_nodes} listed]" if run.listed_nodes != run.serving_nodes else ""
        lines.append(f"  blocks {run.blocks:>7}  {count}{listed}")
    if status.gaps:
        lines.append(f"GAPS: no serving node for blocks {', '.join(status.gaps)}")
    else:
        lines.append("every block is covered")
    return "\n".join(lines)
