from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.registry.etcd_cluster import EtcdCluster, EtcdPki, running_etcd


@pytest.fixture(scope="session")
def etcd_pki(tmp_path_factory: pytest.TempPathFactory) -> EtcdPki:
    return EtcdPki(tmp_path_factory.mktemp("etcd-pki"))


@pytest.fixture(scope="session")
def etcd(etcd_pki: EtcdPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member with RBAC on, as deployed: the registry's user may use ``TEST_PREFIX`` only."""
    with running_etcd(etcd_pki, tmp_path_factory.mktemp("etcd"), rbac=True) as cluster:
        yield cluster
