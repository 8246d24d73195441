"""The model store: a model split into a client part and one file per block, pinned by a manifest.

``fincluster model import`` builds a store with :func:`import_model`; servers and clients open it with
:meth:`ModelStore.open` and load only their part, each file checked against the manifest's SHA-256.
"""

from __future__ import annotations

from fincluster.store.aliases import STORE_ALIASES
from fincluster.store.importer import import_from_model, import_model
from fincluster.store.manifest import Manifest
from fincluster.store.store import ModelStore

__all__ = ["STORE_ALIASES", "Manifest", "ModelStore", "import_from_model", "import_model"]
