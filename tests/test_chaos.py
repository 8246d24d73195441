"""Chaos on loopback, bounded in time: five servers — two real ``fincluster serve`` processes that are
SIGKILLed, three in-process servers stopped abruptly — killed and restarted at random for a minute
while three clients generate without pause. Every generation completes and equals transformers'
own; afterwards the registry lists exactly the live servers, every audit log verifies, and the
client logs reconcile with the servers' (only what a killed server had no time to write, or a
response a failed server never delivered, is unpaired — and only for nodes and sessions that failed).

``FINCLUSTER_CHAOS_SECONDS`` changes the length of the chaos phase (default 60 s).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fincluster.audit import (
    AuditLog,
    FailoverEvent,
    TransferEvent,
    read_events,
    reconcile,
    verify,
)
from fincluster.serving.server import BlockServer
from fincluster.settings import ClientSettings
from fincluster.store import ModelStore
from fincluster.trust.pki import Role
from tests.helpers import Cluster, Pki, ServerProcess, running_cluster, spawn_server, tiny_model

pytestmark = pytest.mark.e2e
CHAOS_SECONDS = float(os.environ.get("FINCLUSTER_CHAOS_SECONDS", "60"))
NEW_TOKENS = 12
PROMPTS = [
    torch.randint(3, 128, (1, 6 + i), generator=torch.Generator().manual_seed(40 + i)) for i in range(3)
]
# blocks 0:3 are served by p0, i0, i1 and 3:6 by p1, i0, i2
SLOTS = {"p0": "0:3", "p1": "3:6", "i0": "0:6", "i1": "0:3", "i2": "3:6"}
COVERERS = [{"p0", "i0", "i1"}, {"p1", "i0", "i2"}]


@dataclass
class Chaos:
    """The five slots, their current incarnations, and every audit log any incarnation wrote."""

    cluster: Cluster
    directory: Path
    rng: random.Random
    running: dict[str, BlockServer | ServerProcess] = field(default_factory=dict)
    server_logs: list[tuple[str, Path]] = field(default_factory=list)  # (slot, log path)
    open_logs: dict[str, AuditLog] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)
    incarnations: Counter[str] = field(default_factory=Counter)
    starting: dict[str, threading.Thread] = field(default_factory=dict)

    def start(self, slot: str) -> None:
        self.incarnations[slot] += 1
        where = self.directory / f"{slot}-{self.incarnations[slot]}"
        cluster = self.cluster
        if slot.startswith("p"):
            self.running[slot] = spawn_server(
                cluster.pki,
                cluster.store,
                slot,
                SLOTS[slot],
                cluster.registry_address,
                extra_args=["--audit-dir", str(where)],
            )
            self.server_logs.append((slot, where / f"server-{slot}.sqlite"))
        else:
            log = cluster.pki.audit_log(Role.SERVER, slot, where.with_suffix(".sqlite"))
            self.open_logs[slot] = log
            self.running[slot] = cluster.add_server(slot, SLOTS[slot], audit=log)
            self.server_logs.append((slot, log.path))

    def launch(self, slot: str) -> None:
        """Start ``slot``; a server process loads in the background (it takes seconds)."""
        if not slot.startswith("p"):
            self.start(slot)
            return
        thread = threading.Thread(target=self.start, args=(slot,))
        self.starting[slot] = thread
        thread.start()

    def settle(self) -> None:
        """Wait for the processes still starting."""
        for slot, thread in list(self.starting.items()):
            thread.join()
            del self.starting[slot]

    def stop(self, slot: str) -> None:
        self.kills[slot] += 1
        server = self.running.pop(slot)
        if isinstance(server, ServerProcess):
            server.kill()  # SIGKILL: no withdrawal, the record expires with its TTL
        else:
            server.stop(0)  # abrupt: running calls are cancelled at once
            self.open_logs.pop(slot).close()

    def killable(self) -> list[str]:
        """Running slots whose loss leaves every block with at least two running servers."""
        return [
            slot
            for slot in self.running
            if all(len((group & self.running.keys()) - {slot}) >= 2 for group in COVERERS)
        ]

    def step(self) -> None:
        for slot, thread in list(self.starting.items()):
            if not thread.is_alive():
                del self.starting[slot]
        down = sorted(set(SLOTS) - self.running.keys() - self.starting.keys())
        victims = [s for s in self.killable() if s not in self.starting]
        if down and (not victims or self.rng.random() < 0.5):
            self.launch(self.rng.choice(down))
        elif victims:
            self.stop(self.rng.choice(victims))


def test_chaos_generations_stay_exact_and_every_log_reconciles(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    reference = tiny_model("llama")
    expected = [reference.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False) for p in PROMPTS]
    settings = ClientSettings(
        step_timeout_seconds=5,
        request_timeout_seconds=10,
        failover_attempts=8,
        failover_backoff_seconds=0.2,
        failover_backoff_max_seconds=1.0,
        ban_seconds=1.0,
        rtt_refresh_seconds=2.0,
    )
    clients = [f"chaos-{i}" for i in range(3)]
    phase = time.monotonic()
    client_logs = {
        name: pki.audit_log(Role.CLIENT, name, tmp_path / f"client-{name}.sqlite") for name in clients
    }
    done = threading.Event()
    generations: Counter[str] = Counter()
    failures: list[str] = []
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        chaos = Chaos(cluster, tmp_path, random.Random(7))
        for slot in SLOTS:
            chaos.launch(slot)
        chaos.settle()
        cluster.wait_until_listed(len(SLOTS))

        def generate(index: int, name: str) -> None:
            with cluster.swarm(name, audit=client_logs[name], settings=settings) as swarm:
                model = cluster.model(swarm)
                while not done.is_set():
                    try:
                        output = model.generate(PROMPTS[index], max_new_tokens=NEW_TOKENS, do_sample=False)
                    except Exception as error:
                        failures.append(f"{name}: {type(error).__name__}: {error}")
                        return
                    if output.tolist() != expected[index].tolist():
                        failures.append(f"{name}: generation {generations[name]} differs: {output.tolist()}")
                        return
                    generations[name] += 1

        threads = [threading.Thread(target=generate, args=(i, name)) for i, name in enumerate(clients)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        events = 0
        while not failures:
            left = CHAOS_SECONDS - (time.monotonic() - started)
            time.sleep(min(max(left, 0), chaos.rng.uniform(1.0, 3.0)))
            if left <= 0:
                break
            chaos.step()
            events += 1
        chaos_seconds = time.monotonic() - started
        chaos.settle()
        done.set()
        for thread in threads:
            thread.join(timeout=120)
        # the registry converges: exactly the live incarnations, at their addresses (the records of
        # SIGKILLed processes expire with their 2 s TTL)
        live = {}
        for server in chaos.running.values():
            node_id = server.node_id
            live[node_id] = server.address if isinstance(server, BlockServer) else None
        deadline = time.monotonic() + 10
        while True:
            listed = {r.node_id: r.address for r in cluster.registry.backend.list(tiny_llama_store.model_id)}
            if listed.keys() == live.keys() and all(a is None or listed[n] == a for n, a in live.items()):
                break
            assert time.monotonic() < deadline, f"registry did not converge: {listed} vs {live}"
            time.sleep(0.2)
        for slot in list(chaos.running):
            chaos.stop(slot)
    for log in client_logs.values():
        log.close()
    swarm_seconds = time.monotonic() - phase

    assert not failures, failures
    assert chaos_seconds >= CHAOS_SECONDS and sum(chaos.kills.values()) >= 5
    assert all(generations[name] >= 3 for name in clients), generations
    # every log verifies against its node's key
    for name, log in client_logs.items():
        assert verify(log.path, [pki.public_key(Role.CLIENT, name)]).ok, name
    for slot, path in chaos.server_logs:
        verified = verify(path, [pki.public_key(Role.SERVER, slot)])
        if slot.startswith("p") and not verified.ok:  # a process SIGKILLed before its first checkpoint
            assert [problem.code for problem in verified.problems] == ["no_checkpoint"], verified.problems
            continue
        assert verified.ok, (path, verified.problems)
    # and the client logs reconcile with the union of the servers' logs
    client_events = [e for log in client_logs.values() for e in read_events(log.path)]
    server_events = [e for _, path in chaos.server_logs for e in read_events(path)]
    node_keys = {pki.credential(Role.SERVER, s).spiffe_id: pki.public_key(Role.SERVER, s) for s in SLOTS}
    report = reconcile(client_events, server_events, node_keys=node_keys)
    failovers = [e for e in client_events if isinstance(e, FailoverEvent)]
    failed_sessions = {e.session_id for e in failovers}
    killed_processes = {pki.credential(Role.SERVER, s).spiffe_id for s in SLOTS if s.startswith("p")}
    assert report.mismatched == ()
    assert {key.node_id for key in report.client_only} <= killed_processes  # unwritten at SIGKILL
    assert len(report.client_only) <= 3 * sum(chaos.kills[s] for s in SLOTS if s.startswith("p"))
    assert {key.session_id for key in report.server_only} <= failed_sessions  # answers never delivered
    transfers = sum(isinstance(e, TransferEvent) for e in client_events)
    assert report.matched >= transfers - len(report.client_only)
    print(
        f"\nchaos: {chaos_seconds:.0f} s, {events} events, kills {dict(chaos.kills)}, "
        f"incarnations {dict(chaos.incarnations)}; generations {dict(generations)}; "
        f"{len(failovers)} failovers; {report.matched} transfers reconciled, "
        f"{len(report.client_only)} client-only, {len(report.server_only)} server-only; swarm up "
        f"{swarm_seconds:.0f} s, checks {time.monotonic() - phase - swarm_seconds:.0f} s"
    )
