"""``fincluster demo``: a whole swarm on loopback, every link mTLS, one finance question answered.

Imports the demo model (once), creates a development CA and node certificates, starts the registry
and four block servers as separate processes (three serve, one is refused by policy), generates
through the chain, prints the answer, the placement and the timings, and shuts everything down.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from fincluster import __version__
from fincluster.audit import AuditSettings, build_report, read_events, reconcile, render_html, verify
from fincluster.audit.keys import KeyRing
from fincluster.audit.node import open_node_audit_log
from fincluster.bootstrap import trust_from_settings
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.client.placement import Verdict
from fincluster.errors import FinclusterError
from fincluster.settings import TrustSettings
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore, import_model
from fincluster.trust.archive import load_certificates
from fincluster.trust.attestation import (
    SIGNED_SOFTWARE_EVIDENCE,
    AttestationSubject,
    TrustTier,
    generate_authority_key_files,
    issue_attestation,
    load_authority_private_key,
)
from fincluster.trust.pki import (
    CertificateAuthority,
    Credential,
    Role,
    public_key_digest,
    spiffe_id,
)
from fincluster.trust.policy import Classification, ModelRef
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire.codec import span_to_wire

DEMO_MODEL = "smollm2-135m-instruct"
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


def _spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> _Process:
    log_file = (log_dir / f"{name}.log").open("w")
    popen = subprocess.Popen(
        [sys.executable, "-m", "fincluster", *args],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        env={**os.environ, **SHARED_HOST_ENV, **env},
    )
    process = _Process(name, popen)
    process.start_reader()
    return process


@dataclass(frozen=True)
class DemoServer:
    name: str
    span: str
    tier: str


DEMO_SERVERS = (
    DemoServer("a", "0:10", "trusted"),
    DemoServer("b", "10:20", "standard"),
    DemoServer("c", "20:30", "standard"),
)
# A standard node that offers the sensitive prefix: policy must keep it out.
INTRUDER = DemoServer("d", "0:10", "standard")
CLIENT_CLEARANCE = "confidential"


def policy_dir() -> Path:
    path = Path(__file__).resolve().parents[1] / "policies"
    if not (path / "data.json").is_file():
        raise FinclusterError(f"policies not found at {path}: run the demo from a source checkout")
    return path


def _prepare(workdir: Path, servers: Sequence[DemoServer]) -> tuple[Path, Path, Path]:
    """Store, development PKI (fresh node certificates) and attestations for this run."""
    store_dir = workdir / "store"
    if not (store_dir / "manifest.json").exists():
        print(f"importing {DEMO_MODEL} into {store_dir} (once; about 30 s) …", flush=True)
        import_model(DEMO_MODEL, store_dir, overwrite=True)
    store = ModelStore.open(store_dir)
    certs = workdir / "certs"
    ca = (
        CertificateAuthority.load(certs)
        if (certs / "ca.pem").exists()
        else CertificateAuthority.init(certs, trust_domain=TRUST_DOMAIN)
    )
    ca.issue(Role.REGISTRY, "registry")
    ca.issue(Role.CLIENT, "analyst")
    authority = workdir / "authority"
    if not (authority / "authority.pub").exists():
        authority.mkdir(parents=True, exist_ok=True)
        generate_authority_key_files(authority / "authority.key", authority / "authority.pub")
    authority_key = load_authority_private_key(authority / "authority.key")
    for server in servers:
        credential = ca.issue(Role.SERVER, server.name)
        subject = AttestationSubject(
            node_id=credential.spiffe_id,
            tls_key_sha256=public_key_digest(credential.cert_path.read_bytes()),
            tier=TrustTier(server.tier),
            zone="eu-fra",
            hardware="cpu-demo",
            software_version=f"fincluster-{__version__}",
            model_manifest_sha256=store.manifest_digest,
        )
        token = issue_attestation(
            subject, authority_key=authority_key, now=datetime.now(UTC), lifetime=timedelta(hours=8)
        )
        (authority / f"{server.name}.jwt").write_text(token)
    return store_dir, certs, authority


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
    authority: Path

    def client_credential(self) -> Credential:
        nodes = self.certs / "nodes"
        return Credential.from_files(
            cert_path=nodes / "client-analyst.pem",
            key_path=nodes / "client-analyst.key",
            ca_cert_path=self.certs / "ca.pem",
        )

    def trust_settings(self) -> TrustSettings:
        """What every party of the demo enforces: the shipped policies, the demo authority, clearances."""
        return TrustSettings(
            policy_dir=policy_dir(),
            authority_keys=[self.authority / "authority.pub"],
            crl=self.certs / "crl.pem",
            clearances={self.client_credential().spiffe_id: CLIENT_CLEARANCE},
        )


@contextlib.contextmanager
def launch(
    workdir: Path,
    servers: Sequence[DemoServer] = DEMO_SERVERS,
    *,
    registry_port: int = 0,
    expect_listed: int | None = None,
    server_args: Sequence[str] = (),
    server_env: dict[str, str] | None = None,
    stopped: dict[str, tuple[int, float]] | None = None,
) -> Iterator[LocalSwarmProcesses]:
    """Prepare store, PKI and attestations in ``workdir``, start the processes, stop them on exit.

    ``server_args`` / ``server_env`` go to every ``fincluster serve`` (device, dtype, step strategy …);
    ``stopped`` receives each process's exit code and seconds from SIGTERM to exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    store_dir, certs, authority = _prepare(workdir, servers)
    swarm = LocalSwarmProcesses("", store_dir, certs, authority)
    trust = swarm.trust_settings()
    trust_args = [
        "--policy-dir",
        str(trust.policy_dir),
        "--authority-key",
        str(authority / "authority.pub"),
        "--crl",
        str(certs / "crl.pem"),
    ]
    env = {"FINCLUSTER_TRUST__CLEARANCES": json.dumps(trust.clearances)}
    log_dir = workdir / "logs"
    log_dir.mkdir(exist_ok=True)
    processes: list[_Process] = []
    try:
        registry_args = [
            "registry",
            "--audit-dir",
            str(workdir / "audit"),
            "--port",
            str(registry_port),
            *trust_args,
            *_tls_args(certs, "registry", "registry"),
        ]
        registry = _spawn("registry", registry_args, log_dir, env)
        processes.append(registry)
        registry_address = registry.wait_line("registry listening on ", 60).rsplit(" ", 1)[1]
        print(f"registry      {registry_address}")
        for server in servers:
            args = [
                "serve",
                "--audit-dir",
                str(workdir / "audit"),
                "--store",
                str(store_dir),
                "--blocks",
                server.span,
                "--registry",
                registry_address,
                "--attestation",
                str(authority / f"{server.name}.jwt"),
                *trust_args,
                *_tls_args(certs, "server", server.name),
                *server_args,
            ]
            processes.append(_spawn(f"server-{server.name}", args, log_dir, {**env, **(server_env or {})}))
        for process in processes[1:]:
            print(process.wait_line("serving blocks", 180))
        swarm = LocalSwarmProcesses(registry_address, store_dir, certs, authority)
        _wait_until_listed(swarm, len(servers) if expect_listed is None else expect_listed)
        yield swarm
    finally:
        codes = _shutdown(processes)
        if stopped is not None:
            stopped.update(codes)


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
    servers = (*DEMO_SERVERS, INTRUDER)
    audit_dir = workdir / "audit"
    for stale in audit_dir.glob("*.sqlite*"):  # each demo run starts fresh logs (the CA is re-keyed too)
        stale.unlink()
    with launch(workdir, servers, registry_port=registry_port, expect_listed=len(DEMO_SERVERS)) as processes:
        credential = processes.client_credential()
        trust = trust_from_settings(processes.trust_settings(), credential)
        client_log = open_node_audit_log(AuditSettings(directory=audit_dir), credential)
        with (
            client_log,
            Swarm(
                registry=processes.registry_address, credential=credential, trust=trust, audit=client_log
            ) as swarm,
        ):
            store = ModelStore.open(processes.store_dir)
            _show_intruder_refused(swarm, processes, store)
            model = DistributedModelForCausalLM.from_pretrained(store, swarm=swarm, classification="internal")
            tokenizer = store.load_tokenizer()
            question = prompt or DEMO_PROMPT
            chat = [{"role": "user", "content": question}]
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            input_ids = tokenizer(text, return_tensors="pt").input_ids
            print(
                f"\nquestion ({model.classification.value} data): {question}\nanswer:   ", end="", flush=True
            )
            streamer = TimingStreamer(tokenizer)
            with model.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
                model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
                tiers = {hop.record.node_id: _tier(verdict) for hop, verdict in swarm.last_route}
                placement = [
                    (hop.client.node_id, hop.client.span, tiers.get(hop.client.node_id, "unattested"))
                    for hop in session.hops
                ]
            _print_report(placement, streamer, input_ids.shape[1])
            if keep_running:
                print(
                    f"\nswarm running: registry at {processes.registry_address}; press Ctrl-C to stop",
                    flush=True,
                )
                _wait_for_interrupt()
    _print_audit(audit_dir, processes)
    return 0


