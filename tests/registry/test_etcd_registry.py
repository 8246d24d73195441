"""The etcd backend beyond the contract: key layout and leases, an etcd restart, the loss of one member of
three, the registry service in front of etcd (identity checks, shared by two replicas), and who etcd
lets in. Real etcd processes on loopback (``tests.registry.etcd_cluster``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from fincluster.errors import RegistryError, RegistryUnavailableError
from fincluster.registry.backend import Registry
from fincluster.registry.etcd import EtcdRegistry
from fincluster.registry.server import RegistryServer
from fincluster.registry.service import RegistryClient
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import Pki
from tests.registry.etcd_cluster import TEST_PREFIX, EtcdCluster, EtcdPki, free_port, running_etcd
from tests.registry.support import PUT, REMOVED, Announcer, Watcher, eventually, record


def fresh_prefix() -> str:
    return f"{TEST_PREFIX}{uuid.uuid4().hex}/"


def node_ids(registry: Registry, model: str = "m") -> list[str]:
    return [r.node_id for r in registry.list(model)]


@contextmanager
def registry_service(pki: Pki, backend: Registry, name: str = "registry") -> Iterator[str]:
    """A registry service (mTLS gRPC) in front of ``backend``; yields its address."""
    with RegistryServer(pki.credential(Role.REGISTRY, name), backend=backend) as server:
        assert server.address is not None
        yield server.address


def client_of(pki: Pki, address: str, role: Role, name: str) -> RegistryClient:
    channel = grpc.secure_channel(address, channel_credentials(pki.credential(role, name)))
    return RegistryClient(channel, timeout_seconds=5)


def replay_until(
    watcher: Watcher, live: dict[str, pb.ServerRecord], wanted: tuple[int, pb.ServerRecord], timeout: float
) -> dict[str, pb.ServerRecord]:
    """Applies the watch's events to ``live`` (records by node id) until ``wanted`` arrives."""
    live = dict(live)
    deadline = time.monotonic() + timeout
    while True:
        kind, seen = watcher.next(timeout=max(0.0, deadline - time.monotonic()))
        if kind == PUT:
            live[seen.node_id] = seen
        else:
            live.pop(seen.node_id, None)
        if (kind, seen) == wanted:
            return live


# key layout and leases -------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_record_is_one_leased_key_and_a_refresh_renews_the_lease_without_a_write(
    etcd: EtcdCluster,
) -> None:
    prefix = fresh_prefix()
    announced = record("spiffe://t/server/a")
    with etcd.registry(prefix) as backend:
        backend.announce(announced, ttl_seconds=1)
        key = f"{prefix}m/spiffe%3A%2F%2Ft%2Fserver%2Fa".encode()
        stored = etcd.get(key)
        assert stored is not None
        assert pb.ServerRecord.FromString(stored.value) == announced
        assert stored.lease != 0
        for _ in range(6):  # 1.8 s: past the 1 s TTL only because the lease is renewed
            time.sleep(0.3)
            backend.announce(announced, ttl_seconds=1)
        refreshed = etcd.get(key)
        assert refreshed is not None
        assert (refreshed.mod_revision, refreshed.lease) == (stored.mod_revision, stored.lease)


# failures of etcd --------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("keep_data", [True, False], ids=["data-kept", "data-lost"])
def test_an_announcing_server_is_listed_again_after_etcd_restarts(
    pki: Pki, etcd_pki: EtcdPki, tmp_path: Path, keep_data: bool
) -> None:
    """Through the registry service, as in production: the server keeps announcing while etcd is down;
    afterwards its record is back within a few seconds and a watch opened before the restart goes on."""
    server_id = pki.credential(Role.SERVER, "s0").spiffe_id
    late_id = pki.credential(Role.SERVER, "s1").spiffe_id
    with (
        running_etcd(etcd_pki, tmp_path) as cluster,
        cluster.registry(fresh_prefix()) as backend,
        registry_service(pki, backend) as address,
        Announcer(client_of(pki, address, Role.SERVER, "s0"), record(server_id), ttl=2, interval=0.3),
        Watcher(client_of(pki, address, Role.CLIENT, "analyst")) as watcher,
    ):
        assert watcher.next() == (PUT, record(server_id))
        cluster.restart(0, keep_data=keep_data)
        eventually(lambda: node_ids(backend) == [server_id], within=5, what="the record back after restart")
        client_of(pki, address, Role.SERVER, "s1").announce(record(late_id), ttl_seconds=30)
        before = {server_id: record(server_id)}
        after = replay_until(watcher, before, (PUT, record(late_id)), timeout=10)
        assert after == {server_id: record(server_id), late_id: record(late_id)}


