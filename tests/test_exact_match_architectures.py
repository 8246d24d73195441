"""Tiny random-weight Llama, Mistral and Qwen2 models through a real 3-server swarm match transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import Pki, running_cluster, store_of, tiny_model

pytestmark = pytest.mark.e2e
TOLERANCE = 1e-4


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_generation_logits_sessions_and_gradients_match(arch: str, pki: Pki, tmp_path: Path) -> None:
    reference = tiny_model(arch)
    store = store_of(reference, tmp_path / "store", f"tiny-{arch}")
    prompts = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # left padding on the second row
    with running_cluster(pki, store, ["0:2", "2:3", "3:6"]) as cluster, cluster.swarm() as swarm:
        model = cluster.model(swarm)
        # greedy generation, padded batch, longer than the sliding window
        expected = reference.generate(prompts, attention_mask=mask, max_new_tokens=12, do_sample=False)
        produced = model.generate(prompts, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert produced.tolist() == expected.tolist()
        # full forward logits
        with torch.no_grad():
            local = reference(prompts).logits
            remote = model(prompts).logits
        assert (remote - local).abs().max().item() <= TOLERANCE
        # a session fed one token at a time equals the parallel forward
        with torch.no_grad(), model.inference_session(max_length=12):
            stepped = torch.cat([model(prompts[:, t : t + 1]).logits for t in range(12)], dim=1)
        assert (stepped - local).abs().max().item() <= TOLERANCE
        # gradients w.r.t. input embeddings
        local_embeds = reference.get_input_embeddings()(prompts).detach().requires_grad_(True)
        reference(inputs_embeds=local_embeds).logits.square().mean().backward()
        embeds = model.get_input_embeddings()(prompts).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits.square().mean().backward()
        assert local_embeds.grad is not None and embeds.grad is not None
        assert (embeds.grad - local_embeds.grad).abs().max().item() <= TOLERANCE
