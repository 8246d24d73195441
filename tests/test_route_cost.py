"""The route cost model: measured round trip + compute + queue wait + a penalty for overloaded or
nearly full nodes; the terms are logged with every planned route (``route_planned``)."""

from __future__ import annotations

import pytest

from fincluster.client import swarm as swarm_module
from fincluster.client.placement import PlacementRequest
from fincluster.client.routing import AVOID_SECONDS, HOP_PENALTY_SECONDS, hop_cost, load_warnings, plan_route
from fincluster.spans import BlockSpan
from fincluster.trust.policy import Classification, ModelRef
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import Cluster, RecordingLogger


def server(node: str, start: int, end: int, **load: int) -> pb.ServerRecord:
    return pb.ServerRecord(
        node_id=node,
        address=f"{node}:1",
        model_id="m",
        span=pb.BlockSpan(start=start, end=end),
        throughput=100.0,  # 10 ms per block
        cache_bytes_total=1000,
        cache_bytes_free=load.pop("cache_bytes_free", 1000),
        **load,
    )


def nodes(route) -> list[str]:
    return [hop.record.node_id for hop in route]


def test_a_hops_cost_adds_round_trip_compute_queue_and_overhead() -> None:
    cost = hop_cost(server("a", 0, 10, queue_length=3), 4, 0.005)
    assert (cost.rtt, cost.compute, cost.queue, cost.load_penalty) == (0.005, 0.04, pytest.approx(0.3), 0.0)
    assert cost.total == pytest.approx(0.005 + 0.04 + 0.3 + HOP_PENALTY_SECONDS)
    assert cost.as_log() == {
        "rtt_ms": 5.0,
        "compute_ms": 40.0,
        "queue_ms": 300.0,
        "load_ms": 0.0,
        "total_ms": pytest.approx(347.0),
    }


def test_a_server_with_a_queue_loses_to_an_idle_one() -> None:
    records = [server("busy", 0, 10, queue_length=2), server("idle", 0, 10), server("b", 10, 20)]
    assert nodes(plan_route(records, BlockSpan(0, 20))) == ["idle", "b"]


def test_overloaded_and_nearly_full_servers_are_avoided_but_not_refused() -> None:
    overloaded = server("overloaded", 0, 20, queue_length=8)
    full = server("full", 0, 20, cache_bytes_free=50)  # 5% of the cache left
    assert load_warnings(overloaded) == ["overloaded"] and load_warnings(full) == ["nearly full"]
    assert hop_cost(full, 20, 0.001).load_penalty == AVOID_SECONDS
    # two hops of healthy nodes beat one hop on either, though one hop is otherwise cheaper
    records = [overloaded, full, server("a", 0, 10), server("b", 10, 20)]
    assert nodes(plan_route(records, BlockSpan(0, 20))) == ["a", "b"]
    # with nothing else, the full node still serves (avoided, not excluded)
    assert nodes(plan_route([full], BlockSpan(0, 20))) == ["full"]


def test_the_planned_route_is_logged_with_its_cost_terms(
    tiny_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = RecordingLogger()
    monkeypatch.setattr(swarm_module, "log", recording)
    store = tiny_cluster.store
    request = PlacementRequest(
        Classification.PUBLIC, ModelRef(id=store.model_id, num_blocks=store.num_blocks)
    )
    with tiny_cluster.swarm() as swarm:
        swarm.route(request, BlockSpan(0, 6), session_id="cost-log")
    (event,) = [e for e in recording.events if e["event"] == "route_planned"]
    assert event["level"] == "debug" and event["blocks"] == "0:6"
    hops = event["hops"]
    assert [hop["blocks"] for hop in hops] == ["0:2", "2:4", "4:6"]  # type: ignore[index]
    for hop in hops:  # type: ignore[attr-defined]
        assert set(hop) == {"node", "blocks", "rtt_ms", "compute_ms", "queue_ms", "load_ms", "total_ms"}
        assert hop["rtt_ms"] > 0 and hop["compute_ms"] > 0 and hop["load_ms"] == 0
