"""Which nodes may receive which blocks of this request: attestation checks, route policy and pins.

For every candidate record the guard verifies the attestation (an invalid one excludes the node and is
noted as an attestation failure), then asks the policy engine for a ROUTE decision, then applies the
user's pins, which can only narrow what policy allows. Denials are kept with their reasons so that a
request that cannot be placed fails with an error naming the blocks and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fincluster.errors import TrustError
from fincluster.logs import get_logger
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import ATTESTATION_REJECTED, VerifiedClaims
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.policy import Classification, Decision, ModelRef
from fincluster.wire import fincluster_pb2 as pb

log = get_logger(__name__)

#: Blocks → allowed node ids, or a tier name such as "trusted".
Pins = Mapping[range, Sequence[str] | str]


@dataclass(frozen=True)
class PlacementRequest:
    """What is being placed: the data classification, the model, and the user's pins."""

    classification: Classification
    model: ModelRef
    pins: Pins = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """Why a node may (decision) or may not (reasons) receive a span."""

    record: pb.ServerRecord
    claims: VerifiedClaims | None
    decision: Decision | None
    reasons: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.reasons


class PlacementGuard:
    """Judges records for one request; keeps every verdict (the audit trail reads them)."""

    def __init__(self, trust: TrustContext, client_id: str, request: PlacementRequest) -> None:
        self.trust = trust
        self.client_id = client_id
        self.request = request
        self.verdicts: dict[str, Verdict] = {}
        self.attestation_failures: list[tuple[str, TrustError]] = []

    def allows(self, record: pb.ServerRecord, span: BlockSpan) -> bool:
        verdict = self._judge(record, span)
        self.verdicts[record.node_id] = verdict
        return verdict.allowed

    def _judge(self, record: pb.ServerRecord, span: BlockSpan) -> Verdict:
        try:
            claims, decision = self.trust.decide_route(
                record,
                span,
                client_id=self.client_id,
                classification=self.request.classification,
                model=self.request.model,
            )
        except TrustError as error:
            self.attestation_failures.append((record.node_id, error))
            log.warning("attestation_rejected", node=record.node_id, reason=str(error))
            return Verdict(record, None, None, (ATTESTATION_REJECTED,))
        return self._pinned(Verdict(record, claims, decision, decision.reasons), span)

    def _pinned(self, verdict: Verdict, span: BlockSpan) -> Verdict:
        for blocks, allowed in self.request.pins.items():
            if not (blocks.start < span.end and span.start < blocks.stop):
                continue
            if isinstance(allowed, str):
                tier = verdict.claims.tier.value if verdict.claims is not None else None
                if tier != allowed:
                    reason = f"blocks {blocks.start}:{blocks.stop} are pinned to tier {allowed!r}"
                    return Verdict(
                        verdict.record, verdict.claims, verdict.decision, (*verdict.reasons, reason)
                    )
            elif verdict.record.node_id not in allowed:
                reason = f"blocks {blocks.start}:{blocks.stop} are pinned to {', '.join(allowed)}"
                return Verdict(verdict.record, verdict.claims, verdict.decision, (*verdict.reasons, reason))
        return verdict

    def explain(self, blocks: Sequence[int]) -> str:
        """The denials of nodes that hold any of ``blocks``, for the error message."""
        wanted = set(blocks)
        lines = [
            f"{verdict.record.node_id} ({verdict.record.span.start}:{verdict.record.span.end}): "
            + "; ".join(verdict.reasons)
            for verdict in self.verdicts.values()
            if not verdict.allowed and wanted & set(range(verdict.record.span.start, verdict.record.span.end))
        ]
        return " | ".join(lines) if lines else "no server announces them"
