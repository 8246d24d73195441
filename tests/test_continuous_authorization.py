"""Attestation, revocation and policy hold for every call of a session, not only at its open.
Time is injected: the tests cross an attestation's expiry without waiting for it."""

from __future__ import annotations

import os
import queue
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import torch
from structlog.testing import capture_logs

from fincluster.audit import AuditRecorder, FailoverEvent
from fincluster.health import CLASSIFIED_DATA, check
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import encode
from tests.helpers import Pki, TrustKit, running_cluster, tiny_model
from tests.test_failover import AtToken

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(41))


def eventually(condition, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Clock:
    """A settable wall clock for trust contexts."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture()
def kit(pki: Pki) -> TrustKit:
    return TrustKit.create(pki)


def cleared(kit: TrustKit, **options) -> dict:
    return {"clearances": {kit.pki.credential(Role.CLIENT, "analyst").spiffe_id: "confidential"}, **options}


def test_a_session_crossing_its_nodes_attestation_expiry_fails_over_to_a_valid_node(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    expected = tiny_model("llama").generate(PROMPT, max_new_tokens=10, do_sample=False)
    client_clock = Clock()
    with running_cluster(kit.pki, store, []) as cluster:
        servers_trust = kit.context(**cleared(kit))
        short = cluster.add_server(
            "ca-short",
            "0:2",
            trust=servers_trust,
            attestation=kit.attest("ca-short", store, lifetime=timedelta(hours=1)),
        )
        cluster.add_server(
            "ca-rest",
            "2:6",
            trust=servers_trust,
            attestation=kit.attest("ca-rest", store, tier="standard", lifetime=timedelta(hours=10)),
        )
        cluster.wait_until_listed(2)

        def expire_and_add_a_valid_node() -> None:
            cluster.add_server(
                "ca-fresh",
                "0:2",
                trust=servers_trust,
                attestation=kit.attest("ca-fresh", store, lifetime=timedelta(hours=5)),
            )
            cluster.wait_until_listed(3)
            client_clock.advance(hours=2)  # ca-short's attestation is now past its expiry

        recorder = AuditRecorder()
        with cluster.swarm(trust=kit.context(**cleared(kit, clock=client_clock)), audit=recorder) as swarm:
            model = cluster.model(swarm, classification="internal")
            produced = model.generate(
                PROMPT, max_new_tokens=10, do_sample=False, streamer=AtToken(4, expire_and_add_a_valid_node)
            )
    assert produced.tolist() == expected.tolist()
    (failover,) = recorder.of_kind(FailoverEvent)
    assert failover.failed_node_id == short.node_id and failover.replacement_node_id.endswith("/ca-fresh")
    assert failover.reason.startswith("expired: attestation ")


class RawStream:
    def __init__(self, stub: pb_grpc.BlockServiceStub) -> None:
        self._requests: queue.Queue[pb.InferenceRequest | None] = queue.Queue()
        self.responses = stub.Inference(iter(self._requests.get, None), timeout=30)

    def send(self, request: pb.InferenceRequest) -> pb.InferenceResponse:
        self._requests.put(request)
        return next(self.responses)

    def end(self) -> None:
        self._requests.put(None)


def open_request(classification: str) -> pb.InferenceRequest:
    return pb.InferenceRequest(
        open=pb.OpenSession(
            span=pb.BlockSpan(start=0, end=6),
            max_length=8,
            batch_size=1,
            classification=classification,
            nonce=os.urandom(16),
            session_id=os.urandom(8).hex(),
        )
    )


def step_request(session_id: str, position: int) -> pb.InferenceRequest:
    return pb.InferenceRequest(
        step=pb.SessionStep(
            session_id=session_id,
            step=position,
            inputs=pb.SpanInputs(
                hidden_states=encode(torch.randn(1, 1, 64)),
                attention_mask=encode(torch.ones(1, position + 1, dtype=torch.int64)),
                position_ids=encode(torch.tensor([[position]])),
            ),
        )
    )


def test_a_server_whose_own_attestation_expires_stops_serving_classified_data(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    server_clock = Clock()
    with running_cluster(kit.pki, store, []) as cluster:
        server = cluster.add_server(
            "ca-own",
            "0:6",
            trust=kit.context(**cleared(kit, clock=server_clock)),
            attestation=kit.attest("ca-own", store, lifetime=timedelta(hours=1)),
        )
        channel = grpc.secure_channel(
            server.address, channel_credentials(kit.pki.credential(Role.CLIENT, "analyst"))
        )
        stub = pb_grpc.BlockServiceStub(channel)
        stream = RawStream(stub)
        session_id = stream.send(open_request("internal")).opened.session_id
        assert stream.send(step_request(session_id, 0)).step.position == 1
        assert eventually(lambda: check(channel, service=CLASSIFIED_DATA) == "SERVING")
        with capture_logs() as logs:
            server_clock.advance(hours=1, seconds=1)
            # health says so: classified data NOT_SERVING, the server itself still SERVING (public)
            assert eventually(lambda: check(channel, service=CLASSIFIED_DATA) == "NOT_SERVING")
            assert check(channel) == "SERVING"
            time.sleep(0.5)  # more maintenance rounds: the expiry is logged once
        expired = [entry for entry in logs if entry["event"] == "own_attestation_expired"]
        assert len(expired) == 1 and "public data is still served" in expired[0]["action"]
        with pytest.raises(grpc.RpcError) as during:  # the open session is refused at its next step
            stream.send(step_request(session_id, 1))
        assert during.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert eventually(lambda: len(server.sessions) == 0)  # the stream is gone, its session with it
        late = RawStream(stub)
        with pytest.raises(grpc.RpcError) as opening:  # and a new internal session is refused
            late.send(open_request("internal"))
        assert opening.value.code() is grpc.StatusCode.PERMISSION_DENIED
        public = RawStream(stub)  # public data needs no attestation
        assert public.send(open_request("public")).opened.session_id
        for each in (stream, late, public):
            each.end()
        channel.close()


def test_revoking_a_clients_certificate_ends_its_open_session(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    with running_cluster(kit.pki, tiny_llama_store, []) as cluster:
        server = cluster.add_server("ca-crl", "0:6", trust=kit.context(crl=True))
        client = kit.pki.ca.issue(Role.CLIENT, "ca-leaver")
        channel = grpc.secure_channel(server.address, channel_credentials(client))
        stream = RawStream(pb_grpc.BlockServiceStub(channel))
        session_id = stream.send(open_request("public")).opened.session_id
        assert stream.send(step_request(session_id, 0)).step.position == 1
        kit.pki.ca.revoke(client.cert_path)
        with pytest.raises(grpc.RpcError) as caught:
            stream.send(step_request(session_id, 1))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert eventually(lambda: len(server.sessions) == 0)  # the stream is gone, its session with it
        stream.end()
        channel.close()
