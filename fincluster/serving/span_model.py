"""A run of consecutive transformer blocks, computed by transformers' own code.

The span is the family's base model class (``LlamaModel``, ``MistralModel``, ``Qwen2Model`` …) built
from a copy of the model config cut down to the span: its decoder layers, rotary embeddings, causal /
sliding-window masks and KV cache are transformers' own, so remote output matches a local run. The
embedding table is dropped (inputs are hidden states) and the final norm is an identity (the client
applies it).

Any contiguous sub-span of the loaded span can be run: a *view* is another base-model object whose
layer list holds the same decoder-layer modules (no weight is copied), built once per sub-span. A
session's KV cache over a sub-span is an :class:`OffsetCache`, because the shared layers address the
cache by their index in the whole span. Deep prompts (peft prefix tuning) are keys and values put into
such a cache ahead of the tokens (:func:`prefill_cache`), so the layers attend to them exactly as
they do locally, and autograd reaches them through the cache's own concatenation.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache

from fincluster.errors import OutOfRangeError, StoreError
from fincluster.spans import BlockSpan
from fincluster.store.partition import cut_config, empty_model
from fincluster.values import Quantization


class OffsetCache(DynamicCache):
    """A ``DynamicCache`` for a sub-span that starts ``offset`` layers into the loaded span: decoder
    layers call ``update`` with their index in the whole span, everything else uses the sub-span's."""

    def __init__(self, *, config: PretrainedConfig, offset: int) -> None:
        super().__init__(config=config)
        self.offset = offset

    def update(  # type: ignore[override]
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result: tuple[torch.Tensor, torch.Tensor] = super().update(
            key_states, value_states, layer_idx - self.offset, *args, **kwargs
        )
        return result


def prefill_cache(cache: DynamicCache, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put deep-prompt prefixes of every block into an empty ``cache`` ahead of the tokens; keys, values:
    [blocks, batch, kv_heads, prefix, head_dim], indexed by the cache's own blocks (not the offset ones)."""
    for index in range(keys.shape[0]):
        DynamicCache.update(cache, keys[index], values[index], index)


class SpanModel(torch.nn.Module):
    """Blocks ``span`` of a model; forward maps hidden states to hidden states over any sub-span."""

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
        self.model_config = config
        self.config = cut_config(config, span.blocks)
        self.dtype = dtype
        self.quantization = Quantization.NONE  # fincluster.serving.quant changes it
        base = empty_model(self.config)
        base.embed_tokens = None
        base.norm = torch.nn.Identity()
        state = {
            f"layers.{index - span.start}.{name}": tensor.to(dtype)
            for index in span.blocks
            for name, tensor in block_states[index].items()
        }
        missing, unexpected = base.load_state_dict(state, strict=False, assign=True)
        if unexpected:
            raise StoreError(f"unexpected weights for blocks {span}: {sorted(unexpected)[:5]}")
        # rotary frequencies are buffers computed from the config, not weights: build them for real
        base.rotary_emb = type(base.rotary_emb)(config=self.config)
        still_empty = [
            name for name, tensor in (*base.named_parameters(), *base.named_buffers()) if tensor.is_meta
        ]
        if missing or still_empty:
            raise StoreError(
                f"weights missing for blocks {span}: {sorted(set(missing) | set(still_empty))[:5]}"
            )
        base.requires_grad_(False)
        self.base = base.to(device).eval()
        self._views: dict[BlockSpan, Any] = {span: self.base}
        self._views_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.base.parameters()).device
        return device

    def check(self, span: BlockSpan) -> None:
        """OutOfRangeError unless ``span`` lies inside the loaded span."""
        if not self.span.contains(span):
            raise OutOfRangeError(
                f"blocks {span} requested; this server serves blocks {self.span} (or any part of them)",
                span=span,
            )

    def view(self, span: BlockSpan) -> Any:
        """A base model over sub-span ``span`` sharing this span's layer modules and rotary embedding."""
        self.check(span)
        with self._views_lock:
            view = self._views.get(span)
            if view is None:
                view = empty_model(cut_config(self.model_config, span.blocks))
                view.embed_tokens = None
                view.norm = torch.nn.Identity()
                first = span.start - self.span.start
                view.layers = torch.nn.ModuleList(list(self.base.layers)[first : first + len(span)])
                view.rotary_emb = self.base.rotary_emb
                view.eval()
                self._views[span] = view
            return view

    def new_cache(self, span: BlockSpan | None = None, **_size: int) -> OffsetCache:
        """An empty KV cache for one inference session over ``span`` (default: the whole span); it
        grows as needed, so the session's size (``batch_size``, ``max_length``) does not matter."""
        span = span or self.span
        self.check(span)
        return OffsetCache(
            config=cut_config(self.model_config, span.blocks), offset=span.start - self.span.start
        )

    def __call__(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        span: BlockSpan | None = None,
    ) -> torch.Tensor:
        output: torch.Tensor = super().__call__(hidden_states, attention_mask, position_ids, cache, span=span)
        return output

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        span: BlockSpan | None = None,
    ) -> torch.Tensor:
        # hidden_states: [batch, seq, hidden]; attention_mask: [batch, past + seq]; position_ids: [batch, seq]
        base = self.view(span) if span is not None else self.base
        output = base(
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
        )
        hidden: torch.Tensor = output.last_hidden_state
        return hidden


def kv_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(key/value heads, head dimension) of one attention layer: the shape of a deep-prompt prefix."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(head_dim)


def cache_bytes_per_token(config: PretrainedConfig, span: BlockSpan, dtype: torch.dtype) -> int:
    """KV-cache bytes one token of one sequence takes in ``span`` (keys and values of every block)."""
    heads, head_dim = kv_shape(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(2 * len(span) * heads * head_dim * itemsize)
