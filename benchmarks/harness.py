"""One benchmark harness: local transformers vs the swarm, on CPU (demo model) or on a GPU.

In one run it measures decode ms/token at batch 1 (16-token prompt), prefill tokens/s, forward +
backward tokens/s and aggregate decode tokens/s at 8 and 32 concurrent sessions, for

* (a) local transformers on the same device (concurrency as one padded batch),
* (b) the swarm: registry + block servers as separate ``fincluster serve`` processes on loopback,
  every link mTLS; ``public`` (no client policy or audit) and ``internal`` (policies, attestations,
  possession proofs, signed receipts checked per step, client and server audit logs),
* (c) the memory floor: weight bytes read per token / measured copy bandwidth.

CPU: SmolLM2-135M-Instruct (the demo store), fp32, 3 servers (0:10, 10:20, 20:30). GPU: a
Llama-2-7B-shaped model with random weights created on the device (no download), bf16, 2 servers
(0:16, 16:32) on the same GPU. On a GPU it first checks the fast step (CUDA graphs, batched decode)
against the eager path, and compares swarm vs local logits with local bf16 vs local fp32.
``--part quant`` measures int8 / nf4 servers instead. Results: a table in BENCHMARKS.md (``--write``)
and JSON + logs under ``--out``.

    .venv/bin/python benchmarks/harness.py --device cpu --write
    python3 benchmarks/harness.py --device cuda --out $OUT [--part speed|quant]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see generation_cpu.py

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from results import machine, publish
from transformers import AutoModelForCausalLM, LlamaConfig, StoppingCriteria, StoppingCriteriaList

from fincluster.audit import AuditSettings
from fincluster.audit.node import open_node_audit_log
from fincluster.bootstrap import trust_from_settings
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.demo import DEMO_SERVERS, DemoServer, LocalSwarmProcesses, launch
from fincluster.store import ModelStore, import_from_model
from fincluster.trust.policy import Classification

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    device: str
    dtype: torch.dtype
    servers: tuple[DemoServer, ...]
    new_tokens: int
    prefill_shape: tuple[int, int]
    train_shape: tuple[int, int]
    concurrency: tuple[int, ...]
    concurrent_tokens: int
    runs: int
    server_args: tuple[str, ...]
    server_env: dict[str, str] = field(default_factory=dict)


def cpu_profile(quick: bool) -> Profile:
    slot = 10 * 2 * 3 * 64 * 4 * 512  # 10 blocks, keys+values, 3 kv heads, head dim 64, fp32, 512 tokens
    return Profile(
        device="cpu",
        dtype=torch.float32,
        servers=DEMO_SERVERS,
        new_tokens=32 if quick else 128,
        prefill_shape=(2, 128),
        train_shape=(1, 64),
        concurrency=(8,) if quick else (8, 32),
        concurrent_tokens=8 if quick else 16,
        runs=1 if quick else 3,
        server_args=("--step-strategy", "static"),
        server_env={
            "FINCLUSTER_SERVER__MAX_SESSION_LENGTH": "512",
            "FINCLUSTER_SERVER__CACHE_BUDGET_BYTES": str(40 * slot),
            "FINCLUSTER_SERVER__MAX_STREAMS_PER_CLIENT": "64",
        },
    )


def gpu_profile(quick: bool) -> Profile:
    slot = 16 * 2 * 32 * 128 * 2 * 1024  # 16 blocks, keys+values, 32 kv heads, head dim 128, bf16, 1024
    return Profile(
        device="cuda",
        dtype=torch.bfloat16,
        servers=(DemoServer("a", "0:16", "trusted"), DemoServer("b", "16:32", "standard")),
        new_tokens=32 if quick else 128,
        prefill_shape=(8, 512),
        train_shape=(4, 512),
        concurrency=(8, 32),
        concurrent_tokens=32 if quick else 64,
        runs=1 if quick else 3,
        server_args=("--device", "cuda", "--dtype", "bfloat16", "--step-strategy", "graphs"),
        server_env={
            "FINCLUSTER_SERVER__MAX_SESSION_LENGTH": "1024",
            "FINCLUSTER_SERVER__CACHE_BUDGET_BYTES": str(36 * slot),
            "FINCLUSTER_SERVER__MAX_STREAMS_PER_CLIENT": "64",
        },
    )


LLAMA2_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class TokenTimes(StoppingCriteria):
    """Records when each generated token is ready (transformers calls this once per token)."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []  # type: list[float]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_ms(model: Any, ids: torch.Tensor, new: int, device: str) -> tuple[float, float]:
    """(decode ms/token after the first, ms to the first token) of one greedy generate."""
    timer = TokenTimes(device)
    sync(device)
    started = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([timer]),
        pad_token_id=0,
    )
    times = timer.times
    return (times[-1] - times[0]) / (len(times) - 1) * 1000, (times[0] - started) * 1000


