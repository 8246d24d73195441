"""Bad input is refused with a clear status and message, and the server keeps serving others."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import encode
from tests.helpers import Cluster, Pki, running_cluster

pytestmark = pytest.mark.e2e
HIDDEN = 64


def stub_for(cluster: Cluster, index: int = 0) -> pb_grpc.BlockServiceStub:
    server = cluster.servers[index]
    credential = cluster.pki.credential(Role.CLIENT, "prober")
    channel = grpc.secure_channel(server.address, channel_credentials(credential))
    return pb_grpc.BlockServiceStub(channel)


def inputs(
    batch: int = 1, seq: int = 3, past: int = 0, *, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32
) -> pb.SpanInputs:
    return pb.SpanInputs(
        hidden_states=encode(torch.randn(batch, seq, hidden).to(dtype)),
        attention_mask=encode(torch.ones(batch, past + seq, dtype=torch.int64)),
        position_ids=encode(torch.arange(past, past + seq).expand(batch, -1).contiguous()),
    )


def forward(stub: pb_grpc.BlockServiceStub, message: pb.SpanInputs, span: tuple[int, int] = (0, 2)):
    return stub.Forward(
        pb.ForwardRequest(
            span=pb.BlockSpan(start=span[0], end=span[1]),
            inputs=message,
            classification="public",
            session_id="probe",
        ),
        timeout=10,
    )


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def assert_still_serving(stub: pb_grpc.BlockServiceStub) -> None:
    response = forward(stub, inputs())
    assert list(response.hidden_states.shape) == [1, 3, HIDDEN]


def test_wrong_hidden_size(tiny_cluster: Cluster) -> None:
    stub = stub_for(tiny_cluster)
    error = refused(lambda: forward(stub, inputs(hidden=HIDDEN + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hidden_states: size 65 on axis 2 received, 64 expected" in error.details()
    assert_still_serving(stub)


def test_wrong_dtype(tiny_cluster: Cluster) -> None:
    stub = stub_for(tiny_cluster)
    error = refused(lambda: forward(stub, inputs(dtype=torch.bfloat16)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dtype torch.bfloat16 received, torch.float32 expected" in error.details()
    assert_still_serving(stub)


def test_wrong_rank(tiny_cluster: Cluster) -> None:
    stub = stub_for(tiny_cluster)
    message = inputs()
    message.hidden_states.CopyFrom(encode(torch.randn(3, HIDDEN)))
    error = refused(lambda: forward(stub, message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rank 2" in error.details() and "rank 3 expected" in error.details()
    assert_still_serving(stub)


def test_byte_length_not_matching_shape(tiny_cluster: Cluster) -> None:
    stub = stub_for(tiny_cluster)
    message = inputs()
    message.hidden_states.data = message.hidden_states.data[:-4]
    error = refused(lambda: forward(stub, message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes do not match shape (1, 3, 64)" in error.details()
    assert_still_serving(stub)


def test_mask_not_covering_the_sequence(tiny_cluster: Cluster) -> None:
    stub = stub_for(tiny_cluster)
    message = inputs()
    message.attention_mask.CopyFrom(encode(torch.ones(1, 2, dtype=torch.int64)))
    error = refused(lambda: forward(stub, message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "attention_mask: size 2 on axis 1 received, 3 expected" in error.details()


@pytest.mark.parametrize("span", [(2, 4), (1, 3), (0, 3), (5, 2)])
def test_blocks_outside_the_span(tiny_cluster: Cluster, span: tuple[int, int]) -> None:
    stub = stub_for(tiny_cluster)
    error = refused(lambda: forward(stub, inputs(), span))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "0:2" in error.details() or error.details() == "invalid block span 5:2"
    assert_still_serving(stub)


def open_stream(
    stub: pb_grpc.BlockServiceStub, requests: list[pb.InferenceRequest]
) -> Iterator[pb.InferenceResponse]:
    return stub.Inference(iter(requests), timeout=10)


def open_request(max_length: int, span: tuple[int, int] = (0, 2), batch: int = 1) -> pb.InferenceRequest:
    return pb.InferenceRequest(
        open=pb.OpenSession(
            span=pb.BlockSpan(start=span[0], end=span[1]),
            max_length=max_length,
            batch_size=batch,
            classification="public",
            nonce=os.urandom(16),
        )
    )


class Stream:
    """A bidirectional inference stream driven request by request."""

    def __init__(self, stub: pb_grpc.BlockServiceStub) -> None:
        import queue

        self._queue: queue.Queue = queue.Queue()
        self._responses = stub.Inference(iter(self._queue.get, None), timeout=20)

    def send(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        self._queue.put(request)
        return next(self._responses)

    def end(self) -> None:
        self._queue.put(None)


def step_request(session_id: str, seq: int, past: int) -> pb.InferenceRequest:
    return pb.InferenceRequest(step=pb.SessionStep(session_id=session_id, inputs=inputs(seq=seq, past=past)))


def test_step_beyond_max_length(tiny_cluster: Cluster) -> None:
    stream = Stream(stub_for(tiny_cluster))
    session_id = stream.send(open_request(max_length=4)).opened.session_id
    assert stream.send(step_request(session_id, seq=3, past=0)).step.position == 3
    error = refused(lambda: stream.send(step_request(session_id, seq=2, past=3)))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "exceeds max_length 4" in error.details()
    assert_still_serving(stub_for(tiny_cluster))


def test_max_length_above_server_limit(tiny_cluster: Cluster) -> None:
    stream = Stream(stub_for(tiny_cluster))
    error = refused(lambda: stream.send(open_request(max_length=10**6)))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "max_length 1000000 outside 1..4096" in error.details()


def test_unknown_session(tiny_cluster: Cluster) -> None:
    stream = Stream(stub_for(tiny_cluster))
    stream.send(open_request(max_length=8))
    error = refused(lambda: stream.send(step_request("not-a-session", seq=1, past=0)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown or closed session 'not-a-session'" in error.details()


def test_closed_session(tiny_cluster: Cluster) -> None:
    stream = Stream(stub_for(tiny_cluster))
    session_id = stream.send(open_request(max_length=8)).opened.session_id
    closed = stream.send(pb.InferenceRequest(close=pb.CloseSession(session_id=session_id)))
    assert closed.closed.session_id == session_id
    error = refused(lambda: stream.send(step_request(session_id, seq=1, past=0)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert session_id in error.details()


def test_without_a_policy_engine_only_public_data_is_served(tiny_cluster: Cluster) -> None:
    """A server with no policy configured refuses internal data, opaquely, and serves public data."""
    stub = stub_for(tiny_cluster)
    request = pb.ForwardRequest(
        span=pb.BlockSpan(start=0, end=2), inputs=inputs(), classification="internal", session_id="probe"
    )
    error = refused(lambda: stub.Forward(request, timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # the peer learns no reasons, only the decision id an operator can look up in the server's log
    assert re.fullmatch(r"request refused by policy \(decision local-[0-9a-f]{32}\)", error.details())
    assert_still_serving(stub)


def test_without_a_policy_engine_only_client_workloads_are_served(tiny_cluster: Cluster) -> None:
    """Roles hold without a policy: a server- or registry-role certificate gets no activations."""
    for role, name in ((Role.SERVER, "s-probe"), (Role.REGISTRY, "r-probe")):
        credential = tiny_cluster.pki.credential(role, name)
        channel = grpc.secure_channel(tiny_cluster.servers[0].address, channel_credentials(credential))
        error = refused(lambda channel=channel: forward(pb_grpc.BlockServiceStub(channel), inputs()))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        channel.close()
    assert_still_serving(stub_for(tiny_cluster))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (float("nan"), "hidden_states: NaN or infinite values"),
        (float("inf"), "hidden_states: NaN or infinite values"),
    ],
)
def test_non_finite_hidden_states_are_refused(tiny_cluster: Cluster, bad: float, message: str) -> None:
    stub = stub_for(tiny_cluster)
    hidden = torch.randn(1, 3, HIDDEN)
    hidden[0, 1, 5] = bad
    message_in = inputs()
    message_in.hidden_states.CopyFrom(encode(hidden))
    error = refused(lambda: forward(stub, message_in))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == message
    assert_still_serving(stub)


def test_positions_beyond_the_models_range_are_refused(tiny_cluster: Cluster) -> None:
    stub = stub_for(tiny_cluster)
    message = inputs()
    message.position_ids.CopyFrom(encode(torch.tensor([[0, 1, 10**12]])))
    error = refused(lambda: forward(stub, message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "position_ids: positions must lie within 0..255 (the model's range)"
    assert_still_serving(stub)


def test_a_stateless_call_longer_than_a_session_may_be_is_refused(pki: Pki, tiny_llama_store) -> None:
    with running_cluster(pki, tiny_llama_store, ["0:2"], max_session_length=32) as cluster:
        stub = stub_for(cluster)
        long_inputs = inputs(seq=33)
        long_inputs.position_ids.CopyFrom(encode(torch.zeros(1, 33, dtype=torch.int64)))
        error = refused(lambda: forward(stub, long_inputs))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (
            "hidden_states: 33 tokens in one stateless call; this server takes at most 32 (use an inference "
            "session, or shorter sequences)"
        )
        assert_still_serving(stub)


def test_missing_session_id(tiny_cluster: Cluster) -> None:
    stub = stub_for(tiny_cluster)
    request = pb.ForwardRequest(span=pb.BlockSpan(start=0, end=2), inputs=inputs(), classification="public")
    error = refused(lambda: stub.Forward(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "session_id: 1 to 256 printable ASCII characters without spaces are required"


def test_step_before_open(tiny_cluster: Cluster) -> None:
    stream = Stream(stub_for(tiny_cluster))
    error = refused(lambda: stream.send(step_request("x", seq=1, past=0)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_sessions_free_their_cache_when_streams_end(tiny_cluster: Cluster) -> None:
    server = tiny_cluster.servers[0]
    free_before = server.budget.free_bytes
    stream = Stream(stub_for(tiny_cluster))
    stream.send(open_request(max_length=64))
    assert server.budget.free_bytes < free_before
    stream.end()
    deadline = time.monotonic() + 5
    while server.budget.free_bytes != free_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.budget.free_bytes == free_before


@pytest.fixture()
def limited_cluster(pki: Pki, tiny_llama_store) -> Iterator[Cluster]:
    # tiny llama, 2 blocks: 2 (k,v) * 2 blocks * 2 heads * 16 dims * 4 bytes = 512 bytes per token
    with running_cluster(
        pki,
        tiny_llama_store,
        ["0:2"],
        max_message_bytes=64 * 1024,
        cache_budget_bytes=512 * 100,
        cache_wait_seconds=0.2,
        session_idle_timeout_seconds=0.5,
    ) as cluster:
        yield cluster


def test_message_over_the_size_limit(limited_cluster: Cluster) -> None:
    stub = stub_for(limited_cluster)
    error = refused(lambda: forward(stub, inputs(seq=300)))  # 300 * 64 * 4 bytes = 76.8 KB > 64 KiB
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(stub)


def test_cache_budget_full(limited_cluster: Cluster) -> None:
    stub = stub_for(limited_cluster)
    first = Stream(stub)
    first.send(open_request(max_length=80))  # 40 960 of 51 200 bytes
    second = Stream(stub)
    error = refused(lambda: second.send(open_request(max_length=80)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV-cache budget full: session needs 40960 bytes, 10240 of 51200 free" in error.details()
    first.end()
    third = Stream(stub)  # room again once the first session ends (bounded wait at open)
    deadline = time.monotonic() + 5
    while True:
        try:
            assert third.send(open_request(max_length=80)).opened.session_id
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "cache space was not released"
            third = Stream(stub)


def test_idle_session_expires_and_frees_memory(limited_cluster: Cluster) -> None:
    server = limited_cluster.servers[0]
    stream = Stream(stub_for(limited_cluster))
    session_id = stream.send(open_request(max_length=20)).opened.session_id
    assert server.budget.free_bytes == 512 * 100 - 512 * 20
    time.sleep(1.2)  # idle timeout 0.5 s, reaper runs every 0.2 s
    assert server.budget.free_bytes == 512 * 100
    error = refused(lambda: stream.send(step_request(session_id, seq=1, past=0)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "expired after 0.5 s idle" in error.details()


def test_stop_closes_open_sessions(pki: Pki, tiny_llama_store) -> None:
    with running_cluster(pki, tiny_llama_store, ["0:2"]) as cluster:
        server = cluster.servers[0]
        stream = Stream(stub_for(cluster))
        stream.send(open_request(max_length=16))
        assert len(server.sessions) == 1
        server.stop(0.2)
        assert len(server.sessions) == 0
        assert server.budget.free_bytes == server.budget.total_bytes
        assert server.node_id not in [
            r.node_id for r in cluster.registry.backend.list(cluster.store.model_id)
        ]
