"""Signed LoRA adapters: manifests, signatures and the adapter store servers load them from.

``fincluster adapters push|pull|list|keygen`` (``fincluster.adapters.commands``) is the operator's side;
servers call :meth:`AdapterStore.fetch` with the keys their settings trust (``trust.adapter_keys``)
and apply what it returns (``fincluster.serving.adapters``). The names below load on first use, so a
client that only names an adapter (:class:`AdapterRef`) does not import the store's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fincluster.adapters.manifest import AdapterKeys, AdapterManifest, AdapterRef
    from fincluster.adapters.store import AdapterStore, ListedAdapter, VerifiedAdapter

_LAZY = {
    "AdapterKeys": "fincluster.adapters.manifest",
    "AdapterManifest": "fincluster.adapters.manifest",
    "AdapterRef": "fincluster.adapters.manifest",
    "AdapterStore": "fincluster.adapters.store",
    "ListedAdapter": "fincluster.adapters.store",
    "VerifiedAdapter": "fincluster.adapters.store",
}

__all__ = ["AdapterKeys", "AdapterManifest", "AdapterRef", "AdapterStore", "ListedAdapter", "VerifiedAdapter"]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fincluster.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