def _print_audit(audit_dir: Path, processes: LocalSwarmProcesses) -> None:
    """Verify every log against the CA's archive, reconcile the client's transfers with the servers'
    receipts, and write the client's and the registry's reports."""
    archive = KeyRing.of(load_certificates([processes.certs / "issued"]), pinned=False)
    client_db = audit_dir / "client-analyst.sqlite"
    server_dbs = sorted(audit_dir.glob("server-*.sqlite"))
    print("\naudit")
    for path in sorted(audit_dir.glob("*.sqlite")):
        result = verify(path, archive)
        print(f"  {path.name:<24} {'verified' if result.ok else 'FAILED'} ({result.problem_count} problems)")
    server_events = [event for path in server_dbs for event in read_events(path)]
    report = reconcile(read_events(client_db), server_events, node_keys=archive)
    print(
        f"  reconciliation: {report.matched} of the demo client's transfers matched to signed server "
        f"receipts; {len(report.client_only)} without a server record, {len(report.mismatched)} mismatched; "
        f"{len(report.server_only)} server records of other client sessions"
    )
    for name, html in (("client-analyst", "report.html"), ("registry-registry", "report-registry.html")):
        report_file = audit_dir / html
        log = build_report(audit_dir / f"{name}.sqlite", trusted_public_keys=archive)
        report_file.write_text(render_html(log))
        print(f"  report: {report_file} (open it in a browser)")


