"""The client model over in-process spans (the transport seam, no gRPC) matches transformers exactly.

These run in well under a second per architecture, so most client logic (generation, masks, sessions,
autograd through hops, local blocks) is checked without sockets; the gRPC tests check the network.
"""

from __future__ import annotations

import pytest
import torch

from fincluster.client import DistributedModelForCausalLM, LocalSwarm
from fincluster.serving.local import LocalSpanClient
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from tests.helpers import store_of, tiny_model

TOLERANCE = 1e-5
SPLITS = {"llama": ("0:1", "1:4", "4:6"), "mistral": ("0:3", "3:6"), "qwen2": ("0:2", "2:3", "3:5", "5:6")}


def in_process_model(
    store: ModelStore, spans: tuple[str, ...], **options: object
) -> DistributedModelForCausalLM:
    clients = [
        LocalSpanClient.from_store(store, BlockSpan.parse(span), dtype=torch.float32, node_id=f"local-{span}")
        for span in spans
    ]
    return DistributedModelForCausalLM.from_pretrained(
        store, swarm=LocalSwarm(clients), classification="public", **options
    )


@pytest.fixture(scope="module", params=sorted(SPLITS))
def arch_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    reference = tiny_model(request.param, seed=3)
    store = store_of(reference, tmp_path_factory.mktemp(request.param) / "store", f"tiny-{request.param}")
    return request.param, reference, store


def test_padded_greedy_generation_equals_transformers(arch_store) -> None:
    arch, reference, store = arch_store
    prompts = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompts)
    mask[0, :3] = 0
    expected = reference.generate(prompts, attention_mask=mask, max_new_tokens=10, do_sample=False)
    produced = in_process_model(store, SPLITS[arch]).generate(
        prompts, attention_mask=mask, max_new_tokens=10, do_sample=False
    )
    assert produced.tolist() == expected.tolist()


def test_logits_and_stepwise_session_equal_transformers(arch_store) -> None:
    arch, reference, store = arch_store
    ids = torch.randint(3, 128, (1, 11), generator=torch.Generator().manual_seed(8))
    model = in_process_model(store, SPLITS[arch])
    with torch.no_grad():
        local = reference(ids).logits
        assert (model(ids).logits - local).abs().max().item() <= TOLERANCE
        with model.inference_session(max_length=11):
            stepped = torch.cat([model(ids[:, t : t + 1]).logits for t in range(11)], dim=1)
    assert (stepped - local).abs().max().item() <= TOLERANCE


def test_gradients_through_the_hops_equal_local_autograd(arch_store) -> None:
    arch, reference, store = arch_store
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(9))
    local_embeds = reference.get_input_embeddings()(ids).detach().requires_grad_(True)
    reference(inputs_embeds=local_embeds).logits.square().mean().backward()
    model = in_process_model(store, SPLITS[arch])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.square().mean().backward()
    assert local_embeds.grad is not None and embeds.grad is not None
    assert (embeds.grad - local_embeds.grad).abs().max().item() <= TOLERANCE


def test_local_blocks_run_in_process_and_the_rest_on_the_hops(arch_store) -> None:
    arch, reference, store = arch_store
    first = SPLITS[arch][0]
    remote = SPLITS[arch][1:]
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(10))
    model = in_process_model(store, remote, local_blocks=BlockSpan.parse(first).end)
    assert model.local is not None and model.local.span == BlockSpan.parse(first)
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert model.generate(ids, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()


def test_models_built_in_four_threads_at_once_are_all_complete_and_torch_is_left_unpatched(
    arch_store,
) -> None:
    """No process-global patch while building: every model gets its weights, and torch.nn.init and
    nn.Module are what they were."""
    from concurrent.futures import ThreadPoolExecutor

    arch, reference, store = arch_store
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(12))
    expected = reference.generate(ids, max_new_tokens=4, do_sample=False).tolist()
    init_before = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    register_before = torch.nn.Module.register_parameter

    def build_and_generate(_: int) -> list[list[int]]:
        model = in_process_model(store, SPLITS[arch])
        assert not any(p.is_meta for p in model.parameters())
        return model.generate(ids, max_new_tokens=4, do_sample=False).tolist()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(build_and_generate, range(4)))
    assert results == [expected] * 4
    assert {name: getattr(torch.nn.init, name) for name in init_before} == init_before
    assert torch.nn.Module.register_parameter is register_before
