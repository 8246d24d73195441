"""``fincluster demo``: a whole swarm on loopback, every link mTLS, one finance question answered.

Imports the demo model (once), creates a development CA and node certificates, starts the registry
and three block servers as separate processes, generates through the chain, prints the answer, the
placement and the timings, and shuts everything down.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.errors import FinclusterError
from fincluster.serving.span_model import BlockSpan
from fincluster.store import ModelStore, import_model
from fincluster.trust.pki import CertificateAuthority, Credential, Role

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_SPANS = ("0:10", "10:20", "20:30")
DEMO_PROMPT = (
    "In two sentences: what is the difference between a bond's coupon rate and its yield to maturity?"
)
TRUST_DOMAIN = "demo.fincluster.internal"


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def start_reader(self) -> None:
        def pump(stream: IO[str]) -> None:
            for line in stream:
                self.lines.put(line.rstrip("\n"))

        if self.popen.stdout is None:
            raise FinclusterError(f"{self.name} was started without a stdout pipe")
        threading.Thread(target=pump, args=(self.popen.stdout,), daemon=True).start()

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise FinclusterError(f"{self.name} exited with code {self.popen.returncode}; see its log")
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line
        raise FinclusterError(f"{self.name} did not report {prefix!r} within {timeout:.0f} s")


class TimingStreamer(TextStreamer):
    """Prints tokens as they come and notes when the first one arrived (end of prefill)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.started = time.perf_counter()
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            self.started = time.perf_counter()
        else:
            self.token_times.append(time.perf_counter())
        super().put(value)  # type: ignore[no-untyped-call]


# Several servers share this host's cores and run one after another for each token: idle OpenMP
# threads must sleep instead of spinning, or they steal the cores the active hop needs.
SHARED_HOST_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def _spawn(name: str, args: list[str], log_dir: Path) -> _Process:
    log_file = (log_dir / f"{name}.log").open("w")
    popen = subprocess.Popen(
        [sys.executable, "-m", "fincluster", *args],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        env={**os.environ, **SHARED_HOST_ENV},
    )
    process = _Process(name, popen)
    process.start_reader()
    return process


def _prepare(workdir: Path, servers: int) -> tuple[Path, Path]:

    store_dir = workdir / "store"
    if not (store_dir / "manifest.json").exists():
        print(f"importing {DEMO_MODEL} into {store_dir} (once; about 30 s) …", flush=True)
        import_model(DEMO_MODEL, store_dir, overwrite=True)
    ModelStore.open(store_dir)
    certs = workdir / "certs"
    ca = (
        CertificateAuthority.load(certs)
        if (certs / "ca.pem").exists()
        else CertificateAuthority.init(certs, trust_domain=TRUST_DOMAIN)
    )
    ca.issue(Role.REGISTRY, "registry")
    for index in range(servers):
        ca.issue(Role.SERVER, _server_name(index))
    ca.issue(Role.CLIENT, "analyst")
    return store_dir, certs


def _tls_args(certs: Path, role: str, name: str) -> list[str]:
    nodes = certs / "nodes"
    return [
        "--ca-cert",
        str(certs / "ca.pem"),
        "--cert",
        str(nodes / f"{role}-{name}.pem"),
        "--key",
        str(nodes / f"{role}-{name}.key"),
    ]


@dataclass(frozen=True)
class LocalSwarmProcesses:
    """A registry and block servers running as separate processes on loopback (see ``launch``)."""

    registry_address: str
    store_dir: Path
    certs: Path

    def client_credential(self) -> Credential:
        nodes = self.certs / "nodes"
        return Credential.from_files(
            cert_path=nodes / "client-analyst.pem",
            key_path=nodes / "client-analyst.key",
            ca_cert_path=self.certs / "ca.pem",
        )


@contextlib.contextmanager
def launch(
    workdir: Path, spans: Sequence[str] = DEMO_SPANS, *, registry_port: int = 0
) -> Iterator[LocalSwarmProcesses]:
    """Prepare store and certificates in ``workdir``, start the processes, stop them on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    store_dir, certs = _prepare(workdir, len(spans))
    log_dir = workdir / "logs"
    log_dir.mkdir(exist_ok=True)
    processes: list[_Process] = []
    try:
        registry_args = ["registry", "--port", str(registry_port), *_tls_args(certs, "registry", "registry")]
        registry = _spawn("registry", registry_args, log_dir)
        processes.append(registry)
        registry_address = registry.wait_line("registry listening on ", 60).rsplit(" ", 1)[1]
        print(f"registry      {registry_address}")
        for index, span in enumerate(spans):
            args = ["serve", "--store", str(store_dir), "--blocks", span, "--registry", registry_address]
            processes.append(
                _spawn(
                    f"server-{_server_name(index)}",
                    [*args, *_tls_args(certs, "server", _server_name(index))],
                    log_dir,
                )
            )
        for server in processes[1:]:
            print(server.wait_line("serving blocks", 180))
        swarm = LocalSwarmProcesses(registry_address, store_dir, certs)
        _wait_until_listed(swarm, len(spans))
        yield swarm
    finally:
        _shutdown(processes)


def _server_name(index: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[index]


def _wait_until_listed(swarm: LocalSwarmProcesses, count: int) -> None:

    model_id = ModelStore.open(swarm.store_dir).model_id
    with Swarm(registry=swarm.registry_address, credential=swarm.client_credential()) as client:
        deadline = time.monotonic() + 30
        while len(client.registry.list(model_id)) < count:
            if time.monotonic() > deadline:
                raise FinclusterError(f"{count} servers did not appear in the registry within 30 s")
            time.sleep(0.2)


def run_demo(
    *,
    workdir: Path,
    prompt: str | None,
    max_new_tokens: int,
    keep_running: bool = False,
    registry_port: int = 0,
) -> int:
    with (
        launch(workdir, registry_port=registry_port) as processes,
        Swarm(registry=processes.registry_address, credential=processes.client_credential()) as swarm,
    ):
        store = ModelStore.open(processes.store_dir)
        model = DistributedModelForCausalLM.from_pretrained(store, swarm=swarm)
        tokenizer = store.load_tokenizer()
        question = prompt or DEMO_PROMPT
        chat = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        print(f"\nquestion: {question}\nanswer:   ", end="", flush=True)
        streamer = TimingStreamer(tokenizer)
        with model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
            model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
            placement = [(hop.client.node_id, hop.client.span) for hop in session.hops]
        _print_report(placement, streamer, input_ids.shape[1])
        if keep_running:
            print(
                f"\nswarm running: registry at {processes.registry_address}; press Ctrl-C to stop", flush=True
            )
            _wait_for_interrupt()
    return 0


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_report(
    placement: list[tuple[str, BlockSpan]], streamer: TimingStreamer, prompt_tokens: int
) -> None:
    print("\n\nplacement")
    for node_id, span in placement:
        print(f"  blocks {span!s:>6}  {node_id}")
    times = streamer.token_times
    if times:
        prefill = times[0] - streamer.started
        decode = (times[-1] - times[0]) / max(len(times) - 1, 1)
        print("timings")
        print(f"  prefill  {prompt_tokens} tokens in {prefill * 1000:.0f} ms")
        print(
            f"  decode   {len(times) - 1} tokens, {decode * 1000:.1f} ms/token "
            f"({1 / max(decode, 1e-9):.1f} tokens/s)"
        )


def _shutdown(processes: list[_Process]) -> None:
    for process in reversed(processes):
        if process.popen.poll() is None:
            process.popen.terminate()
    for process in reversed(processes):
        try:
            code = process.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            code = process.popen.wait()
        print(f"stopped {process.name} (exit {code})")
