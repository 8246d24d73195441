"""``--blocks auto`` over real gRPC: servers arriving one by one cover a 30-block model, a fifth raises
the weakest coverage, and when a server is SIGKILLed another moves into the gap — without ever
uncovering a block — while an open session fails over and still matches transformers' output.

Servers announce a fixed throughput (``server.throughput``) so that spans do not depend on how busy
this machine is; the placement logic itself is tested in tests/test_placement.py.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from fincluster.audit import AuditRecorder, FailoverEvent
from fincluster.settings import ClientSettings
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import Cluster, Pki, running_cluster, spawn_server, store_of, tiny_model

pytestmark = pytest.mark.e2e
LAYERS = 30
PROMPT = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(30))
THROUGHPUT = 10.0  # blocks/s: one second per token for a 10-block span, far above loopback round trips


@pytest.fixture(scope="module")
def store30(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return store_of(tiny_model("llama", LAYERS), tmp_path_factory.mktemp("tiny30") / "store", "tiny-llama-30")


def listed(cluster: Cluster) -> list[pb.ServerRecord]:
    return cluster.registry.backend.list(cluster.store.model_id)


def spans(cluster: Cluster) -> dict[str, str]:
    return {r.node_id.rsplit("/", 1)[1]: f"{r.span.start}:{r.span.end}" for r in listed(cluster)}


def coverage(records: list[pb.ServerRecord]) -> list[int]:
    counts = [0] * LAYERS
    for record in records:
        for block in range(record.span.start, record.span.end):
            counts[block] += 1
    return counts


def test_servers_started_one_by_one_cover_the_model_and_a_fifth_raises_the_weakest_coverage(
    pki: Pki, store30: ModelStore
) -> None:
    with running_cluster(pki, store30, []) as cluster:
        for count, (name, blocks) in enumerate((("a", 10), ("b", 10), ("c", 10), ("d", 12)), start=1):
            cluster.add_auto_server(name, num_blocks=blocks, throughput=THROUGHPUT)
            cluster.wait_until_listed(count)
        assert spans(cluster) == {"a": "0:10", "b": "10:20", "c": "20:30", "d": "0:12"}
        assert min(coverage(listed(cluster))) == 1
        # the fifth sizes itself from a memory budget: 20.5 blocks of weights next to 1 MiB of KV cache
        weights = 4 * sum(p.numel() for p in tiny_model("llama", 1).model.layers[0].parameters())
        fifth = cluster.add_auto_server(
            "e",
            memory_budget_bytes=2**20 + 20 * weights + weights // 2,
            cache_budget_bytes=2**20,
            throughput=THROUGHPUT,
        )
        cluster.wait_until_listed(5)
        assert str(fifth.model.span) == "10:30"
        assert min(coverage(listed(cluster))) == 2


def test_a_killed_server_is_replaced_by_a_move_without_any_gap_and_the_session_fails_over(
    pki: Pki, store30: ModelStore, tmp_path: Path
) -> None:
    reference = tiny_model("llama", LAYERS).generate(PROMPT, max_new_tokens=12, do_sample=False)
    moving = {"throughput": THROUGHPUT, "rebalance_seconds": 0.5}
    with running_cluster(pki, store30, []) as cluster:
        cluster.add_auto_server("a", num_blocks=10, **moving)
        cluster.wait_until_listed(1)
        victim = spawn_server(
            pki,
            store30,
            "b",
            "auto",
            cluster.registry_address,
            extra_args=["--num-blocks", "10", "--audit-dir", str(tmp_path / "b-audit")],
            extra_env={"FINCLUSTER_SERVER__THROUGHPUT": str(THROUGHPUT)},
        )
        try:
            cluster.wait_until_listed(2)
            cluster.add_auto_server("c", num_blocks=10, **moving)
            cluster.wait_until_listed(3)
            cluster.add_auto_server("d", num_blocks=12, **moving)
            cluster.wait_until_listed(4)
            assert spans(cluster) == {"a": "0:10", "b": "10:20", "c": "20:30", "d": "0:12"}
            recorder = AuditRecorder()
            settings = ClientSettings(failover_attempts=4, failover_backoff_seconds=0.1)
            with cluster.swarm(audit=recorder, settings=settings) as swarm:
                model = cluster.model(swarm)
                with model.inference_session(max_length=PROMPT.shape[1] + 12):
                    first = model.generate(PROMPT, max_new_tokens=4, do_sample=False)
                    victim.kill()
                    killed = time.monotonic()
                    uncovered_seen: list[set[int]] = []
                    while True:  # until the registry lists full coverage again
                        records = listed(cluster)
                        uncovered = {b for b, n in enumerate(coverage(records)) if n == 0}
                        if all(r.node_id != victim.node_id for r in records):
                            uncovered_seen.append(uncovered)
                            if not uncovered:
                                break
                        assert time.monotonic() - killed < 20, f"still uncovered: {sorted(uncovered)}"
                        time.sleep(0.05)
                    restored = time.monotonic() - killed
                    for _ in range(20):  # it stays covered: the mover loaded before it left
                        assert min(coverage(listed(cluster))) >= 1
                        time.sleep(0.05)
                    second = model.generate(first, max_new_tokens=8, do_sample=False)
        finally:
            victim.kill()
    # the gap (blocks 12:20, which only b served) only shrank until it closed
    assert uncovered_seen[0] and uncovered_seen[0] <= set(range(12, 20))
    assert all(later <= earlier for earlier, later in itertools.pairwise(uncovered_seen))
    assert restored < 20
    movers = [s for s in cluster.servers if s._rebalancer is not None and s._rebalancer.moves]
    assert len(movers) == 1 and movers[0].model.span.contains(BlockSpan(12, 20))
    assert second.tolist() == reference.tolist()
    failed = {e.failed_node_id for e in recorder.of_kind(FailoverEvent)}
    assert victim.node_id in failed
    print(f"coverage restored {restored:.1f} s after SIGKILL (TTL 2 s); mover {movers[0].node_id}")


def test_a_session_through_a_server_that_moves_fails_over_and_the_mover_is_not_banned(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    """m (auto, 3 blocks) lands on 0:3 next to a fixed 3:6; a session runs through both. Then a fixed
    0:3 arrives and the 3:6 server stops: m moves to 3:6. The session's next step finds its hop on m
    moved (MovedError) and its hop on 3:6 gone; both are replaced — the second by m itself — with the
    inputs replayed, and the tokens equal transformers' own."""
    import grpc

    from fincluster.trust.pki import Role
    from fincluster.trust.tls import channel_credentials
    from fincluster.wire import fincluster_pb2_grpc as pb_grpc
    from fincluster.wire.tensors import encode

    reference = tiny_model("llama").generate(PROMPT, max_new_tokens=10, do_sample=False)
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        mover = cluster.add_auto_server("m", num_blocks=3, throughput=THROUGHPUT, rebalance_seconds=0.3)
        cluster.wait_until_listed(1)
        tail = cluster.add_server("tail", "3:6", throughput=THROUGHPUT)
        cluster.wait_until_listed(2)
        assert str(mover.model.span) == "0:3"
        recorder = AuditRecorder()
        with cluster.swarm(audit=recorder) as swarm:
            model = cluster.model(swarm)
            with model.inference_session(max_length=PROMPT.shape[1] + 10):
                first = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
                cluster.add_server("head", "0:3", throughput=THROUGHPUT)
                cluster.wait_until_listed(3)
                tail.stop()
                deadline = time.monotonic() + 15
                while str(mover.model.span) != "3:6" or spans(cluster).get("m") != "3:6":
                    assert time.monotonic() < deadline, "m did not move into the gap"
                    time.sleep(0.05)
                second = model.generate(first, max_new_tokens=7, do_sample=False)
            assert not swarm.bans.is_banned(mover.node_id)
        # blocks it left are refused as moved (ABORTED), blocks it never had as out of range
        channel = grpc.secure_channel(mover.address, channel_credentials(pki.credential(Role.CLIENT, "p")))
        stub = pb_grpc.BlockServiceStub(channel)
        inputs = pb.SpanInputs(
            hidden_states=encode(torch.randn(1, 2, 64)),
            attention_mask=encode(torch.ones(1, 2, dtype=torch.int64)),
            position_ids=encode(torch.arange(2).unsqueeze(0)),
        )
        codes = []
        for start, end in ((0, 3), (3, 6)):
            request = pb.ForwardRequest(
                span=pb.BlockSpan(start=start, end=end),
                inputs=inputs,
                classification="public",
                session_id="x",
            )
            try:
                stub.Forward(request, timeout=10)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(f"{error.code().name}: {error.details()}")
        channel.close()
    assert second.tolist() == reference.tolist()
    events = [
        (e.failed_node_id, e.replacement_node_id, str(e.block_span)) for e in recorder.of_kind(FailoverEvent)
    ]
    head = cluster.servers[-1].node_id
    assert events == [(mover.node_id, head, "0:3"), (tail.node_id, mover.node_id, "3:6")]
    moved = recorder.of_kind(FailoverEvent)[0]
    assert "blocks 0:3 moved away; this server now serves blocks 3:6" in moved.reason
    assert codes == ["ABORTED: blocks 0:3 moved away; this server now serves blocks 3:6", "OK"]


def test_under_the_announce_policy_a_standard_node_avoids_the_prefix_and_a_trusted_one_takes_it(
    pki: Pki, store30: ModelStore
) -> None:
    """The registry enforces the shipped announce policy (the first 8 of 30 blocks are sensitive);
    each node asks that policy which blocks it may announce, so both are listed where they chose."""
    from tests.helpers import TrustKit

    kit = TrustKit.create(pki)
    trust = kit.context()
    with running_cluster(pki, store30, [], registry_trust=trust) as cluster:
        cluster.add_auto_server(
            "std-auto",
            num_blocks=10,
            trust=trust,
            attestation=kit.attest("std-auto", store30, tier="standard"),
        )
        cluster.wait_until_listed(1)
        cluster.add_auto_server(
            "trusted-auto", num_blocks=12, trust=trust, attestation=kit.attest("trusted-auto", store30)
        )
        cluster.wait_until_listed(2)
        assert spans(cluster) == {"std-auto": "8:18", "trusted-auto": "0:12"}
