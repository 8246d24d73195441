"""Addresses are configuration: what a node may advertise, announcing with backoff, and the state a
server reports while its registry is unreachable."""

from __future__ import annotations

import socket
import time

import pytest

from fincluster.backoff import Backoff
from fincluster.errors import ConfigurationError, RegistryError
from fincluster.net import check_advertised, check_reachable_from, split_host_port
from fincluster.registry import backend
from fincluster.registry.backend import InMemoryRegistry
from fincluster.registry.server import RegistryServer
from fincluster.serving import announcer as announcer_module
from fincluster.serving.announcer import Announcer
from fincluster.store import ModelStore
from fincluster.trust.pki import Role, load_certificate
from fincluster.wire import fincluster_pb2 as pb
from tests.helpers import Cluster, Pki, RecordingLogger


def certificate_for(pki: Pki, name: str, hosts: tuple[str, ...]):
    credential = pki.ca.issue(Role.SERVER, name, hosts=hosts)
    return load_certificate(credential.cert_path.read_bytes())


def test_host_port_parsing() -> None:
    assert split_host_port("gpu-a.bank.example:7001") == ("gpu-a.bank.example", 7001)
    assert split_host_port("[fd00::12]:7001") == ("fd00::12", 7001)
    with pytest.raises(ConfigurationError, match="not a host:port address: 'gpu-a'"):
        split_host_port("gpu-a")


def test_an_advertised_host_must_be_a_san_of_the_certificate(pki: Pki) -> None:
    certificate = certificate_for(pki, "addr-a", ("gpu-a.bank.example", "127.0.0.12"))
    check_advertised("gpu-a.bank.example:7001", "0.0.0.0", certificate, flag="--public-address")
    check_advertised("GPU-A.bank.example:7001", "0.0.0.0", certificate, flag="--public-address")
    check_advertised(None, "127.0.0.12", certificate, flag="--public-address")
    with pytest.raises(ConfigurationError) as caught:
        check_advertised("127.0.0.13:7001", "127.0.0.13", certificate, flag="--public-address")
    assert str(caught.value) == (
        "the advertised address 127.0.0.13:7001 is not covered by this node's certificate (its DNS/IP "
        "names: addr-a.server.test.fincluster.internal, gpu-a.bank.example, 127.0.0.12): peers would "
        "fail the TLS handshake. Re-issue the certificate with `fincluster certs issue ... --host "
        "127.0.0.13`, or set --public-address to one of those names"
    )


def test_a_wildcard_bind_address_needs_a_public_address(pki: Pki) -> None:
    certificate = certificate_for(pki, "addr-b", ("gpu-b.bank.example",))
    with pytest.raises(ConfigurationError, match=r"^binding 0\.0\.0\.0 needs --public-address HOST:PORT"):
        check_advertised(None, "0.0.0.0", certificate, flag="--public-address")


def test_a_loopback_address_is_not_announced_to_a_registry_elsewhere() -> None:
    check_reachable_from("127.0.0.1", "localhost:7000", flag="--public-address")
    check_reachable_from("gpu-a.bank.example", "reg1.bank.example:7000", flag="--public-address")
    with pytest.raises(ConfigurationError) as caught:
        check_reachable_from("127.0.0.1", "reg1.bank.example:7000", flag="--public-address")
    assert str(caught.value) == (
        "refusing to announce the loopback address 127.0.0.1 to the registry at "
        "reg1.bank.example:7000: clients on other hosts could not reach it; set --public-address to "
        "this host's name or IP"
    )