def timed(device: str, work: Callable[[], Any], runs: int) -> float:
    """Median seconds of ``work`` over ``runs`` (after one warm-up)."""
    work()
    seconds = []
    for _ in range(runs):
        sync(device)
        started = time.perf_counter()
        work()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def prefill_tokens_per_second(model: Any, profile: Profile, vocab: int, runs: int) -> float:
    batch, seq = profile.prefill_shape
    ids = torch.randint(3, vocab, (batch, seq), device=profile.device)
    with torch.no_grad():
        seconds = timed(profile.device, lambda: model(input_ids=ids, logits_to_keep=1), runs)
    return batch * seq / seconds


def train_tokens_per_second(model: Any, profile: Profile, vocab: int, runs: int) -> float:
    """Forward + backward w.r.t. the input embeddings (weights frozen, as the swarm computes)."""
    batch, seq = profile.train_shape
    ids = torch.randint(3, vocab, (batch, seq), device=profile.device)

    def step() -> None:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        logits.float().square().mean().backward()

    return batch * seq / timed(profile.device, step, runs)


def local_concurrent(model: Any, profile: Profile, vocab: int, sessions: int) -> float:
    ids = torch.randint(3, vocab, (sessions, 16), device=profile.device)
    new = profile.concurrent_tokens
    seconds = timed(
        profile.device,
        lambda: model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        ),
        1,
    )
    return sessions * new / seconds


def _generate_together(
    models: list[tuple[Any, Any]], profile: Profile, vocab: int, wait: Callable[[], None]
) -> float:
    """Generate on every model at once, in threads, after ``wait()``; returns when the last ended
    (``time.monotonic``, comparable across processes)."""
    new = profile.concurrent_tokens
    prompts = [torch.randint(3, vocab, (1, 16), device=profile.device) for _ in models]
    models[0][0].generate(prompts[0], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    barrier = threading.Barrier(len(models) + 1)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            models[index][0].generate(
                prompts[index], max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    wait()
    barrier.wait()
    for thread in threads:
        thread.join()
    ended = time.monotonic()
    for _, swarm in models:
        swarm.close()
    if errors:
        raise errors[0]
    return ended


def _client_worker(spec: dict[str, Any], arm: str, sessions: int, start: Any, done: Any) -> None:
    """One client process of a concurrency measurement (its own GIL, as separate clients have)."""
    profile = (gpu_profile if spec["device"] == "cuda" else cpu_profile)(spec["quick"])
    processes = LocalSwarmProcesses(
        spec["registry"], Path(spec["store"]), Path(spec["certs"]), Path(spec["authority"])
    )
    store = ModelStore.open(spec["store"])
    try:
        with connections(processes, store, profile, Path(spec["audit"]) / f"worker-{os.getpid()}") as arms:
            models = [arms[arm]() for _ in range(sessions)]
            done.put(("ended", _generate_together(models, profile, spec["vocab"], start.wait)))
    except BaseException as error:
        done.put(("error", repr(error)))
        start.abort()


def swarm_concurrent(
    processes: LocalSwarmProcesses, arm: str, profile: Profile, vocab: int, sessions: int, audit_dir: Path
) -> float:
    """``sessions`` clients, each its own swarm connection and model, generating at once, spread over
    up to 8 client processes (one Python process would be bound by its own GIL long before the
    servers are)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = min(sessions, 8)
    shares = [sessions // workers + (1 if i < sessions % workers else 0) for i in range(workers)]
    start, done = context.Barrier(workers + 1), context.Queue()
    spec = {
        "device": profile.device,
        "registry": processes.registry_address,
        "store": str(processes.store_dir),
        "certs": str(processes.certs),
        "authority": str(processes.authority),
        "audit": str(audit_dir),
        "vocab": vocab,
        "quick": profile.concurrent_tokens
        == (gpu_profile(True) if profile.device == "cuda" else cpu_profile(True)).concurrent_tokens,
    }
    children = [context.Process(target=_client_worker, args=(spec, arm, n, start, done)) for n in shares]
    for child in children:
        child.start()
    try:
        start.wait(timeout=600)
    except threading.BrokenBarrierError:
        raise RuntimeError(f"a client worker failed: {done.get(timeout=60)[1]}") from None
    started = time.monotonic()
    outcomes = [done.get(timeout=600) for _ in children]
    for child in children:
        child.join(timeout=60)
    failed = [detail for kind, detail in outcomes if kind == "error"]
    if failed:
        raise RuntimeError(f"a client worker failed: {failed[0]}")
    return sessions * profile.concurrent_tokens / (max(ended for _, ended in outcomes) - started)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written."""
    size = 2**31 if device == "cuda" else 2**28
    source = torch.empty(size // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    seconds = timed(device, lambda: target.copy_(source), 5)
    return 2 * size / seconds


def random_store(workdir: Path, device: str) -> tuple[ModelStore, torch.nn.Module]:
    """A Llama-2-7B-shaped model with random bf16 weights, made on ``device``, imported as a store."""
    store_dir = workdir / "store"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LLAMA2_7B, dtype=torch.bfloat16)
    # transformers' own initialisation: normal(0, 0.02) projections, unit norms
    model.eval().requires_grad_(False)
    if not (store_dir / "manifest.json").exists():
        started = time.perf_counter()
        import_from_model(model, None, store_dir, model_id="llama-2-7b-random", overwrite=True)
        print(f"store written in {time.perf_counter() - started:.0f} s", flush=True)
    return ModelStore.open(store_dir), model


def demo_local(store: ModelStore) -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).parent))
    from generation_cpu import local_model

    return local_model(store).requires_grad_(False)