def _tier(verdict: Verdict | None) -> str:
    return verdict.claims.tier.value if verdict is not None and verdict.claims is not None else "unattested"


def _show_intruder_refused(swarm: Swarm, processes: LocalSwarmProcesses, store: ModelStore) -> None:
    """Server d (standard) offers the sensitive prefix: show it is not listed, and the policy's reasons."""
    listed = {record.node_id for record in swarm.registry.list(store.model_id)}
    node_id = spiffe_id(TRUST_DOMAIN, Role.SERVER, INTRUDER.name)
    if swarm.trust.policy is None or node_id in listed:
        raise FinclusterError(
            f"policy did not keep the standard server {node_id} out of the sensitive prefix"
        )
    offered = pb.ServerRecord(
        node_id=node_id,
        span=span_to_wire(BlockSpan.parse(INTRUDER.span)),
        attestation=(processes.authority / f"{INTRUDER.name}.jwt").read_text(),
        evidence_kind=SIGNED_SOFTWARE_EVIDENCE,
    )
    claims, decision = swarm.trust.decide_route(
        offered,
        BlockSpan.parse(INTRUDER.span),
        client_id=swarm.client_id,
        classification=Classification.INTERNAL,
        model=ModelRef(id=store.model_id, num_blocks=store.num_blocks, manifest_sha256=store.manifest_digest),
    )
    tier = claims.tier.value if claims is not None else "unattested"
    print(
        f"\nrefused       server {INTRUDER.name} ({tier}) offering blocks {INTRUDER.span}: "
        f"the registry did not list it, and route policy says: {'; '.join(decision.reasons)}"
    )


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_report(
    placement: list[tuple[str, BlockSpan, str]], streamer: TimingStreamer, prompt_tokens: int
) -> None:
    print("\n\nplacement")
    for node_id, span, tier in placement:
        print(f"  blocks {span!s:>6}  {tier:<10} {node_id}")
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


def _shutdown(processes: list[_Process]) -> dict[str, tuple[int, float]]:
    """SIGTERM every process, wait (SIGKILL after 30 s); name -> (exit code, seconds to exit)."""
    started = time.monotonic()
    for process in reversed(processes):
        if process.popen.poll() is None:
            process.popen.terminate()
    codes = {}
    for process in reversed(processes):
        try:
            code = process.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            code = process.popen.wait()
        codes[process.name] = (code, time.monotonic() - started)
        print(f"stopped {process.name} (exit {code})")
    return codes