@pytest.mark.e2e
def test_losing_one_of_three_etcd_members_keeps_the_registry_working(
    etcd_pki: EtcdPki, tmp_path: Path
) -> None:
    with (
        running_etcd(etcd_pki, tmp_path, size=3) as cluster,
        cluster.registry(fresh_prefix()) as backend,
        Announcer(backend, record("a"), ttl=2, interval=0.3),
        Watcher(backend) as watcher,
    ):
        assert watcher.next() == (PUT, record("a"))
        cluster.kill(0)  # the member listed first: the one the backend and its watch were using
        lost = time.monotonic()
        eventually(lambda: _announced(backend, record("b")), within=10, what="an announcement after the loss")
        assert watcher.next(timeout=10) == (PUT, record("b"))
        time.sleep(max(0.0, lost + 3 - time.monotonic()))  # past a's 2 s TTL: refreshed on the others
        assert node_ids(backend) == ["a", "b"]


def _announced(backend: Registry, announced: pb.ServerRecord) -> bool:
    try:
        backend.announce(announced, ttl_seconds=30)
    except RegistryUnavailableError:
        return False
    return True


def test_unreachable_etcd_is_a_clear_error_and_an_opaque_unavailable_to_callers(
    pki: Pki, etcd_pki: EtcdPki
) -> None:
    endpoints = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    user = etcd_pki.user("fincluster-registry")
    with EtcdRegistry(
        endpoints, ca_cert=user.ca_cert_path, cert=user.cert_path, key=user.key_path, timeout_seconds=0.5
    ) as backend:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError, match="etcd range failed on every endpoint") as error:
            backend.list("m")
        assert time.monotonic() - started < 3
        assert all(endpoint in str(error.value) for endpoint in endpoints)
        with registry_service(pki, backend) as address:
            server = client_of(pki, address, Role.SERVER, "s0")
            with pytest.raises(RegistryError, match="UNAVAILABLE") as refused:
                server.announce(record(pki.credential(Role.SERVER, "s0").spiffe_id), ttl_seconds=5)
            assert "127.0.0.1" not in str(refused.value)  # etcd's whereabouts stay in the local log


# the registry service in front of etcd -----------------------------------------------------------
@pytest.mark.e2e
def test_the_registry_service_on_etcd_lets_a_server_announce_and_withdraw_only_itself(
    pki: Pki, etcd: EtcdCluster
) -> None:
    victim = record(pki.credential(Role.SERVER, "s1").spiffe_id)
    with etcd.registry(fresh_prefix()) as backend, registry_service(pki, backend) as address:
        client_of(pki, address, Role.SERVER, "s1").announce(victim, ttl_seconds=30)
        impostor = client_of(pki, address, Role.SERVER, "s0")
        with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
            impostor.announce(record(victim.node_id, address="10.6.6.6:7001"), ttl_seconds=30)
        with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
            impostor.withdraw(victim.node_id)
        analyst = client_of(pki, address, Role.CLIENT, "analyst")
        with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
            analyst.announce(record(pki.credential(Role.CLIENT, "analyst").spiffe_id), ttl_seconds=30)
        assert backend.list("m") == [victim]


