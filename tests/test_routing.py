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
    with pytest.raises(RoutingError, match="blocks 10,11 have no available server") as caught:
        plan_route([server("a", 0, 10), server("c", 12, 20)], BlockSpan(0, 20))
    assert caught.value.missing_blocks == (10, 11)


def test_filter_is_never_bypassed() -> None:
    """The policy seam: a rejected node is not used even when it is the only one for a block."""
    records = [server("standard", 0, 10), server("b", 10, 20)]
    with pytest.raises(RoutingError, match="blocks 0,1,2,3,4,5,6,7,8,9 have no available server"):
        plan_route(records, BlockSpan(0, 20), allow=lambda record, span: record.node_id != "standard")


def test_misaligned_spans_report_where_the_chain_stops() -> None:
    with pytest.raises(RoutingError, match="no chain of server spans continues at block 10"):
        plan_route([server("a", 0, 10), server("b", 5, 20)], BlockSpan(0, 20))
