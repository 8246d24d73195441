"""The audit trail of a real swarm: one record per (step, node), receipts that reconcile, replays
audited, mismatches reported, and no raw data anywhere in the logs."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch

from fincluster.audit import AuditLog, TransferEvent, read_events, reconcile, verify
from fincluster.cli import main
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.errors import ConfigurationError
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from fincluster.wire.tensors import encode
from tests.helpers import Pki, TrustKit, running_cluster

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(11))
NEW_TOKENS = 6


@pytest.fixture()
def audited(pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path):
    """t (trusted 0:2), a and a2 (standard 2:4), b (standard 4:6); every party keeps an audit log."""
    kit = TrustKit.create(pki)
    analyst = pki.credential(Role.CLIENT, "analyst").spiffe_id
    trust = kit.context(clearances={analyst: "confidential"})
    logs = {
        name: pki.audit_log(Role.SERVER, name, tmp_path / f"server-{name}.sqlite")
        for name in ("t", "a", "a2", "b")
    }
    with running_cluster(pki, tiny_llama_store, [], registry_trust=trust) as cluster:
        for name, span, tier in (
            ("t", "0:2", "trusted"),
            ("a", "2:4", "standard"),
            ("a2", "2:4", "standard"),
            ("b", "4:6", "standard"),
        ):
            cluster.add_server(
                name,
                span,
                trust=trust,
                audit=logs[name],
                attestation=kit.attest(name, tiny_llama_store, tier=tier),
            )
        cluster.wait_until_listed(4)
        client_log = pki.audit_log(Role.CLIENT, "analyst", tmp_path / "client.sqlite")
        yield cluster, trust, client_log, logs
        client_log.close()
    for log in logs.values():
        log.close()


def transfers(path: Path) -> list[TransferEvent]:
    return [e for e in read_events(path) if isinstance(e, TransferEvent)]


def server_events(logs: dict[str, AuditLog], *, transfers_at_least: int = 0):
    """Every server's events. Servers write a transfer's record just after sending its response, so
    wait (up to 5 s) until at least ``transfers_at_least`` transfer records are there."""
    deadline = time.monotonic() + 5
    while True:
        events = [event for log in logs.values() for event in read_events(log.path)]
        if (
            sum(isinstance(e, TransferEvent) for e in events) >= transfers_at_least
            or time.monotonic() > deadline
        ):
            return events
        time.sleep(0.02)


def node_keys(pki: Pki, names) -> dict:
    return {pki.credential(Role.SERVER, n).spiffe_id: pki.public_key(Role.SERVER, n) for n in names}


def test_generation_has_one_transfer_per_step_and_node_and_reconciles(audited, pki: Pki) -> None:
    cluster, trust, client_log, logs = audited
    with cluster.swarm(trust=trust, audit=client_log) as swarm:
        model = cluster.model(swarm, classification="internal")
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        session_id = session.session_id
    client_log.checkpoint()
    records = transfers(client_log.path)
    per_step_node = Counter((r.session_id, r.step, r.node_id) for r in records)
    nodes = {r.node_id for r in records}
    assert len(nodes) == 3 and set(per_step_node.values()) == {1}
    assert len(records) == 3 * NEW_TOKENS  # prompt + (NEW_TOKENS - 1) one-token steps, on each of 3 nodes
    assert {r.session_id for r in records} == {session_id}
    first = next(r for r in records if r.step == 0 and r.block_span.start == 0)
    assert first.num_tokens == PROMPT.shape[1] and first.node_tier == "trusted"
    assert first.attestation_id and first.policy_decision_id and first.policy_bundle_digest
    assert first.cert_fingerprint.startswith("sha256:") and first.receipt is not None
    report = reconcile(
        read_events(client_log.path),
        server_events(logs, transfers_at_least=len(records)),
        node_keys=node_keys(pki, logs),
    )
    assert report.ok and report.matched == len(records)
    kinds = Counter(e.kind for e in read_events(client_log.path))
    assert kinds["session_open"] == 1 and kinds["session_close"] == 1 and kinds["routing"] == 1
    trusted = [pki.credential(Role.CLIENT, "analyst")]
    assert verify(client_log.path, [pki.public_key(Role.CLIENT, "analyst")]).ok, trusted
    for name, log in logs.items():
        assert verify(log.path, [pki.public_key(Role.SERVER, name)]).ok


def test_forward_and_backward_are_audited_with_receipts(audited, pki: Pki) -> None:
    cluster, trust, client_log, logs = audited
    with cluster.swarm(trust=trust, audit=client_log) as swarm:
        model = cluster.model(swarm, classification="internal")
        embeds = model.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.sum().backward()
    records = transfers(client_log.path)
    assert Counter(r.operation for r in records) == {"forward": 3, "backward": 3}
    assert len({r.session_id for r in records if r.operation == "forward"}) == 1  # one pass, one id
    assert len({r.session_id for r in records if r.operation == "backward"}) == 1  # its own pass
    report = reconcile(
        read_events(client_log.path),
        server_events(logs, transfers_at_least=6),
        node_keys=node_keys(pki, logs),
    )
    assert report.ok and report.matched == 6


def test_unmatched_transfers_are_reported_both_ways(audited, pki: Pki) -> None:
    cluster, trust, client_log, logs = audited
    with cluster.swarm(trust=trust, audit=client_log) as swarm, torch.no_grad():
        cluster.model(swarm, classification="public")(PROMPT)
    # a call the client's log never saw: another tool talks to server b directly
    server_b = next(s for s in cluster.servers if s.node_id.endswith("/b"))
    channel = grpc.secure_channel(
        server_b.address, channel_credentials(pki.credential(Role.CLIENT, "analyst"))
    )
    inputs = pb.SpanInputs(
        hidden_states=encode(torch.randn(1, 2, 64)),
        attention_mask=encode(torch.ones(1, 2, dtype=torch.int64)),
        position_ids=encode(torch.arange(2).unsqueeze(0)),
    )
    pb_grpc.BlockServiceStub(channel).Forward(
        pb.ForwardRequest(
            span=pb.BlockSpan(start=4, end=6), inputs=inputs, session_id="side-door", classification="public"
        ),
        timeout=10,
    )
    report = reconcile(read_events(client_log.path), server_events(logs, transfers_at_least=4))
    assert [key.session_id for key in report.server_only] == ["side-door"]
    assert report.client_only == () and report.matched == 3
    # a server whose log is missing: the client's records of it are unmatched
    without_t = {n: log for n, log in logs.items() if n != "t"}
    report = reconcile(read_events(client_log.path), server_events(without_t, transfers_at_least=3))
    assert len(report.client_only) == 1 and report.client_only[0].node_id.endswith("/t")


def test_replaying_a_session_to_another_node_is_audited(audited, pki: Pki) -> None:
    """What failover does: hop 2:4 moves from its node to the other 2:4 node, inputs replayed."""
    cluster, trust, client_log, logs = audited
    with cluster.swarm(trust=trust, audit=client_log) as swarm:
        model = cluster.model(swarm, classification="internal")
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            first = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
            old = session.hops[1].client.node_id
            other = next(s.node_id for s in cluster.servers if s.model.span.start == 2 and s.node_id != old)
            replayed = model.move_hop(1, other)
            second = model.generate(first, max_new_tokens=3, do_sample=False)
        reference_model = cluster.model(swarm, classification="internal")
        expected = reference_model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert second.tolist() == expected.tolist()  # the rebuilt cache continues the generation exactly
    assert replayed == 3  # prompt + 2 steps had reached the old node
    events = read_events(client_log.path)
    replays = [e for e in events if isinstance(e, TransferEvent) and e.operation == "replay"]
    assert [(r.node_id, r.step) for r in replays] == [(other, 0), (other, 1), (other, 2)]
    failovers = [e for e in events if e.kind == "failover"]
    assert len(failovers) == 1 and failovers[0].failed_node_id == old and failovers[0].replayed_steps == 3
    transfers_sent = sum(isinstance(e, TransferEvent) for e in events)
    report = reconcile(
        events, server_events(logs, transfers_at_least=transfers_sent), node_keys=node_keys(pki, logs)
    )
    assert report.ok, report


def test_no_record_contains_prompt_tokens_or_activations(audited, pki: Pki) -> None:
    cluster, trust, client_log, logs = audited
    with cluster.swarm(trust=trust, audit=client_log) as swarm:
        model = cluster.model(swarm, classification="internal")
        model.generate(PROMPT, max_new_tokens=3, do_sample=False)
        embeddings = model.get_input_embeddings()(PROMPT).detach()
    client_log.checkpoint()
    ids = PROMPT[0].tolist()
    needles = [
        json.dumps(ids).encode(),
        ",".join(map(str, ids)).encode(),
        encode(embeddings).data[:64],
        encode(embeddings[0, 0]).data,
    ]
    for path in [client_log.path, *(log.path for log in logs.values())]:
        blob = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert blob, path
        for needle in needles:
            assert needle not in blob, (path, needle[:20])


def test_audit_cannot_be_turned_off_for_internal_data(audited) -> None:
    cluster, trust, _, _ = audited
    swarm = Swarm(
        registry=cluster.registry_address,
        credential=cluster.pki.credential(Role.CLIENT, "analyst"),
        trust=trust,
        audit=None,
    )
    with swarm:
        with pytest.raises(ConfigurationError, match="audit cannot be disabled for internal data"):
            DistributedModelForCausalLM.from_pretrained(
                cluster.store, swarm=swarm, classification="internal"
            )(PROMPT)
        with torch.no_grad():
            DistributedModelForCausalLM.from_pretrained(cluster.store, swarm=swarm, classification="public")(
                PROMPT
            )


def test_audit_usage_counts_tokens_per_client_department_and_node_as_both_sides_recorded(
    audited, pki: Pki, tmp_path: Path
) -> None:
    """``fincluster audit usage`` over the servers' logs gives, per node, the tokens the client's log
    says it sent there; departments come from the policy data."""
    cluster, trust, client_log, logs = audited
    with cluster.swarm(trust=trust, audit=client_log) as swarm:
        cluster.model(swarm, classification="internal").generate(PROMPT, max_new_tokens=4, do_sample=False)
    client_log.checkpoint()
    analyst = pki.credential(Role.CLIENT, "analyst").spiffe_id
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"fincluster": {"departments": {analyst: "research"}}}))
    sent = transfers(client_log.path)
    server_events(logs, transfers_at_least=len(sent))
    for observer, paths in (("server", [log.path for log in logs.values()]), ("client", [client_log.path])):
        out = tmp_path / f"usage-{observer}.json"
        argv = ["audit", "usage", *map(str, paths), "--observer", observer, "--policy-data", str(data)]
        assert main([*argv, "--format", "json", "--out", str(out)]) == 0
        rows = json.loads(out.read_text())
        assert {row["department"] for row in rows} == {"research"}
        assert {row["client_id"] for row in rows} == {analyst}
        expected = Counter()
        for event in sent:
            expected[event.node_id] += event.num_tokens
        assert {row["node_id"]: row["tokens"] for row in rows} == dict(expected)
        blocks = {event.node_id: len(event.block_span) for event in sent}
        assert all(row["token_blocks"] == row["tokens"] * blocks[row["node_id"]] for row in rows)
