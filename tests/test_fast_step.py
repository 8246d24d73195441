"""The static KV pool and batched decode steps compute what transformers computes.

The fast step strategy (``fincluster.serving.fast_step``) changes only what surrounds transformers'
layers: where keys and values live (one static pool of session slots), and that one-token steps of
concurrent sessions run as one batch. On CPU the same code runs without CUDA graphs, so its results
are checked here against transformers' own model and against each session run alone.
"""

from __future__ import annotations

import pytest
import torch

from fincluster.client import DistributedModelForCausalLM, LocalSwarm
from fincluster.errors import CapacityError, SessionLengthError
from fincluster.serving.fast_step import StepEngine
from fincluster.serving.local import LocalSpanClient
from fincluster.serving.runner import BlockRunner
from fincluster.serving.server import load_span_model
from fincluster.serving.sessions import Session
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.values import StepStrategy, TensorDType
from fincluster.wire.codec import SpanInputs
from tests.helpers import store_of, tiny_model

TOLERANCE = 1e-5
SPLITS = {"llama": ("0:2", "2:6"), "mistral": ("0:3", "3:6"), "qwen2": ("0:4", "4:6")}
POOL_BYTES = 2**22


def static_engine(store: ModelStore, span: str, max_length: int = 64) -> tuple[BlockRunner, StepEngine]:
    model = load_span_model(store, BlockSpan.parse(span), dtype=TensorDType.FLOAT32, device="cpu")
    engine = StepEngine(model, StepStrategy.STATIC, cache_bytes=POOL_BYTES, max_length=max_length)
    return BlockRunner(model, engine=engine), engine


@pytest.fixture(scope="module", params=sorted(SPLITS))
def arch_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    reference = tiny_model(request.param, seed=11)
    store = store_of(reference, tmp_path_factory.mktemp(request.param) / "store", f"fast-{request.param}")
    return request.param, reference, store


def static_model(store: ModelStore, spans: tuple[str, ...]) -> DistributedModelForCausalLM:
    clients = []
    for span in spans:
        runner, engine = static_engine(store, span)
        clients.append(LocalSpanClient(runner.model, node_id=span, engine=engine))
    return DistributedModelForCausalLM.from_pretrained(
        store, swarm=LocalSwarm(clients), classification="public"
    )


def test_static_pool_generation_equals_transformers(arch_store) -> None:
    arch, reference, store = arch_store
    prompts = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # left padding: the decode mask must keep hiding it
    expected = reference.generate(prompts, attention_mask=mask, max_new_tokens=12, do_sample=False)
    produced = static_model(store, SPLITS[arch]).generate(
        prompts, attention_mask=mask, max_new_tokens=12, do_sample=False
    )
    assert produced.tolist() == expected.tolist()


def test_static_pool_stepwise_logits_equal_transformers(arch_store) -> None:
    arch, reference, store = arch_store
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    model = static_model(store, SPLITS[arch])
    with torch.no_grad():
        local = reference(ids).logits
        with model.inference_session(max_length=12):
            prefill = model(ids[:, :5]).logits  # a multi-token step, then one-token steps
            stepped = torch.cat([prefill, *(model(ids[:, t : t + 1]).logits for t in range(5, 12))], dim=1)
    assert (stepped - local).abs().max().item() <= TOLERANCE


def _open(runner: BlockRunner, name: str, batch: int, max_length: int) -> Session:
    cache = runner.engine.new_cache(runner.span, batch_size=batch, max_length=max_length)
    return Session(name, runner.span, max_length, batch, 0, cache, "client", 0.0)


