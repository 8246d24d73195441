"""Verification of what standard nodes compute: sampled re-execution on other allowed nodes.

Signed receipts make a wrong output *attributable*; re-execution makes it *detectable*. The policy data
(``data.fincluster.verification`` in ``policies/data.json``) sets, per data classification, the share
of a checked tier's outputs that is re-executed, and per dtype the tolerance of the comparison.
``rate: 1.0`` is the redundant mode (every output of those nodes is computed twice).

A sampled output (one hop of a stateless forward, or one step of an inference session) is recomputed
by other nodes that policy allows for the same blocks, as one stateless forward of the same inputs —
for a session step, of every input the hop has received so far, compared on the step's positions.
When the two disagree beyond the tolerance, a third party (other allowed nodes again) referees: the
side the referee contradicts is quarantined (routing avoids it) and, if it is the checked node, the
hop fails over and replays. With no referee, the checked node is quarantined — a session never goes
on with an output no one vouched for. Every comparison is an audit event with both digests; the
re-executions are transfers of the same session (those nodes saw its activations).

Which outputs are sampled is drawn from the operating system's random source, so a node cannot
predict which of its outputs are checked. A node that corrupts every output is caught within ``N``
sampled-for outputs with probability ``1 - (1 - rate) ** N`` (rate 0.2: 89 % within 10, 99 % within 21).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Annotated

import torch
from pydantic import Field, ValidationError

from fincluster.errors import (
    AdapterError,
    AdapterRefusedError,
    InvalidResponseError,
    PolicyError,
    RoutingError,
    TrustError,
    UnavailableError,
)
from fincluster.logs import get_logger
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import TrustTier
from fincluster.trust.policy import Classification
from fincluster.values import FrozenModel, TensorDType
from fincluster.wire.codec import SpanInputs
from fincluster.wire.tensors import digest, encode

log = get_logger(__name__)

DEFAULT_TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}  # a dtype the policy data does not list


class Tolerance(FrozenModel):
    """``|verifier - checked| <= atol + rtol * |checked|`` element-wise (``torch.allclose``)."""

    atol: Annotated[float, Field(ge=0)]
    rtol: Annotated[float, Field(ge=0)]


class Sampling(FrozenModel):
    """For one classification: the share of the listed tiers' outputs that is re-executed, and
    whether a sampled output that no other node can recompute fails the call (``required``) or goes
    on unverified (logged)."""

    rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    tiers: frozenset[TrustTier] = frozenset()
    required: bool = False


class VerificationPolicy(FrozenModel):
    """``data.fincluster.verification`` of the policy data, validated (a typo must not turn checks off)."""

    public: Sampling = Sampling()
    internal: Sampling = Sampling()
    confidential: Sampling = Sampling()
    restricted: Sampling = Sampling()
    tolerance: Mapping[TensorDType, Tolerance] = {}

    @classmethod
    def from_policy_data(cls, data: Mapping[str, object]) -> VerificationPolicy:
        """The policy data's verification section; no verification when it has none. PolicyError
        when the section is malformed (unknown keys, a rate outside [0, 1], an unknown tier)."""
        section = data.get("fincluster")
        entry = section.get("verification") if isinstance(section, Mapping) else None
        if entry is None:
            return cls()
        try:
            return cls.model_validate(entry)
        except ValidationError as error:
            raise PolicyError(f"invalid data.fincluster.verification in the policy data: {error}") from None

    def sampling(self, classification: Classification) -> Sampling:
        sampling: Sampling = getattr(self, classification.value)
        return sampling

    def tolerance_for(self, dtype: torch.dtype) -> Tolerance:
        found = self.tolerance.get(TensorDType.of(dtype))
        return found if found is not None else Tolerance.model_validate(DEFAULT_TOLERANCE)


@dataclass(frozen=True)
class Comparison:
    """One re-execution and its outcome, as the client saw it: what the audit trail records."""

    session_id: str
    step: int
    span: BlockSpan
    checked_node_id: str
    verifier_node_ids: tuple[str, ...]
    checked_sha256: str
    verifier_sha256: str
    max_abs_diff: float | None
    agreed: bool
    referee_node_ids: tuple[str, ...] = ()
    quarantined_node_id: str | None = None


SpanRunner = Callable[[BlockSpan, SpanInputs, frozenset[str]], tuple[tuple[str, ...], torch.Tensor]]
"""Run ``inputs`` statelessly over a span on allowed nodes none of the set: (their ids, output)."""

# Re-execution is best effort: when no other node can run it now, the output stays unverified (logged).
_NOT_RUN = (
    RoutingError,
    UnavailableError,
    TrustError,
    InvalidResponseError,
    AdapterError,
    AdapterRefusedError,
)


class SpotChecker:
    """Samples a hop's outputs for re-execution and judges each comparison (see the module docstring)."""

    def __init__(
        self,
        sampling: Sampling,
        tolerance: Callable[[torch.dtype], Tolerance],
        *,
        run_elsewhere: SpanRunner,
        quarantine: Callable[[str, str], None],
        record: Callable[[Comparison], None],
        rng: random.Random,
    ) -> None:
        self.sampling = sampling
        self._tolerance = tolerance
        self._run_elsewhere = run_elsewhere
        self._quarantine = quarantine
        self._record = record
        self._rng = rng
        self._skipped: set[tuple[str, BlockSpan]] = set()  # warned once each, then logged at debug

    def wants(self, tier: TrustTier | None) -> bool:
        """Whether this output of a node of ``tier`` is to be re-executed (None: not attested, e.g.
        the client's own blocks, never checked)."""
        if tier is None or tier not in self.sampling.tiers or self.sampling.rate <= 0:
            return False
        return self.sampling.rate >= 1 or self._rng.random() < self.sampling.rate

    def check(
        self,
        node_id: str,
        span: BlockSpan,
        inputs: SpanInputs,
        output: torch.Tensor,
        *,
        session_id: str,
        step: int,
    ) -> None:
        """Re-execute ``inputs`` elsewhere and compare the last ``output.shape[1]`` positions with
        ``output``; InvalidResponseError naming ``node_id`` when the checked node is found wrong."""
        try:
            verifiers, again = self._run_elsewhere(span, inputs, frozenset({node_id}))
        except _NOT_RUN as error:
            if self.sampling.required:
                raise RoutingError(
                    f"the output of blocks {span} from {node_id} must be verified, but no other allowed "
                    f"node could recompute it ({error})",
                    missing_blocks=tuple(span.blocks),
                ) from error
            emit = log.debug if (node_id, span) in self._skipped else log.warning
            self._skipped.add((node_id, span))
            emit("verification_skipped", node=node_id, blocks=str(span), reason=str(error))
            return
        tolerance = self._tolerance(output.dtype)
        again = _last(again, output)
        diff = _max_abs_diff(again, output)
        agreed = _close(again, output, tolerance)
        comparison = Comparison(
            session_id, step, span, node_id, verifiers, _sha256(output), _sha256(again), diff, agreed
        )
        if agreed:
            self._record(comparison)
            return
        culprit, referees = self._referee(node_id, verifiers, span, inputs, output, again, tolerance)
        other = ", ".join(verifiers) if culprit == node_id else node_id
        self._quarantine(culprit, f"its output of blocks {span} disagreed with {other}'s")
        self._record(replace(comparison, referee_node_ids=referees, quarantined_node_id=culprit))
        log.warning(
            "verification_failed",
            node=node_id,
            verifiers=verifiers,
            referees=referees,
            quarantined=culprit,
            max_abs_diff=diff,
        )
        if culprit == node_id:
            raise InvalidResponseError(
                f"its output of blocks {span} disagrees with {', '.join(verifiers)} "
                f"(max difference {'n/a' if diff is None else f'{diff:.3g}'}); the node is quarantined",
                node_id=node_id,
                span=span,
                session_id=session_id,
            )

    def _referee(
        self,
        node_id: str,
        verifiers: tuple[str, ...],
        span: BlockSpan,
        inputs: SpanInputs,
        output: torch.Tensor,
        again: torch.Tensor,
        tolerance: Tolerance,
    ) -> tuple[str, tuple[str, ...]]:
        """(the node to quarantine, the referees). The verifier is quarantined only when a referee
        agrees with the checked node and not with it (and it is one node); otherwise the checked node."""
        try:
            referees, third = self._run_elsewhere(span, inputs, frozenset({node_id, *verifiers}))
        except _NOT_RUN:
            return node_id, ()
        third = _last(third, output)
        if len(verifiers) == 1 and _close(third, output, tolerance) and not _close(third, again, tolerance):
            return verifiers[0], referees
        return node_id, referees


def concatenated(history: Sequence[SpanInputs]) -> SpanInputs:
    """The inputs of several session steps as one stateless pass: every position so far, with the
    last step's attention mask (it covers them all) and the first step's deep prompts."""
    if len(history) == 1:
        return history[0]
    return SpanInputs(
        torch.cat([inputs.hidden_states for inputs in history], 1),
        history[-1].attention_mask,
        torch.cat([inputs.position_ids for inputs in history], 1),
        prefixes=history[0].prefixes,  # deep prompts go with a session's first step
    )


def _last(again: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return again[:, -output.shape[1] :].to(output.device, output.dtype)


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: Tolerance) -> bool:
    return a.shape == b.shape and bool(
        torch.allclose(a.float(), b.float(), atol=tolerance.atol, rtol=tolerance.rtol)
    )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """None when the shapes differ or a difference is not finite."""
    if a.shape != b.shape:
        return None
    difference = (a.float() - b.float()).abs()
    largest = float(difference.max()) if difference.numel() else 0.0
    return largest if math.isfinite(largest) else None


def _sha256(tensor: torch.Tensor) -> str:
    """The wire digest of ``tensor``: for the checked output, the one its signed receipt covers."""
    return digest(encode(tensor))
