"""What fine-tuning needs from the client model beyond a forward pass: deep prompts and micro-batches.

peft's prompt learning needs nothing of its own from the swarm: prompt tuning prepends its virtual
tokens as ``inputs_embeds`` (gradients flow back through the remote blocks), and prefix tuning passes
its per-layer keys and values as a prefilled ``past_key_values`` cache, which :func:`deep_prompts`
turns into the :class:`~fincluster.wire.codec.BlockPrefixes` that travel with each hop's request.
So ``get_peft_model(DistributedModelForCausalLM, PromptTuningConfig(...) | PrefixTuningConfig(...))``,
``save_pretrained`` / ``PeftModel.from_pretrained``, plain optimizers and transformers' ``Trainer``
work as they do on a local model, while every trained parameter stays in the client's process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import Cache, DynamicCache

from fincluster.errors import UsageError
from fincluster.wire.codec import BlockPrefixes

if TYPE_CHECKING:
    from fincluster.client.chain import InferenceSession


class RemoteSessionCache(DynamicCache):
    """What ``forward`` returns as ``past_key_values`` inside an inference session: it holds nothing
    (the keys and values live on the servers) but its length is the positions the session holds, so
    code that reads the cache's length — peft's prompt injection, which must happen only before the
    first step, and ``generate``'s slicing — sees what it would see with a local model."""

    def __init__(self, session: InferenceSession) -> None:
        super().__init__()
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position


def deep_prompts(past_key_values: object, num_blocks: int) -> BlockPrefixes | None:
    """The deep prompts in a ``past_key_values`` cache a caller (peft's prefix tuning) filled, or None
    for no cache or an empty one (what ``generate`` passes)."""
    if (
        not isinstance(past_key_values, Cache)
        or isinstance(past_key_values, RemoteSessionCache)
        or past_key_values.get_seq_length() == 0
    ):
        return None
    layers = past_key_values.layers
    keys_of: list[torch.Tensor] = []
    values_of: list[torch.Tensor] = []
    for layer in layers:
        layer_keys, layer_values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(layer_keys, torch.Tensor) and isinstance(layer_values, torch.Tensor):
            keys_of.append(layer_keys)
            values_of.append(layer_values)
    if len(layers) != num_blocks or len(keys_of) != num_blocks or any(k.dim() != 4 for k in keys_of):
        raise UsageError(
            f"past_key_values holds {len(layers)} layers; deep prompts need keys and values "
            f"[batch, kv_heads, prefix, head_dim] for each of the model's {num_blocks} blocks"
        )
    keys = torch.stack(keys_of)  # [blocks, batch, kv_heads, prefix, head_dim]
    values = torch.stack(values_of)
    if keys.shape != values.shape:
        raise UsageError(f"deep prompts: keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    return BlockPrefixes(keys, values)


def without_prefix_columns(mask: torch.Tensor, prefix: int) -> torch.Tensor:
    """The token part of a mask that covers ``prefix`` deep-prompt positions first (peft prepends ones;
    servers always attend to the prefix, so anything else there is refused)."""
    if not prefix:
        return mask
    if mask.shape[1] < prefix or not bool((mask[:, :prefix] == 1).all()):
        raise UsageError(
            f"attention_mask: the first {prefix} columns cover the deep prompts and must be ones "
            f"(mask of {mask.shape[1]} columns given)"
        )
    return mask[:, prefix:]


def micro_batches(batch: int, tokens_per_row: int, max_tokens: int | None) -> list[slice]:
    """Rows of a batch grouped so that each group carries at most ``max_tokens`` tokens (at least one
    row per group: a single longer sequence is the servers' limit to refuse)."""
    if max_tokens is None or batch * tokens_per_row <= max_tokens:
        return [slice(0, batch)]
    rows = max(1, max_tokens // max(tokens_per_row, 1))
    return [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]
