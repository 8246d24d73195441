"""Trust enforced end to end: attestation, possession proofs, policy at registry, router and server.

Tiny Llama store (6 blocks): the shipped policy's sensitive prefix is ceil(6 / 4) = 2 blocks, 0:2.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fincluster.bootstrap import trust_from_settings
from fincluster.client import DistributedModelForCausalLM
from fincluster.errors import (
    ConfigurationError,
    PolicyError,
    RefusedError,
    RegistryError,
    RemoteError,
    RoutingError,
    TrustError,
)
from fincluster.registry.service import RegistryClient
from fincluster.serving.service import Transfer
from fincluster.settings import TrustSettings
from fincluster.store import ModelStore
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import POLICY_DIR, Cluster, Pki, TrustKit, running_cluster, tiny_model

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def kit(pki: Pki) -> TrustKit:
    return TrustKit.create(pki)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return tiny_model("llama")  # the model tiny_llama_store was made from


def analyst(pki: Pki) -> str:
    return pki.credential(Role.CLIENT, "analyst").spiffe_id


def context(kit: TrustKit, **kwargs) -> TrustContext:
    return kit.context(clearances={analyst(kit.pki): "confidential"}, **kwargs)


@pytest.fixture()
def trusted_swarm(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> Iterator[tuple[Cluster, dict[str, list[Transfer]]]]:
    """t (trusted, 0:2), a (standard, 2:4), b (standard, 4:6); registry, servers and client all enforce."""
    received: dict[str, list[Transfer]] = {"t": [], "a": [], "b": []}
    trust = context(kit)
    with running_cluster(kit.pki, tiny_llama_store, [], registry_trust=trust) as cluster:
        for name, span, tier in (("t", "0:2", "trusted"), ("a", "2:4", "standard"), ("b", "4:6", "standard")):
            cluster.add_server(
                name,
                span,
                trust=trust,
                received=received[name],
                attestation=kit.attest(name, tiny_llama_store, tier=tier),
            )
        cluster.wait_until_listed(3)
        yield cluster, received


def test_internal_request_places_prefix_on_trusted_node_and_matches_local(
    trusted_swarm, kit: TrustKit, reference
) -> None:
    cluster, received = trusted_swarm
    expected = reference.generate(PROMPT, max_new_tokens=8, do_sample=False)
    with cluster.swarm(trust=context(kit)) as swarm:
        model = cluster.model(swarm, classification="internal")
        with model.inference_session(max_length=18) as session:
            produced = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
            placement = [(hop.client.node_id.rsplit("/", 1)[1], str(hop.client.span)) for hop in session.hops]
        tiers = {
            hop.record.node_id: verdict.claims.tier for hop, verdict in swarm.last_route if verdict.claims
        }
    assert produced.tolist() == expected.tolist()
    assert placement == [("t", "0:2"), ("a", "2:4"), ("b", "4:6")]
    assert tiers[cluster.servers[0].node_id] == "trusted"
    assert [len(received[n]) for n in "tab"] == [8, 8, 8]  # prompt + 7 one-token steps, each node


def test_no_trusted_node_for_the_prefix_fails_and_sends_nothing(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    """The registry here does not enforce, so the router alone must keep the standard node out."""
    received: list[Transfer] = []
    trust = context(kit)
    with running_cluster(kit.pki, tiny_llama_store, []) as cluster:
        cluster.add_server(
            "std",
            "0:2",
            trust=trust,
            received=received,
            attestation=kit.attest("std", tiny_llama_store, tier="standard"),
        )
        cluster.add_server(
            "rest", "2:6", trust=trust, attestation=kit.attest("rest", tiny_llama_store, tier="standard")
        )
        cluster.wait_until_listed(2)
        with cluster.swarm(trust=trust) as swarm:
            model = cluster.model(swarm, classification="internal")
            with pytest.raises(RoutingError) as caught:
                model.generate(PROMPT, max_new_tokens=2)
    message = str(caught.value)
    assert "no allowed, reachable server continues the chain at block 0" in message
    assert "server/std (blocks 0:2): node is not attested as trusted" in message
    assert received == []
    assert len(cluster.servers[0].sessions) == 0


def test_public_data_may_use_the_standard_node(
    kit: TrustKit, tiny_llama_store: ModelStore, reference
) -> None:
    trust = context(kit)
    with running_cluster(kit.pki, tiny_llama_store, []) as cluster:
        cluster.add_server(
            "std", "0:6", trust=trust, attestation=kit.attest("std", tiny_llama_store, tier="standard")
        )
        cluster.wait_until_listed(1)
        with cluster.swarm(trust=trust) as swarm, torch.no_grad():
            logits = cluster.model(swarm, classification="public")(PROMPT).logits
    assert (logits - reference(PROMPT).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "forgery",
    ["expired", "unknown_key", "replayed_for_other_node", "claims_trusted_without_token"],
)
def test_registry_refuses_invalid_attestations(
    kit: TrustKit, tiny_llama_store: ModelStore, forgery: str
) -> None:
    """The server's own credential announces a record whose attestation is not valid for it."""
    store = tiny_llama_store
    token = {
        "expired": lambda: kit.attest("f", store, now=datetime.now(UTC) - timedelta(hours=2)),
        "unknown_key": lambda: kit.attest("f", store, authority=Ed25519PrivateKey.generate()),
        "replayed_for_other_node": lambda: kit.attest("other", store),
        "claims_trusted_without_token": lambda: "",
    }[forgery]()
    with running_cluster(kit.pki, store, [], registry_trust=context(kit)) as cluster:
        credential = kit.pki.credential(Role.SERVER, "f")
        registry = RegistryClient(
            grpc.secure_channel(cluster.registry_address, channel_credentials(credential))
        )
        record = pb.ServerRecord(
            node_id=credential.spiffe_id,
            address="127.0.0.1:1",
            model_id=store.model_id,
            manifest_digest=store.manifest_digest,
            span=pb.BlockSpan(start=0, end=2),
            num_blocks=6,
            attestation=token,
            evidence_kind="signed-software" if token else "",
        )
        with pytest.raises(RegistryError, match="PERMISSION_DENIED: announcement refused by policy"):
            registry.announce(record, ttl_seconds=5)
        assert cluster.registry.backend.list(store.model_id) == []


