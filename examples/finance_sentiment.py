"""Train a financial-news sentiment classifier through a fincluster swarm, with peft prompt tuning.

The model's blocks stay on the servers, frozen; the client trains only what it owns: a few virtual
prompt tokens (peft ``PromptTuningConfig``) and a classifier head (peft's trainable copy of ``score``),
on the finance sentiment set shipped with fincluster (300 train / 60 validation sentences). Every
forward and backward through the swarm is audited like inference. Run with the demo swarm (a registry
and three ``fincluster serve`` processes on loopback, mTLS, ``internal`` data under the policies)::

    .venv/bin/python examples/finance_sentiment.py [--epochs 3] [--workdir var/finetune] [--out adapter/]

The trained adapter is written with ``save_pretrained`` (``--out``): ``PeftModel.from_pretrained``
loads it again on a swarm model or a local transformers classifier.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # one host's cores shared by client and servers

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from fincluster.client import DistributedModelForSequenceClassification
from fincluster.client.swarm import ChainPlanner
from fincluster.datasets import FinanceExample, Sentiment, load_finance_sentiment
from fincluster.store import ModelStore

LABELS = [sentiment.value for sentiment in Sentiment]
INSTRUCTION = "Classify the sentiment of this financial news for investors as negative, neutral or positive:"


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (the defaults are the run recorded in BENCHMARKS.md)."""

    virtual_tokens: int = 16
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0
    train_examples: int | None = None  # a prefix of the (shuffled) train split; None: all of it


def classifier(store: ModelStore, swarm: ChainPlanner, recipe: Recipe, *, classification: str) -> PeftModel:
    """A prompt-tuned classifier over the swarm: prompts initialised from the instruction's tokens,
    a new score head (both seeded by ``recipe.seed``)."""
    torch.manual_seed(recipe.seed)
    base = DistributedModelForSequenceClassification.from_pretrained(
        store, swarm=swarm, labels=LABELS, classification=classification
    )
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=recipe.virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INSTRUCTION,
        tokenizer_name_or_path=str(store.path),
    )
    return get_peft_model(base, config)


def batches(
    tokenizer: object, examples: Sequence[FinanceExample], batch_size: int, order: torch.Tensor | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded batches (the classifier reads the last position) with their label ids."""
    indices = order.tolist() if order is not None else range(len(examples))
    chosen = [examples[i] for i in indices]
    for start in range(0, len(chosen), batch_size):
        part = chosen[start : start + batch_size]
        encoded = tokenizer([e.text for e in part], return_tensors="pt", padding=True)  # type: ignore[operator]
        labels = torch.tensor([LABELS.index(e.label.value) for e in part])
        yield {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "labels": labels}


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: object, examples: Sequence[FinanceExample]) -> float:
    correct = 0
    for batch in batches(tokenizer, examples, 20):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(examples)


def train(
    model: torch.nn.Module, tokenizer: object, examples: Sequence[FinanceExample], recipe: Recipe
) -> list[float]:
    """AdamW over the trainable (client-owned) parameters; returns each epoch's mean loss."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses = []
    for _ in range(recipe.epochs):
        total, steps = 0.0, 0
        for batch in batches(
            tokenizer, examples, recipe.batch_size, torch.randperm(len(examples), generator=generator)
        ):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / steps)
    model.eval()
    return losses


@dataclass(frozen=True)
class Outcome:
    baseline_accuracy: float
    accuracy: float
    epoch_losses: list[float]
    train_seconds: float
    train_examples: int


def run(
    store: ModelStore, swarm: ChainPlanner, recipe: Recipe, *, classification: str = "public"
) -> tuple[PeftModel, Outcome]:
    """Validation accuracy before and after training through ``swarm``."""
    tokenizer = store.load_tokenizer()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = load_finance_sentiment("train")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    train_split = [examples[i] for i in order][: recipe.train_examples]
    validation = load_finance_sentiment("validation")
    model = classifier(store, swarm, recipe, classification=classification)
    baseline = accuracy(model, tokenizer, validation)
    started = time.perf_counter()
    losses = train(model, tokenizer, train_split, recipe)
    seconds = time.perf_counter() - started
    return model, Outcome(baseline, accuracy(model, tokenizer, validation), losses, seconds, len(train_split))


def main(argv: Sequence[str] | None = None) -> int:
    from fincluster.bootstrap import trust_from_settings
    from fincluster.client import Swarm
    from fincluster.demo import launch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--virtual-tokens", type=int, default=Recipe.virtual_tokens)
    parser.add_argument("--learning-rate", type=float, default=Recipe.learning_rate)
    parser.add_argument("--train-examples", type=int, default=None, help="use only this many (default: 300)")
    parser.add_argument("--workdir", type=Path, default=Path("var/finetune"), help="demo swarm's directory")
    parser.add_argument("--out", type=Path, help="write the trained adapter here (save_pretrained)")
    args = parser.parse_args(argv)
    recipe = Recipe(
        virtual_tokens=args.virtual_tokens,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        train_examples=args.train_examples,
    )
    with launch(args.workdir) as processes:
        store = ModelStore.open(processes.store_dir)
        credential = processes.client_credential()
        trust = trust_from_settings(processes.trust_settings(), credential)
        with Swarm(registry=processes.registry_address, credential=credential, trust=trust) as swarm:
            model, outcome = run(store, swarm, recipe, classification="internal")
            if args.out is not None:
                model.save_pretrained(args.out)
    print(f"validation accuracy before training: {outcome.baseline_accuracy:.3f}")
    print(f"validation accuracy after training:  {outcome.accuracy:.3f}")
    print(f"epoch losses: {', '.join(f'{loss:.3f}' for loss in outcome.epoch_losses)}")
    print(
        f"training: {outcome.train_examples} examples x {recipe.epochs} epochs "
        f"in {outcome.train_seconds:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
