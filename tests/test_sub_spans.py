"""A server holding blocks 0:6 computes any contiguous part of them exactly as transformers does."""

from __future__ import annotations

import pytest
import torch

from fincluster.errors import OutOfRangeError
from fincluster.serving.runner import BlockRunner
from fincluster.serving.sessions import Session
from fincluster.serving.span_model import SpanModel
from fincluster.spans import BlockSpan
from fincluster.wire.codec import SpanInputs
from tests.helpers import tiny_model

TOLERANCE = 1e-5
SUB_SPANS = [BlockSpan(0, 2), BlockSpan(2, 5), BlockSpan(4, 6), BlockSpan(3, 4), BlockSpan(0, 6)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference_and_runner(request: pytest.FixtureRequest):
    reference = tiny_model(request.param, seed=5)
    blocks = {
        index: {
            name.removeprefix(f"model.layers.{index}."): tensor
            for name, tensor in reference.state_dict().items()
            if name.startswith(f"model.layers.{index}.")
        }
        for index in range(6)
    }
    model = SpanModel(reference.config, BlockSpan(0, 6), blocks)
    return reference, BlockRunner(model)


def hidden_states_of(reference, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return reference(ids, output_hidden_states=True).hidden_states


def session_over(runner: BlockRunner, span: BlockSpan, max_length: int) -> Session:
    return Session(
        session_id="s",
        span=span,
        max_length=max_length,
        batch_size=1,
        reserved_bytes=0,
        cache=runner.model.new_cache(span),
        client_id="c",
        last_used=0.0,
    )


@pytest.mark.parametrize("span", SUB_SPANS, ids=str)
def test_forward_over_a_sub_span_equals_those_blocks_of_transformers(reference_and_runner, span) -> None:
    reference, runner = reference_and_runner
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    states = hidden_states_of(reference, ids)
    mask = torch.ones(2, 10, dtype=torch.int64)
    positions = torch.arange(10).expand(2, -1)
    output = runner.forward(span, SpanInputs(states[span.start], mask, positions))
    if span.end < 6:  # transformers applies the final norm to its last hidden state; servers never do
        assert (output - states[span.end]).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("span", SUB_SPANS, ids=str)
def test_session_steps_over_a_sub_span_equal_the_parallel_forward(reference_and_runner, span) -> None:
    reference, runner = reference_and_runner
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    states = hidden_states_of(reference, ids)
    parallel = runner.forward(
        span,
        SpanInputs(states[span.start], torch.ones(1, 9, dtype=torch.int64), torch.arange(9).unsqueeze(0)),
    )
    session = session_over(runner, span, max_length=9)
    steps = [
        runner.step(
            session,
            SpanInputs(
                states[span.start][:, :4] if t == 0 else states[span.start][:, t + 3 : t + 4],
                torch.ones(1, 4 if t == 0 else t + 4, dtype=torch.int64),
                torch.arange(4).unsqueeze(0) if t == 0 else torch.tensor([[t + 3]]),
            ),
        )
        for t in range(6)
    ]
    assert session.position == 9
    assert (torch.cat(steps, dim=1) - parallel).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("span", SUB_SPANS, ids=str)
def test_backward_over_a_sub_span_equals_local_autograd(reference_and_runner, span) -> None:
    reference, runner = reference_and_runner
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    states = hidden_states_of(reference, ids)
    mask, positions = torch.ones(1, 7, dtype=torch.int64), torch.arange(7).unsqueeze(0)
    grad_outputs = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(4))
    # the reference: transformers' whole model, its block span.start fed a leaf tensor, the output of
    # block span.end - 1 taken, so masks (causal, sliding window) are transformers' own
    leaf = states[span.start].clone().requires_grad_(True)
    taken: list[torch.Tensor] = []

    def feed(module, args, kwargs):
        return (leaf, *args[1:]), kwargs

    def take(module, args, output):
        taken.append(output[0] if isinstance(output, tuple) else output)

    layers = reference.model.layers
    handles = [
        layers[span.start].register_forward_pre_hook(feed, with_kwargs=True),
        layers[span.end - 1].register_forward_hook(take),
    ]
    try:
        reference(ids)
    finally:
        for handle in handles:
            handle.remove()
    (expected,) = torch.autograd.grad(taken[0], leaf, grad_outputs)
    grad = runner.backward(span, SpanInputs(states[span.start], mask, positions), grad_outputs).inputs
    assert (grad - expected).abs().max().item() <= 1e-4


def test_blocks_outside_the_loaded_span_are_refused(reference_and_runner) -> None:
    _, runner = reference_and_runner
    with pytest.raises(OutOfRangeError, match="this server serves blocks 0:6"):
        runner.check_span(BlockSpan(4, 7))