@contextlib.contextmanager
def connections(
    processes: LocalSwarmProcesses, store: ModelStore, profile: Profile, audit_dir: Path
) -> Iterator[dict[str, Callable[[], tuple[Any, Any]]]]:
    """Factories of (model, swarm) for the two arms: ``public`` (no client policy, no audit) and
    ``internal`` (trust context with the policies and authority key, client audit log)."""
    credential = processes.client_credential()
    trust = trust_from_settings(processes.trust_settings(), credential)
    logs = []
    config = store.load_config()
    # one copy of the client part's weights (digests checked once), shared by every model object
    state = {k: v.to(profile.device, profile.dtype) for k, v in store.load_client_state().items()}

    def client_model(swarm: Swarm, classification: Classification) -> DistributedModelForCausalLM:
        model = DistributedModelForCausalLM(
            config,
            store=store,
            swarm=swarm,
            client_state=state,
            dtype=profile.dtype,
            classification=classification,
        )
        return model.eval().to(profile.device)

    def public() -> tuple[Any, Any]:
        swarm = Swarm(registry=processes.registry_address, credential=credential, audit=None)
        return client_model(swarm, Classification.PUBLIC), swarm

    def internal() -> tuple[Any, Any]:
        log = open_node_audit_log(AuditSettings(directory=audit_dir / f"client-{len(logs)}"), credential)
        logs.append(log)
        swarm = Swarm(registry=processes.registry_address, credential=credential, trust=trust, audit=log)
        return client_model(swarm, Classification.INTERNAL), swarm

    try:
        yield {"public": public, "internal": internal}
    finally:
        for log in logs:
            log.close()


def save(results: dict[str, Any], out_dir: Path, name: str) -> None:
    """Write what is known so far (a run cut short still leaves its numbers)."""
    (out_dir / name).write_text(json.dumps(results, indent=2, default=str))


