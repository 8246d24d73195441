"""The client trusts nothing it receives: every returned tensor is checked for shape, dtype and finite
values before the next hop sees it, the error names the node that sent it (so failover bans the right
one), and every transfer that left the client is recorded — also when its receipt does not verify."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from fincluster.audit import AuditRecorder, FailoverEvent, TransferEvent, sign_receipt
from fincluster.client.transport import GrpcSpanClient
from fincluster.errors import InvalidResponseError, RoutingError, TrustError
from fincluster.store import ModelStore
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire.tensors import encode
from tests.helpers import Pki, running_cluster, tiny_model

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(51))

CORRUPTIONS = {
    "wider": lambda out: torch.cat([out, out[..., :1]], dim=-1),
    "half": lambda out: out.to(torch.float16),
    "nan": lambda out: out * float("nan"),
    "shorter": lambda out: out[:, :-1],
}
PROBLEMS = {
    "wider": "hidden_states: shape (1, 7, 65) returned, (1, 7, 64) sent",
    "half": "hidden_states: dtype torch.float16 returned, torch.float32 sent",
    "nan": "hidden_states: non-finite values returned",
    "shorter": "hidden_states: shape (1, 6, 64) returned, (1, 7, 64) sent",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_middle_server_returning_a_bad_tensor_is_named_and_replaced(
    pki: Pki, tiny_llama_store: ModelStore, kind: str
) -> None:
    expected = tiny_model("llama").generate(PROMPT, max_new_tokens=6, do_sample=False)
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("cr-first", "0:2")
        bad = cluster.add_server(f"cr-bad-{kind}", "2:4", corrupt=CORRUPTIONS[kind])
        cluster.add_server("cr-last", "4:6")
        cluster.wait_until_listed(3)
        recorder = AuditRecorder()
        with cluster.swarm(audit=recorder) as swarm:
            model = cluster.model(swarm)
            with pytest.raises(RoutingError) as caught:  # nobody else holds 2:4
                model.generate(PROMPT, max_new_tokens=6, do_sample=False)
            problem = caught.value.__cause__
            assert isinstance(problem, InvalidResponseError) and problem.node_id == bad.node_id
            assert problem.reason == PROBLEMS[kind]
            assert swarm.bans.is_banned(bad.node_id) and not swarm.bans.is_banned(cluster.servers[2].node_id)
            # an honest replacement appears: the same client now generates the reference tokens
            cluster.add_server("cr-honest", "2:4")
            cluster.wait_until_listed(4)
            assert model.generate(PROMPT, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
        # the bad node's answers were transfers too: recorded with the node that sent them
        assert any(e.node_id == bad.node_id for e in recorder.of_kind(TransferEvent))


def test_a_bad_last_hop_is_caught_before_the_lm_head(pki: Pki, tiny_llama_store: ModelStore) -> None:
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("cr-head", "0:4")
        bad = cluster.add_server("cr-tail", "4:6", corrupt=CORRUPTIONS["wider"])
        cluster.wait_until_listed(2)
        with cluster.swarm() as swarm, torch.no_grad(), pytest.raises(RoutingError) as caught:
            cluster.model(swarm)(PROMPT)
    assert isinstance(caught.value.__cause__, InvalidResponseError)
    assert caught.value.__cause__.node_id == bad.node_id


def test_truncated_bytes_are_an_error_naming_the_node(pki: Pki, tiny_llama_store: ModelStore) -> None:
    with running_cluster(pki, tiny_llama_store, ["0:6"]) as cluster, cluster.swarm() as swarm:
        (record,) = swarm.registry.list(tiny_llama_store.model_id)
        client: GrpcSpanClient = swarm.span_client(record)
        message = encode(torch.randn(1, 3, 64))
        message.data = message.data[:-5]
        with pytest.raises(InvalidResponseError) as caught:
            client.received(message, like=torch.zeros(1, 3, 64), name="hidden_states", session_id="s")
    assert caught.value.node_id == record.node_id
    assert "763 bytes do not match shape (1, 3, 64) of FLOAT32 (768 bytes expected)" in caught.value.reason


def test_a_transfer_whose_receipt_fails_is_recorded_with_the_verdict(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    """A server that signs its receipts with a key it never proved: its answer is refused, and the
    transfer (the activations did leave the client) is recorded with why the receipt was refused."""
    forger = ec.generate_private_key(ec.SECP256R1())
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        liar = cluster.add_server("cr-liar", "0:6")

        def forged_receipt(**fields: object) -> pb.Receipt:
            return sign_receipt(
                forger,
                node_id=liar.node_id,
                cert_fingerprint="sha256:" + "1" * 64,
                issued_at=datetime.now(UTC),
                **fields,  # type: ignore[arg-type]
            )

        liar.guard.receipt = forged_receipt  # type: ignore[method-assign]
        cluster.wait_until_listed(1)
        recorder = AuditRecorder()
        with cluster.swarm(audit=recorder) as swarm, torch.no_grad(), pytest.raises(RoutingError) as caught:
            cluster.model(swarm)(PROMPT)
    assert isinstance(caught.value.__cause__, TrustError)
    (transfer,) = [e for e in recorder.of_kind(TransferEvent) if e.node_id == liar.node_id]
    assert transfer.receipt_problem is not None
    assert transfer.receipt_problem.startswith("bad_receipt: receipt for session ")
    assert transfer.output_sha256 is not None and transfer.receipt is not None
    assert not recorder.of_kind(FailoverEvent)  # nothing could take over
