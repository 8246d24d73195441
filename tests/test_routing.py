"""Route planning: cover every block, fewest hops and lowest latency first, fail closed with the gaps."""

from __future__ import annotations

import pytest

from fincluster.client.routing import plan_route
from fincluster.errors import RoutingError
from fincluster.spans import BlockSpan
from fincluster.wire import fincluster_pb2 as pb


def server(node: str, start: int, end: int, throughput: float = 100.0) -> pb.ServerRecord:
    return pb.ServerRecord(
        node_id=node,
        address=f"{node}:1",
        model_id="m",
        span=pb.BlockSpan(start=start, end=end),
        throughput=throughput,
    )


def nodes(route) -> list[str]:
    return [hop.record.node_id for hop in route]


def test_chain_covers_all_blocks_in_order() -> None:
    records = [server("c", 20, 30), server("a", 0, 10), server("b", 10, 20)]
    route = plan_route(records, BlockSpan(0, 30))
    assert nodes(route) == ["a", "b", "c"]
    assert [str(hop.span) for hop in route] == ["0:10", "10:20", "20:30"]


def test_fewer_hops_preferred() -> None:
    records = [server("a", 0, 10), server("b", 10, 20), server("whole", 0, 20)]
    assert nodes(plan_route(records, BlockSpan(0, 20))) == ["whole"]


def test_lower_measured_latency_preferred() -> None:
    records = [server("far", 0, 10), server("near", 0, 10), server("b", 10, 20)]
    rtt = {"far": 0.050, "near": 0.001, "b": 0.001}
    assert nodes(plan_route(records, BlockSpan(0, 20), rtt=lambda r: rtt[r.node_id])) == ["near", "b"]


def test_unreachable_server_is_never_chosen() -> None:
    records = [server("dead", 0, 10), server("alive", 0, 10), server("b", 10, 20)]
    rtt = {"dead": float("inf"), "alive": 0.2, "b": 0.001}
    assert nodes(plan_route(records, BlockSpan(0, 20), rtt=lambda r: rtt[r.node_id])) == ["alive", "b"]


def test_missing_blocks_are_named() -> None:
    with pytest.raises(RoutingError, match="blocks 10,11 have no server") as caught:
        plan_route([server("a", 0, 10), server("c", 12, 20)], BlockSpan(0, 20))
    assert caught.value.missing_blocks == (10, 11)


def test_filter_is_never_bypassed() -> None:
    """The policy seam: a rejected node is not used even when it is the only one for a block."""
    records = [server("standard", 0, 10), server("b", 10, 20)]
    with pytest.raises(
        RoutingError, match="no allowed, reachable server continues the chain at block 0"
    ) as caught:
        plan_route(records, BlockSpan(0, 20), allow=lambda record, span: record.node_id != "standard")
    assert caught.value.missing_blocks == (0,)


def test_overlapping_spans_are_chained_through_sub_spans() -> None:
    route = plan_route([server("a", 0, 10), server("b", 5, 20)], BlockSpan(0, 20))
    assert nodes(route) == ["a", "b"]
    assert route[0].span.start == 0 and route[-1].span.end == 20 and route[0].span.end == route[1].span.start


def test_a_chain_may_start_inside_a_servers_span() -> None:
    """local_blocks=3: the remote chain starts at block 3, inside a's 0:10."""
    route = plan_route([server("a", 0, 10), server("b", 10, 20)], BlockSpan(3, 20))
    assert [(hop.record.node_id, str(hop.span)) for hop in route] == [("a", "3:10"), ("b", "10:20")]


def test_a_failed_span_is_covered_by_two_servers_with_other_splits() -> None:
    records = [server("x", 8, 15), server("y", 15, 25)]
    route = plan_route(records, BlockSpan(10, 20))
    assert [(hop.record.node_id, str(hop.span)) for hop in route] == [("x", "10:15"), ("y", "15:20")]


def test_policy_may_allow_the_part_of_a_span_outside_the_prefix() -> None:
    """A standard node holding 0:16 may be denied the prefix and still serve 8:16."""
    records = [server("trusted", 0, 8), server("standard", 0, 16)]
    asked: list[tuple[str, str]] = []

    def allow(record: pb.ServerRecord, span: BlockSpan) -> bool:
        asked.append((record.node_id, str(span)))
        return record.node_id == "trusted" or span.start >= 8

    route = plan_route(records, BlockSpan(0, 16), allow=allow)
    assert [(hop.record.node_id, str(hop.span)) for hop in route] == [
        ("trusted", "0:8"),
        ("standard", "8:16"),
    ]
    assert ("standard", "0:16") in asked and ("standard", "8:16") in asked