def test_batched_decode_of_sessions_of_different_lengths_equals_each_session_alone(tiny_llama_store) -> None:
    """Three sessions at positions 3, 7 and 12 (one of batch 2, left-padded) step together for 5 tokens;
    each one's outputs equal the same session stepped alone by transformers' eager path."""
    batched, _ = static_engine(tiny_llama_store, "1:5")
    alone = BlockRunner(batched.model)  # eager: DynamicCache per session
    generator = torch.Generator().manual_seed(6)
    shapes = [(1, 3), (2, 7), (1, 12)]
    hidden = {i: torch.randn(b, n + 5, 64, generator=generator) for i, (b, n) in enumerate(shapes)}
    masks = {i: torch.ones(b, n + 5, dtype=torch.int64) for i, (b, n) in enumerate(shapes)}
    masks[1][1, :2] = 0
    fast = [_open(batched, f"fast-{i}", b, 32) for i, (b, _) in enumerate(shapes)]
    slow = [_open(alone, f"slow-{i}", b, 32) for i, (b, _) in enumerate(shapes)]

    def inputs(i: int, start: int, end: int) -> SpanInputs:
        mask = masks[i][:, :end]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]
        return SpanInputs(hidden[i][:, start:end], mask, positions)

    for i, (_, n) in enumerate(shapes):  # prefill, one session at a time
        first, second = batched.step(fast[i], inputs(i, 0, n)), alone.step(slow[i], inputs(i, 0, n))
        assert (first - second).abs().max().item() <= TOLERANCE
    for t in range(5):
        steps = [(fast[i], inputs(i, n + t, n + t + 1)) for i, (_, n) in enumerate(shapes)]
        outputs = batched.step_batch(steps)
        for i, (_, n) in enumerate(shapes):
            expected = alone.step(slow[i], inputs(i, n + t, n + t + 1))
            output = outputs[i]
            assert isinstance(output, torch.Tensor) and output.shape == expected.shape
            assert (output - expected).abs().max().item() <= TOLERANCE
    assert [session.position for session in fast] == [8, 12, 17]


def test_a_refused_step_in_a_batch_fails_alone(tiny_llama_store) -> None:
    runner, _ = static_engine(tiny_llama_store, "0:6")
    good, full = _open(runner, "good", 1, 8), _open(runner, "full", 1, 1)
    runner.step(
        full,
        SpanInputs(
            torch.randn(1, 1, 64), torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64)
        ),
    )
    one = SpanInputs(
        torch.randn(1, 1, 64), torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64)
    )
    two = SpanInputs(
        torch.randn(1, 1, 64), torch.ones(1, 2, dtype=torch.int64), torch.ones(1, 1, dtype=torch.int64)
    )
    results = runner.step_batch([(good, one), (full, two)])
    assert isinstance(results[0], torch.Tensor) and results[0].shape == (1, 1, 64)
    assert isinstance(results[1], SessionLengthError)
    assert (good.position, full.position) == (1, 1)


def test_pool_slots_are_taken_at_open_and_given_back_at_close(tiny_llama_store) -> None:
    runner, engine = static_engine(tiny_llama_store, "0:6", max_length=64)
    assert engine.pool is not None
    slots = engine.pool.free_slots
    assert slots == POOL_BYTES // (2 * 6 * 2 * 16 * 4 * 64)  # keys+values, blocks, kv heads, head dim, fp32
    caches = [engine.new_cache(runner.span, batch_size=1, max_length=64) for _ in range(slots)]
    with pytest.raises(CapacityError, match="free KV-cache slot"):
        engine.new_cache(runner.span, batch_size=1, max_length=64)
    engine.release(caches[0])
    engine.release(caches[0])  # twice is once
    assert engine.pool.free_slots == 1
    with pytest.raises(SessionLengthError, match="static cache of 64 positions"):
        engine.new_cache(runner.span, batch_size=1, max_length=65)


@pytest.mark.e2e
def test_concurrent_sessions_over_grpc_are_batched_and_each_equals_transformers(
    pki, tiny_llama_store
) -> None:
    import threading

    from fincluster.client import Swarm
    from fincluster.trust.pki import Role
    from tests.helpers import running_cluster

    reference = tiny_model("llama")  # the store's weights (conftest: tiny_model("llama"), seed 0)
    prompts = [
        torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 5, 8, 11, 4, 6)
    ]
    expected = [reference.generate(p, max_new_tokens=12, do_sample=False).tolist() for p in prompts]
    with running_cluster(
        pki,
        tiny_llama_store,
        ["0:3", "3:6"],
        step_strategy="static",
        cache_budget_bytes=2**22,
        max_session_length=64,
    ) as cluster:
        produced: dict[int, list[list[int]]] = {}
        start = threading.Barrier(len(prompts))

        def generate(index: int) -> None:
            with Swarm(
                registry=cluster.registry_address, credential=pki.credential(Role.CLIENT, f"c{index}")
            ) as swarm:
                model = cluster.model(swarm)
                start.wait()
                produced[index] = model.generate(prompts[index], max_new_tokens=12, do_sample=False).tolist()

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        batches = [server.compute.batches_run for server in cluster.servers]
    assert [produced.get(i) for i in range(len(prompts))] == expected
    assert min(batches) >= 1, batches
