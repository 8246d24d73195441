"""Audit overhead per generated token on the CPU demo model.

Three block servers (blocks 0:10, 10:20, 20:30) run as separate processes (benchmarks/block_server.py),
the registry and the client in this one, over real mTLS gRPC; the same greedy generation runs
alternately with audit logs on (client and every server write SQLite audit logs, signed checkpoints)
and off, and the median decode time per token is compared.
Receipts and possession proofs are on in both arms (they are part of the protocol, not of logging).

    .venv/bin/python benchmarks/audit_overhead.py [--runs 5] [--new-tokens 48]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see generation_cpu.py

import argparse
import contextlib
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from results import machine, publish
from transformers import PreTrainedTokenizerBase

from fincluster.audit import AuditSettings
from fincluster.audit.node import open_node_audit_log
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.demo import TimingStreamer, _prepare
from fincluster.registry.server import RegistryServer
from fincluster.store import ModelStore
from fincluster.trust.pki import Credential, Role

HERE = Path(__file__).resolve().parent

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Explain what a credit default swap is, in plain words."
SPANS = ("0:10", "10:20", "20:30")


def credential(certs: Path, role: str, name: str) -> Credential:
    nodes = certs / "nodes"
    return Credential.from_files(
        cert_path=nodes / f"{role}-{name}.pem",
        key_path=nodes / f"{role}-{name}.key",
        ca_cert_path=certs / "ca.pem",
    )


@contextlib.contextmanager
def swarm_with(store: ModelStore, certs: Path, audit_dir: Path | None) -> Iterator[Swarm]:
    """Registry in this process; each block server in its own process (as deployed); the client here."""
    registry = RegistryServer(credential(certs, "registry", "registry"))
    address = registry.start()
    processes: list[subprocess.Popen[str]] = []
    client_log = None
    try:
        for name, span in zip("abc", SPANS, strict=True):
            args = [str(store.path), span, str(certs), name, address, str(audit_dir) if audit_dir else "-"]
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(HERE / "block_server.py"), *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        for process in processes:
            if process.stdout is None or process.stdout.readline().strip() != "serving":
                raise RuntimeError("a benchmark server did not start")
        client = credential(certs, "client", "analyst")
        client_log = (
            open_node_audit_log(AuditSettings(directory=audit_dir), client) if audit_dir is not None else None
        )
        with Swarm(registry=address, credential=client, audit=client_log) as swarm:
            while len(swarm.registry.list(store.model_id)) < len(SPANS):
                time.sleep(0.05)
            yield swarm
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        registry.stop(0)
        if client_log is not None:
            client_log.close()


def component_costs(certs: Path, scratch: Path) -> tuple[float, float]:
    """Median ms of (client: one step's 3 transfer records in one transaction, server: one record)."""
    from datetime import UTC, datetime

    from fincluster.audit import TransferEvent
    from fincluster.serving.audit_trail import ServerAuditTrail
    from fincluster.serving.guard import ServeGuard
    from fincluster.serving.service import Transfer
    from fincluster.spans import BlockSpan
    from fincluster.trust.enforcement import TrustContext
    from fincluster.trust.pki import load_certificate
    from fincluster.trust.policy import ModelRef

    server = credential(certs, "server", "a")
    model = ModelRef(id="m", num_blocks=30, manifest_sha256="0" * 64)
    trust = TrustContext.public_only(load_certificate(server.read()[0]))
    guard = ServeGuard(server, model, trust=trust)
    receipt = guard.receipt(
        session_id="s", step=0, span=BlockSpan(0, 10), input_sha256="1" * 64, output_sha256="2" * 64
    )
    settings = AuditSettings(directory=scratch / "components")
    client_log = open_node_audit_log(settings, credential(certs, "client", "analyst"))
    trail = ServerAuditTrail(
        open_node_audit_log(settings, server), node_id=server.spiffe_id, model=model, claims=None
    )
    client_ms, server_ms = [], []
    for step in range(200):
        events = [
            TransferEvent(
                time=datetime.now(UTC),
                observer="client",
                session_id="s",
                operation="inference_step",
                step=step,
                client_id=server.spiffe_id.replace("server", "client"),
                classification="internal",
                model_id="m",
                manifest_digest="0" * 64,
                node_id=server.spiffe_id,
                cert_fingerprint="sha256:" + "0" * 64,
                block_span=BlockSpan(0, 10),
                num_tokens=1,
                input_sha256="1" * 64,
                output_sha256="2" * 64,
                receipt=receipt,
            )
            for _ in range(3)
        ]
        started = time.perf_counter()
        client_log.append_many(events)
        client_ms.append((time.perf_counter() - started) * 1000)
        transfer = Transfer(
            "s",
            step,
            "inference_step",
            BlockSpan(0, 10),
            events[0].client_id,
            "internal",
            1,
            "1" * 64,
            "2" * 64,
            receipt,
        )
        started = time.perf_counter()
        trail.transfer(transfer)
        server_ms.append((time.perf_counter() - started) * 1000)
    client_log.close()
    return statistics.median(client_ms), statistics.median(server_ms)


def decode_seconds_per_token(
    model: DistributedModelForCausalLM, ids: torch.Tensor, new: int, tokenizer: PreTrainedTokenizerBase
) -> float:
    streamer = TimingStreamer(tokenizer)
    streamer.on_finalized_text = lambda text, stream_end=False: None  # type: ignore[method-assign]
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer)
    times = streamer.token_times
    return (times[-1] - times[0]) / (len(times) - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--workdir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    store_dir, certs, _ = _prepare(args.workdir, [])
    store = ModelStore.open(store_dir)
    tokenizer = store.load_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    from fincluster.trust.pki import CertificateAuthority

    ca = CertificateAuthority.load(certs)
    for name in "abc":
        ca.issue(Role.SERVER, name)
    results: dict[str, list[float]] = {"audit off": [], "audit on": []}
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.runs):
            for arm in ("audit off", "audit on"):
                audit_dir = Path(scratch) / f"run{run}" if arm == "audit on" else None
                with swarm_with(store, certs, audit_dir) as swarm:
                    model = DistributedModelForCausalLM.from_pretrained(
                        store, swarm=swarm, classification="public"
                    )
                    decode_seconds_per_token(model, ids, 4, tokenizer)  # warm-up
                    seconds = decode_seconds_per_token(model, ids, args.new_tokens, tokenizer)
                results[arm].append(seconds)
                print(f"run {run + 1}: {arm:9s} {seconds * 1000:6.2f} ms/token", flush=True)
        client_ms, server_ms = component_costs(certs, Path(scratch))
    off, on = (statistics.median(results[arm]) for arm in ("audit off", "audit on"))
    overhead = (on - off) / off
    paired = statistics.median(b - a for a, b in zip(results["audit off"], results["audit on"], strict=True))
    runs_off = ", ".join(f"{x * 1000:.1f}" for x in results["audit off"])
    runs_on = ", ".join(f"{x * 1000:.1f}" for x in results["audit on"])
    report = "\n".join(
        [
            f"### Audit overhead per generated token, CPU demo model ({datetime.date.today().isoformat()})",
            "",
            f"- Machine: {machine()}",
            f"- Command: `python benchmarks/audit_overhead.py {' '.join(sys.argv[1:])}`".rstrip() + "",
            f"- 3 server processes + client over mTLS gRPC; {args.new_tokens} new tokens, greedy; median of"
            f" {args.runs} runs per arm, arms alternated. 'audit on': the client and each server append one"
            " record per transfer to their SQLite logs (WAL, synchronous=FULL) and sign checkpoints;"
            " receipts and possession proofs are on in both arms.",
            "",
            "| arm | decode (ms/token) |",
            "|---|---:|",
            f"| audit off | {off * 1000:.2f} |",
            f"| audit on | {on * 1000:.2f} |",
            "",
            f"Overhead: {overhead * 100:+.1f} % of the token time from the medians; median of the"
            f" per-run paired differences {paired / off * 100:+.1f} %; runs: off {runs_off} / on {runs_on}"
            " ms/token (target ≤ 5 %).",
            "",
            "Where the time goes (median of 200, same machine): the client writes one step's 3 transfer"
            f" records in one transaction in {client_ms:.2f} ms, on the critical path"
            f" ({client_ms / (off * 1000) * 100:.1f} % of a token); each server writes its record in"
            f" {server_ms:.2f} ms after its response is sent, off the critical path but on the same 2 cores"
            f" here ({3 * server_ms / (off * 1000) * 100:.1f} % of a token's CPU for 3 servers).",
        ]
    )
    print(report)
    if not args.no_write:
        publish("audit_overhead", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
