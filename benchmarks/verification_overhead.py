"""Cost of verification (sampled re-execution of standard nodes' outputs) per sampling rate, CPU demo model.

Five ``fincluster serve`` processes on loopback (a: blocks 0:10, trusted; b1, b2: 10:20 and c1, c2:
20:30, standard), the registry and the client in this one; ``internal`` data, so the two standard hops
are the checked ones. Each arm gives the client policy data whose ``fincluster.verification.internal``
rate is the arm's; the same greedy generation runs in every arm, arms alternated, median decode time
per token reported with the number of re-executions and the largest honest difference seen.

    .venv/bin/python benchmarks/verification_overhead.py [--runs 3] [--new-tokens 32]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see generation_cpu.py

import argparse
import datetime
import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from generation_cpu import PROMPT, measure
from results import machine, publish

from fincluster.audit import AuditRecorder, VerificationEvent
from fincluster.bootstrap import trust_from_settings
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.demo import DemoServer, launch
from fincluster.store import ModelStore

ROOT = Path(__file__).resolve().parents[1]
SERVERS = (
    DemoServer("a", "0:10", "trusted"),
    DemoServer("b1", "10:20", "standard"),
    DemoServer("b2", "10:20", "standard"),
    DemoServer("c1", "20:30", "standard"),
    DemoServer("c2", "20:30", "standard"),
)
RATES = (0.0, 0.05, 0.2, 1.0)


def policy_with_rate(policy_dir: Path, scratch: Path, rate: float) -> Path:
    """A copy of the shipped policies whose internal verification rate is ``rate``."""
    target = scratch / f"policies-{rate}"
    shutil.copytree(policy_dir, target, dirs_exist_ok=True)
    data = json.loads((target / "data.json").read_text())
    data["fincluster"]["verification"]["internal"] = {"rate": rate, "tiers": ["standard"]}
    (target / "data.json").write_text(json.dumps(data))
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench-verify")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = "python benchmarks/verification_overhead.py " + " ".join(sys.argv[1:])
    per_token: dict[float, list[float]] = {rate: [] for rate in RATES}
    checks: dict[float, int] = dict.fromkeys(RATES, 0)
    worst = 0.0
    with launch(args.workdir, SERVERS) as processes, tempfile.TemporaryDirectory() as scratch:
        store = ModelStore.open(processes.store_dir)
        tokenizer = store.load_tokenizer()
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        credential = processes.client_credential()
        settings = processes.trust_settings()
        trusts = {
            rate: trust_from_settings(
                settings.model_copy(
                    update={"policy_dir": policy_with_rate(settings.policy_dir, Path(scratch), rate)}
                ),
                credential,
            )
            for rate in RATES
        }
        for run in range(args.runs + 1):  # run 0 warms every arm up and is not counted
            for rate in RATES:
                recorder = AuditRecorder()
                with Swarm(
                    registry=processes.registry_address,
                    credential=credential,
                    trust=trusts[rate],
                    audit=recorder,
                ) as swarm:
                    swarm.rng = random.Random(run)
                    model = DistributedModelForCausalLM.from_pretrained(
                        store, swarm=swarm, classification="internal"
                    )
                    _, tokens_per_second = measure(model, input_ids, args.new_tokens, tokenizer)
                events = recorder.of_kind(VerificationEvent)
                if any(not e.agreed for e in events):
                    raise RuntimeError(f"an honest node was found wrong at rate {rate}")
                worst = max([worst, *(e.max_abs_diff or 0.0 for e in events)])
                if run:
                    per_token[rate].append(1000 / tokens_per_second)
                    checks[rate] += len(events)
                print(
                    f"run {run}: rate {rate:4.2f}  {1000 / tokens_per_second:7.1f} ms/token  "
                    f"{len(events)} checks"
                )
    base = statistics.median(per_token[0.0])
    lines = [
        f"### Verification overhead per sampling rate, CPU demo model ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- 5 server processes (a 0:10 trusted; b1, b2 10:20 and c1, c2 20:30 standard) + client over mTLS;"
        f" `internal` data; prompt {input_ids.shape[1]} tokens, {args.new_tokens} new tokens, greedy;"
        f" median of {args.runs} runs per arm after a warm-up, arms alternated. A checked session step is"
        " recomputed as one stateless pass over every position the hop holds, on a standard node chosen"
        " at random among the others.",
        "",
        "| rate (internal, standard tier) | outputs re-executed per run | decode (ms/token) | vs rate 0 |",
        "|---:|---:|---:|---:|",
    ]
    for rate in RATES:
        median = statistics.median(per_token[rate])
        lines.append(
            f"| {rate:g} | {checks[rate] / args.runs:.1f} | {median:.1f} | {median / base - 1:+.0%} |"
        )
    lines += ["", f"Largest difference between an honest output and its re-execution (fp32): {worst:.3g}."]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        publish("verification_overhead", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
