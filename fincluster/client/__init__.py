"""Client SDK: a transformers-style model whose blocks run on the swarm."""

from fincluster.client.chain import InferenceSession
from fincluster.client.classification import DistributedModelForSequenceClassification
from fincluster.client.model import DistributedModelForCausalLM
from fincluster.client.swarm import LocalSwarm, Swarm

__all__ = [
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "InferenceSession",
    "LocalSwarm",
    "Swarm",
]