def measure_all(
    name: str, model: Any, profile: Profile, vocab: int, concurrent: Callable[[int], float]
) -> dict[str, Any]:
    ids = torch.randint(3, vocab, (1, 16), device=profile.device)
    decode_ms(model, ids, 4, profile.device)  # warm-up (graphs, caches)
    decode = [decode_ms(model, ids, profile.new_tokens, profile.device) for _ in range(profile.runs)]
    row: dict[str, Any] = {
        "setup": name,
        "decode_ms": statistics.median(d for d, _ in decode),
        "first_token_ms": statistics.median(f for _, f in decode),
        "prefill_tps": prefill_tokens_per_second(model, profile, vocab, profile.runs),
        "train_tps": train_tokens_per_second(model, profile, vocab, profile.runs),
    }
    for sessions in profile.concurrency:
        row[f"concurrent_{sessions}_tps"] = concurrent(sessions)
    print(json.dumps(row), flush=True)
    return row


def gpu_self_test(store: ModelStore, out: dict[str, Any]) -> None:
    """The fast step (CUDA graphs, batched decode) against the eager path, in this process."""
    from fincluster.serving.fast_step import StepEngine
    from fincluster.serving.runner import BlockRunner
    from fincluster.serving.server import load_span_model
    from fincluster.serving.sessions import Session
    from fincluster.spans import BlockSpan
    from fincluster.values import StepStrategy, TensorDType
    from fincluster.wire.codec import SpanInputs

    model = load_span_model(store, BlockSpan(0, 16), dtype=TensorDType.BFLOAT16, device="cuda")
    graphs = StepEngine(model, StepStrategy.GRAPHS, cache_bytes=8 * 2**30, max_length=256)
    fast, eager = BlockRunner(model, engine=graphs), BlockRunner(model)
    hidden_size = model.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    sessions = []
    for index, prompt in enumerate((5, 9, 16, 3)):
        steps = prompt + 24
        hidden = torch.randn(1, steps, hidden_size, generator=generator).to(torch.bfloat16)
        fast_session = Session(
            f"f{index}",
            model.span,
            256,
            1,
            0,
            graphs.new_cache(model.span, batch_size=1, max_length=256),
            "c",
            0.0,
        )
        eager_session = Session(f"e{index}", model.span, 256, 1, 0, model.new_cache(model.span), "c", 0.0)
        sessions.append((prompt, steps, hidden, fast_session, eager_session))

    def inputs(hidden: torch.Tensor, start: int, end: int) -> SpanInputs:
        mask = torch.ones(1, end, dtype=torch.int64)
        return SpanInputs(hidden[:, start:end], mask, torch.arange(start, end).unsqueeze(0))

    def compare(a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item())

    for prompt, _, hidden, fast_session, eager_session in sessions:
        compare(
            fast.step(fast_session, inputs(hidden, 0, prompt)),
            eager.step(eager_session, inputs(hidden, 0, prompt)),
        )
    for t in range(24):  # solo graph replays for the first 12 steps, then all four as one batch
        if t < 12:
            for prompt, _, hidden, fast_session, eager_session in sessions:
                compare(
                    fast.step(fast_session, inputs(hidden, prompt + t, prompt + t + 1)),
                    eager.step(eager_session, inputs(hidden, prompt + t, prompt + t + 1)),
                )
        else:
            batch = fast.step_batch([(f, inputs(h, p + t, p + t + 1)) for p, _, h, f, _ in sessions])
            for (prompt, _, hidden, _, eager_session), output in zip(sessions, batch, strict=True):
                assert isinstance(output, torch.Tensor), output
                compare(output, eager.step(eager_session, inputs(hidden, prompt + t, prompt + t + 1)))
    # span step wall time: eager (DynamicCache) vs graph replay, 16 layers, one token
    probe = Session("probe-e", model.span, 256, 1, 0, model.new_cache(model.span), "c", 0.0)
    probe_fast = Session(
        "probe-f", model.span, 256, 1, 0, graphs.new_cache(model.span, batch_size=1, max_length=256), "c", 0.0
    )
    hidden = torch.randn(1, 200, hidden_size, generator=generator).to(torch.bfloat16)
    eager.step(probe, inputs(hidden, 0, 64))
    fast.step(probe_fast, inputs(hidden, 0, 64))
    times: dict[str, list[float]] = {"eager": [], "graphs": []}
    for t in range(64, 128):
        for name, runner, session in (("eager", eager, probe), ("graphs", fast, probe_fast)):
            torch.cuda.synchronize()
            started = time.perf_counter()
            runner.step(session, inputs(hidden, t, t + 1))
            times[name].append((time.perf_counter() - started) * 1000)
    out["self_test"] = {
        "worst_relative_error_graphs_vs_eager": worst,
        "passed": worst < 2e-2,
        "span_step_ms_16_layers": {name: statistics.median(v[8:]) for name, v in times.items()},
        "graphs_captured": sum(1 for g in graphs._graphs.values() if g is not None and g.graph is not None),
    }
    print(json.dumps(out["self_test"]), flush=True)
    del model, graphs, fast, eager
    torch.cuda.empty_cache()