@pytest.mark.parametrize("forgery", ["expired", "unknown_key", "replayed_for_other_node"])
def test_router_refuses_invalid_attestations_in_records(
    kit: TrustKit, tiny_llama_store: ModelStore, forgery: str
) -> None:
    """A record carrying a bad token (registry not enforcing) is excluded: nothing is sent to it."""
    store = tiny_llama_store
    token = {
        "expired": lambda: kit.attest("g", store, now=datetime.now(UTC) - timedelta(hours=2)),
        "unknown_key": lambda: kit.attest("g", store, authority=Ed25519PrivateKey.generate()),
        "replayed_for_other_node": lambda: kit.attest("other", store),
    }[forgery]()
    with running_cluster(kit.pki, store, []) as cluster:
        received: list[Transfer] = []
        server = cluster.add_server("g", "0:6", received=received)  # serves public data only
        server.attestation = token  # what it announces from now on
        time.sleep(1.0)  # next announcement (TTL 2 s, refreshed every 0.67 s)
        with cluster.swarm(trust=context(kit)) as swarm:
            model = cluster.model(swarm, classification="internal")
            with pytest.raises(RoutingError, match="attestation rejected"):
                model(PROMPT)
            failures = swarm.last_guard.attestation_failures  # type: ignore[union-attr]
            assert [(node, error.reason.value) for node, error in failures.items()] == [
                (
                    server.node_id,
                    {
                        "expired": "expired",
                        "unknown_key": "unknown_key",
                        "replayed_for_other_node": "wrong_node",
                    }[forgery],
                )
            ]
    assert received == []


