"""The model store: a model split into a client part and one file per block, pinned by a manifest.

``fincluster model import`` builds a store with :func:`import_model`; servers and clients open it with
:meth:`ModelStore.open` and load only their part, each file checked against the manifest's SHA-256.
The names below load on first use, so reading a manifest (``fincluster.store.manifest``, e.g. on the
offline machine that issues attestations) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fincluster.store.aliases import STORE_ALIASES
    from fincluster.store.importer import import_from_model, import_model
    from fincluster.store.manifest import Manifest
    from fincluster.store.store import ModelStore

_LAZY = {
    "STORE_ALIASES": "fincluster.store.aliases",
    "Manifest": "fincluster.store.manifest",
    "ModelStore": "fincluster.store.store",
    "import_from_model": "fincluster.store.importer",
    "import_model": "fincluster.store.importer",
}

__all__ = ["STORE_ALIASES", "Manifest", "ModelStore", "import_from_model", "import_model"]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fincluster.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