def exactness(local: torch.nn.Module, swarm_model: Any, vocab: int, out: dict[str, Any]) -> None:
    """Swarm vs local logits in bf16, against local bf16 vs local fp32 (the tolerance to meet)."""
    ids = torch.randint(3, vocab, (1, 16), device="cuda")
    with torch.no_grad():
        bf16 = local(ids).logits.float()
        swarm = swarm_model(ids).logits.float()
        local.float()
        fp32 = local(ids).logits.float()
        local.bfloat16()
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    out["exactness"] = {
        "swarm_bf16_vs_local_bf16": relative(swarm, bf16),
        "local_bf16_vs_local_fp32": relative(bf16, fp32),
        "swarm_bf16_vs_local_fp32": relative(swarm, fp32),
        "greedy_tokens_equal": bool(torch.equal(swarm.argmax(-1), bf16.argmax(-1))),
    }
    print(json.dumps(out["exactness"]), flush=True)


def report(results: dict[str, Any], profile: Profile, command: str) -> str:
    rows = results["rows"]
    local = rows[0]
    versions = results["versions"]
    lines = [
        f"### Harness: local transformers vs the swarm on {results['device_name']}"
        f" ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {results['machine']}; {versions}",
        f"- Command: `{command}`",
        f"- Model: {results['model']}; servers {', '.join(s.span for s in profile.servers)} as separate"
        f" `fincluster serve` processes ({' '.join(profile.server_args)}), mTLS on loopback. Decode: batch 1,"
        f" 16-token prompt, {profile.new_tokens} new tokens, median of {profile.runs}; prefill: batch"
        f" {profile.prefill_shape[0]} x {profile.prefill_shape[1]}; forward+backward (w.r.t. inputs): batch"
        f" {profile.train_shape[0]} x {profile.train_shape[1]}; concurrent: N sessions x"
        f" {profile.concurrent_tokens}"
        " new tokens each (local: one padded batch of N).",
        "",
        "| setup | decode ms/token | vs local | prefill tokens/s | vs local | fwd+bwd tokens/s | vs local |"
        + "".join(f" {n} sessions tokens/s | vs 1 session |" for n in profile.concurrency),
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(profile.concurrency),
    ]
    for row in rows:
        single = 1000 / row["decode_ms"]
        line = (
            f"| {row['setup']} | {row['decode_ms']:.2f} | {local['decode_ms'] / row['decode_ms']:.2f}x |"
            f" {row['prefill_tps']:.0f} | {row['prefill_tps'] / local['prefill_tps']:.2f}x |"
            f" {row['train_tps']:.0f} | {row['train_tps'] / local['train_tps']:.2f}x |"
        )
        for n in profile.concurrency:
            tps = row[f"concurrent_{n}_tps"]
            line += f" {tps:.0f} | {tps / single:.1f}x |"
        lines.append(line)
    floor = results["floor"]
    lines += [
        "",
        f"Memory floor: {floor['weight_bytes'] / 1e9:.2f} GB of weights read per token at a measured copy"
        f" bandwidth of {floor['bandwidth'] / 1e9:.0f} GB/s = {floor['ms_per_token']:.2f} ms/token."
        " 'vs local' is local time /"
        " swarm time (higher is better for the swarm); 'vs 1 session' is aggregate tokens/s over the setup's"
        " batch-1 decode tokens/s.",
    ]
    for key in ("self_test", "exactness", "quant", "stopped"):
        if key in results:
            lines.append(f"- {key}: `{json.dumps(results[key])}`")
    return "\n".join(lines)


