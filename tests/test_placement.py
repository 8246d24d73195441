"""Placement decisions (fincluster.serving.placement): where a new server goes, when a placed one
moves, and how many blocks fit the memory budget. Records are built by hand; the rates they imply
(tokens/s through a span) are stated beside each one."""

from __future__ import annotations

import pytest

from fincluster.errors import ConfigurationError
from fincluster.serving.placement import (
    BlockRules,
    block_throughput,
    blocks_for_memory,
    choose_span,
    plan_move,
    server_rate,
)
from fincluster.serving.rebalancer import auto_block_count, block_rules, choose_first_span
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.own_attestation import verify_own_attestation
from fincluster.trust.pki import Role
from fincluster.trust.policy import ModelRef
from fincluster.values import TensorDType
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import Pki, TrustKit, tiny_model

ANYONE = BlockRules.anyone(30)


def record(
    name: str, start: int, end: int, *, rate: float = 10.0, num_blocks: int = 30, moving_to=None
) -> pb.ServerRecord:
    """A server of blocks start:end that pushes ``rate`` tokens/s through its span (no network time)."""
    return pb.ServerRecord(
        node_id=f"spiffe://t/server/{name}",
        model_id="m",
        span=pb.BlockSpan(start=start, end=end),
        throughput=rate * (end - start),
        num_blocks=num_blocks,
        moving_to=pb.BlockSpan(start=moving_to[0], end=moving_to[1]) if moving_to else None,
    )


def coverage(records: list[pb.ServerRecord], num_blocks: int = 30) -> list[int]:
    counts = [0] * num_blocks
    for r in records:
        for block in range(r.span.start, r.span.end):
            counts[block] += 1
    return counts


def test_a_servers_rate_is_its_spans_compute_time_plus_its_network_time() -> None:
    fast = pb.ServerRecord(span=pb.BlockSpan(start=0, end=10), throughput=100.0, network_rtt_seconds=0.1)
    assert server_rate(fast) == pytest.approx(1 / (10 / 100 + 0.1))  # 5 tokens/s
    unmeasured = pb.ServerRecord(span=pb.BlockSpan(start=0, end=10))
    assert server_rate(unmeasured) == pytest.approx(10.0)  # 0.01 s per block assumed


def test_servers_arriving_one_by_one_cover_the_model_then_a_fifth_doubles_the_weakest_coverage() -> None:
    records: list[pb.ServerRecord] = []
    for name, length in (("a", 10), ("b", 10), ("c", 10), ("d", 12), ("e", 20)):
        span = choose_first_span(records, num_blocks=30, length=length, rules=ANYONE)
        records.append(record(name, span.start, span.end))
        if name == "d":
            assert min(coverage(records)) == 1
    assert [(r.span.start, r.span.end) for r in records] == [(0, 10), (10, 20), (20, 30), (0, 12), (10, 30)]
    assert min(coverage(records)) == 2


def test_a_window_that_helps_more_of_the_weakest_blocks_wins() -> None:
    others = block_throughput([record("a", 0, 10), record("b", 20, 30)], 30)  # 10:20 uncovered
    assert choose_span(8, others, ANYONE, 10.0) == BlockSpan(10, 18)  # all 8 on the gap, lowest start
    assert choose_span(12, others, ANYONE, 10.0) == BlockSpan(8, 20)  # 8:20, 9:21, 10:22 tie: lowest start


@pytest.fixture(scope="module")
def policy_rules(pki: Pki, tiny_llama_store: ModelStore) -> tuple[BlockRules, BlockRules]:
    """The rules the shipped announce policy gives a trusted and a standard node for a 30-block model."""
    kit = TrustKit.create(pki)
    trust = kit.context()
    model = ModelRef(id="m", num_blocks=30)
    rules = []
    for name, tier in (("placer-t", "trusted"), ("placer-s", "standard")):
        credential = pki.credential(Role.SERVER, name)
        claims = verify_own_attestation(kit.attest(name, tiny_llama_store, tier=tier), credential, trust)
        rules.append(block_rules(trust, model, node_id=credential.spiffe_id, claims=claims))
    return rules[0], rules[1]


