"""Local transformers ``generate`` vs the 3-server swarm (separate processes, mTLS) for the demo model.

Measures prefill (prompt → first token) and decode (tokens/s after the first token) separately, as the
median of several greedy runs, and writes the result into BENCHMARKS.md.

    .venv/bin/python benchmarks/generation_cpu.py [--runs 3] [--new-tokens 64] [--workdir var/bench]
"""

from __future__ import annotations

import os

# Every process of this benchmark shares one host's cores, and for each token only one of them works
# at a time: idle OpenMP threads must sleep rather than spin (read by libgomp when torch loads, so it
# is set before the imports below; the server processes get it from fincluster.demo).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
from results import machine, publish
from transformers import AutoModelForCausalLM

from fincluster.bootstrap import trust_from_settings
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.demo import TimingStreamer, launch
from fincluster.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Summarise the main risks of holding long-dated government bonds when inflation is rising."


def measure(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, tokenizer: object
) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of one greedy generate call."""
    streamer = TimingStreamer(tokenizer)  # type: ignore[arg-type]
    streamer.on_finalized_text = lambda text, stream_end=False: None  # type: ignore[method-assign]
    model.generate(
        input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer
    )
    times = streamer.token_times
    return times[0] - streamer.started, (len(times) - 1) / (times[-1] - times[0])


def local_model(store: ModelStore) -> torch.nn.Module:
    """The whole model in this process, plain transformers, from the same store files."""
    model = AutoModelForCausalLM.from_config(store.load_config())
    client = store.load_client_state()
    state = {
        "model.embed_tokens.weight": client["embed_tokens.weight"],
        "model.norm.weight": client["norm.weight"],
    }
    if "lm_head.weight" in client:
        state["lm_head.weight"] = client["lm_head.weight"]
    for index in range(store.num_blocks):
        state.update({f"model.layers.{index}.{k}": v for k, v in store.load_block_state(index).items()})
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def write_report(
    rows: list[tuple[str, float, float]], command: str, prompt_tokens: int, new_tokens: int
) -> str:
    local_decode = rows[0][2]
    lines = [
        f"### Demo model on CPU: local transformers vs 3-server swarm ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}",
        f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} in every process (client and servers)",
        f"- Command: `{command}`",
        f"- Model: SmolLM2-135M-Instruct, fp32; prompt {prompt_tokens} tokens, {new_tokens} new tokens,"
        " greedy;"
        " median of the runs. Swarm: registry + 3 `fincluster serve` processes (blocks 0:10, 10:20, 20:30)"
        " on loopback, every link mTLS; `internal` data under the shipped policies (attested trusted"
        " server for the prefix, possession proofs, signed receipts checked per step).",
        "",
        "| setup | prefill (ms) | decode (tokens/s) | decode vs local |",
        "|---|---:|---:|---:|",
    ]
    for name, prefill, decode in rows:
        lines.append(f"| {name} | {prefill * 1000:.0f} | {decode:.1f} | {decode / local_decode:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python benchmarks/generation_cpu.py " + " ".join(sys.argv[1:])

    with launch(args.workdir) as processes:
        store = ModelStore.open(processes.store_dir)
        tokenizer = store.load_tokenizer()
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        local = local_model(store)
        credential = processes.client_credential()
        trust = trust_from_settings(processes.trust_settings(), credential)
        with Swarm(registry=processes.registry_address, credential=credential, trust=trust) as swarm:
            remote = DistributedModelForCausalLM.from_pretrained(
                store, swarm=swarm, classification="internal"
            )
            results: dict[str, list[tuple[float, float]]] = {
                "local transformers": [],
                "swarm (3 servers)": [],
            }
            measure(local, input_ids, 4, tokenizer)  # warm-up both paths
            measure(remote, input_ids, 4, tokenizer)
            for run in range(args.runs):
                for name, model in (("local transformers", local), ("swarm (3 servers)", remote)):
                    prefill, decode = measure(model, input_ids, args.new_tokens, tokenizer)
                    results[name].append((prefill, decode))
                    print(
                        f"run {run + 1}: {name:20s} prefill {prefill * 1000:6.0f} ms  "
                        f"decode {decode:6.1f} tok/s",
                        flush=True,
                    )
    rows = [
        (name, statistics.median(p for p, _ in runs), statistics.median(d for _, d in runs))
        for name, runs in results.items()
    ]
    report = write_report(rows, command, input_ids.shape[1], args.new_tokens)
    print(report)
    if not args.no_write:
        publish("generation_cpu", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
