"""A server's KV cache as one static pool of session slots, readable by transformers' own layers.

Why a pool: a decode step reads every weight of the span once, whatever the batch size, so the steps
of concurrent sessions should run as one batch; and a step that runs as a CUDA graph needs tensors at
fixed addresses. Both hold when every session's keys and values live in rows ("slots") of one tensor
allocated at start: a session owns ``batch_size`` consecutive slots of ``max_length`` positions.

Two views of the pool speak transformers' ``Cache`` protocol, so the decoder layers stay
transformers' own code:

* :class:`SlotCache` — one session, any number of new tokens (prefill, chunked steps). ``update``
  writes the new keys/values at the session's position and returns exactly the held + new ones (a view
  of its slots), and the mask sizes are those of a ``DynamicCache`` holding that many tokens: the
  attention computed is the same as with transformers' dynamic cache.
* :class:`GatherCache` — one new token for each of several rows (sessions) at their own positions, at
  fixed shapes: ``update`` scatters each row's key/value into its slot at its position and gathers the
  rows' first ``window`` positions; the caller passes a 4-D mask that hides everything past each row's
  own tokens. Fixed shapes make it capturable as a CUDA graph (``fast_step``).

Layers address the cache by their index in the server's whole span (sub-span views share the layer
modules), which is the pool's layer index, so no offset is needed.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from fincluster.errors import CapacityError, SessionLengthError


def kv_shape(config: PretrainedConfig) -> tuple[int, int]:
    """(key/value heads, head dim) of the model family."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(head_dim)


class KVPool:
    """``slots`` rows of ``max_length`` positions for every layer of a span, allocated once."""

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        num_layers: int,
        slots: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if slots < 1:
            raise CapacityError("the KV-cache budget holds no session slot of max_session_length tokens")
        heads, head_dim = kv_shape(config)
        self.num_layers, self.slots, self.max_length = num_layers, slots, max_length
        # storage: [layer, key|value, slot, kv_heads, position, head_dim]; zeros, so that masked
        # positions never hold NaN (0 * NaN would leak through attention)
        self.storage = torch.zeros(
            (num_layers, 2, slots, heads, max_length, head_dim), dtype=dtype, device=device
        )
        self._free = [True] * slots
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        return self.storage[layer, 0]  # [slot, kv_heads, position, head_dim]

    def values(self, layer: int) -> torch.Tensor:
        return self.storage[layer, 1]

    def allocate(self, count: int) -> int:
        """First of ``count`` consecutive free slots, now taken; CapacityError when none."""
        with self._lock:
            run = 0
            for index, free in enumerate(self._free):
                run = run + 1 if free else 0
                if run == count:
                    first = index - count + 1
                    self._free[first : index + 1] = [False] * count
                    return first
        raise CapacityError(f"no {count} free KV-cache slot(s) of {self.slots}")

    def release(self, first: int, count: int) -> None:
        with self._lock:
            self._free[first : first + count] = [True] * count

    @property
    def free_slots(self) -> int:
        with self._lock:
            return sum(self._free)


class _SlotLayer(CacheLayerMixin):
    """One layer of a :class:`SlotCache`: the session's slots, up to the tokens it holds."""

    is_sliding = False

    def __init__(self, cache: SlotCache, layer: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage is the pool's, allocated at start."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [batch, kv_heads, new, head_dim]
        cache = self.cache
        rows = slice(cache.first_slot, cache.first_slot + cache.rows)
        start, end = cache.length, cache.length + key_states.shape[-2]
        keys, values = cache.pool.keys(self.layer)[rows], cache.pool.values(self.layer)[rows]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        return keys[:, :, :end], values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.length

    def get_max_length(self) -> int:
        return self.cache.max_length


class SlotCache(Cache):
    """One session's KV cache: ``rows`` (its batch size) slots of the pool; ``length`` tokens held.

    The runner calls :meth:`advance` after each step (every layer of a step writes at the same
    position)."""

    def __init__(self, pool: KVPool, *, batch_size: int, max_length: int) -> None:
        if max_length > pool.max_length:
            raise SessionLengthError(
                f"max_length {max_length} exceeds this server's static cache of {pool.max_length} positions"
            )
        self.pool, self.rows, self.max_length = pool, batch_size, max_length
        self.first_slot = pool.allocate(batch_size)
        self.length = 0
        self.released = False
        super().__init__(layers=[_SlotLayer(self, layer) for layer in range(pool.num_layers)])

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def release(self) -> None:
        """Give the slots back to the pool (once)."""
        if not self.released:
            self.released = True
            self.pool.release(self.first_slot, self.rows)


class _GatherLayer(CacheLayerMixin):
    """One layer of a :class:`GatherCache`."""

    is_sliding = False

    def __init__(self, cache: GatherCache, layer: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.cache, self.layer = cache, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage is the pool's, allocated at start."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: [rows, kv_heads, 1, head_dim]; slots, positions: [rows]
        cache = self.cache
        keys, values = cache.pool.keys(self.layer), cache.pool.values(self.layer)
        keys[cache.slots, :, cache.positions] = key_states[:, :, 0]  # index_put_: no host sync
        values[cache.slots, :, cache.positions] = value_states[:, :, 0]
        window = cache.window
        return (
            keys[:, :, :window].index_select(0, cache.slots),
            values[:, :, :window].index_select(0, cache.slots),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.window, 0

    def get_seq_length(self) -> int:
        return self.cache.window - 1

    def get_max_length(self) -> int:
        return self.cache.window


class GatherCache(Cache):
    """One decode step over several rows: row ``i`` writes into slot ``slots[i]`` at
    ``positions[i]`` and attends over that slot's first ``window`` positions (the 4-D mask the caller
    passes hides those the row does not hold). ``slots`` and ``positions`` are device tensors, so a
    CUDA graph can replay the step with new values."""

    def __init__(self, pool: KVPool, *, slots: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        self.pool, self.slots, self.positions, self.window = pool, slots, positions, window
        super().__init__(layers=[_GatherLayer(self, layer) for layer in range(pool.num_layers)])
