"""Building blocks for tests: tiny models, PKI material, and in-process swarms over real gRPC."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from fincluster.audit import AuditLog, AuditRecorder, AuditSettings
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.registry.server import RegistryServer
from fincluster.serving.server import BlockServer, ServedModel, load_span_model
from fincluster.serving.service import Transfer
from fincluster.settings import ClientSettings, ServerSettings
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore, import_from_model
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import CertificateAuthority, Credential, Role, load_certificate
from fincluster.trust.policy import PolicyEngine
from fincluster.values import TensorDType

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 256,
}


def tiny_config(arch: str, num_layers: int = 6) -> PretrainedConfig:
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=num_layers, **TINY)
    if arch == "mistral":  # a short window so the sliding-window mask matters
        return MistralConfig(num_hidden_layers=num_layers, sliding_window=5, **TINY)
    if arch == "qwen2":  # sliding-window layers above max_window_layers, full attention below
        return Qwen2Config(
            num_hidden_layers=num_layers,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=3,
            **TINY,
        )
    raise ValueError(arch)


def tiny_model(arch: str, num_layers: int = 6, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_layers)).eval()


@dataclass
class Pki:
    directory: Path
    ca: CertificateAuthority

    def credential(self, role: Role, name: str) -> Credential:
        path = self.ca.nodes_dir / f"{role.value}-{name}.pem"
        if path.exists():
            return Credential.from_files(
                cert_path=path, key_path=path.with_suffix(".key"), ca_cert_path=self.ca.cert_path
            )
        return self.ca.issue(role, name)

    def audit_log(self, role: Role, name: str, path: Path) -> AuditLog:
        """An audit log at ``path`` signed by the node's own TLS key, as the node would open it."""
        _, _, key_pem = self.credential(role, name).read()
        return AuditLog(
            path,
            signing_key=load_pem_private_key(key_pem, password=None),  # type: ignore[arg-type]
            origin=f"{role.value}-{name}",
            settings=AuditSettings(),
        )

    def public_key(self, role: Role, name: str):  # type: ignore[no-untyped-def]
        return load_certificate(self.credential(role, name).cert_path.read_bytes()).public_key()


