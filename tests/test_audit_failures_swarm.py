"""Failures leave records with their reasons: a server's refusal (joined to the client's session by
session id and decision id), a key mismatch, a revoked server, a request no chain covers, and the
registry's refusal of a node; and a server's log says how each session ended."""

from __future__ import annotations

import time

import pytest
import torch

from fincluster.audit import (
    AnnounceEvent,
    AttestationFailureEvent,
    AuditRecorder,
    DenialEvent,
    SessionCloseEvent,
)
from fincluster.errors import RefusedError, RoutingError, TrustError
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from tests.helpers import Pki, TrustKit, running_cluster

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def kit(pki: Pki) -> TrustKit:
    return TrustKit.create(pki)


def cleared(kit: TrustKit, **kwargs):
    analyst = kit.pki.credential(Role.CLIENT, "analyst").spiffe_id
    return kit.context(clearances={analyst: "confidential"}, **kwargs)


def test_a_server_refusal_is_recorded_on_both_sides_with_session_and_decision(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    client_log, server_log = AuditRecorder(), AuditRecorder()
    with running_cluster(kit.pki, store, []) as cluster:
        cluster.add_server(
            "af-strict",
            "0:6",
            trust=kit.context(),
            audit=server_log,
            attestation=kit.attest("af-strict", store),
        )
        cluster.wait_until_listed(1)
        with cluster.swarm(trust=cleared(kit), audit=client_log) as swarm:
            model = cluster.model(swarm, classification="internal")
            # the refusal makes the client look for another node; there is none
            with pytest.raises(RoutingError) as caught:
                model.generate(PROMPT, max_new_tokens=2)
            assert isinstance(caught.value.__cause__, RefusedError)
    (server_denial,) = server_log.of_kind(DenialEvent)
    client_denial, no_replacement = client_log.of_kind(DenialEvent)
    assert no_replacement.enforced_at == "router" and no_replacement.session_id == client_denial.session_id
    assert server_denial.enforced_at == "server" and client_denial.enforced_at == "server"
    assert server_denial.session_id == client_denial.session_id is not None
    assert server_denial.policy_decision_id == client_denial.policy_decision_id is not None
    assert server_denial.client_id == kit.pki.credential(Role.CLIENT, "analyst").spiffe_id
    assert server_denial.reasons == ("client clearance does not cover the data classification",)
    decision = server_denial.policy_decision_id
    assert client_denial.reasons == (
        f"the server refused the call: request refused by policy (decision {decision})",
    )
    (closed,) = client_log.of_kind(SessionCloseEvent)
    assert closed.session_id == client_denial.session_id and closed.outcome == "error"
    assert closed.reason is not None and "request refused by policy (decision " in closed.reason


def test_a_key_mismatch_is_an_attestation_failure_of_the_session(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    stale = kit.attest("af-rekeyed", store)
    kit.pki.ca.rotate(Role.SERVER, "af-rekeyed")
    client_log = AuditRecorder()
    with running_cluster(kit.pki, store, []) as cluster:
        server = cluster.add_server("af-rekeyed", "0:6")
        server.attestation = stale  # announced: valid, but for the key it had before the rotation
        time.sleep(1.0)
        with (
            cluster.swarm(trust=cleared(kit), audit=client_log) as swarm,
            torch.no_grad(),
            pytest.raises(RoutingError, match="key_mismatch") as caught,  # no other node to fail over to
        ):
            cluster.model(swarm, classification="public")(PROMPT)
    assert isinstance(caught.value.__cause__, TrustError)
    (failure,) = client_log.of_kind(AttestationFailureEvent)
    assert failure.node_id == server.node_id and failure.session_id is not None
    assert failure.reason.startswith(f"key_mismatch: {server.node_id} presents TLS key ")
    (closed,) = client_log.of_kind(SessionCloseEvent)  # the failed pass is closed with its reason
    assert (closed.session_id, closed.outcome) == (failure.session_id, "error")
    assert closed.reason is not None and "key_mismatch" in closed.reason


def test_a_revoked_server_is_an_attestation_failure(kit: TrustKit, tiny_llama_store: ModelStore) -> None:
    store = tiny_llama_store
    client_log = AuditRecorder()
    with running_cluster(kit.pki, store, []) as cluster:
        server = cluster.add_server(
            "af-revoked", "0:6", trust=cleared(kit), attestation=kit.attest("af-revoked", store)
        )
        cluster.wait_until_listed(1)
        kit.pki.ca.revoke(server.credential.cert_path)
        with (
            cluster.swarm(trust=cleared(kit, crl=True), audit=client_log) as swarm,
            pytest.raises(RoutingError, match="revoked") as caught,  # no other node to fail over to
        ):
            cluster.model(swarm, classification="internal").generate(PROMPT, max_new_tokens=2)
    assert isinstance(caught.value.__cause__, TrustError)
    (failure,) = client_log.of_kind(AttestationFailureEvent)
    assert failure.node_id == server.node_id
    assert failure.reason == f"revoked: certificate is revoked (node {server.node_id})"
    (closed,) = client_log.of_kind(SessionCloseEvent)
    assert closed.outcome == "error" and closed.reason is not None and failure.reason in closed.reason


def test_a_request_no_allowed_chain_covers_is_a_denial_at_the_router(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    client_log = AuditRecorder()
    with running_cluster(kit.pki, store, []) as cluster:
        cluster.add_server("af-half", "2:6", trust=cleared(kit), attestation=kit.attest("af-half", store))
        cluster.wait_until_listed(1)
        with (
            cluster.swarm(trust=cleared(kit), audit=client_log) as swarm,
            torch.no_grad(),
            pytest.raises(RoutingError),
        ):
            cluster.model(swarm, classification="internal")(PROMPT)
    (denial,) = client_log.of_kind(DenialEvent)
    assert (denial.enforced_at, denial.node_id, str(denial.block_span)) == ("router", None, "0:2")
    assert denial.reasons[0].startswith("cannot route blocks 0:6: blocks 0,1 have no server")


def test_the_registry_records_a_refused_node_once_and_an_accepted_one_with_its_claims(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    registry_log = AuditRecorder()
    with running_cluster(
        kit.pki, store, [], registry_trust=cleared(kit), registry_audit=registry_log
    ) as cluster:
        good = cluster.add_server(
            "af-good", "0:2", trust=cleared(kit), attestation=kit.attest("af-good", store)
        )
        bad = cluster.add_server(
            "af-intruder",
            "0:2",
            trust=cleared(kit),
            attestation=kit.attest("af-intruder", store, tier="standard"),
        )
        time.sleep(2.0)  # several heartbeats of each
    (accepted,) = registry_log.of_kind(AnnounceEvent)
    assert accepted.node_id == good.node_id and accepted.observer == "registry"
    assert accepted.attestation is not None and accepted.attestation.tier == "trusted"
    assert accepted.attestation.zone == "eu-fra" and accepted.policy_decision_id is not None
    (refused,) = registry_log.of_kind(DenialEvent)
    assert (refused.enforced_at, refused.node_id, str(refused.block_span)) == ("registry", bad.node_id, "0:2")
    assert refused.reasons == ("node is not attested as trusted",)
    assert refused.attestation is not None and refused.attestation.tier == "standard"  # valid, not enough


def test_a_server_log_says_how_each_session_ended(kit: TrustKit, tiny_llama_store: ModelStore) -> None:
    store = tiny_llama_store
    server_log = AuditRecorder()
    with running_cluster(kit.pki, store, []) as cluster:
        cluster.add_server("af-log", "0:6", audit=server_log, session_idle_timeout_seconds=0.3)
        cluster.wait_until_listed(1)
        with cluster.swarm() as swarm:
            model = cluster.model(swarm, classification="public")
            with model.inference_session(max_length=12) as session:
                model.generate(PROMPT, max_new_tokens=2, do_sample=False)
            (record,) = swarm.registry.list(store.model_id)
            idle = swarm.span_client(record).open_session(max_length=4, batch_size=1, session_id="idle-1")
            time.sleep(1.0)  # opened, never used, never closed: the server expires it
            idle.close()  # too late: nothing left to close
    closes = {e.session_id: e for e in server_log.of_kind(SessionCloseEvent)}
    assert (closes[session.session_id].outcome, closes[session.session_id].reason) == (
        "ok",
        "closed by the client",
    )
    assert (closes["idle-1"].outcome, closes["idle-1"].reason) == ("error", "expired after 0.3 s idle")
