"""fincluster: a private, policy-enforced, audited swarm for open LLMs on a bank's own servers.

Importing the package changes no global state (no logging set-up, no threads, no network).
"""

from fincluster.client import DistributedModelForCausalLM, InferenceSession, LocalSwarm, Swarm
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

__all__ = [
    "CapacityError",
    "Credential",
    "DistributedModelForCausalLM",
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