def test_the_announce_policy_says_which_blocks_are_sensitive_and_who_may_take_them(policy_rules) -> None:
    trusted, standard = policy_rules
    # policies/data.json: default_fraction 0.25 of 30 blocks, rounded up -> the first 8
    assert trusted.sensitive == standard.sensitive == (True,) * 8 + (False,) * 22
    assert trusted.open == (True,) * 30 and trusted.serves_sensitive
    assert standard.open == (False,) * 8 + (True,) * 22 and not standard.serves_sensitive


def test_a_trusted_node_prefers_the_sensitive_prefix_unless_the_rest_is_much_weaker(policy_rules) -> None:
    trusted, standard = policy_rules
    # prefix 0:8 at 15 tokens/s (trusted nodes), the rest at 10: every window lifts some block of 10
    # to 20 for a standard node, but a trusted node counts the prefix at half (7.5) and goes there
    even = block_throughput([record("t", 0, 8, rate=15), record("s", 8, 30, rate=10)], 30)
    assert choose_span(8, even, trusted, 10.0) == BlockSpan(0, 8)
    assert choose_span(8, even, standard, 10.0) == BlockSpan(8, 16)
    # prefix at 30 tokens/s: even at half it is stronger than the rest, so the trusted node helps there
    strong = block_throughput([record("t", 0, 8, rate=30), record("s", 8, 30, rate=10)], 30)
    assert choose_span(8, strong, trusted, 10.0) == BlockSpan(8, 16)


def test_a_trusted_node_fills_a_sensitive_gap_before_any_other(policy_rules) -> None:
    trusted, _ = policy_rules
    # 0:8 and 18:30 are uncovered. A 12-block server at 18:30 would leave fewer blocks uncovered (8
    # instead of 12), but only trusted nodes can ever cover the prefix
    others = block_throughput([record("s", 8, 18)], 30)
    assert choose_span(12, others, ANYONE, 10.0) == BlockSpan(18, 30)
    assert choose_span(12, others, trusted, 10.0) == BlockSpan(0, 12)


def test_throughputs_within_the_tolerance_do_not_decide() -> None:
    """Measurements jitter: servers within 2% of each other are equally strong, so the new server
    takes the lowest start, and a placed one stays."""
    noisy = [record("a", 0, 10, rate=10.0), record("b", 10, 20, rate=10.15), record("c", 20, 30, rate=9.9)]
    assert choose_span(10, block_throughput(noisy, 30), ANYONE, 10.0) == BlockSpan(0, 10)
    placed = record("d", 10, 20)
    assert plan_move(placed, [*noisy, placed], ANYONE, min_gain=0.0).target is None
    weak = [record("a", 0, 10, rate=10.0), record("b", 10, 20, rate=9.0), record("c", 20, 30, rate=10.0)]
    assert choose_span(10, block_throughput(weak, 30), ANYONE, 10.0) == BlockSpan(10, 20)  # 10% is real


def test_a_standard_node_longer_than_the_open_blocks_takes_all_of_them(policy_rules) -> None:
    _, standard = policy_rules
    assert choose_first_span([], num_blocks=30, length=30, rules=standard) == BlockSpan(8, 30)


def test_a_move_needs_a_clear_gain() -> None:
    """Moving 0:2 -> 2:4 lifts the weakest block from 10 to 12 tokens/s: +20%."""
    own = record("own", 0, 2, rate=10, num_blocks=4)
    swarm = [own, record("a", 0, 2, rate=12, num_blocks=4), record("b", 2, 4, rate=10, num_blocks=4)]
    rules = BlockRules.anyone(4)
    stay = plan_move(own, swarm, rules, min_gain=0.25)
    assert stay.target is None and "would gain 20% at 2:4, below 25%" in stay.reason
    move = plan_move(own, swarm, rules, min_gain=0.1)
    assert move.target == BlockSpan(2, 4) and (move.weakest_now, move.weakest_after) == (10.0, 12.0)


