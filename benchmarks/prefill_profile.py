"""Where a swarm prefill's time goes, on the GPU harness setup: repeated batch 8 x 512 stateless
forwards through the 2 servers (``public`` arm), with py-spy sampling the client and server ``a``.

    python3 benchmarks/prefill_profile.py --out $OUT        # after benchmarks/harness.py wrote the store

Writes per-forward wall times (JSON) and py-spy's collapsed stacks (one line per stack and its
sample count) for both processes; ``--summarize FILE`` prints the heaviest fincluster, protobuf,
grpc and torch frames of such a file.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import connections, gpu_profile, random_store

from fincluster.demo import launch


def summarize(path: Path, top: int = 25) -> None:
    """Inclusive share of samples per frame (a frame counted once per stack) and self share per leaf."""
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        frames = stack.split(";")
        total += samples
        leaves[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    print(f"{path.name}: {total} samples")
    print("  inclusive:")
    for frame, samples in inclusive.most_common(top):
        print(f"    {samples / total:6.1%}  {frame}")
    print("  self (leaf):")
    for frame, samples in leaves.most_common(top):
        print(f"    {samples / total:6.1%}  {frame}")


def primitives() -> dict[str, float]:
    """Milliseconds of the host work one 32 MiB activation message costs, on this machine."""
    from fincluster.wire.tensors import encode

    hidden = torch.randn(8, 512, 4096, device="cuda").to(torch.bfloat16)
    message = encode(hidden)
    data = message.SerializeToString()

    def ms(work: Callable[[], object], runs: int = 5) -> float:
        work()
        started = time.perf_counter()
        for _ in range(runs):
            work()
        return (time.perf_counter() - started) / runs * 1000

    result = {
        "sha256_32MiB": ms(lambda: hashlib.sha256(data).digest()),
        "serialize_deterministic_32MiB": ms(lambda: message.SerializeToString(deterministic=True)),
        "parse_32MiB": ms(lambda: type(message).FromString(data)),
        "bytes_copy_32MiB": ms(lambda: bytearray(data)),
        "d2h_pageable_32MiB": ms(lambda: hidden.to("cpu")),
        "encode_from_gpu_32MiB": ms(lambda: encode(hidden)),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fincluster-bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/fincluster-bench/results"))
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--summarize", type=Path, default=None)
    args = parser.parse_args()
    if args.summarize is not None:
        summarize(args.summarize)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    host_work = primitives()
    profile = gpu_profile(quick=True)
    store, local = random_store(args.workdir, "cuda")
    del local
    torch.cuda.empty_cache()
    vocab = int(store.load_config().vocab_size)
    stopped: dict[str, tuple[int, float]] = {}
    # the device installs wheels with --target: py-spy's binary is then beside the packages
    found = [
        Path(entry) / "bin" / "py-spy" for entry in sys.path if (Path(entry) / "bin" / "py-spy").exists()
    ]
    spy = shutil.which("py-spy") or (str(found[0]) if found else "py-spy")
    with (
        launch(
            args.workdir,
            profile.servers,
            server_args=profile.server_args,
            server_env=profile.server_env,
            stopped=stopped,
        ) as processes,
        connections(processes, store, profile, args.workdir / "client-audit") as arms,
    ):
        model, swarm = arms["public"]()
        ids = torch.randint(3, vocab, profile.prefill_shape, device="cuda")
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)  # warm-up
            server = subprocess.run(
                ["pgrep", "-f", "serve .*--blocks 0:16"],
                capture_output=True,
                text=True,
            ).stdout.split()
            targets = {"client": str(os.getpid())}
            if server:
                targets["server-a"] = server[0]
            spies = [
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        pid,
                        "--duration",
                        str(args.seconds),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--nonblocking",
                        "--output",
                        str(args.out / f"prefill-{name}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for name, pid in targets.items()
            ]
            times = []
            started = time.perf_counter()
            while time.perf_counter() - started < args.seconds:
                torch.cuda.synchronize()
                began = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - began)
            for process in spies:
                _, error = process.communicate(timeout=60)
                if process.returncode:
                    print("py-spy:", error.strip()[-500:], flush=True)
        swarm.close()
    tokens = profile.prefill_shape[0] * profile.prefill_shape[1]
    result = {
        "forwards": len(times),
        "median_s": statistics.median(times),
        "tokens_per_s": tokens / statistics.median(times),
        "targets": targets,
        "host_work_ms": host_work,
    }
    (args.out / "prefill-profile.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    for name in targets:
        path = args.out / f"prefill-{name}.txt"
        if path.exists():
            summarize(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
