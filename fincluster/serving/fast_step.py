"""How a server runs inference steps: transformers' eager path, or a static KV pool with batched,
CUDA-graphed decode steps.

Transformers' eager layers launch one kernel at a time from Python: on a GPU a 16-layer 1-token step
costs ~17 ms of host time for ~3 ms of kernels. The fast strategy keeps transformers' layer code and
changes only what surrounds it:

* the KV cache is one static pool of session slots (:mod:`fincluster.serving.kv_pool`), so shapes and
  addresses are fixed;
* one-token steps of concurrent sessions on the same span run as one batch (rows padded to a power of
  two, attention over a power-of-two window of positions), because a decode step reads every weight
  once whatever the batch;
* on CUDA each (span, rows, window) shape is captured once as a CUDA graph and replayed: no Python,
  no host sync inside the step; inputs and outputs go through pinned host buffers.

Prefill and multi-token steps run eagerly (SDPA) over the session's slots, with the masks a
``DynamicCache`` would give. Families with sliding-window layers take the eager path for every step
(the 4-D decode mask carries no window). ``EAGER`` is the reference: a ``DynamicCache`` per session,
exactly as transformers runs it; it is the default on CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from fincluster.errors import ConfigurationError
from fincluster.logs import get_logger
from fincluster.serving.kv_pool import GatherCache, KVPool, SlotCache
from fincluster.serving.span_model import SpanModel
from fincluster.spans import BlockSpan
from fincluster.values import StepStrategy
from fincluster.wire.codec import SpanInputs

log = get_logger(__name__)


def _bucket(value: int, limit: int) -> int:
    """The smallest power of two ≥ ``value``, at most ``limit``."""
    size = 1
    while size < value:
        size *= 2
    return min(size, limit)


def uses_sliding_window(config: object) -> bool:
    layer_types = getattr(config, "layer_types", None) or []
    return getattr(config, "sliding_window", None) is not None or any(
        kind != "full_attention" for kind in layer_types
    )


@dataclass
class _Graph:
    """One captured decode shape: its static inputs, output and pinned host buffers."""

    graph: torch.cuda.CUDAGraph | None
    hidden: torch.Tensor  # [rows, 1, hidden]
    positions: torch.Tensor  # [rows, 1] rotary positions
    slots: torch.Tensor  # [rows]
    write_at: torch.Tensor  # [rows] cache position written
    mask: torch.Tensor  # [rows, 1, 1, window] bool
    output: torch.Tensor  # [rows, 1, hidden]
    host_output: torch.Tensor  # pinned


class StepEngine:
    """Runs the session steps of one span under a :class:`StepStrategy`."""

    def __init__(
        self,
        model: SpanModel,
        strategy: StepStrategy = StepStrategy.AUTO,
        *,
        cache_bytes: int,
        max_length: int,
        max_batch: int = 32,
    ) -> None:
        """``cache_bytes`` and ``max_length`` size the static pool (slots of ``max_length`` positions;
        one more slot is the scratch row that padding rows write to)."""
        self.model = model
        self.strategy = strategy.resolve(model.device.type)
        if self.strategy is StepStrategy.GRAPHS and model.device.type != "cuda":
            raise ConfigurationError(f"step strategy 'graphs' needs a CUDA device, not {model.device.type}")
        self.max_batch = max_batch
        self.pool: KVPool | None = None
        self.fixed_shape_decode = False
        self._graphs: dict[tuple[BlockSpan, int, int], _Graph | None] = {}
        self._graph_pool: tuple[int, int] | None = None
        self._lock = threading.Lock()
        if self.strategy is StepStrategy.EAGER:
            return
        per_slot = _bytes_per_position(model) * max_length
        slots = cache_bytes // per_slot
        if slots < 1:
            raise ConfigurationError(
                f"step strategy {self.strategy.value!r}: the KV-cache budget ({cache_bytes} bytes) holds no "
                f"session slot of max_session_length={max_length} tokens ({per_slot} bytes); raise "
                "cache_budget_bytes or lower max_session_length"
            )
        self.pool = KVPool(
            model.config,
            num_layers=len(model.span),
            slots=slots + 1,
            max_length=max_length,
            dtype=model.dtype,
            device=model.device,
        )
        self.scratch_slot = self.pool.allocate(1)  # padding rows of a decode batch write here
        self.fixed_shape_decode = not uses_sliding_window(model.config)
        log.info(
            "kv_pool_allocated",
            blocks=str(model.span),
            slots=slots,
            max_length=max_length,
            bytes=self.pool.nbytes,
            strategy=self.strategy.value,
        )

    @property
    def batches(self) -> bool:
        """Whether one-token steps of several sessions can run as one batch."""
        return self.fixed_shape_decode

    def new_cache(self, span: BlockSpan, *, batch_size: int, max_length: int) -> Cache:
        if self.pool is None:
            return self.model.new_cache(span)
        self.model.check(span)
        return SlotCache(self.pool, batch_size=batch_size, max_length=max_length)

    @staticmethod
    def release(cache: Cache) -> None:
        if isinstance(cache, SlotCache):
            cache.release()

    # -- one session -----------------------------------------------------------------------------

    def step(self, span: BlockSpan, cache: Cache, inputs: SpanInputs, *, eager: bool = False) -> torch.Tensor:
        """Run validated ``inputs`` (on the model's device) through ``span``, extending ``cache``;
        ``eager``: through the model's own forward even for one token (no batch, no captured graph)."""
        if (
            not eager
            and isinstance(cache, SlotCache)
            and self.fixed_shape_decode
            and inputs.hidden_states.shape[1] == 1
        ):
            return self.decode([(span, cache, inputs)])[0]
        output = self.model(
            inputs.hidden_states, inputs.attention_mask, inputs.position_ids, cache, span=span
        )
        if isinstance(cache, SlotCache):
            cache.advance(inputs.hidden_states.shape[1])
        return output

    # -- one-token steps of several sessions, as one batch ------------------------------------------

    def decode(self, items: Sequence[tuple[BlockSpan, SlotCache, SpanInputs]]) -> list[torch.Tensor]:
        """One new token per row for every item (all on the same span); outputs in order."""
        pool = self.pool
        if pool is None or not items:
            raise ConfigurationError("batched decode needs the static KV pool")
        span = items[0][0]
        hidden = torch.cat([inputs.hidden_states for _, _, inputs in items])
        positions = torch.cat([inputs.position_ids for _, _, inputs in items])
        slots = torch.cat([torch.arange(c.first_slot, c.first_slot + c.rows) for _, c, _ in items])
        write_at = torch.cat([torch.full((c.rows,), c.length) for _, c, _ in items])
        rows = hidden.shape[0]
        held = max(c.length for _, c, _ in items) + 1
        if self.strategy is StepStrategy.GRAPHS:
            output = self._replay(span, hidden, positions, slots, write_at, items, rows, held)
        else:
            mask = self._mask(items, rows, held, hidden.device)
            cache = GatherCache(
                pool, slots=slots.to(hidden.device), positions=write_at.to(hidden.device), window=held
            )
            output = self._forward(span, hidden, mask, positions, cache)
        outputs, row = [], 0
        for _, cache_, _ in items:
            outputs.append(output[row : row + cache_.rows])
            row += cache_.rows
            cache_.advance(1)
        return outputs

    def _forward(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: GatherCache,
    ) -> torch.Tensor:
        # hidden: [rows, 1, hidden]; mask: [rows, 1, 1, window] (True = attend)
        view = self.model.view(span)
        result: torch.Tensor = view(
            inputs_embeds=hidden,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return result

    @staticmethod
    def _mask(
        items: Sequence[tuple[BlockSpan, SlotCache, SpanInputs]], rows: int, window: int, device: torch.device
    ) -> torch.Tensor:
        """[rows, 1, 1, window]: each row attends to the tokens its session holds (the client's 2-D
        mask over held + new tokens) and nothing past them."""
        mask = torch.zeros((rows, 1, 1, window), dtype=torch.bool)
        row = 0
        for _, cache, inputs in items:
            width = cache.length + 1
            mask[row : row + cache.rows, 0, 0, :width] = inputs.attention_mask.to("cpu", torch.bool)
            row += cache.rows
        if row < rows:
            mask[row:, 0, 0, 0] = True  # padding rows: attend to their scratch position only
        return mask.to(device)

    def _replay(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        write_at: torch.Tensor,
        items: Sequence[tuple[BlockSpan, SlotCache, SpanInputs]],
        rows: int,
        held: int,
    ) -> torch.Tensor:
        assert self.pool is not None
        padded = _bucket(rows, max(self.max_batch, rows))
        window = _bucket(held, self.pool.max_length)
        if held > window:  # pragma: no cover - lengths are checked against the pool at open
            window = held
        key = (span, padded, window)
        with self._lock:
            graph = self._graphs.get(key)
        fresh = graph is None
        if graph is None:
            graph = self._buffers(padded, window)
        graph.hidden.zero_()
        graph.hidden[:rows].copy_(hidden, non_blocking=True)
        graph.positions.zero_()
        graph.positions[:rows].copy_(positions, non_blocking=True)
        graph.slots.fill_(self.scratch_slot)
        graph.slots[:rows].copy_(slots, non_blocking=True)
        graph.write_at.zero_()
        graph.write_at[:rows].copy_(write_at, non_blocking=True)
        graph.mask.copy_(self._mask(items, padded, window, torch.device("cpu")), non_blocking=True)
        if fresh:
            graph = self._capture(span, graph)
            with self._lock:
                self._graphs[key] = graph
        elif graph.graph is not None:
            graph.graph.replay()
        else:
            graph.output.copy_(self._run(span, graph))
        graph.host_output.copy_(graph.output, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return graph.host_output[:rows].clone()

    def _buffers(self, rows: int, window: int) -> _Graph:
        device, dtype = self.model.device, self.model.dtype
        hidden_size = self.model.config.hidden_size
        return _Graph(
            graph=None,
            hidden=torch.zeros((rows, 1, hidden_size), dtype=dtype, device=device),
            positions=torch.zeros((rows, 1), dtype=torch.int64, device=device),
            slots=torch.zeros((rows,), dtype=torch.int64, device=device),
            write_at=torch.zeros((rows,), dtype=torch.int64, device=device),
            mask=torch.zeros((rows, 1, 1, window), dtype=torch.bool, device=device),
            output=torch.zeros((rows, 1, hidden_size), dtype=dtype, device=device),
            host_output=torch.zeros((rows, 1, hidden_size), dtype=dtype).pin_memory(),
        )

    def _run(self, span: BlockSpan, graph: _Graph) -> torch.Tensor:
        assert self.pool is not None
        cache = GatherCache(
            self.pool, slots=graph.slots, positions=graph.write_at, window=graph.mask.shape[-1]
        )
        return self._forward(span, graph.hidden, graph.mask, graph.positions, cache)

    def _capture(self, span: BlockSpan, graph: _Graph) -> _Graph:
        """Warm up on a side stream (writes this step's keys/values, as the replay will again), then
        capture; a shape that cannot be captured runs eagerly from then on."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.output.copy_(self._run(span, graph))
        torch.cuda.current_stream().wait_stream(stream)
        try:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(  # thread-local: other threads' CUDA calls do not break the capture
                captured,
                pool=self._graph_pool,  # type: ignore[arg-type]
                capture_error_mode="thread_local",
            ):
                output = self._run(span, graph)
            captured.replay()
        except RuntimeError as error:
            log.warning("decode_graph_failed", blocks=str(span), rows=graph.hidden.shape[0], error=str(error))
            return graph
        log.info(
            "decode_graph_captured", blocks=str(span), rows=graph.hidden.shape[0], window=graph.mask.shape[-1]
        )
        graph.graph, graph.output = captured, output
        return graph


def _bytes_per_position(model: SpanModel) -> int:
    from fincluster.serving.span_model import cache_bytes_per_token

    return cache_bytes_per_token(model.config, model.span, model.dtype)
