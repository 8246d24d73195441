"""Training throughput on CPU: forward + backward tokens/s of peft prompt learning on the demo model,
local transformers vs the 3-server swarm (separate processes, mTLS, audited), and writes BENCHMARKS.md.

One step is a forward, a backward and an AdamW update of the client-owned parameters (the servers only
compute: their backward recomputes the span's forward, then returns the input and prefix gradients).

    .venv/bin/python benchmarks/fine_tuning_cpu.py [--steps 5] [--batch 8] [--seq 64] [--workdir var/bench]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see generation_cpu.py: one host's cores shared

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
from generation_cpu import local_model
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from results import machine, publish

from fincluster.bootstrap import trust_from_settings
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.demo import launch
from fincluster.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "prompt tuning (16 virtual tokens)": lambda: PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16
    ),
    "prefix tuning (16 per block)": lambda: PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16
    ),
}


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Median seconds of one training step (after one warm-up step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def write_report(rows: list[tuple[str, float, float]], command: str, batch: int, seq: int) -> str:
    tokens = batch * seq
    lines = [
        "### Fine-tuning on CPU: forward + backward through the swarm vs local "
        f"({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}",
        f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} in every process (client and servers)",
        f"- Command: `{command}`",
        f"- Model: SmolLM2-135M-Instruct, fp32; batch {batch} x {seq} tokens = {tokens} tokens per step "
        "(virtual tokens not counted); a step is forward, backward and an AdamW update of the peft "
        "parameters; median step. Swarm: registry + 3 `fincluster serve` processes (blocks 0:10, 10:20, "
        "20:30) on loopback, mTLS, `internal` data under the shipped policies, receipts checked and every "
        "forward and backward audited on both sides.",
        "",
        "| method | local (tokens/s) | swarm (tokens/s) | swarm vs local |",
        "|---|---:|---:|---:|",
    ]
    for name, local, swarm in rows:
        lines.append(f"| {name} | {tokens / local:.0f} | {tokens / swarm:.0f} | {local / swarm:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    command = "python benchmarks/fine_tuning_cpu.py " + " ".join(sys.argv[1:])
    ids = torch.randint(10, 40000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    with launch(args.workdir) as processes:
        store = ModelStore.open(processes.store_dir)
        credential = processes.client_credential()
        trust = trust_from_settings(processes.trust_settings(), credential)
        with Swarm(registry=processes.registry_address, credential=credential, trust=trust) as swarm:
            for name, config in METHODS.items():
                local = get_peft_model(local_model(store), config())
                local_seconds = step_seconds(local, ids, args.steps)
                remote = get_peft_model(
                    DistributedModelForCausalLM.from_pretrained(
                        store, swarm=swarm, classification="internal"
                    ),
                    config(),
                )
                swarm_seconds = step_seconds(remote, ids, args.steps)
                print(
                    f"{name}: local {local_seconds:.2f} s/step, swarm {swarm_seconds:.2f} s/step", flush=True
                )
                rows.append((name, local_seconds, swarm_seconds))
    report = write_report(rows, command, args.batch, args.seq)
    print(report)
    if not args.no_write:
        publish("fine_tuning_cpu", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
