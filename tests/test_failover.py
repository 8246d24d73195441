"""Servers die, hang or stop being allowed mid-work; the client fails over inside ``step``/``backward``
and the result equals the run without failure (reference: the same model run locally by transformers).

The failing servers are real ``fincluster serve`` processes, SIGKILLed or SIGSTOPped at a chosen token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fincluster.audit import AuditRecorder, FailoverEvent, TransferEvent
from fincluster.errors import RoutingError
from fincluster.serving.service import Transfer
from fincluster.settings import ClientSettings
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from tests.helpers import POLICY_DIR, Pki, TrustKit, running_cluster, spawn_server, tiny_model

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(21))
NEW_TOKENS = 12


class AtToken:
    """A transformers streamer that runs ``action`` once ``after`` new tokens have been generated."""

    def __init__(self, after: int, action: Callable[[], None]) -> None:
        self.after, self.action, self.seen = after, action, -1  # the first put() is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.after:
            self.action()

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def expected() -> torch.Tensor:
    return tiny_model("llama").generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)


def operations(recorder: AuditRecorder, node_id: str) -> list[str]:
    return [e.operation for e in recorder.of_kind(TransferEvent) if e.node_id == node_id]


def test_a_server_killed_mid_generation_is_replaced_and_the_tokens_are_unchanged(
    pki: Pki, tiny_llama_store: ModelStore, expected: torch.Tensor
) -> None:
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("s0", "0:3")
        victim = spawn_server(pki, tiny_llama_store, "victim", "3:6", cluster.registry_address)
        backup: list[Transfer] = []
        try:
            cluster.wait_until_listed(2)

            def kill_and_add_backup() -> None:
                cluster.add_server("backup", "3:6", received=backup)
                victim.kill()

            recorder = AuditRecorder()
            with cluster.swarm(audit=recorder) as swarm:
                produced = cluster.model(swarm).generate(
                    PROMPT,
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    streamer=AtToken(5, kill_and_add_backup),
                )
        finally:
            victim.kill()
    assert produced.tolist() == expected.tolist()
    backup_id = cluster.servers[-1].node_id
    # the backup rebuilt the KV cache from the 5 steps the victim had seen, then took the other 7
    assert operations(recorder, backup_id) == ["replay"] * 5 + ["inference_step"] * 7
    assert len(backup) == 12 and {t.session_id for t in backup} == {
        recorder.of_kind(FailoverEvent)[0].session_id
    }
    (failover,) = recorder.of_kind(FailoverEvent)
    assert (failover.failed_node_id, failover.replacement_node_id) == (victim.node_id, backup_id)
    assert (str(failover.block_span), failover.replayed_steps) == ("3:6", 5)


def test_a_failed_span_can_be_taken_over_by_two_servers_with_another_split(
    pki: Pki, tiny_llama_store: ModelStore, expected: torch.Tensor
) -> None:
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("s0", "0:2")
        victim = spawn_server(pki, tiny_llama_store, "victim2", "2:6", cluster.registry_address)
        try:
            cluster.wait_until_listed(2)

            def kill_and_add_two() -> None:
                cluster.add_server("left", "2:4")
                cluster.add_server("right", "4:6")
                victim.kill()

            recorder = AuditRecorder()
            with cluster.swarm(audit=recorder) as swarm:
                model = cluster.model(swarm)
                with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
                    produced = model.generate(
                        PROMPT,
                        max_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        streamer=AtToken(3, kill_and_add_two),
                    )
                    chain = [
                        (hop.client.node_id.rsplit("/", 1)[1], str(hop.client.span)) for hop in session.hops
                    ]
        finally:
            victim.kill()
    assert produced.tolist() == expected.tolist()
    assert chain == [("s0", "0:2"), ("left", "2:4"), ("right", "4:6")]
    assert [(str(e.block_span), e.replayed_steps) for e in recorder.of_kind(FailoverEvent)] == [
        ("2:4", 3),
        ("4:6", 3),
    ]


def test_a_server_that_hangs_is_detected_by_the_step_deadline_and_replaced(
    pki: Pki, tiny_llama_store: ModelStore, expected: torch.Tensor
) -> None:
    settings = ClientSettings(step_timeout_seconds=1.5)
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("s0", "0:3")
        victim = spawn_server(
            pki, tiny_llama_store, "sleeper", "3:6", cluster.registry_address, ttl_seconds=30
        )
        try:
            cluster.wait_until_listed(2)

            def hang_and_add_backup() -> None:
                cluster.add_server("awake", "3:6")
                victim.pause()

            recorder = AuditRecorder()
            with cluster.swarm(audit=recorder, settings=settings) as swarm:
                started = time.monotonic()
                produced = cluster.model(swarm).generate(
                    PROMPT,
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    streamer=AtToken(4, hang_and_add_backup),
                )
                elapsed = time.monotonic() - started
        finally:
            victim.resume()
            victim.kill()
    assert produced.tolist() == expected.tolist()
    (failover,) = recorder.of_kind(FailoverEvent)
    assert failover.failed_node_id == victim.node_id and "no answer within 1.5 s" in failover.reason
    assert elapsed < 30


def test_backward_with_a_server_killed_after_the_forward_returns_the_same_gradients(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    reference = tiny_model("llama")
    local = reference.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
    reference(inputs_embeds=local).logits.square().mean().backward()
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("s0", "0:3")
        victim = spawn_server(pki, tiny_llama_store, "trainer", "3:6", cluster.registry_address)
        try:
            cluster.wait_until_listed(2)
            recorder = AuditRecorder()
            with cluster.swarm(audit=recorder) as swarm:
                model = cluster.model(swarm)
                embeds = model.get_input_embeddings()(PROMPT).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds).logits.square().mean()
                cluster.add_server("spare", "3:6")
                victim.kill()
                loss.backward()
        finally:
            victim.kill()
    assert local.grad is not None and embeds.grad is not None
    assert (embeds.grad - local.grad).abs().max().item() <= 1e-4
    spare = cluster.servers[-1].node_id
    # backward is stateless (the server recomputes its forward from the inputs): the spare was given the
    # victim's inputs and answered the backward alone
    assert operations(recorder, spare) == ["backward"]


def test_the_only_trusted_node_dying_fails_closed_and_no_standard_node_sees_the_prefix(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    kit = TrustKit.create(pki)
    authority = tmp_path / "authority.pub"
    from cryptography.hazmat.primitives import serialization

    authority.write_bytes(
        kit.authority.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    token = tmp_path / "t.jwt"
    token.write_text(kit.attest("prefix-t", tiny_llama_store, tier="trusted"))
    client_id = pki.credential(Role.CLIENT, "analyst").spiffe_id
    trust = kit.context(clearances={client_id: "confidential"})
    standard: list[Transfer] = []
    with running_cluster(pki, tiny_llama_store, []) as cluster:  # registry without announce policy
        cluster.add_server(
            "std",
            "0:6",
            trust=trust,
            received=standard,
            attestation=kit.attest("std", tiny_llama_store, tier="standard"),
        )
        victim = spawn_server(
            pki,
            tiny_llama_store,
            "prefix-t",
            "0:2",
            cluster.registry_address,
            extra_args=[
                "--policy-dir",
                str(POLICY_DIR),
                "--authority-key",
                str(authority),
                "--attestation",
                str(token),
            ],
            extra_env={"FINCLUSTER_TRUST__CLEARANCES": json.dumps({client_id: "confidential"})},
        )
        try:
            cluster.wait_until_listed(2)
            settings = ClientSettings(failover_attempts=2, failover_backoff_seconds=0.05)
            with cluster.swarm(trust=trust, settings=settings) as swarm:
                model = cluster.model(swarm, classification="internal")
                started = time.monotonic()
                with pytest.raises(RoutingError) as caught:
                    model.generate(
                        PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=AtToken(3, victim.kill)
                    )
                elapsed = time.monotonic() - started
        finally:
            victim.kill()
    message = str(caught.value)
    assert f"{victim.node_id} failed on blocks 0:2" in message
    assert "server/std (blocks 0:2): node is not attested as trusted" in message
    assert elapsed < 20
    # the standard node served blocks 2:6 of every step and never saw the prefix
    assert standard and {str(t.span) for t in standard} == {"2:6"}


def test_a_dead_node_is_dropped_from_routing_at_once(pki: Pki, tiny_llama_store: ModelStore) -> None:
    """After a node fails, the next request is not routed to it from cached round trips: it is banned."""
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        cluster.add_server("d-alive", "0:6")
        dead = spawn_server(pki, tiny_llama_store, "d-dead", "0:6", cluster.registry_address, ttl_seconds=30)
        try:
            cluster.wait_until_listed(2)
            recorder = AuditRecorder()
            with cluster.swarm(audit=recorder, settings=ClientSettings()) as swarm, torch.no_grad():
                model = cluster.model(swarm)
                swarm.rtt(swarm.registry.list(tiny_llama_store.model_id)[0])  # measured: both reachable
                dead.kill()
                for _ in range(3):  # still listed (TTL 30 s), but never routed to again after one failure
                    model(PROMPT)
                routes = [hop.record.node_id for hop, _ in swarm.last_route]
        finally:
            dead.kill()
    failovers = recorder.of_kind(FailoverEvent)
    assert len(failovers) <= 1 and all(f.failed_node_id == dead.node_id for f in failovers)
    assert routes == [cluster.servers[0].node_id]
