"""Quality of compressed activations and quantized weights, measured on the demo model.

For each setting (wire compression none / float16 / bfloat16 / blockwise8, and weight quantization
none / int8 / nf4, each against the uncompressed full-precision chain): greedy-token agreement with the
reference over the prompts (the share of generated positions where the setting picks the reference's
token, teacher-forced on the reference's continuation so one early difference does not count for all
later ones, plus the share of prompts whose whole greedy continuation is identical), and perplexity
on held-out text (the finance dataset's validation split). The chain is three in-process spans
(blocks 0:10, 10:20, 20:30) that pass hidden states through the same wire codec as servers do, so
this measures exactly what a session with that setting computes; wire bytes per token are reported
too.

    .venv/bin/python benchmarks/quality.py [--prompts 50] [--new-tokens 24] [--workdir var/bench]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
from results import machine, publish

from fincluster.client import DistributedModelForCausalLM, LocalSwarm
from fincluster.demo import _prepare
from fincluster.serving.local import LocalSpanClient
from fincluster.serving.server import load_span_model
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.values import Quantization, TensorDType
from fincluster.wire.codec import SpanInputs, inputs_to_wire
from fincluster.wire.compression import WireCompression

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fincluster" / "datasets" / "finance_sentiment"
SPANS = ("0:10", "10:20", "20:30")


def chain(
    store: ModelStore, compression: WireCompression, quant: Quantization
) -> DistributedModelForCausalLM:
    clients = []
    for span in SPANS:
        model = load_span_model(
            store, BlockSpan.parse(span), dtype=TensorDType.FLOAT32, device="cpu", quantization=quant
        )
        clients.append(LocalSpanClient(model, node_id=span))
    return DistributedModelForCausalLM.from_pretrained(
        store, swarm=LocalSwarm(clients), classification="public", compression=compression.value
    )


def texts(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in (DATA / name).read_text().splitlines() if line.strip()]


@torch.no_grad()
def stepwise_logits(model: DistributedModelForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position computed the way generation does (prefill, then one token per step),
    so that the session's compressed hops are what is measured."""
    prompt = ids.shape[1] // 2
    with model.inference_session(max_length=ids.shape[1]):
        parts = [model(ids[:, :prompt]).logits]
        parts += [model(ids[:, t : t + 1]).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def perplexity(model: DistributedModelForCausalLM, encoded: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for ids in encoded:
        logits = stepwise_logits(model, ids)[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + loss.item(), count + ids.shape[1] - 1
    return math.exp(total / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=60, help="validation sentences for perplexity")
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    store_dir, _, _ = _prepare(args.workdir, [])
    store = ModelStore.open(store_dir)
    tokenizer = store.load_tokenizer()
    prompts = [
        tokenizer(text, return_tensors="pt").input_ids for text in texts("train.jsonl")[: args.prompts]
    ]
    held_out = [
        tokenizer(text, return_tensors="pt").input_ids for text in texts("validation.jsonl")[: args.held_out]
    ]

    reference = chain(store, WireCompression.NONE, Quantization.NONE)
    continuations = [
        reference.generate(
            ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
        )
        for ids in prompts
    ]
    reference_picks = [stepwise_logits(reference, seq).argmax(-1) for seq in continuations]
    settings = [(mode, Quantization.NONE) for mode in WireCompression] + [
        (WireCompression.NONE, Quantization.INT8),
        (WireCompression.NONE, Quantization.NF4),
    ]
    sample = torch.randn(1, 1, store.load_config().hidden_size)
    rows = []
    for compression, quant in settings:
        model = (
            reference
            if (compression, quant) == (WireCompression.NONE, Quantization.NONE)
            else chain(store, compression, quant)
        )
        agree = total = identical = 0
        for ids, seq, picks in zip(prompts, continuations, reference_picks, strict=True):
            generated = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # positions that predict new tokens
            mine = stepwise_logits(model, seq).argmax(-1)
            agree += int((mine[:, generated] == picks[:, generated]).sum())
            total += generated.stop - generated.start
            free = model.generate(
                ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )
            identical += int(torch.equal(free, seq))
        ppl = perplexity(model, held_out)
        wire = inputs_to_wire(
            SpanInputs(sample, torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64)),
            compression,
        )
        hidden_bytes = len(wire.hidden_states.data) + len(wire.hidden_states.scales)
        rows.append(
            (compression.value, quant.value, agree / total, identical / len(prompts), ppl, hidden_bytes)
        )
        print(
            f"{compression.value:10s} {quant.value:5s} agree {agree / total:.4f} "
            f"identical {identical}/{len(prompts)} ppl {ppl:.3f} hidden bytes/token {hidden_bytes}",
            flush=True,
        )
    base_ppl = rows[0][4]
    fp16_bytes = next(r[5] for r in rows if r[0] == "float16")
    lines = [
        "### Quality of compressed activations and quantized weights, demo model"
        f" ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}; bitsandbytes on CPU for int8/nf4",
        f"- Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`".rstrip(),
        "- SmolLM2-135M-Instruct fp32, three spans 0:10, 10:20, 20:30 passing hidden states through the"
        f" wire codec; {len(prompts)} prompts (finance dataset, train split) x {args.new_tokens} greedy"
        " tokens; agreement = share of generated positions where the setting's greedy pick equals the"
        " uncompressed chain's (teacher-forced on its continuation); identical = prompts whose whole"
        f" free-running continuation is the same; perplexity over {len(held_out)} held-out validation"
        " sentences, computed step by step as generation does.",
        "",
        "| wire compression | weights | token agreement | identical continuations | perplexity"
        " | change in perplexity | hidden-state bytes/token | vs fp16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for compression, quant, agree, same, ppl, nbytes in rows:
        lines.append(
            f"| {compression} | {quant} | {agree * 100:.2f} % | {same * 100:.0f} % | {ppl:.3f}"
            f" | {(ppl - base_ppl) / base_ppl * 100:+.2f} % | {nbytes} | {nbytes / fp16_bytes:.2f}x |"
        )
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        publish("quality", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
