"""Operations: the gRPC health service of servers and the registry, Prometheus /metrics, and
``fincluster status`` (table and JSON) with tiers, load, health and block coverage with gaps."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fincluster.cli import main
from fincluster.health import BLOCK_SERVICE, REGISTRY_SERVICE
from fincluster.metrics import ClientMetrics
from fincluster.registry.service import RegistryClient
from fincluster.serving.server import BlockServer, ServedModel, load_span_model
from fincluster.settings import ServerSettings
from fincluster.spans import BlockSpan
from fincluster.status import SwarmStatus, node_status, render_table
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import encode
from tests.helpers import POLICY_DIR, Pki, TrustKit, running_cluster, spawn_server

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(5))


def health_stub(pki: Pki, address: str) -> health_pb2_grpc.HealthStub:
    channel = grpc.secure_channel(address, channel_credentials(pki.credential(Role.CLIENT, "ops")))
    return health_pb2_grpc.HealthStub(channel)


def status_of(stub: health_pb2_grpc.HealthStub, service: str = "") -> str:
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_a_server_is_serving_once_announced_and_turns_not_serving_when_it_drains(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    with running_cluster(pki, tiny_llama_store, ["0:6"]) as cluster:
        registry_health = health_stub(pki, cluster.registry_address)
        assert status_of(registry_health) == status_of(registry_health, REGISTRY_SERVICE) == "SERVING"
        server = cluster.servers[0]
        stub = health_stub(pki, server.address)
        assert status_of(stub) == status_of(stub, BLOCK_SERVICE) == "SERVING"
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = threading.Thread(target=server.stop, args=(2.0,))
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # draining
        stopping.join()


def test_a_server_that_cannot_announce_is_not_serving(pki: Pki, tiny_llama_store: ModelStore) -> None:
    credential = pki.credential(Role.SERVER, "lonely")
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        address = cluster.registry_address
    # the registry is gone: announcements fail, so the health service says NOT_SERVING
    server = BlockServer(
        load_span_model(tiny_llama_store, BlockSpan(0, 6), dtype="float32", device="cpu"),
        ServedModel.of(tiny_llama_store),
        ServerSettings(announce_ttl_seconds=2, shutdown_grace_seconds=0),
        credential,
        registry=RegistryClient(
            grpc.secure_channel(address, channel_credentials(credential)), timeout_seconds=1
        ),
        registry_address=address,
    )
    server.start()
    try:
        stub = health_stub(pki, server.address)
        assert status_of(stub) == "NOT_SERVING" and not server.announced
    finally:
        server.stop(0)


EXPECTED_METRICS = {
    "fincluster_sessions_open",
    "fincluster_cache_bytes_used",
    "fincluster_cache_bytes_total",
    "fincluster_queue_length",
    "fincluster_sessions_closed",
    "fincluster_steps",
    "fincluster_tokens",
    "fincluster_compute_seconds",
    "fincluster_queue_wait_seconds",
    "fincluster_policy_denials",
    "fincluster_announces",
    "fincluster_span_moves",
}


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics: sample name -> labels -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    families = list(text_string_to_metric_families(text))
    assert {f.name for f in families if not f.name.endswith("_created")} == EXPECTED_METRICS
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_sessions_steps_latency_cache_denials_and_announces(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    with running_cluster(pki, tiny_llama_store, ["0:6"], metrics_port=0, cache_budget_bytes=2**20) as cluster:
        server = cluster.servers[0]
        assert server.metrics_port is not None
        before = scrape(server.metrics_port)
        assert before["fincluster_cache_bytes_total"][()] == 2**20
        assert before["fincluster_sessions_open"][()] == 0
        client_metrics = ClientMetrics()
        with cluster.swarm(settings=None) as swarm:
            swarm.metrics = client_metrics
            cluster.model(swarm).generate(PROMPT, max_new_tokens=4, do_sample=False)
        # a call the serve policy refuses: internal data to a public-only server
        channel = grpc.secure_channel(server.address, channel_credentials(pki.credential(Role.CLIENT, "x")))
        request = pb.ForwardRequest(
            span=pb.BlockSpan(start=0, end=6),
            inputs=pb.SpanInputs(
                hidden_states=encode(torch.zeros(1, 1, 64)),
                attention_mask=encode(torch.ones(1, 1, dtype=torch.int64)),
                position_ids=encode(torch.zeros(1, 1, dtype=torch.int64)),
            ),
            session_id="denied",
            classification="internal",
        )
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.BlockServiceStub(channel).Forward(request, timeout=5)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        channel.close()
        after = scrape(server.metrics_port)
    assert after["fincluster_steps_total"][(("operation", "inference_step"),)] == 4  # prompt + 3 steps
    assert after["fincluster_tokens_total"][(("operation", "inference_step"),)] == 5 + 3
    assert after["fincluster_sessions_closed_total"][(("end", "closed"),)] == 1
    assert after["fincluster_sessions_open"][()] == 0
    assert after["fincluster_cache_bytes_used"][()] == 0
    assert after["fincluster_compute_seconds_count"][(("priority", "interactive"),)] == 4
    assert after["fincluster_queue_wait_seconds_count"][(("priority", "interactive"),)] == 4
    assert after["fincluster_policy_denials_total"][()] == 1
    assert after["fincluster_announces_total"][(("result", "ok"),)] >= 1
    assert client_metrics.routes._value.get() == 1  # type: ignore[attr-defined]


@pytest.fixture()
def attested_swarm(pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path):
    """t (trusted 0:2), s (standard 2:4), and 4:6 served only by a process that is then SIGKILLed
    (its record stays listed for its 30 s TTL)."""
    kit = TrustKit.create(pki)
    authority = tmp_path / "authority.pub"
    authority.write_bytes(
        kit.authority.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    trust = kit.context()
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("t", "0:2", trust=trust, attestation=kit.attest("t", tiny_llama_store))
        cluster.add_server(
            "s", "2:4", trust=trust, attestation=kit.attest("s", tiny_llama_store, tier="standard")
        )
        dead = spawn_server(pki, tiny_llama_store, "gone", "4:6", cluster.registry_address, ttl_seconds=30)
        cluster.wait_until_listed(3)
        dead.kill()
        yield cluster, authority


def status_args(pki: Pki, cluster, *extra: str) -> list[str]:
    credential = pki.credential(Role.CLIENT, "ops")
    return [
        "status",
        "--registry",
        cluster.registry_address,
        "--model",
        cluster.store.model_id,
        "--ca-cert",
        str(credential.ca_cert_path),
        "--cert",
        str(credential.cert_path),
        "--key",
        str(credential.key_path),
        "--timeout",
        "1",
        *extra,
    ]


def test_status_shows_nodes_tiers_health_and_the_gap(pki: Pki, attested_swarm, cli_logging, capsys) -> None:
    cluster, authority = attested_swarm
    verified = ["--policy-dir", str(POLICY_DIR), "--authority-key", str(authority)]
    assert main(status_args(pki, cluster, *verified)) == 1  # a gap: exit status 1
    table = capsys.readouterr().out

    lines = table.splitlines()
    assert lines[0] == f"swarm of {cluster.store.model_id}: 6 blocks, 3 nodes listed, 2 serving"
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["t"][2:5] == ["0:2", "trusted", "SERVING"]
    assert rows["s"][2:5] == ["2:4", "standard", "SERVING"]
    assert rows["gone"][2:5] == ["4:6", "unattested", "UNREACHABLE"]
    assert "  blocks     4:6  GAP [1 listed]" in lines
    assert lines[-1] == "GAPS: no serving node for blocks 4:6"
    # without the authority's key the client cannot know tiers
    assert main(status_args(pki, cluster, "--json")) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(n["name"], n["tier"], n["health"], n["classified_health"]) for n in report["nodes"]] == [
        ("gone", "unattested", "UNREACHABLE", "UNREACHABLE"),
        ("s", "unverified", "SERVING", "SERVING"),
        ("t", "unverified", "SERVING", "SERVING"),
    ]
    assert report["coverage"] == [
        {"blocks": "0:4", "serving_nodes": 1, "listed_nodes": 1},
        {"blocks": "4:6", "serving_nodes": 0, "listed_nodes": 1},
    ]
    assert report["gaps"] == ["4:6"]
    serving = next(n for n in report["nodes"] if n["name"] == "t")
    assert serving["cache_bytes_total"] == 512 * 2**20 and serving["queue_length"] == 0
    assert serving["rtt_ms"] > 0 and set(serving["cost_ms"]) == {
        "rtt_ms",
        "compute_ms",
        "queue_ms",
        "load_ms",
        "total_ms",
    }


def test_status_of_a_fully_covered_swarm_exits_zero(
    pki: Pki, tiny_llama_store: ModelStore, cli_logging, capsys
) -> None:
    with running_cluster(pki, tiny_llama_store, ["0:4", "2:6"]) as cluster:
        assert main(status_args(pki, cluster)) == 0
    out = capsys.readouterr().out
    assert "  blocks     2:4  x2" in out.splitlines() and out.rstrip().endswith("every block is covered")


def test_status_warns_of_an_attested_node_whose_attestation_no_longer_lets_it_serve_classified_data() -> None:
    record = pb.ServerRecord(
        node_id="spiffe://bank/server/x", address="10.0.0.7:7001", span=pb.BlockSpan(start=0, end=4)
    )
    record.attestation = "header.claims.signature"
    expired = node_status(record, health="SERVING", rtt=None, tier="INVALID", classified_health="NOT_SERVING")
    assert expired.warnings == ["public data only: its own attestation is not valid now"]
    assert "public data only" in render_table(SwarmStatus("m", 4, [expired], [], []))
    valid = node_status(record, health="SERVING", rtt=None, tier="trusted", classified_health="SERVING")
    assert valid.warnings == []
    record.attestation = ""  # an unattested node never serves classified data: nothing to warn of
    assert (
        node_status(
            record, health="SERVING", rtt=None, tier="unattested", classified_health="NOT_SERVING"
        ).warnings
        == []
    )