def versions() -> str:
    import grpc
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--part", choices=["speed", "quant"], default="speed")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and runs (a smoke test)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results JSON and server logs go here")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    command = "python benchmarks/harness.py " + " ".join(sys.argv[1:])
    profile = gpu_profile(args.quick) if args.device == "cuda" else cpu_profile(args.quick)
    workdir = args.workdir or (
        Path("/tmp/fincluster-bench") if args.device == "cuda" else ROOT / "var" / "bench"
    )
    out_dir = args.out or workdir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "versions": versions(), "device": args.device}
    results["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    if args.device == "cuda":
        store, local = random_store(workdir, "cuda")
        results["model"] = "Llama-2-7B shape (32 layers, hidden 4096), random weights, bf16"
    else:
        from fincluster.demo import _prepare

        store = ModelStore.open(_prepare(workdir, [])[0])
        local = demo_local(store)
        results["model"] = "SmolLM2-135M-Instruct (demo store), fp32"
    vocab = int(store.load_config().vocab_size)
    weight_bytes = sum(p.numel() * p.element_size() for p in local.parameters())
    bandwidth = copy_bandwidth(args.device)
    results["floor"] = {
        "weight_bytes": weight_bytes,
        "bandwidth": bandwidth,
        "ms_per_token": weight_bytes / bandwidth * 1000,
    }
    rows: list[dict[str, Any]] = []
    results["rows"] = rows
    json_name = f"harness-{args.device}-{args.part}.json"
    if args.device == "cuda" and args.part == "speed":
        try:
            gpu_self_test(store, results)
        except Exception as error:  # the benchmark still runs; the failure is in the results
            results["self_test"] = {"passed": False, "error": repr(error)}
            print(f"self-test failed: {error!r}", flush=True)
        save(results, out_dir, json_name)
    if args.part == "speed":
        rows.append(
            measure_all(
                "local transformers",
                local,
                profile,
                vocab,
                lambda n: local_concurrent(local, profile, vocab, n),
            )
        )
    quant_modes = ("none",) if args.part == "speed" else ("int8", "nf4")
    stopped: dict[str, tuple[int, float]] = {}
    for quant in quant_modes:
        server_args = (*profile.server_args, "--quant", quant)
        with (
            launch(
                workdir,
                profile.servers,
                server_args=server_args,
                server_env=profile.server_env,
                stopped=stopped,
            ) as processes,
            connections(processes, store, profile, workdir / "client-audit") as arms,
        ):
            if args.part == "quant":
                model, swarm = arms["public"]()
                records = swarm.registry.list(store.model_id)
                ids = torch.randint(3, vocab, (1, 16), device=profile.device)
                decode_ms(model, ids, 4, profile.device)
                decode = statistics.median(
                    decode_ms(model, ids, profile.new_tokens, profile.device)[0] for _ in range(profile.runs)
                )
                results.setdefault("quant", {})[quant] = {
                    "decode_ms": decode,
                    "weight_bytes": sum(r.weight_bytes for r in records),
                    "weight_fraction_of_bf16": sum(r.weight_bytes for r in records)
                    / (weight_bytes - 2 * vocab * 4096 * 2),
                    "quantization": sorted({r.quantization for r in records}),
                }
                swarm.close()
                print(json.dumps(results["quant"][quant]), flush=True)
                save(results, out_dir, json_name)
                continue
            for arm in ("public", "internal"):
                model, swarm = arms[arm]()
                if arm == "public" and args.device == "cuda":
                    exactness(local, model, vocab, results)
                name = f"swarm {len(profile.servers)} servers, {arm}"
                rows.append(
                    measure_all(
                        name,
                        model,
                        profile,
                        vocab,
                        lambda n, a=arm: swarm_concurrent(
                            processes, a, profile, vocab, n, workdir / "client-audit"
                        ),
                    )
                )
                swarm.close()
                save(results, out_dir, json_name)
    results["stopped"] = {
        name: {"exit": code, "seconds": round(seconds, 2)} for name, (code, seconds) in stopped.items()
    }
    save(results, out_dir, json_name)
    if rows:
        text = report(results, profile, command)
        print(text)
        (out_dir / f"harness-{args.device}-{args.part}.md").write_text(text)
        if args.write:
            publish(f"harness_{args.device}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
