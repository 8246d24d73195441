"""No swarm certificate can starve the swarm: floods of streams, silent streams, idle sessions and
watches are bounded per peer (refused with RESOURCE_EXHAUSTED or ended), cost no thread each, and
another client's generation meanwhile completes within twice its normal time."""

from __future__ import annotations

import os
import queue
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from fincluster.audit import AuditRecorder
from fincluster.errors import CapacityError, RoutingError
from fincluster.settings import DepartmentQuota
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from tests.helpers import Cluster, Pki, running_cluster, tiny_model

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(31))
NEW_TOKENS = 8


class RawStream:
    """An inference stream an attacker drives by hand (one request at a time)."""

    def __init__(self, stub: pb_grpc.BlockServiceStub) -> None:
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue()
        self.responses = stub.Inference(iter(self._requests.get, None), timeout=60)

    def send(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        self._requests.put(request)
        return next(self.responses)

    def end(self) -> None:
        self._requests.put(None)


def open_request(span: tuple[int, int]) -> pb.InferenceRequest:
    return pb.InferenceRequest(
        open=pb.OpenSession(
            span=pb.BlockSpan(start=span[0], end=span[1]),
            max_length=16,
            batch_size=1,
            classification="public",
            nonce=os.urandom(16),
        )
    )


def attacker_stub(cluster: Cluster, index: int = 0) -> pb_grpc.BlockServiceStub:
    channel = grpc.secure_channel(
        cluster.servers[index].address, channel_credentials(cluster.pki.credential(Role.CLIENT, "flooder"))
    )
    return pb_grpc.BlockServiceStub(channel)


def generation_seconds(cluster: Cluster, runs: int = 3) -> float:
    """Median wall time of the victim's greedy generation (checked against the reference, too)."""
    expected = tiny_model("llama").generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    times = []
    with cluster.swarm("victim") as swarm:
        model = cluster.model(swarm)
        for _ in range(runs):
            started = time.perf_counter()
            produced = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
            times.append(time.perf_counter() - started)
            assert produced.tolist() == expected.tolist()
    return statistics.median(times)


@pytest.fixture()
def guarded(pki: Pki, tiny_llama_store: ModelStore) -> Iterator[Cluster]:
    with running_cluster(
        pki,
        tiny_llama_store,
        ["0:3", "3:6"],
        first_message_seconds=1.0,
        session_idle_timeout_seconds=1.0,
        max_streams_per_client=8,
    ) as cluster:
        yield cluster


def test_two_hundred_streams_from_one_client_are_capped_and_others_still_generate(guarded: Cluster) -> None:
    baseline = generation_seconds(guarded)
    stub = attacker_stub(guarded)
    streams = [RawStream(stub) for _ in range(200)]

    def try_open(stream: RawStream) -> str:
        try:
            stream.send(open_request((0, 3)))
            return "opened"
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            return error.details() or ""

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(try_open, streams))
    try:
        assert outcomes.count("opened") == 8
        refusals = {o for o in outcomes if o != "opened"}
        assert refusals == {
            "this client already holds 8 inference streams on this server (its limit); close one first"
        }
        under_attack = generation_seconds(guarded)
        assert under_attack <= 2 * baseline + 0.05, (baseline, under_attack)
    finally:
        for stream in streams:
            stream.end()


def test_silent_streams_are_ended_at_the_first_message_deadline_and_cost_no_thread(guarded: Cluster) -> None:
    baseline = generation_seconds(guarded)
    threads_before = threading.active_count()
    stub = attacker_stub(guarded)
    silent = [RawStream(stub) for _ in range(16)]
    # the server threads do not grow with the streams it holds (each is a suspended coroutine)
    time.sleep(0.3)
    assert threading.active_count() - threads_before <= 16 + 2  # the client's own stream threads
    under_attack = generation_seconds(guarded)
    assert under_attack <= 2 * baseline + 0.05, (baseline, under_attack)
    outcomes = []
    for stream in silent:
        with pytest.raises(grpc.RpcError) as caught:
            next(stream.responses)
        outcomes.append((caught.value.code(), caught.value.details()))
        stream.end()
    # 8 were admitted and ended at the deadline; the other 8 were over this client's stream limit
    ended = (grpc.StatusCode.DEADLINE_EXCEEDED, "no request within 1 s of opening the stream")
    over = (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "this client already holds 8 inference streams on this server (its limit); close one first",
    )
    assert sorted(outcomes, key=str) == sorted([ended] * 8 + [over] * 8, key=str)


