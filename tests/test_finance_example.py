"""The shipped example trains a sentiment classifier (prompts + head) through a 3-server swarm of the
demo model, and validation accuracy ends clearly above the untrained classifier's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finance_sentiment.py"


def load_example():
    spec = importlib.util.spec_from_file_location("finance_sentiment_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_prompt_tuned_classifier_trained_through_the_swarm_beats_the_untrained_one(
    demo_cluster: Cluster,
) -> None:
    example = load_example()
    recipe = example.Recipe(epochs=2, train_examples=96, virtual_tokens=8)
    with demo_cluster.swarm() as swarm:
        _, outcome = example.run(demo_cluster.store, swarm, recipe)
    print(f"baseline {outcome.baseline_accuracy:.3f} -> trained {outcome.accuracy:.3f}", outcome)
    assert outcome.epoch_losses[-1] < outcome.epoch_losses[0]
    assert outcome.accuracy >= outcome.baseline_accuracy + 0.2
    assert outcome.accuracy >= 0.6