def test_server_failing_the_possession_proof_is_never_sent_activations(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    """Token attests key K, the server now holds key K' (re-issued certificate): proof fails at open."""
    store = tiny_llama_store
    stale_token = kit.attest("rekeyed", store)  # bound to the current key
    kit.pki.ca.issue(Role.SERVER, "rekeyed")  # new key; the old token is now for a key it no longer has
    received: list[Transfer] = []
    with running_cluster(kit.pki, store, []) as cluster:
        server = cluster.add_server("rekeyed", "0:6", received=received)  # serves public data
        server.attestation = stale_token  # announced: valid signature, but for its previous key
        time.sleep(1.0)
        with cluster.swarm(trust=context(kit)) as swarm:
            model = cluster.model(swarm, classification="public")
            # the node fails its proof: it is left out, and no other node can take its blocks
            with pytest.raises(
                RoutingError, match=r"server/rekeyed failed on blocks 0:6 .*key_mismatch"
            ) as caught:
                model.generate(PROMPT, max_new_tokens=2)
            assert isinstance(caught.value.__cause__, TrustError)
            with pytest.raises(RoutingError, match=r"not used: .*server/rekeyed failed .*key_mismatch"):
                model(PROMPT)
    assert received == []


def test_server_refuses_to_start_with_an_attestation_for_another_key(kit: TrustKit, tiny_llama_store) -> None:
    with pytest.raises(TrustError), running_cluster(kit.pki, tiny_llama_store, []) as cluster:
        cluster.add_server(
            "x", "0:6", trust=context(kit), attestation=kit.attest("x", tiny_llama_store, key_of="y")
        )


def test_client_the_server_policy_does_not_allow(kit: TrustKit, tiny_llama_store: ModelStore) -> None:
    """The client believes itself cleared; the server's own settings clear it for public only."""
    store = tiny_llama_store
    server_trust = kit.context(clearances={})  # analyst not listed: public only
    with running_cluster(kit.pki, store, []) as cluster:
        received: list[Transfer] = []
        cluster.add_server(
            "strict", "0:6", trust=server_trust, received=received, attestation=kit.attest("strict", store)
        )
        cluster.wait_until_listed(1)
        with cluster.swarm(trust=context(kit)) as swarm:
            model = cluster.model(swarm, classification="internal")
            with pytest.raises(RoutingError, match="request refused by policy") as caught:
                model.generate(PROMPT, max_new_tokens=2)
            refusal = caught.value.__cause__
            assert isinstance(refusal, RefusedError)
            assert refusal.status == grpc.StatusCode.PERMISSION_DENIED
            assert re.fullmatch(r"request refused by policy \(decision [0-9a-f-]{36}\)", refusal.reason)
            with torch.no_grad():
                assert cluster.model(swarm, classification="public")(PROMPT).logits.shape == (1, 10, 128)
    assert [t.classification for t in received] == ["public"]


def test_revoked_server_certificate_is_refused_by_the_client(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    received: list[Transfer] = []
    with running_cluster(kit.pki, store, []) as cluster:
        server = cluster.add_server(
            "revoked-srv",
            "0:6",
            trust=context(kit),
            received=received,
            attestation=kit.attest("revoked-srv", store),
        )
        cluster.wait_until_listed(1)
        kit.pki.ca.revoke(server.credential.cert_path)
        with cluster.swarm(trust=context(kit, crl=True)) as swarm:
            model = cluster.model(swarm, classification="internal")
            with pytest.raises(RoutingError, match=r"revoked-srv failed on blocks 0:6 .*revoked") as caught:
                model.generate(PROMPT, max_new_tokens=2)
            assert isinstance(caught.value.__cause__, TrustError)
    assert received == []


def test_revoked_client_certificate_is_refused_by_the_server(
    kit: TrustKit, tiny_llama_store: ModelStore
) -> None:
    store = tiny_llama_store
    victim = kit.pki.credential(Role.CLIENT, "leaver")
    with running_cluster(kit.pki, store, []) as cluster:
        cluster.add_server(
            "crl-srv", "0:6", trust=context(kit, crl=True), attestation=kit.attest("crl-srv", store)
        )
        cluster.wait_until_listed(1)
        with cluster.swarm("leaver") as swarm, torch.no_grad():
            model = cluster.model(swarm, classification="public")
            model(PROMPT)  # allowed before revocation
            kit.pki.ca.revoke(victim.cert_path)
            with pytest.raises(RemoteError) as caught:
                model(PROMPT)
    assert caught.value.status == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(caught.value, RefusedError)


def test_classification_per_call_overrides_the_models_default(
    trusted_swarm, kit: TrustKit, reference
) -> None:
    cluster, received = trusted_swarm
    expected = reference.generate(PROMPT, max_new_tokens=3, do_sample=False)
    with cluster.swarm(trust=context(kit)) as swarm:
        model = cluster.model(swarm, classification="public")
        produced = model.generate(PROMPT, max_new_tokens=3, do_sample=False, classification="internal")
        assert produced.tolist() == expected.tolist()
        with pytest.raises(RoutingError, match="client clearance does not cover the data classification"):
            model(PROMPT, classification="restricted")
        with pytest.raises(ConfigurationError, match="unknown classification 'secret'"):
            model(PROMPT, classification="secret")
    assert {t.classification for t in received["t"]} == {"internal"}


def test_restricted_needs_the_prefix_on_the_client(trusted_swarm, kit: TrustKit, reference) -> None:
    cluster, _received = trusted_swarm
    with cluster.swarm(trust=context(kit)) as swarm:
        model = cluster.model(swarm, classification="restricted")
        with pytest.raises(RoutingError, match="restricted data keeps the sensitive prefix on the client"):
            model(PROMPT)


def test_local_blocks_keep_the_prefix_in_the_client(trusted_swarm, kit: TrustKit, reference) -> None:
    """local_blocks=2 (the whole sensitive prefix): output equals local transformers; the first server
    receives the hidden states entering block 2, never earlier ones."""
    cluster, received = trusted_swarm
    expected_tokens = reference.generate(PROMPT, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = reference(PROMPT, output_hidden_states=True)
    with cluster.swarm(trust=context(kit)) as swarm:
        model = DistributedModelForCausalLM.from_pretrained(
            cluster.store, swarm=swarm, classification="internal", local_blocks=2
        )
        with torch.no_grad():
            logits = model(PROMPT).logits
        tokens = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert (logits - expected.logits).abs().max().item() <= 1e-4
    assert tokens.tolist() == expected_tokens.tolist()
    assert received["t"] == []  # the trusted prefix server was not needed and saw nothing
    first = received["a"][0]  # the stateless forward: inputs are the hidden states entering block 2
    from fincluster.client.transport import inputs_to_wire
    from fincluster.wire.codec import SpanInputs
    from fincluster.wire.tensors import digest

    mask = torch.ones(1, 10, dtype=torch.int64)
    block2_inputs = SpanInputs(expected.hidden_states[2], mask, torch.arange(10).unsqueeze(0))
    assert first.input_sha256 == digest(inputs_to_wire(block2_inputs))
    block0_inputs = SpanInputs(expected.hidden_states[0], mask, torch.arange(10).unsqueeze(0))
    assert first.input_sha256 != digest(inputs_to_wire(block0_inputs))


def test_pins_narrow_placement(trusted_swarm, kit: TrustKit) -> None:
    cluster, _ = trusted_swarm
    other = kit.pki.credential(Role.SERVER, "elsewhere").spiffe_id
    with cluster.swarm(trust=context(kit)) as swarm:
        pinned_away = DistributedModelForCausalLM.from_pretrained(
            cluster.store, swarm=swarm, classification="public", pin={range(0, 2): [other]}
        )
        with pytest.raises(RoutingError, match=r"blocks 0:2 are pinned to spiffe://.*/server/elsewhere"):
            pinned_away(PROMPT)
        by_tier = DistributedModelForCausalLM.from_pretrained(
            cluster.store, swarm=swarm, classification="public", pin={range(2, 6): "trusted"}
        )
        with pytest.raises(RoutingError, match="pinned to tier 'trusted'"):
            by_tier(PROMPT)
        to_t = DistributedModelForCausalLM.from_pretrained(
            cluster.store,
            swarm=swarm,
            classification="public",
            pin={range(0, 2): [cluster.servers[0].node_id]},
        )
        with torch.no_grad():
            assert to_t(PROMPT).logits.shape == (1, 10, 128)


def test_without_policy_only_public_data_leaves_the_client(tiny_cluster: Cluster) -> None:
    with tiny_cluster.swarm() as swarm:
        model = tiny_cluster.model(swarm, classification="internal")
        with pytest.raises(RoutingError, match="no policy engine is configured"):
            model(PROMPT)


def test_policy_with_a_syntax_error_refuses_startup(tmp_path: Path, pki: Pki) -> None:
    broken = tmp_path / "policies"
    broken.mkdir()
    for source in POLICY_DIR.iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    lines = (broken / "route.rego").read_text().splitlines()
    line_number = next(i for i, line in enumerate(lines, 1) if line.startswith("allow if"))
    lines[line_number - 1] = "allow if count(reasons) == == 0"
    (broken / "route.rego").write_text("\n".join(lines) + "\n")
    credential = pki.credential(Role.SERVER, "s0")
    with pytest.raises(PolicyError, match=rf"route\.rego:{line_number}"):
        trust_from_settings(TrustSettings(policy_dir=broken), credential)


def test_unreachable_opa_server_fails_closed(pki: Pki) -> None:
    credential = pki.credential(Role.SERVER, "s0")
    with pytest.raises(PolicyError):
        trust = trust_from_settings(
            TrustSettings(policy_dir=POLICY_DIR, opa_url="http://127.0.0.1:9"), credential
        )
        assert trust.policy is not None
        from fincluster.spans import BlockSpan
        from fincluster.trust.policy import DecisionKind, ModelRef, NodeRef, PolicyInput

        trust.policy.decide(
            DecisionKind.ROUTE,
            PolicyInput(
                model=ModelRef(id="m", num_blocks=4),
                span=BlockSpan(0, 1),
                node=NodeRef(id=credential.spiffe_id, claims=None),
            ),
        )
