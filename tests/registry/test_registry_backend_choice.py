"""Choosing the registry backend from settings, the etcd settings' checks, and the generated etcd API."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fincluster.errors import ConfigurationError
from fincluster.registry.backend import InMemoryRegistry
from fincluster.registry.etcd import EtcdRegistry
from fincluster.registry.etcd_connection import parse_endpoint
from fincluster.registry.factory import registry_backend
from fincluster.settings import RegistryBackend, load_settings
from tests.registry.etcd_cluster import EtcdPki

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("kv_pb2.py", "kv_pb2.pyi", "auth_pb2.py", "auth_pb2.pyi", "rpc_pb2.py", "rpc_pb2.pyi")


@pytest.fixture(autouse=True)
def no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINCLUSTER_CONFIG", raising=False)


def test_the_generated_etcd_api_matches_its_proto_files(tmp_path: Path) -> None:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's python
    subprocess.run(
        [str(ROOT / "scripts" / "gen_etcd_api"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PATH": path},
    )
    for name in (*GENERATED, "rpc_pb2_grpc.py", "rpc_pb2_grpc.pyi"):
        generated = tmp_path / "fincluster" / "registry" / "etcd_api" / name
        committed = ROOT / "fincluster" / "registry" / "etcd_api" / name
        assert filecmp.cmp(generated, committed, shallow=False), f"{name} is stale: run scripts/gen_etcd_api"


def test_the_memory_backend_is_the_default() -> None:
    assert isinstance(registry_backend(load_settings().registry), InMemoryRegistry)


def test_the_deploy_example_runs_the_registry_on_a_three_member_etcd() -> None:
    settings = load_settings(ROOT / "deploy" / "registry-etcd.toml").registry
    assert settings.backend is RegistryBackend.ETCD
    assert settings.etcd is not None
    assert settings.etcd.endpoints == [
        "etcd-1.bank.example:2379",
        "etcd-2.bank.example:2379",
        "etcd-3.bank.example:2379",
    ]
    assert settings.etcd.prefix == "/fincluster/registry/"
    assert settings.etcd.cert == Path("/etc/fincluster/etcd/fincluster-registry.pem")


def test_etcd_settings_from_the_environment_make_an_etcd_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = EtcdPki(tmp_path).user("fincluster-registry")
    monkeypatch.setenv("FINCLUSTER_REGISTRY__BACKEND", "etcd")
    monkeypatch.setenv("FINCLUSTER_REGISTRY__ETCD__ENDPOINTS", '["https://10.0.0.1:2379", "10.0.0.2:2379"]')
    monkeypatch.setenv("FINCLUSTER_REGISTRY__ETCD__PREFIX", "/swarm-a/registry")
    monkeypatch.setenv("FINCLUSTER_REGISTRY__ETCD__CA_CERT", str(user.ca_cert_path))
    monkeypatch.setenv("FINCLUSTER_REGISTRY__ETCD__CERT", str(user.cert_path))
    monkeypatch.setenv("FINCLUSTER_REGISTRY__ETCD__KEY", str(user.key_path))
    backend = registry_backend(load_settings().registry)
    assert isinstance(backend, EtcdRegistry)
    with backend:
        assert backend.endpoints == ("10.0.0.1:2379", "10.0.0.2:2379")
        assert backend.prefix == "/swarm-a/registry/"


def test_etcd_backend_without_its_section_is_refused() -> None:
    settings = load_settings(registry={"backend": "etcd"}).registry
    with pytest.raises(ConfigurationError, match=r"\[registry.etcd\] .* is missing"):
        registry_backend(settings)


def test_an_etcd_section_under_the_memory_backend_is_refused() -> None:
    etcd = {"endpoints": ["127.0.0.1:2379"], "ca_cert": "ca.pem", "cert": "c.pem", "key": "c.key"}
    settings = load_settings(registry={"etcd": etcd}).registry
    with pytest.raises(ConfigurationError, match=r'registry\.backend is "memory"'):
        registry_backend(settings)


def test_missing_etcd_certificate_files_are_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"cannot read the etcd TLS file .*ca\.pem"):
        EtcdRegistry(
            ["127.0.0.1:2379"],
            ca_cert=tmp_path / "ca.pem",
            cert=tmp_path / "c.pem",
            key=tmp_path / "c.key",
        )


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [("10.0.0.1:2379", "10.0.0.1:2379"), ("https://etcd-1.bank.example:2379/", "etcd-1.bank.example:2379")],
)
def test_etcd_endpoints_are_host_port_or_https_urls(endpoint: str, address: str) -> None:
    assert parse_endpoint(endpoint) == address


@pytest.mark.parametrize(
    ("endpoint", "complaint"),
    [
        ("http://10.0.0.1:2379", "only TLS endpoints"),
        ("etcd-1", "not host:port"),
        ("etcd-1:port", "not host:port"),
    ],
)
def test_plain_text_or_malformed_etcd_endpoints_are_refused(endpoint: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        parse_endpoint(endpoint)


def test_an_empty_etcd_prefix_is_refused(tmp_path: Path) -> None:
    user = EtcdPki(tmp_path).user("fincluster-registry")
    with pytest.raises(ConfigurationError, match="must name a prefix"):
        EtcdRegistry(
            ["127.0.0.1:2379"], ca_cert=user.ca_cert_path, cert=user.cert_path, key=user.key_path, prefix="/"
        )