@dataclass
class Cluster:
    """A registry and block servers in this process, over real mTLS gRPC on loopback."""

    pki: Pki
    store: ModelStore
    registry: RegistryServer
    servers: list[BlockServer] = field(default_factory=list)

    @property
    def registry_address(self) -> str:
        assert self.registry.address is not None
        return self.registry.address

    def swarm(
        self,
        client: str = "analyst",
        *,
        trust: TrustContext | None = None,
        audit=None,
        settings: ClientSettings | None = None,
    ) -> Swarm:
        """A client connection; audit goes to ``audit`` (an in-memory recorder when not given). Which
        outputs verification samples is drawn from a seeded generator, so runs repeat exactly."""
        swarm = Swarm(
            registry=self.registry_address,
            credential=self.pki.credential(Role.CLIENT, client),
            trust=trust,
            audit=AuditRecorder() if audit is None else audit,
            settings=settings,
        )
        swarm.rng = random.Random(0)
        return swarm

    def model(self, swarm: Swarm, classification: str = "public") -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(
            self.store, swarm=swarm, classification=classification
        )

    def add_server(
        self,
        name: str,
        span: str,
        *,
        trust: TrustContext | None = None,
        attestation: str | None = None,
        received: list[Transfer] | None = None,
        audit=None,
        corrupt=None,
        tamper=None,
        **settings: object,
    ) -> BlockServer:
        """``corrupt``: a function applied to every output the server's blocks compute — a node that
        holds a valid certificate and attestation and changes the answer (the receipts it signs are
        over what it really sends). ``tamper(honest_forward, hidden_states, *args, **kwargs)`` replaces
        the computation itself (e.g. returns its input: a node that skips its blocks)."""
        options = {"announce_ttl_seconds": 2, "shutdown_grace_seconds": 0.5, **settings}
        dtype = TensorDType(options.pop("dtype", "float32"))
        adapter_keys = options.pop("adapter_keys", None)
        return self._start(
            name,
            BlockSpan.parse(span),
            ServerSettings(**options),  # type: ignore[arg-type]
            dtype=dtype,
            trust=trust,
            attestation=attestation,
            received=received,
            audit=audit,
            corrupt=corrupt,
            tamper=tamper,
            adapter_keys=adapter_keys,
        )

    def add_auto_server(
        self,
        name: str,
        *,
        num_blocks: int | None = None,
        trust: TrustContext | None = None,
        attestation: str | None = None,
        received: list[Transfer] | None = None,
        audit=None,
        **settings: object,
    ) -> BlockServer:
        """A server with ``blocks = "auto"``: it chooses its span from the registry's records (as
        ``fincluster serve --blocks auto`` does) and re-checks every ``rebalance_seconds``."""
        from fincluster.serving.rebalancer import first_placement
        from fincluster.trust.own_attestation import verify_own_attestation
        from fincluster.trust.pki import load_certificate

        options = {
            "announce_ttl_seconds": 2,
            "shutdown_grace_seconds": 0.5,
            "blocks": "auto",
            "num_blocks": num_blocks,
            **settings,
        }
        server_settings = ServerSettings(**options)  # type: ignore[arg-type]
        credential = self.pki.credential(Role.SERVER, name)
        context = trust or TrustContext.public_only(load_certificate(credential.read()[0]))
        claims = verify_own_attestation(attestation, credential, context) if attestation else None
        span = first_placement(
            self.store,
            server_settings,
            registry=self.registry_client(name),
            trust=context,
            node_id=credential.spiffe_id,
            claims=claims,
        )
        return self._start(
            name,
            span,
            server_settings,
            dtype=server_settings.dtype,
            trust=trust,
            attestation=attestation,
            received=received,
            audit=audit,
        )

    def registry_client(self, name: str):
        from fincluster.registry.service import RegistryClient
        from fincluster.trust.tls import RenewingChannel

        credential = self.pki.credential(Role.SERVER, name)
        address = self.registry_address
        return RegistryClient(RenewingChannel(address, credential), address=address)

    def _start(
        self,
        name: str,
        span: BlockSpan,
        settings: ServerSettings,
        *,
        dtype: TensorDType,
        trust: TrustContext | None,
        attestation: str | None,
        received: list[Transfer] | None,
        audit,
        corrupt=None,
        tamper=None,
        adapter_keys=None,
    ) -> BlockServer:
        credential = self.pki.credential(Role.SERVER, name)
        model = load_span_model(self.store, span, dtype=dtype, device="cpu")
        honest = model.forward
        if corrupt is not None:
            model.forward = lambda *args, **kwargs: corrupt(honest(*args, **kwargs))  # type: ignore[method-assign]
        if tamper is not None:
            model.forward = lambda *args, **kwargs: tamper(honest, *args, **kwargs)  # type: ignore[method-assign]
        server = BlockServer(
            model,
            ServedModel.of(self.store),
            settings,
            credential,
            registry=self.registry_client(name),
            registry_address=self.registry_address,
            trust=trust,
            attestation=attestation,
            audit=audit,
            on_transfer=received.append if received is not None else None,
            store=self.store,
            adapter_keys=adapter_keys,
        )
        server.start()
        self.servers.append(server)
        return server

    def wait_until_listed(self, count: int, timeout: float = 10.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while len(self.registry.backend.list(self.store.model_id)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} servers not listed within {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(0)
        self.registry.stop(0)


@contextlib.contextmanager
def running_cluster(
    pki: Pki,
    store: ModelStore,
    spans: Sequence[str],
    *,
    registry_trust: TrustContext | None = None,
    registry_audit=None,
    **settings: object,
) -> Iterator[Cluster]:
    registry = RegistryServer(
        pki.credential(Role.REGISTRY, "registry"), trust=registry_trust, audit=registry_audit
    )
    registry.start()
    cluster = Cluster(pki, store, registry)
    try:
        for index, span in enumerate(spans):
            cluster.add_server(f"s{index}", span, **settings)
        cluster.wait_until_listed(len(spans))
        yield cluster
    finally:
        cluster.stop()


class RecordingLogger:
    """Stands in for a module's ``log`` (``monkeypatch.setattr(module, "log", RecordingLogger())``):
    records every event at every level, whatever the test session's logging level."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def _record(self, level: str, event: str, **fields: object) -> None:
        self.events.append({"level": level, "event": event, **fields})

    def debug(self, event: str, **fields: object) -> None:
        self._record("debug", event, **fields)

    def info(self, event: str, **fields: object) -> None:
        self._record("info", event, **fields)

    def warning(self, event: str, **fields: object) -> None:
        self._record("warning", event, **fields)

    def error(self, event: str, **fields: object) -> None:
        self._record("error", event, **fields)

    def exception(self, event: str, **fields: object) -> None:
        self._record("error", event, **fields)


def store_of(model: torch.nn.Module, directory: Path, model_id: str) -> ModelStore:
    return import_from_model(model, None, directory, model_id=model_id)


@dataclass
class TrustKit:
    """An attestation authority, the shipped policies, and trust contexts built from them."""

    pki: Pki
    authority: Ed25519PrivateKey
    policy: PolicyEngine

    @classmethod
    def create(cls, pki: Pki) -> TrustKit:
        from fincluster.trust.policy_engine import open_policy_engine

        return cls(pki, Ed25519PrivateKey.generate(), open_policy_engine(POLICY_DIR))

    def context(
        self,
        *,
        clearances: dict[str, str] | None = None,
        crl: bool = False,
        authority: Ed25519PrivateKey | None = None,
        clock=None,
    ) -> TrustContext:
        from fincluster.trust.attestation import AuthorityKeys
        from fincluster.trust.pki import RevocationList
        from fincluster.trust.policy import Classification
        from fincluster.trust.verifiers import SignedSoftwareVerifier, VerifierSet

        keys = AuthorityKeys([(authority or self.authority).public_key()])
        return TrustContext(
            ca_certificate=self.pki.ca.certificate,
            policy=self.policy,
            verifiers=VerifierSet([SignedSoftwareVerifier(keys)]),
            revocations=RevocationList(self.pki.ca.crl_path, self.pki.ca.certificate) if crl else None,
            clearances={k: Classification(v) for k, v in (clearances or {}).items()},
            **({"clock": clock} if clock is not None else {}),
        )

    def attest(
        self,
        name: str,
        store: ModelStore,
        *,
        tier: str = "trusted",
        zone: str = "eu-fra",
        key_of: str | None = None,
        node_of: str | None = None,
        lifetime: timedelta = timedelta(hours=1),
        now: datetime | None = None,
        authority: Ed25519PrivateKey | None = None,
    ) -> str:
        """A token for server ``name`` (or with another server's key / node id, to forge one)."""
        from fincluster.trust.attestation import AttestationSubject, TrustTier, issue_attestation
        from fincluster.trust.pki import public_key_digest

        _, cert_pem, _ = self.pki.credential(Role.SERVER, key_of or name).read()
        subject = AttestationSubject(
            node_id=self.pki.credential(Role.SERVER, node_of or name).spiffe_id,
            tls_key_sha256=public_key_digest(cert_pem),
            tier=TrustTier(tier),
            zone=zone,
            hardware="cpu-test",
            software_version="fincluster-test",
            model_manifest_sha256=store.manifest_digest,
        )
        return issue_attestation(
            subject,
            authority_key=authority or self.authority,
            now=now or datetime.now(UTC),
            lifetime=lifetime,
        )


@dataclass
class ServerProcess:
    """A real ``fincluster serve`` process (so a test can SIGKILL or SIGSTOP it)."""

    name: str
    popen: subprocess.Popen[str]
    node_id: str

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=10)

    def pause(self) -> None:
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)


def spawn_server(
    pki: Pki,
    store: ModelStore,
    name: str,
    blocks: str,
    registry_address: str,
    *,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    ttl_seconds: int = 2,
) -> ServerProcess:
    """Start ``fincluster serve`` for ``blocks`` as server ``name``; returns once it is serving."""
    credential = pki.credential(Role.SERVER, name)
    env = {
        **os.environ,
        "FINCLUSTER_SERVER__ANNOUNCE_TTL_SECONDS": str(ttl_seconds),
        "FINCLUSTER_SERVER__SHUTDOWN_GRACE_SECONDS": "0.5",
        "OMP_WAIT_POLICY": "PASSIVE",
        **(extra_env or {}),
    }
    log = open(os.environ.get("FINCLUSTER_TEST_SERVER_LOG", os.devnull), "a")  # noqa: SIM115
    popen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fincluster",
            "serve",
            "--store",
            str(store.path),
            "--blocks",
            blocks,
            "--registry",
            registry_address,
            "--ca-cert",
            str(credential.ca_cert_path),
            "--cert",
            str(credential.cert_path),
            "--key",
            str(credential.key_path),
            *extra_args,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    process = ServerProcess(name, popen, credential.spiffe_id)
    assert popen.stdout is not None
    line = popen.stdout.readline()
    if not line.startswith("serving blocks"):
        process.kill()
        raise RuntimeError(f"server {name} did not start: {line!r}")
    return process
