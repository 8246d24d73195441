"""Shared pieces of the audit tests: fixed keys, a fake clock, and a realistic two-session scenario."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fincluster.audit import (
    AttestationClaims,
    AttestationFailureEvent,
    DenialEvent,
    FailoverEvent,
    RouteHop,
    RoutingEvent,
    SessionCloseEvent,
    SessionOpenEvent,
    TransferEvent,
    sha256_hex,
    sign_receipt,
)
from fincluster.spans import BlockSpan

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "audit"
REGENERATE = os.environ.get("FINCLUSTER_REGENERATE_VECTORS") == "1"

CLIENT = "spiffe://bank.example/client/analyst-1"
NODE_A = "spiffe://bank.example/server/a"
NODE_B = "spiffe://bank.example/server/b"
NODE_C = "spiffe://bank.example/server/c"
NODE_D = "spiffe://bank.example/server/d"
MODEL = "HuggingFaceTB/SmolLM2-135M"
MANIFEST = sha256_hex(b"manifest of the demo model")
BUNDLE = sha256_hex(b"policy bundle v1")
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def cert_fingerprint(node_id: str) -> str:
    """A stand-in certificate fingerprint per node (the scenario has keys, not certificates)."""
    return "sha256:" + sha256_hex(f"certificate of {node_id}".encode())


def ed25519_key(label: str) -> Ed25519PrivateKey:
    """A fixed Ed25519 key per label, so signatures (and hence vectors) are reproducible."""
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sha256_hex(label.encode())))


def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(sha256_hex(label.encode()), 16) % (2**255), ec.SECP256R1())


class FakeClock:
    """Returns ``now``; ``advance`` moves it. Every call also ticks one millisecond so times differ."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def check_vector(name: str, actual: Any) -> None:
    """Compare with ``tests/vectors/audit/<name>``; FINCLUSTER_REGENERATE_VECTORS=1 rewrites it."""
    path = VECTORS / name
    if REGENERATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert json.loads(path.read_text(encoding="utf-8")) == actual


@dataclass
class Swarm:
    """Builds the events of a client and its servers for one scenario, with real signed receipts."""

    clock: FakeClock
    node_keys: dict[str, Ed25519PrivateKey | ec.EllipticCurvePrivateKey] = field(
        default_factory=lambda: {node: ed25519_key(node) for node in (NODE_A, NODE_B, NODE_C, NODE_D)}
    )
    tiers: dict[str, str] = field(
        default_factory=lambda: {NODE_A: "trusted", NODE_B: "standard", NODE_C: "standard", NODE_D: "trusted"}
    )

    def transfer_pair(
        self,
        *,
        session_id: str,
        step: int,
        node_id: str,
        span: tuple[int, int],
        num_tokens: int,
        operation: str = "inference_step",
        classification: str = "confidential",
    ) -> tuple[TransferEvent, TransferEvent]:
        """The client's and the server's record of one transfer (payloads are stand-in bytes)."""
        block_span = BlockSpan(start=span[0], end=span[1])
        sent = f"activations {session_id} {step} {span} {operation}".encode()
        returned = f"outputs {session_id} {step} {span}".encode()
        receipt = sign_receipt(
            self.node_keys[node_id],
            session_id=session_id,
            step=step,
            span=block_span,
            input_sha256=sha256_hex(sent),
            output_sha256=sha256_hex(returned),
            node_id=node_id,
            cert_fingerprint=cert_fingerprint(node_id),
            issued_at=self.clock(),
        )
        common: dict[str, Any] = dict(
            session_id=session_id,
            operation=operation,
            step=step,
            client_id=CLIENT,
            classification=classification,
            model_id=MODEL,
            manifest_digest=MANIFEST,
            node_id=node_id,
            cert_fingerprint=cert_fingerprint(node_id),
            attestation=self.claims(node_id),
            block_span=block_span,
            num_tokens=num_tokens,
            input_sha256=sha256_hex(sent),
            output_sha256=sha256_hex(returned),
            policy_decision_id=f"dec-{session_id}-{node_id.rsplit('/', 1)[-1]}",
            policy_bundle_digest=BUNDLE,
            receipt=receipt,
        )
        client = TransferEvent(time=self.clock(), observer="client", **common)
        server = TransferEvent(time=self.clock(), observer="server", **common)
        return client, server

    def hop(self, node_id: str, span: tuple[int, int], session_id: str) -> RouteHop:
        return RouteHop(
            block_span=BlockSpan(start=span[0], end=span[1]),
            node_id=node_id,
            attestation=self.claims(node_id),
            policy_decision_id=f"dec-{session_id}-{node_id.rsplit('/', 1)[-1]}",
        )

    def claims(self, node_id: str) -> AttestationClaims:
        """What the node's (stand-in) attestation says: its tier, in Frankfurt, valid for a day."""
        return AttestationClaims(
            attestation_id=f"att-{node_id.rsplit('/', 1)[-1]}-1",
            tier=self.tiers[node_id],
            zone="eu-fra",
            hardware="h100-cc" if self.tiers[node_id] == "trusted" else "l40s",
            software_version="fincluster-0.1.0",
            model_manifest_sha256=MANIFEST,
            authority_key_id="authority-key-2025",
            evidence_kind="signed-software",
            issued_at=T0 - timedelta(hours=1),
            expires_at=T0 + timedelta(days=1),
        )


