"""Registry: TTL liveness, identity-bound announcements, list and watch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from fincluster.errors import RegistryError
from fincluster.registry.backend import InMemoryRegistry
from fincluster.registry.service import RegistryClient
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import Cluster, Pki, running_cluster


def record(node: str, start: int = 0, end: int = 2, model: str = "m") -> pb.ServerRecord:
    return pb.ServerRecord(
        node_id=node, address="127.0.0.1:1", model_id=model, span=pb.BlockSpan(start=start, end=end)
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_record_disappears_after_its_ttl() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    registry.announce(record("a"), ttl_seconds=5)
    clock.now += 4.9
    assert [r.node_id for r in registry.list("m")] == ["a"]
    clock.now += 0.2
    assert registry.list("m") == []


def test_refresh_extends_the_ttl_and_list_filters_by_model() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock)
    registry.announce(record("a"), ttl_seconds=5)
    registry.announce(record("b", model="other"), ttl_seconds=5)
    clock.now += 4
    registry.announce(record("a"), ttl_seconds=5)
    clock.now += 4
    assert [r.node_id for r in registry.list("m")] == ["a"]
    assert [r.node_id for r in registry.list("other")] == []


def test_watch_reports_puts_and_removals() -> None:
    clock = FakeClock()
    registry = InMemoryRegistry(clock=clock, sweep_seconds=0.05)
    registry.announce(record("a"), ttl_seconds=5)
    stop = threading.Event()
    events: list[tuple[int, str]] = []

    def consume() -> None:
        for event in registry.watch("m", stop):
            events.append((event.kind, event.record.node_id))

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.1)
    registry.announce(record("b"), ttl_seconds=5)
    registry.withdraw("a")
    clock.now += 10  # b expires
    time.sleep(0.3)
    stop.set()
    thread.join(timeout=5)
    assert events == [
        (pb.RegistryEvent.PUT, "a"),
        (pb.RegistryEvent.PUT, "b"),
        (pb.RegistryEvent.REMOVED, "a"),
        (pb.RegistryEvent.REMOVED, "b"),
    ]


@pytest.mark.e2e
def test_watch_over_grpc_sees_a_new_server(pki: Pki, tiny_llama_store) -> None:
    with running_cluster(pki, tiny_llama_store, ["0:2"]) as cluster, cluster.swarm() as swarm:
        stop = threading.Event()
        seen: list[str] = []

        def consume() -> None:
            for event in swarm.registry.watch(cluster.store.model_id, stop):
                seen.append(f"{event.kind}:{event.record.span.start}")

        thread = threading.Thread(target=consume)
        thread.start()
        cluster.add_server("late", "2:4")
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(timeout=5)
        assert seen == [f"{pb.RegistryEvent.PUT}:0", f"{pb.RegistryEvent.PUT}:2"]


@pytest.mark.e2e
def test_a_server_may_announce_only_itself(tiny_cluster: Cluster, pki: Pki) -> None:
    def client_as(role: Role, name: str) -> RegistryClient:
        channel = grpc.secure_channel(
            tiny_cluster.registry_address, channel_credentials(pki.credential(role, name))
        )
        return RegistryClient(channel)

    impostor = client_as(Role.SERVER, "s0")
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
        impostor.announce(record(tiny_cluster.servers[1].node_id), ttl_seconds=5)
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
        client_as(Role.CLIENT, "analyst").announce(
            record(pki.credential(Role.CLIENT, "analyst").spiffe_id), 5
        )
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
        impostor.withdraw(tiny_cluster.servers[1].node_id)


@pytest.mark.e2e
def test_killed_server_process_disappears_within_its_ttl(pki: Pki, tiny_llama_store, tmp_path: Path) -> None:
    """A real `fincluster serve` process is SIGKILLed (no withdraw); its record expires with the TTL."""
    ttl = 2
    with running_cluster(pki, tiny_llama_store, []) as cluster:
        credential = pki.credential(Role.SERVER, "doomed")
        env = {**os.environ, "FINCLUSTER_SERVER__ANNOUNCE_TTL_SECONDS": str(ttl)}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fincluster",
                "serve",
                "--store",
                str(tiny_llama_store.path),
                "--blocks",
                "0:2",
                "--registry",
                cluster.registry_address,
                "--ca-cert",
                str(credential.ca_cert_path),
                "--cert",
                str(credential.cert_path),
                "--key",
                str(credential.key_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("serving blocks 0:2"), line
            cluster.wait_until_listed(1, timeout=20)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            killed_at = time.monotonic()
            while cluster.registry.backend.list(tiny_llama_store.model_id):
                assert time.monotonic() - killed_at <= ttl + 0.5, "record outlived its TTL"
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
