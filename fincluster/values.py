"""Typed values every layer shares: identities, digests, opaque ids, the frozen-model base, the clock,
tensor dtypes. Importing it loads neither torch nor gRPC.

Audit records, policy inputs and attestation claims all name nodes, digests and ids; they use these
definitions so that a value valid in one is valid in the others.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

SpiffeId = Annotated[str, Field(pattern=r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$", max_length=2048)]
"""A SPIFFE-style workload identity, ``spiffe://<trust-domain>/<role>/<name>``."""

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 digest as 64 lowercase hex characters."""

OpaqueId = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,256}$")]
"""Session, attestation (``jti``), policy decision and model ids: 1 to 256 printable ASCII characters
without spaces, so no sentence fits."""

MAX_REASON_CHARS = 500
"""Longest reason text kept in audit records and local logs (policy and trust reasons)."""

Clock = Callable[[], datetime]
"""Returns the current time (timezone-aware); injected wherever expiry or freshness matters."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def sha256_hex(data: bytes) -> str:
    """SHA-256 of exact bytes as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def short_reason(text: str) -> str:
    """``text`` cut to :data:`MAX_REASON_CHARS` (with an ellipsis) and to one line."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 1] + "…"


class FrozenModel(BaseModel):
    """Base of every validated value: immutable, and unknown fields are refused rather than dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorDType(enum.StrEnum):
    """Floating-point element types of weights and activations (store files, servers, the wire)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.value)
        return dtype

    @classmethod
    def of(cls, dtype: torch.dtype) -> TensorDType:
        """The member for a torch dtype; ValueError for any other dtype."""
        name = str(dtype).removeprefix("torch.")
        return cls(name)


class StepStrategy(enum.StrEnum):
    """How a server runs inference steps (``fincluster.serving.fast_step`` says what each does)."""

    AUTO = "auto"
    """``graphs`` on a CUDA device, ``eager`` elsewhere."""
    EAGER = "eager"
    """transformers' ``DynamicCache`` per session, one session per step (the reference)."""
    STATIC = "static"
    """static KV pool; one-token steps of concurrent sessions batched; eager kernels."""
    GRAPHS = "graphs"
    """``static``, with every decode batch shape captured once as a CUDA graph (CUDA only)."""

    def resolve(self, device_type: str) -> StepStrategy:
        """The strategy this one means on a device of ``device_type`` (``"cuda"``, ``"cpu"`` …)."""
        if self is StepStrategy.AUTO:
            return StepStrategy.GRAPHS if device_type == "cuda" else StepStrategy.EAGER
        return self


class Quantization(enum.StrEnum):
    """How a server holds its span's weights (``fincluster.serving.quant``)."""

    NONE = "none"
    INT8 = "int8"
    """bitsandbytes LLM.int8: int8 weights, outlier features (|x| > 6) computed in 16 bits."""
    NF4 = "nf4"
    """bitsandbytes 4-bit NormalFloat with blockwise absmax scales."""
