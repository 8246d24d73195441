"""Which store file each tensor of a transformers causal LM goes to.

One generic mapping, based on the state-dict key names that transformers gives every Llama-style
family (Llama 2/3, Mistral, Qwen2, ...)::

    model.embed_tokens.weight       -> client.safetensors   embed_tokens.weight
    model.norm.weight               -> client.safetensors   norm.weight
    lm_head.weight                  -> client.safetensors   lm_head.weight (dropped when tied)
    model.layers.{i}.{name}         -> blocks/block_{i}     {name}

Anything else is refused, so no weight is silently left behind.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModel, PretrainedConfig

from fincluster.errors import ConfigurationError, StoreError

EMBEDDINGS = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
_CLIENT_KEYS = {EMBEDDINGS: "embed_tokens.weight", FINAL_NORM: "norm.weight", LM_HEAD: "lm_head.weight"}
_LAYER_KEY = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\.(.+)")
# Rotary frequencies are recomputed from the config; older checkpoints still carry them.
_DERIVED_SUFFIX = "rotary_emb.inv_freq"


@dataclass(frozen=True)
class StorePlan:
    """Store key -> source key, for the client part and for each block."""

    client: Mapping[str, str]
    blocks: tuple[Mapping[str, str], ...]


def plan_store(source_keys: Iterable[str], *, num_blocks: int, tie_word_embeddings: bool) -> StorePlan:
    client: dict[str, str] = {}
    blocks: list[dict[str, str]] = [{} for _ in range(num_blocks)]
    unexpected: list[str] = []
    for key in source_keys:
        layer = _LAYER_KEY.fullmatch(key)
        if key.endswith(_DERIVED_SUFFIX) or (key == LM_HEAD and tie_word_embeddings):
            continue
        if key in _CLIENT_KEYS:
            client[_CLIENT_KEYS[key]] = key
        elif layer is not None and int(layer[1]) < num_blocks:
            blocks[int(layer[1])][layer[2]] = key
        else:
            unexpected.append(key)
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5])
        raise ConfigurationError(
            f"the source has {len(unexpected)} tensor(s) outside the Llama-style layout of a "
            f"{num_blocks}-layer model: {shown}{' ...' if len(unexpected) > 5 else ''}"
        )
    required = [EMBEDDINGS, FINAL_NORM] + ([] if tie_word_embeddings else [LM_HEAD])
    missing = [key for key in required if _CLIENT_KEYS[key] not in client]
    missing += [f"model.layers.{index}.*" for index, block in enumerate(blocks) if not block]
    if missing:
        raise ConfigurationError(f"the source lacks tensor(s): {', '.join(missing[:5])}")
    return StorePlan(client=client, blocks=tuple(blocks))


def cut_config(config: PretrainedConfig, layers: range) -> PretrainedConfig:
    """A copy of the model config restricted to ``layers`` (layer count and per-layer attention types);
    ``range(0)`` gives the config of the client part (embeddings, norm, head: no layers)."""
    if layers.stop > config.num_hidden_layers:
        raise StoreError(
            f"blocks {layers.start}:{layers.stop} exceed the model's {config.num_hidden_layers} blocks"
        )
    sub = copy.deepcopy(config)
    sub.num_hidden_layers = len(layers)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sub.layer_types = list(layer_types[layers.start : layers.stop])
    return sub


_SKELETON_LOCK = threading.Lock()
"""transformers patches ``torch.nn.init`` process-wide while it builds a model; building one model at a
time keeps two threads from restoring each other's patches."""


def empty_model(
    config: PretrainedConfig, factory: Callable[[PretrainedConfig], Any] = AutoModel.from_config
) -> Any:
    """A model of ``config`` (the family's base model by default) with its parameters and buffers on
    the meta device: no memory, no initialisation, and no process-global patch (``torch.device`` is a
    thread-local mode), so threads may build models at the same time."""
    with _SKELETON_LOCK, torch.device("meta"):
        return factory(config)
