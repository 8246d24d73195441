"""What an analyst meets in the SDK: defaults that follow transformers, and mistakes refused early with
messages that say what is wrong and what to do."""

from __future__ import annotations

import re
import socket

import pytest
import torch

from fincluster.client import DistributedModelForCausalLM, LocalSwarm, Swarm
from fincluster.errors import ClosedError, ConfigurationError, RegistryError, RemoteError, UsageError
from fincluster.serving.local import LocalSpanClient
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import Cluster, Pki, store_of, tiny_model

SPANS = ("0:2", "2:6")


@pytest.fixture(scope="module")
def reference_and_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, ModelStore]:
    reference = tiny_model("llama", seed=5)
    return reference, store_of(reference, tmp_path_factory.mktemp("sdk") / "store", "tiny-sdk")


def local_model(store: ModelStore, **options: object) -> DistributedModelForCausalLM:
    clients = [
        LocalSpanClient.from_store(store, BlockSpan.parse(span), dtype=torch.float32, node_id=f"local-{span}")
        for span in SPANS
    ]
    return DistributedModelForCausalLM.from_pretrained(
        store, swarm=LocalSwarm(clients), classification="public", **options
    )


def prompt(length: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(11))


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default:UserWarning")
def test_generate_without_max_new_tokens_follows_transformers_defaults(reference_and_store) -> None:
    reference, store = reference_and_store
    expected = reference.generate(prompt(), do_sample=False)
    produced = local_model(store).generate(prompt(), do_sample=False)
    assert expected.shape == (1, 5 + 20)  # transformers' model-agnostic default: 20 new tokens
    assert produced.tolist() == expected.tolist()


def test_generate_with_max_length_stops_there(reference_and_store) -> None:
    _, store = reference_and_store
    assert local_model(store).generate(prompt(), max_length=9, do_sample=False).shape == (1, 9)


def test_generate_past_the_session_length_is_refused_before_anything_is_sent(reference_and_store) -> None:
    _, store = reference_and_store
    model = local_model(store)
    with model.inference_session(max_length=10) as session:
        with pytest.raises(UsageError) as caught:
            model.generate(prompt(), max_new_tokens=8, do_sample=False)
        assert str(caught.value) == (
            "8 new tokens do not fit the active inference session: it holds 0 of its max_length=10 tokens "
            "and this call would need 12; ask for at most 6 new tokens, or open the session with "
            "inference_session(max_length=12)"
        )
        assert session.position == 0 and session.hops == []  # nothing was generated or sent
        first = model.generate(prompt(), max_new_tokens=6, do_sample=False)  # exactly fits: 5 + 6 - 1
        assert first.shape == (1, 11) and session.position == 10


def test_converting_the_model_to_another_dtype_is_refused_at_to(reference_and_store) -> None:
    _, store = reference_and_store
    model = local_model(store)
    message = (
        "cannot convert the model to float16: its activations travel to the servers as float32, the "
        "dtype it was loaded with, and servers refuse any other. For a swarm of float16 servers load it "
        "as DistributedModelForCausalLM.from_pretrained(store, swarm=..., dtype=torch.float16)"
    )
    with pytest.raises(UsageError) as caught:
        model.to(torch.float16)
    assert str(caught.value) == message
    with pytest.raises(UsageError, match="cannot convert the model to bfloat16"):
        model.to("cpu", dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="cannot convert the model to float16"):
        model.half()
    assert model.to("cpu") is model and model.float() is model  # same dtype, or a device: fine
    assert model.dtype == torch.float32


def test_repr_shows_where_the_blocks_run_and_the_last_chain(reference_and_store) -> None:
    _, store = reference_and_store
    model = local_model(store)
    before = repr(model)
    assert "model_id='tiny-sdk', blocks=6, classification=public, dtype=float32" in before
    assert "blocks 0:6 run on the swarm, routed per call (no call routed yet)" in before
    model(prompt())
    assert "(last chain: 0:2 local-0:2, 2:6 local-2:6)" in repr(model)
    assert "client part below (num_parameters counts only it)" in repr(model)
    client_part = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == client_part == 128 * 64 * 2 + 64  # embeddings, LM head, norm


def test_a_tier_pin_without_attestation_verification_is_refused_at_construction(
    reference_and_store,
) -> None:
    _, store = reference_and_store
    with pytest.raises(ConfigurationError) as caught:
        local_model(store, pin={range(0, 2): "trusted"})
    assert str(caught.value).startswith(
        "pin {range(0, 2): 'trusted'} cannot be honoured: a node's tier is what its verified attestation "
        "says, and this swarm connection verifies no attestations"
    )
    with pytest.raises(ConfigurationError, match=r"'trustd' is not a trust tier \(trusted, standard\)"):
        local_model(store, pin={range(0, 2): "trustd"})


def test_a_tier_pin_on_a_swarm_without_trust_is_refused(tiny_cluster: Cluster) -> None:
    with tiny_cluster.swarm() as swarm, pytest.raises(ConfigurationError, match="verifies no attestations"):
        DistributedModelForCausalLM.from_pretrained(
            tiny_cluster.store, swarm=swarm, classification="public", pin={range(0, 2): "trusted"}
        )


@pytest.mark.e2e
def test_generate_after_the_swarm_closed_says_so(tiny_cluster: Cluster) -> None:
    with tiny_cluster.swarm() as swarm:
        model = tiny_cluster.model(swarm)
        model.generate(prompt(), max_new_tokens=2, do_sample=False)
    with pytest.raises(ClosedError) as caught:
        model.generate(prompt(), max_new_tokens=2, do_sample=False)
    assert str(caught.value) == (
        "the swarm connection of this model is closed (its `with Swarm(...)` block ended): "
        "open a new Swarm and load the model with it"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.e2e
def test_a_wrong_registry_address_is_noticed_when_the_swarm_opens(
    pki: Pki, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where the default audit log would go
    port = free_port()
    with pytest.raises(RegistryError) as caught:
        Swarm(registry=f"127.0.0.1:{port}", credential=pki.credential(Role.CLIENT, "analyst"))
    assert str(caught.value) == (
        f"registry check failed: no registry at 127.0.0.1:{port} (connection refused) [UNAVAILABLE]"
    )
    assert list(tmp_path.iterdir()) == []  # a swarm that did not open left no audit log behind


@pytest.mark.e2e
def test_a_registry_of_another_ca_is_explained_when_the_swarm_opens(
    tiny_cluster: Cluster, foreign_pki: Pki
) -> None:
    with pytest.raises(RegistryError) as caught:
        Swarm(
            registry=tiny_cluster.registry_address,
            credential=foreign_pki.credential(Role.CLIENT, "intruder"),
            audit=None,
        )
    assert (
        f"the registry's certificate at {tiny_cluster.registry_address} is not from the swarm CA this "
        "node trusts (check the CA certificate: --ca-cert / tls.ca_cert)"
    ) in str(caught.value)


@pytest.mark.e2e
def test_an_unreachable_server_is_named_with_its_address(tiny_cluster: Cluster) -> None:
    gone = pb.ServerRecord(
        node_id=tiny_cluster.servers[0].node_id,
        address=f"127.0.0.1:{free_port()}",
        model_id="m",
        span=pb.BlockSpan(start=0, end=2),
    )
    with tiny_cluster.swarm() as swarm, pytest.raises(RemoteError) as caught:
        swarm.span_client(gone).info()
    assert re.search(
        rf"^no server at {gone.address} \(connection refused\) \(node=spiffe://\S+/server/s0, "
        r"blocks=0:2, status=UNAVAILABLE\)$",
        str(caught.value),
    )