def test_backoff_doubles_up_to_its_cap_with_jitter_in_the_upper_half() -> None:
    longest = Backoff(initial=1.0, maximum=10.0, uniform=lambda low, high: high)
    assert [longest.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    shortest = Backoff(initial=1.0, maximum=10.0, uniform=lambda low, high: low)
    assert [shortest.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 5.0]
    longest.reset()
    assert longest.next_delay() == 1.0
    delays = [longest.next_delay() for _ in range(5000)]  # no overflow however long the peer is away
    assert delays[:4] == [2.0, 4.0, 8.0, 10.0] and set(delays[3:]) == {10.0}


class FlakyRegistry(InMemoryRegistry):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def announce(self, record: pb.ServerRecord, ttl_seconds: int) -> float:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise RegistryError("registry announce failed: no registry at reg1:7000 (connection refused)")
        return super().announce(record, ttl_seconds)


def test_an_unreachable_registry_is_retried_with_backoff_and_the_state_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = RecordingLogger()
    monkeypatch.setattr(announcer_module, "log", log)
    now = [100.0]
    registry = FlakyRegistry(failures=3)
    record = pb.ServerRecord(
        node_id="n", address="gpu-a:7001", model_id="m", span=pb.BlockSpan(start=0, end=2)
    )
    announcer = Announcer(
        registry,
        lambda: record,
        ttl_seconds=15,
        registry_address="reg1:7000",
        backoff=Backoff(initial=1.0, maximum=30.0, uniform=lambda low, high: high),
        clock=lambda: now[0],
    )
    assert announcer.status == "not yet announced to reg1:7000"
    attempts_at = []
    while not announcer.announced:
        before = registry.attempts
        announcer.tick()
        if registry.attempts > before:
            attempts_at.append(now[0] - 100.0)
        if registry.attempts == 1:
            assert announcer.status == (
                "NOT announced to reg1:7000 (1 failed attempts): registry announce failed: "
                "no registry at reg1:7000 (connection refused)"
            )
        now[0] += 0.25
    logs = log.events
    assert attempts_at == [0.0, 1.0, 3.0, 7.0]  # 1 s, 2 s, 4 s apart: not once a second forever
    assert [entry["event"] for entry in logs] == ["server_not_announced"] * 3 + ["server_announced"]
    assert logs[0]["retry_in_s"] == 1.0 and logs[0]["registry"] == "reg1:7000"
    assert logs[-1]["after_failed_attempts"] == 3
    assert announcer.status == "announced to reg1:7000"
    assert [r.node_id for r in registry.list("m")] == ["n"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.e2e
def test_a_server_reports_not_announced_until_its_registry_comes_up(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    port = free_port()
    registry = RegistryServer(pki.credential(Role.REGISTRY, "late"), port=port)
    cluster = Cluster(pki, tiny_llama_store, registry)
    registry.address = f"127.0.0.1:{port}"  # where it will listen; nothing does yet
    try:
        server = cluster.add_server("waits", "0:2")
        deadline = time.monotonic() + 10
        while server.announcer is not None and server.announcer.attempts_failed == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not server.announced
        assert server.announce_status.startswith("NOT announced to ")
        assert f"no registry at 127.0.0.1:{port} (connection refused)" in server.announce_status
        registry.start()
        cluster.wait_until_listed(1, timeout=40)
        deadline = time.monotonic() + 5
        while not server.announced:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        cluster.stop()


@pytest.mark.e2e
def test_a_server_refuses_to_start_with_an_address_its_certificate_does_not_name(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    with RegistryServer(pki.credential(Role.REGISTRY, "registry")) as registry:
        cluster = Cluster(pki, tiny_llama_store, registry)
        with pytest.raises(ConfigurationError, match=r"advertised address 10\.9\.8\.7:7001 is not covered"):
            cluster.add_server("elsewhere-addr", "0:2", public_address="10.9.8.7:7001")


def test_the_registry_logs_listings_and_expiries(monkeypatch: pytest.MonkeyPatch) -> None:
    log = RecordingLogger()
    monkeypatch.setattr(backend, "log", log)
    now = [0.0]
    registry = InMemoryRegistry(clock=lambda: now[0])
    record = pb.ServerRecord(
        node_id="n", address="gpu-a:7001", model_id="m", span=pb.BlockSpan(start=0, end=2)
    )
    registry.announce(record, 5)
    registry.announce(record, 5)  # a refresh is not news
    now[0] = 6.0
    assert registry.list("m") == []
    logs = log.events
    assert [(entry["event"], entry["node"]) for entry in logs] == [
        ("server_listed", "n"),
        ("server_expired", "n"),
    ]
    assert logs[0]["address"] == "gpu-a:7001" and logs[0]["blocks"] == "0:2"


@pytest.mark.e2e
def test_a_server_refuses_to_announce_loopback_to_a_registry_on_another_host(
    pki: Pki, tiny_llama_store: ModelStore
) -> None:
    from fincluster.serving.server import BlockServer, ServedModel, load_span_model
    from fincluster.settings import ServerSettings
    from fincluster.spans import BlockSpan
    from fincluster.values import TensorDType

    model = load_span_model(tiny_llama_store, BlockSpan(0, 2), dtype=TensorDType.FLOAT32, device="cpu")
    server = BlockServer(
        model,
        ServedModel.of(tiny_llama_store),
        ServerSettings(host="127.0.0.1"),
        pki.credential(Role.SERVER, "loopback-only"),
        registry=InMemoryRegistry(),
        registry_address="reg1.bank.example:7000",
    )
    with pytest.raises(ConfigurationError, match=r"refusing to announce the loopback address 127\.0\.0\.1"):
        server.start()
    assert server.address is None  # nothing was bound
