"""The client part runs where it is put, and computes the LM head only for the positions asked for.

transformers' ``generate`` passes ``logits_to_keep=1``: in prefill only the last position's logits
are needed, so the head (the largest matrix on the client) runs on one position instead of all.
"""

from __future__ import annotations

import pytest
import torch

from fincluster.client import DistributedModelForCausalLM, LocalSwarm
from fincluster.errors import UsageError
from fincluster.serving.local import LocalSpanClient
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from tests.helpers import store_of, tiny_model


@pytest.fixture(scope="module")
def reference_and_store(tmp_path_factory: pytest.TempPathFactory):
    reference = tiny_model("llama", seed=5)
    return reference, store_of(reference, tmp_path_factory.mktemp("device") / "store", "tiny-device")


def in_process(store: ModelStore, **options: object) -> DistributedModelForCausalLM:
    clients = [
        LocalSpanClient.from_store(store, BlockSpan.parse(span), dtype=torch.float32, node_id=span)
        for span in ("0:3", "3:6")
    ]
    return DistributedModelForCausalLM.from_pretrained(
        store, swarm=LocalSwarm(clients), classification="public", **options
    )


def test_logits_to_keep_computes_the_head_for_the_last_positions_only(reference_and_store) -> None:
    reference, store = reference_and_store
    model = in_process(store)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = reference(ids).logits
        last = model(ids, logits_to_keep=1).logits
        chosen = model(ids, logits_to_keep=torch.tensor([0, 4])).logits
        every = model(ids).logits
    assert last.shape == (2, 1, 128)
    assert (last - full[:, -1:]).abs().max().item() <= 1e-5
    assert (chosen - full[:, [0, 4]]).abs().max().item() <= 1e-5
    assert every.shape == full.shape


def test_generate_runs_the_lm_head_on_one_position_per_step(reference_and_store) -> None:
    reference, store = reference_and_store
    model = in_process(store)
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[1]))
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    produced = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert produced.tolist() == reference.generate(ids, max_new_tokens=4, do_sample=False).tolist()
    assert rows == [1, 1, 1, 1]  # the 9-token prompt too


def test_device_is_chosen_at_loading_and_moves_keep_the_wire_dtype(reference_and_store) -> None:
    reference, store = reference_and_store
    model = in_process(store, device="cpu", local_blocks=0)
    assert model.device == torch.device("cpu")
    assert model.to("cpu") is model
    with pytest.raises(UsageError, match="cannot convert the model to float16"):
        model.to("cpu", torch.float16)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = reference.generate(ids, max_new_tokens=3, do_sample=False)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).tolist() == expected.tolist()
