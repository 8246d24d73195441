"""Load: 32 inference sessions at once on one server stay within its KV-cache budget (a 33rd waits,
then is refused), compute what the same blocks compute locally, and leave nothing behind when they
close — the budget, the server's session table, the cache objects and the process's memory return to
where they were, round after round."""

from __future__ import annotations

import gc
import threading
import weakref

import psutil
import pytest
import torch

from fincluster.client.placement import PlacementRequest
from fincluster.errors import CapacityError
from fincluster.serving.local import LocalSpanClient
from fincluster.serving.span_model import cache_bytes_per_token
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.policy import Classification, ModelRef
from fincluster.wire.codec import SpanInputs
from tests.helpers import Pki, running_cluster

pytestmark = pytest.mark.e2e
SESSIONS = 32
MAX_LENGTH = 16
PROMPT, STEPS = 5, 6
ROUNDS = 5


def session_inputs(seed: int) -> list[SpanInputs]:
    """A prompt of 5 tokens then 6 one-token steps of random hidden states, as a client sends them."""
    generator = torch.Generator().manual_seed(seed)
    steps, held = [], 0
    for seq in [PROMPT] + [1] * STEPS:
        steps.append(
            SpanInputs(
                torch.randn(1, seq, 64, generator=generator),
                torch.ones(1, held + seq, dtype=torch.int64),
                torch.arange(held, held + seq).unsqueeze(0),
            )
        )
        held += seq
    return steps


def run_round(client, tag: str, *, while_open) -> dict[int, list[torch.Tensor]]:
    """32 sessions open at once (``while_open()`` runs when all are), step, then close together."""
    all_open = threading.Barrier(SESSIONS + 1)
    closing = threading.Event()
    outputs: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            session = client.open_session(max_length=MAX_LENGTH, batch_size=1, session_id=f"{tag}-{seed}")
            all_open.wait(timeout=60)
            outputs[seed] = [session.step(inputs) for inputs in session_inputs(seed)]
            closing.wait(timeout=60)
            session.close()
        except BaseException as error:  # reported below
            errors.append(error)
            all_open.abort()

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(SESSIONS)]
    for thread in threads:
        thread.start()
    try:
        all_open.wait(timeout=60)
        while_open()
    finally:
        closing.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors
    return outputs


def test_32_concurrent_sessions_stay_within_the_cache_budget_and_leak_nothing(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    span = BlockSpan(0, 6)
    per_session = cache_bytes_per_token(tiny_llama_store.load_config(), span, torch.float32) * MAX_LENGTH
    budget = SESSIONS * per_session  # exactly 32 sessions' worth
    local = LocalSpanClient.from_store(tiny_llama_store, span, dtype=torch.float32)
    expected = {}
    for seed in range(SESSIONS):
        reference = local.open_session(max_length=MAX_LENGTH, batch_size=1, session_id=f"ref-{seed}")
        expected[seed] = [reference.step(inputs) for inputs in session_inputs(seed)]
    settings = {
        "cache_budget_bytes": budget,
        "cache_wait_seconds": 0.3,
        "max_streams_per_client": SESSIONS + 1,
    }
    with running_cluster(pki, tiny_llama_store, ["0:6"], **settings) as cluster:
        server = cluster.servers[0]
        request = PlacementRequest(
            Classification.PUBLIC, ModelRef(id=tiny_llama_store.model_id, num_blocks=6)
        )
        rss: list[int] = []
        with cluster.swarm() as swarm:
            (client,) = swarm.plan_chain(request, span, session_id="load")
            for round_number in range(ROUNDS):
                tag = f"r{round_number}"
                caches: list[weakref.ref] = []

                def while_open(tag: str = tag, first: bool = round_number == 0, caches=caches) -> None:
                    assert len(server.sessions) == SESSIONS and server.budget.free_bytes == 0
                    caches.extend(
                        weakref.ref(server.sessions.get(f"{tag}-{s}").cache) for s in range(SESSIONS)
                    )
                    if first:  # a 33rd session finds no room: a bounded wait, then it is refused
                        with pytest.raises(CapacityError, match="KV-cache budget full"):
                            client.open_session(
                                max_length=MAX_LENGTH, batch_size=1, session_id="one-too-many"
                            )

                outputs = run_round(client, tag, while_open=while_open)
                for seed in range(SESSIONS):
                    for got, want in zip(outputs[seed], expected[seed], strict=True):
                        assert (got - want).abs().max().item() <= 1e-5
                assert server.budget.free_bytes == budget and len(server.sessions) == 0
                del outputs
                gc.collect()
                assert [cache() for cache in caches] == [None] * SESSIONS  # every KV cache was freed
                rss.append(psutil.Process().memory_info().rss)
    growth = (rss[-1] - rss[1]) / 2**20  # round 0 warms up allocators, channels and threads
    assert growth < 16, f"RSS grew {growth:.1f} MiB over rounds 2..{ROUNDS}: {[r >> 20 for r in rss]} MiB"