def test_a_server_never_leaves_blocks_that_no_other_server_keeps() -> None:
    """Own 0:3 is alone on block 0; 3:5 is a gap. 2:5 would cover more blocks in all (one uncovered
    instead of two), but block 0 would lose its only server."""
    own = record("own", 0, 3, num_blocks=6)
    swarm = [own, record("x", 1, 3, num_blocks=6), record("y", 5, 6, num_blocks=6)]
    plan = plan_move(own, swarm, BlockRules.anyone(6), min_gain=0.0)
    assert plan.target is None and plan.reason == "moving to 2:5 would leave blocks 0:1 without a server"


def test_a_gap_left_by_a_dead_server_is_filled_by_one_mover_not_two() -> None:
    """a 0:10, d 0:12, c 20:30; the server of 10:20 died. Either a or d could fill the gap, each
    relying on the other for the prefix; once d announces it is moving, a stays."""
    a, d, c = record("a", 0, 10), record("d", 0, 12), record("c", 20, 30)
    plan_d = plan_move(d, [a, d, c], ANYONE, min_gain=0.25)
    assert plan_d.target == BlockSpan(8, 20) and plan_d.reason == "8:20 fills 8 blocks no server covers"
    assert plan_move(a, [a, d, c], ANYONE, min_gain=0.25).target == BlockSpan(10, 20)
    d_moving = record("d", 0, 12, moving_to=(8, 20))
    plan_a = plan_move(a, [a, d_moving, c], ANYONE, min_gain=0.25)
    assert plan_a.target is None


def test_the_block_count_follows_from_the_memory_left_after_the_kv_cache() -> None:
    mib = 2**20
    budget = blocks_for_memory(
        memory_bytes=10 * mib,
        cache_bytes=4 * mib,
        weight_bytes_per_block=mib,
        cache_bytes_per_token_per_block=256,
        model_blocks=30,
    )
    assert budget.blocks == 6
    assert budget.explanation == (
        "10.0 MiB memory - 4.0 MiB KV cache = 6.0 MiB for weights; 1.0 MiB per block -> 6 blocks fit "
        "-> 6 blocks; the KV cache holds 2730 tokens over them"
    )
    capped = blocks_for_memory(
        memory_bytes=100 * mib,
        cache_bytes=4 * mib,
        weight_bytes_per_block=mib,
        cache_bytes_per_token_per_block=256,
        model_blocks=30,
    )
    assert capped.blocks == 30 and "96 blocks fit, the model has 30 -> 30 blocks" in capped.explanation
    with pytest.raises(ConfigurationError, match=r"leaves 512.0 KiB after the KV cache \(4.0 MiB\)"):
        blocks_for_memory(
            memory_bytes=4 * mib + mib // 2,
            cache_bytes=4 * mib,
            weight_bytes_per_block=mib,
            cache_bytes_per_token_per_block=256,
            model_blocks=30,
        )


def test_the_weights_of_a_block_are_measured_from_the_store(tiny_llama_store: ModelStore) -> None:
    layer = tiny_model("llama").model.layers[0]
    per_block = sum(p.numel() for p in layer.parameters()) * 4  # float32
    kv_per_token = 2 * 2 * 16 * 4  # keys and values, 2 KV heads of 16, float32
    budget = auto_block_count(
        tiny_llama_store, memory_bytes=2**20 + 3 * per_block + 1, cache_bytes=2**20, dtype=TensorDType.FLOAT32
    )
    assert budget.blocks == 3
    assert f"the KV cache holds {2**20 // (kv_per_token * 3)} tokens" in budget.explanation
