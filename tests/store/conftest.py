"""Tiny random-weight Llama-family checkpoints (hidden 64, 4 layers, vocab 128), built offline.

Tiny models on the hub would need a download, so the tokenizer is a word-level one built in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

WORDS = ("<unk>", "<s>", "</s>", "hello", "world", "bank", "ledger")


def build_tiny_model(
    family: str, *, tied: bool = False, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    config_class: Any = CONFIG_MAPPING[family]
    config = config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    # Dropout is zero in these configs, so train or eval mode computes the same.
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    return model


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(
        models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def tiny_model() -> Callable[..., PreTrainedModel]:
    """``tiny_model(family, tied=False, dtype=torch.float32)``: a seeded random model."""
    return build_tiny_model


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, PreTrainedModel]]:
    """``make_checkpoint(family, tied=, dtype=, max_shard_size=, with_tokenizer=, name=)`` -> (dir, model).

    The directory is what ``save_pretrained`` writes: safetensors, sharded with an index when
    ``max_shard_size`` is given.
    """

    def make(
        family: str = "llama",
        *,
        max_shard_size: str | None = None,
        with_tokenizer: bool = False,
        name: str = "tiny-model",
        **model_options: Any,
    ) -> tuple[Path, PreTrainedModel]:
        model = build_tiny_model(family, **model_options)
        path = tmp_path / name
        if max_shard_size is None:
            model.save_pretrained(path)
        else:
            model.save_pretrained(path, max_shard_size=max_shard_size)
        if with_tokenizer:
            build_tiny_tokenizer().save_pretrained(path)
        return path, model

    return make