@dataclass
class ScenarioLogs:
    client_events: list[Any]
    server_events: list[Any]


def client_scenario(swarm: Swarm) -> ScenarioLogs:
    """Two sessions: a generation with a failover and replays, and a forward/backward pass with a denial."""
    clock = swarm.clock
    client: list[Any] = []
    server: list[Any] = []

    def transfer(**kwargs: Any) -> None:
        c, s = swarm.transfer_pair(**kwargs)
        client.append(c)
        server.append(s)

    client.append(
        AttestationFailureEvent(
            time=clock(), observer="client", node_id=NODE_D, reason="attestation token expired"
        )
    )
    # Session s-1: generation on a (blocks 0-4) and b (4-8); b dies at step 2, c takes over.
    client.append(
        SessionOpenEvent(
            time=clock(),
            observer="client",
            session_id="s-1",
            client_id=CLIENT,
            classification="confidential",
            model_id=MODEL,
            manifest_digest=MANIFEST,
        )
    )
    client.append(
        RoutingEvent(
            time=clock(),
            observer="client",
            session_id="s-1",
            client_id=CLIENT,
            chain=(swarm.hop(NODE_A, (0, 4), "s-1"), swarm.hop(NODE_B, (4, 8), "s-1")),
            policy_bundle_digest=BUNDLE,
        )
    )
    for step in range(2):
        tokens = 7 if step == 0 else 1
        transfer(session_id="s-1", step=step, node_id=NODE_A, span=(0, 4), num_tokens=tokens)
        transfer(session_id="s-1", step=step, node_id=NODE_B, span=(4, 8), num_tokens=tokens)
    transfer(session_id="s-1", step=2, node_id=NODE_A, span=(0, 4), num_tokens=1)
    client.append(
        FailoverEvent(
            time=clock(),
            observer="client",
            session_id="s-1",
            block_span=BlockSpan(start=4, end=8),
            failed_node_id=NODE_B,
            replacement_node_id=NODE_C,
            reason="connection reset",
            replayed_steps=2,
        )
    )
    client.append(
        RoutingEvent(
            time=clock(),
            observer="client",
            session_id="s-1",
            client_id=CLIENT,
            chain=(swarm.hop(NODE_A, (0, 4), "s-1"), swarm.hop(NODE_C, (4, 8), "s-1")),
            policy_bundle_digest=BUNDLE,
        )
    )
    for step in range(2):
        transfer(
            session_id="s-1",
            step=step,
            node_id=NODE_C,
            span=(4, 8),
            num_tokens=7 if step == 0 else 1,
            operation="replay",
        )
    transfer(session_id="s-1", step=2, node_id=NODE_C, span=(4, 8), num_tokens=1)
    transfer(session_id="s-1", step=3, node_id=NODE_A, span=(0, 4), num_tokens=1)
    transfer(session_id="s-1", step=3, node_id=NODE_C, span=(4, 8), num_tokens=1)
    client.append(
        SessionCloseEvent(time=clock(), observer="client", session_id="s-1", client_id=CLIENT, outcome="ok")
    )
    # Session s-2: restricted data; the router refuses b, everything runs on trusted a.
    client.append(
        SessionOpenEvent(
            time=clock(),
            observer="client",
            session_id="s-2",
            client_id=CLIENT,
            classification="restricted",
            model_id=MODEL,
            manifest_digest=MANIFEST,
        )
    )
    client.append(
        DenialEvent(
            time=clock(),
            observer="client",
            enforced_at="router",
            session_id="s-2",
            client_id=CLIENT,
            node_id=NODE_B,
            block_span=BlockSpan(start=4, end=8),
            classification="restricted",
            reasons=("tier standard may not serve restricted data",),
            policy_decision_id="dec-s-2-b",
            policy_bundle_digest=BUNDLE,
        )
    )
    client.append(
        RoutingEvent(
            time=clock(),
            observer="client",
            session_id="s-2",
            client_id=CLIENT,
            chain=(swarm.hop(NODE_A, (0, 8), "s-2"),),
            policy_bundle_digest=BUNDLE,
        )
    )
    transfer(
        session_id="s-2",
        step=0,
        node_id=NODE_A,
        span=(0, 8),
        num_tokens=12,
        operation="forward",
        classification="restricted",
    )
    transfer(
        session_id="s-2",
        step=1,
        node_id=NODE_A,
        span=(0, 8),
        num_tokens=12,
        operation="backward",
        classification="restricted",
    )
    client.append(
        SessionCloseEvent(time=clock(), observer="client", session_id="s-2", client_id=CLIENT, outcome="ok")
    )
    return ScenarioLogs(client_events=client, server_events=server)
