"""The registry backend that the registry service's settings ask for (``registry.backend``)."""

from __future__ import annotations

from fincluster.errors import ConfigurationError
from fincluster.registry.backend import InMemoryRegistry, Registry
from fincluster.registry.etcd import EtcdRegistry
from fincluster.settings import RegistryBackend, RegistrySettings


def registry_backend(settings: RegistrySettings) -> Registry:
    """An ``InMemoryRegistry`` (one registry process), or an ``EtcdRegistry`` on ``settings.etcd``.

    Refuses an ``etcd`` section under the memory backend: the operator meant etcd, and silently
    running a registry that no replica shares would hide that.
    """
    if settings.backend is RegistryBackend.MEMORY:
        if settings.etcd is not None:
            raise ConfigurationError('registry.etcd is set but registry.backend is "memory"; choose one')
        return InMemoryRegistry()
    etcd = settings.etcd
    if etcd is None:
        raise ConfigurationError(
            'registry.backend is "etcd" but [registry.etcd] (endpoints, ca_cert, cert, key) is missing'
        )
    return EtcdRegistry(
        etcd.endpoints,
        ca_cert=etcd.ca_cert,
        cert=etcd.cert,
        key=etcd.key,
        prefix=etcd.prefix,
        timeout_seconds=etcd.timeout_seconds,
    )
