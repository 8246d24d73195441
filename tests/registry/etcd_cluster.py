"""Real etcd members on loopback for tests: free ports, temporary data directories, mTLS from a test CA.

The etcd CA is a second ``CertificateAuthority``, apart from the swarm's, as in the documented
deployment: member certificates carry serverAuth + clientAuth and the IP SAN 127.0.0.1; etcd users
are client certificates whose common name is the user name. Heartbeat 50 ms and election timeout
500 ms keep elections short and let etcd grant 1-second leases (its minimum TTL is 1.5 election
timeouts, rounded up).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from fincluster.registry.etcd import EtcdRegistry
from fincluster.registry.etcd_api import auth_pb2
from fincluster.registry.etcd_api import rpc_pb2 as etcd
from fincluster.registry.etcd_api import rpc_pb2_grpc as etcd_grpc
from fincluster.registry.etcd_api.kv_pb2 import KeyValue
from fincluster.trust.pki import CertificateAuthority, Credential, Role

READY_TIMEOUT_S = 20.0
REGISTRY_USER = "fincluster-registry"  # the registry service's etcd user: CN of its etcd certificate
REGISTRY_ROLE = "fincluster-registry"
TEST_PREFIX = "/fincluster-test/"  # what that role may read and write; each test takes a subdirectory


def etcd_binary() -> str:
    """Path of ``etcd``; skips the test without it, or fails it under ``FINCLUSTER_REQUIRE_ETCD=1`` (CI)."""
    found = shutil.which("etcd")
    if found is None:
        if os.environ.get("FINCLUSTER_REQUIRE_ETCD") == "1":
            pytest.fail("etcd not installed but FINCLUSTER_REQUIRE_ETCD=1 (run scripts/install-etcd)")
        pytest.skip("etcd not installed (scripts/install-etcd; CI installs it from .ci/run)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class EtcdPki:
    """The etcd cluster's own CA, its member certificates and its users' client certificates."""

    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority.init(directory, trust_domain="etcd.test.internal")

    def member(self, name: str) -> Credential:
        return self._credential(Role.REGISTRY, name)

    def user(self, name: str) -> Credential:
        return self._credential(Role.CLIENT, name)

    def _credential(self, role: Role, name: str) -> Credential:
        path = self.ca.nodes_dir / f"{role.value}-{name}.pem"
        if path.exists():
            return Credential.from_files(
                cert_path=path, key_path=path.with_suffix(".key"), ca_cert_path=self.ca.cert_path
            )
        return self.ca.issue(role, name, hosts=("127.0.0.1",))


@dataclass
class EtcdMember:
    name: str
    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://127.0.0.1:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"


class EtcdCluster:
    """``size`` etcd members on loopback; ``start()``, ``kill(i)``, ``restart(i)``, ``stop()``."""

    def __init__(self, pki: EtcdPki, directory: Path, size: int = 1) -> None:
        self.binary = etcd_binary()
        self.pki = pki
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.members = [EtcdMember(f"m{i}", directory / f"m{i}.data") for i in range(size)]
        self._token = f"fincluster-test-{os.getpid()}-{id(self)}"

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> None:
        for index in range(len(self.members)):
            self._launch(index)
        for member in self.members:
            self._wait_ready(member)

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crash: no goodbye to its peers or clients)."""
        process = self.members[index].process
        if process is not None:
            process.kill()
            process.wait(timeout=10)
            self.members[index].process = None

    def restart(self, index: int, *, keep_data: bool = True) -> None:
        """Stop one member (SIGTERM) and start it again on the same ports, with or without its data."""
        member = self.members[index]
        if member.process is not None:
            member.process.terminate()
            member.process.wait(timeout=10)
            member.process = None
        if not keep_data:
            shutil.rmtree(member.data_dir)
        self._launch(index)
        self._wait_ready(member)

    def stop(self) -> None:
        """SIGKILL every member: their data is thrown away, and a graceful stop of a cluster that has
        lost a member waits seconds for a leadership transfer."""
        for index in range(len(self.members)):
            self.kill(index)

    def registry(self, prefix: str, user: str = REGISTRY_USER, timeout_seconds: float = 1.0) -> EtcdRegistry:
        credential = self.pki.user(user)
        return EtcdRegistry(
            self.endpoints,
            ca_cert=credential.ca_cert_path,
            cert=credential.cert_path,
            key=credential.key_path,
            prefix=prefix,
            timeout_seconds=timeout_seconds,
        )

    def get(self, key: bytes) -> KeyValue | None:
        """The key as etcd holds it (read as ``root``, past the registry)."""
        with self._channel("root") as channel:
            kvs = etcd_grpc.KVStub(channel).Range(etcd.RangeRequest(key=key), timeout=5).kvs
        return kvs[0] if kvs else None

    def enable_rbac(self) -> None:
        """etcd auth on: ``root`` for administration, and the registry's user with readwrite on
        ``TEST_PREFIX`` only. With ``--client-cert-auth`` the certificate's CN names the user."""
        with self._channel("root") as channel:
            auth = etcd_grpc.AuthStub(channel)
            no_password = auth_pb2.UserAddOptions(no_password=True)
            end = TEST_PREFIX[:-1].encode() + bytes([TEST_PREFIX.encode()[-1] + 1])
            auth.UserAdd(etcd.AuthUserAddRequest(name="root", options=no_password), timeout=5)
            auth.RoleAdd(etcd.AuthRoleAddRequest(name="root"), timeout=5)
            auth.UserGrantRole(etcd.AuthUserGrantRoleRequest(user="root", role="root"), timeout=5)
            auth.RoleAdd(etcd.AuthRoleAddRequest(name=REGISTRY_ROLE), timeout=5)
            permission = auth_pb2.Permission(
                permType=auth_pb2.Permission.READWRITE, key=TEST_PREFIX.encode(), range_end=end
            )
            auth.RoleGrantPermission(
                etcd.AuthRoleGrantPermissionRequest(name=REGISTRY_ROLE, perm=permission), timeout=5
            )
            auth.UserAdd(etcd.AuthUserAddRequest(name=REGISTRY_USER, options=no_password), timeout=5)
            auth.UserGrantRole(
                etcd.AuthUserGrantRoleRequest(user=REGISTRY_USER, role=REGISTRY_ROLE), timeout=5
            )
            auth.AuthEnable(etcd.AuthEnableRequest(), timeout=5)

    # ---------------------------------------------------------------------------------------------
    def _launch(self, index: int) -> None:
        member = self.members[index]
        tls = self.pki.member(member.name)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        client_url = f"https://{member.endpoint}"
        command = [
            self.binary,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self._token}",
            f"--cert-file={tls.cert_path}",
            f"--key-file={tls.key_path}",
            f"--trusted-ca-file={tls.ca_cert_path}",
            "--client-cert-auth",
            f"--peer-cert-file={tls.cert_path}",
            f"--peer-key-file={tls.key_path}",
            f"--peer-trusted-ca-file={tls.ca_cert_path}",
            "--peer-client-cert-auth",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=warn",
        ]
        with member.log_path.open("ab") as log:
            member.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, member: EtcdMember) -> None:
        """Until the member answers a linearizable read (so the cluster has a leader)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self._channel("root", member) as channel:
            kv = etcd_grpc.KVStub(channel)
            while True:
                assert member.process is not None
                if member.process.poll() is not None:
                    raise RuntimeError(f"etcd {member.name} exited:\n{self._log_tail(member)}")
                try:
                    kv.Range(etcd.RangeRequest(key=b"/ready"), timeout=0.5)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"etcd {member.name} not ready in {READY_TIMEOUT_S} s:\n{self._log_tail(member)}"
                        ) from None
                    time.sleep(0.05)

    @contextmanager
    def _channel(self, user: str, member: EtcdMember | None = None) -> Iterator[grpc.Channel]:
        credential = self.pki.user(user)
        ca_pem, cert_pem, key_pem = credential.read()
        credentials = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
        running = member or next(m for m in self.members if m.process is not None)
        channel = grpc.secure_channel(running.endpoint, credentials)
        try:
            yield channel
        finally:
            channel.close()

    def _log_tail(self, member: EtcdMember) -> str:
        return "\n".join(member.log_path.read_text(errors="replace").splitlines()[-20:])


@contextmanager
def running_etcd(
    pki: EtcdPki, directory: Path, size: int = 1, *, rbac: bool = False
) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(pki, directory, size)
    try:
        cluster.start()
        if rbac:
            cluster.enable_rbac()
        yield cluster
    finally:
        cluster.stop()
