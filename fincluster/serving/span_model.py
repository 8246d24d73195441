"""A run of consecutive transformer blocks, computed by transformers' own code.

The span is the family's base model class (``LlamaModel``, ``MistralModel``, ``Qwen2Model`` …) built
from a copy of the model config cut down to the span: its decoder layers, rotary embeddings, causal /
sliding-window masks and KV cache are transformers' own, so remote output matches a local run. The
embedding table is dropped (inputs are hidden states) and the final norm is an identity (the client
applies it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from accelerate import init_empty_weights
from transformers import AutoModel, DynamicCache, PretrainedConfig

from fincluster.errors import StoreError
from fincluster.spans import BlockSpan
from fincluster.store.partition import cut_config


class SpanModel(torch.nn.Module):
    """Blocks ``span`` of a model; forward maps hidden states to hidden states."""

    def __init__(
        self,
        config: PretrainedConfig,
        span: BlockSpan,
        block_states: Mapping[int, Mapping[str, torch.Tensor]],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.span = span
        self.config = cut_config(config, span.blocks)
        self.dtype = dtype
        with init_empty_weights(include_buffers=False):
            base = AutoModel.from_config(self.config)
        base.embed_tokens = None
        base.norm = torch.nn.Identity()
        state = {
            f"layers.{index - span.start}.{name}": tensor.to(dtype)
            for index in range(span.start, span.end)
            for name, tensor in block_states[index].items()
        }
        missing, unexpected = base.load_state_dict(state, strict=False, assign=True)
        if unexpected:
            raise StoreError(f"unexpected weights for blocks {span}: {sorted(unexpected)[:5]}")
        still_empty = [name for name, param in base.named_parameters() if param.is_meta]
        if missing or still_empty:
            raise StoreError(
                f"weights missing for blocks {span}: {sorted(set(missing) | set(still_empty))[:5]}"
            )
        base.requires_grad_(False)
        self.base = base.to(device).eval()

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.base.parameters()).device
        return device

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for one inference session over this span."""
        return DynamicCache(config=self.config)

    def __call__(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        output: torch.Tensor = super().__call__(hidden_states, attention_mask, position_ids, cache)
        return output

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        # hidden_states: [batch, seq, hidden]; attention_mask: [batch, past + seq]; position_ids: [batch, seq]
        output = self.base(
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        hidden: torch.Tensor = output.last_hidden_state
        return hidden


def cache_bytes_per_token(config: PretrainedConfig, span: BlockSpan, dtype: torch.dtype) -> int:
    """KV-cache bytes one token of one sequence takes in ``span`` (keys and values of every block)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(2 * len(span) * heads * head_dim * itemsize)