@pytest.mark.e2e
def test_two_registry_services_share_one_etcd(pki: Pki, etcd: EtcdCluster) -> None:
    """A server that fails over between replicas refreshes the same record: no event for watchers."""
    announced = record(pki.credential(Role.SERVER, "s0").spiffe_id)
    changed = record(announced.node_id, address="127.0.0.1:7002")
    prefix = fresh_prefix()
    with (
        etcd.registry(prefix) as backend_a,
        etcd.registry(prefix) as backend_b,
        registry_service(pki, backend_a, "registry-a") as replica_a,
        registry_service(pki, backend_b, "registry-b") as replica_b,
        Watcher(client_of(pki, replica_a, Role.CLIENT, "analyst")) as watcher,
    ):
        client_of(pki, replica_a, Role.SERVER, "s0").announce(announced, ttl_seconds=30)
        assert watcher.next() == (PUT, announced)
        assert client_of(pki, replica_b, Role.CLIENT, "analyst").list("m") == [announced]
        via_b = client_of(pki, replica_b, Role.SERVER, "s0")
        via_b.announce(announced, ttl_seconds=30)
        via_b.announce(changed, ttl_seconds=30)
        assert watcher.next() == (PUT, changed)
        via_b.withdraw(announced.node_id)
        assert watcher.next() == (REMOVED, changed)
        assert client_of(pki, replica_a, Role.CLIENT, "analyst").list("m") == []


@pytest.mark.e2e
def test_the_registry_command_stores_announcements_in_etcd_when_configured(
    pki: Pki, etcd_pki: EtcdPki, etcd: EtcdCluster, tmp_path: Path
) -> None:
    """``fincluster registry --config`` with ``backend = "etcd"``: what a server announces through it
    is in etcd, where a second registry (another replica) reads it."""
    registry, user = pki.credential(Role.REGISTRY, "registry"), etcd_pki.user("fincluster-registry")
    prefix = fresh_prefix()
    config = tmp_path / "registry.toml"
    config.write_text(
        "\n".join(
            [
                "[tls]",
                f'ca_cert = "{registry.ca_cert_path}"',
                f'cert = "{registry.cert_path}"',
                f'key = "{registry.key_path}"',
                "[registry]",
                'backend = "etcd"',
                "[registry.etcd]",
                f"endpoints = {json.dumps(etcd.endpoints)}",
                f'prefix = "{prefix}"',
                f'ca_cert = "{user.ca_cert_path}"',
                f'cert = "{user.cert_path}"',
                f'key = "{user.key_path}"',
            ]
        )
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("FINCLUSTER_")}
    command = [sys.executable, "-m", "fincluster", "registry", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("registry listening on "), line
        address = line.split()[-1]
        announced = record(pki.credential(Role.SERVER, "s0").spiffe_id)
        client_of(pki, address, Role.SERVER, "s0").announce(announced, ttl_seconds=30)
        with etcd.registry(prefix) as replica:
            assert replica.list("m") == [announced]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


# who etcd lets in --------------------------------------------------------------------------------
@pytest.mark.e2e
def test_etcd_admits_only_the_registry_services_user_and_only_to_its_prefix(
    pki: Pki, etcd_pki: EtcdPki, etcd: EtcdCluster
) -> None:
    swarm_server = pki.credential(Role.SERVER, "s0")  # a block server's own (swarm CA) certificate
    outsider = EtcdRegistry(
        etcd.endpoints,
        ca_cert=etcd_pki.ca.cert_path,
        cert=swarm_server.cert_path,
        key=swarm_server.key_path,
        prefix=fresh_prefix(),
        timeout_seconds=1,
    )
    with outsider, pytest.raises(RegistryUnavailableError):  # the TLS handshake fails: not etcd's CA
        outsider.list("m")
    with etcd.registry(fresh_prefix(), user="someone-else") as stranger:
        with pytest.raises(RegistryError, match="PERMISSION_DENIED") as refused:
            stranger.announce(record("a"), ttl_seconds=30)
        assert not isinstance(refused.value, RegistryUnavailableError)
    with (
        etcd.registry("/elsewhere/") as outside_its_prefix,
        pytest.raises(RegistryError, match="PERMISSION_DENIED"),
    ):
        outside_its_prefix.announce(record("a"), ttl_seconds=30)