def test_idle_sessions_end_their_streams_and_free_their_cache(guarded: Cluster) -> None:
    server = guarded.servers[0]
    free_before = server.budget.free_bytes
    stub = attacker_stub(guarded)
    idle = [RawStream(stub) for _ in range(8)]
    for stream in idle:
        assert stream.send(open_request((0, 3))).opened.session_id
    assert server.budget.free_bytes < free_before and len(server.sessions) == 8
    for stream in idle:
        with pytest.raises(grpc.RpcError) as caught:
            next(stream.responses)  # nothing sent for 1 s: the server ends the stream
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "session expired after 1 s idle"
        stream.end()
    assert len(server.sessions) == 0 and server.budget.free_bytes == free_before
    # the stream slots are free again: the same client can open new streams
    fresh = RawStream(stub)
    assert fresh.send(open_request((0, 3))).opened.session_id
    fresh.end()


def test_forty_watch_streams_are_capped_and_lists_and_heartbeats_go_on(guarded: Cluster) -> None:
    registry = guarded.registry
    channel = grpc.secure_channel(
        guarded.registry_address, channel_credentials(guarded.pki.credential(Role.CLIENT, "watcher"))
    )
    stub = pb_grpc.RegistryServiceStub(channel)
    watches = [stub.Watch(pb.WatchRequest(model_id=guarded.store.model_id), timeout=30) for _ in range(40)]
    outcomes: list[str] = []

    def first_event(call: object) -> None:
        try:
            next(call)  # type: ignore[call-overload]
            outcomes.append("watching")
        except grpc.RpcError as error:
            outcomes.append(f"{error.code().name}: {error.details()}")

    with ThreadPoolExecutor(40) as pool:
        list(pool.map(first_event, watches))
    try:
        assert outcomes.count("watching") == 4
        assert set(outcomes) - {"watching"} == {
            "RESOURCE_EXHAUSTED: this client already holds 4 watch streams on this server (its limit); "
            "close one first"
        }
        # List answers at once, and the servers' heartbeats keep them listed past their TTL (2 s)
        started = time.perf_counter()
        listed = stub.List(pb.ListRequest(model_id=guarded.store.model_id), timeout=5).records
        assert time.perf_counter() - started < 1.0 and len(listed) == 2
        time.sleep(3)
        assert len(registry.backend.list(guarded.store.model_id)) == 2
    finally:
        for call in watches:
            call.cancel()  # type: ignore[attr-defined]
        channel.close()


def test_a_department_over_its_token_quota_is_refused_and_others_are_not(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    quota = {"risk": DepartmentQuota(tokens_per_minute=150)}
    departments = {
        pki.credential(Role.CLIENT, "risk-analyst").spiffe_id: "risk",
        pki.credential(Role.CLIENT, "treasury-analyst").spiffe_id: "treasury",
    }
    with running_cluster(pki, tiny_llama_store, ["0:6"], quotas=quota, departments=departments) as cluster:
        recorder = AuditRecorder()
        with cluster.swarm("risk-analyst", audit=recorder) as swarm:
            model = cluster.model(swarm)
            model.generate(PROMPT, max_new_tokens=4, do_sample=False)  # 8 + 3 tokens x 6 blocks = 66
            model.generate(PROMPT, max_new_tokens=4, do_sample=False)  # 132
            with pytest.raises(RoutingError) as caught:  # full: no other server to fail over to
                model.generate(PROMPT, max_new_tokens=4, do_sample=False)
        refusal = caught.value.__cause__
        assert isinstance(refusal, CapacityError)
        assert refusal.reason.startswith(
            "department 'risk' is over its quota of 150 tokens per minute on this server (132 used); retry in"
        )
        with cluster.swarm("treasury-analyst") as swarm:  # another department is not affected
            produced = cluster.model(swarm).generate(PROMPT, max_new_tokens=4, do_sample=False)
        assert produced.shape == (1, 12)
