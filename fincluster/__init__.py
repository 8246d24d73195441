"""fincluster: a private, policy-enforced, audited swarm for open LLMs on a bank's own servers.

Importing the package changes no global state (no logging set-up, no threads, no network) and
imports nothing heavy: the public names below are loaded on first use (PEP 562), so the command
line (``fincluster --help``, ``certs``, ``attest``, ``audit``) starts without torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fincluster.client import (
        DistributedModelForCausalLM,
        DistributedModelForSequenceClassification,
        InferenceSession,
        LocalSwarm,
        Swarm,
    )
    from fincluster.errors import (
        CapacityError,
        FinclusterError,
        RemoteError,
        RoutingError,
        SessionError,
        StoreIntegrityError,
    )
    from fincluster.store import ModelStore, import_model
    from fincluster.trust.pki import Credential

__version__ = "0.1.0"

_LAZY = {
    "CapacityError": "fincluster.errors",
    "Credential": "fincluster.trust.pki",
    "DistributedModelForCausalLM": "fincluster.client",
    "DistributedModelForSequenceClassification": "fincluster.client",
    "FinclusterError": "fincluster.errors",
    "InferenceSession": "fincluster.client",
    "LocalSwarm": "fincluster.client",
    "ModelStore": "fincluster.store",
    "RemoteError": "fincluster.errors",
    "RoutingError": "fincluster.errors",
    "SessionError": "fincluster.errors",
    "StoreIntegrityError": "fincluster.errors",
    "Swarm": "fincluster.client",
    "import_model": "fincluster.store",
}

__all__ = [
    "CapacityError",
    "Credential",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "FinclusterError",
    "InferenceSession",
    "LocalSwarm",
    "ModelStore",
    "RemoteError",
    "RoutingError",
    "SessionError",
    "StoreIntegrityError",
    "Swarm",
    "__version__",
    "import_model",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fincluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
