"""The demo model through a 3-server mTLS swarm equals the same model run locally by transformers."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PROMPTS = [
    "What is a bond's yield to maturity?",
    "Explain the difference between a stock and a bond.",
    "List three risks a bank faces when lending to small businesses.",
    "What does the Basel III leverage ratio measure?",
    "Write one sentence about inflation and interest rates.",
]
LOGIT_TOLERANCE = 1e-4


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_equal_local_generate(demo_cluster: Cluster, demo_reference, prompt: str) -> None:
    reference, tokenizer = demo_reference
    ids = chat_ids(tokenizer, prompt)
    expected = reference.generate(ids, max_new_tokens=32, do_sample=False)
    with demo_cluster.swarm() as swarm:
        produced = demo_cluster.model(swarm).generate(ids, max_new_tokens=32, do_sample=False)
    assert produced.shape[1] == ids.shape[1] + 32 or produced[0, -1] == tokenizer.eos_token_id
    assert produced.tolist() == expected.tolist()


def test_full_forward_logits_within_tolerance(demo_cluster: Cluster, demo_reference) -> None:
    reference, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPTS[0])
    with torch.no_grad():
        expected = reference(ids).logits
        with demo_cluster.swarm() as swarm:
            produced = demo_cluster.model(swarm)(ids).logits
    assert produced.shape == expected.shape
    assert (produced - expected).abs().max().item() <= LOGIT_TOLERANCE


def test_session_steps_match_parallel_forward(demo_cluster: Cluster, demo_reference) -> None:
    """Prompt first, then one token per step: each step's logits equal the parallel forward's."""
    _, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPTS[1])
    prompt_len = ids.shape[1] - 6
    with demo_cluster.swarm() as swarm, torch.no_grad():
        model = demo_cluster.model(swarm)
        parallel = model(ids).logits
        steps = []
        with model.inference_session(max_length=ids.shape[1]) as session:
            steps.append(model(ids[:, :prompt_len]).logits)
            for position in range(prompt_len, ids.shape[1]):
                steps.append(model(ids[:, position : position + 1]).logits)
            assert session.position == ids.shape[1]
    stepped = torch.cat(steps, dim=1)
    assert (stepped - parallel).abs().max().item() <= LOGIT_TOLERANCE


def test_padded_batch_of_two_matches_local(demo_cluster: Cluster, demo_reference) -> None:
    reference, tokenizer = demo_reference
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS[:2]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any(), "the prompts must differ in length so padding is exercised"
    expected = reference.generate(**batch, max_new_tokens=16, do_sample=False)
    with demo_cluster.swarm() as swarm:
        produced = demo_cluster.model(swarm).generate(**batch, max_new_tokens=16, do_sample=False)
    assert produced.tolist() == expected.tolist()


def test_gradients_wrt_input_embeddings_match_local_autograd(demo_cluster: Cluster, demo_reference) -> None:
    reference, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPTS[3])[:, :24]
    weights = torch.randn(reference.config.vocab_size, generator=torch.Generator().manual_seed(0))
    local_embeds = reference.get_input_embeddings()(ids).detach().requires_grad_(True)
    (reference(inputs_embeds=local_embeds).logits @ weights).sum().backward()
    with demo_cluster.swarm() as swarm:
        model = demo_cluster.model(swarm)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        (model(inputs_embeds=embeds).logits @ weights).sum().backward()
    assert embeds.grad is not None and local_embeds.grad is not None
    assert local_embeds.grad.abs().max().item() > 0
    assert (embeds.grad - local_embeds.grad).abs().max().item() <= LOGIT_TOLERANCE
