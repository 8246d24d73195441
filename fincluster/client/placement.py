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
    """Why a node may (decision) or may not (reasons) receive ``span``."""

    record: pb.ServerRecord
    span: BlockSpan
    claims: VerifiedClaims | None
    decision: Decision | None
    reasons: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.reasons


class PlacementGuard:
    """Judges candidate hops for one request and keeps every verdict (the audit trail reads them).

    Routing asks about many candidate parts of each server's span. A part inside a span the guard
    already allowed for that node is *assumed* allowed while planning; :meth:`confirm` then judges
    every hop of the chosen chain exactly, so no hop is ever used without its own decision.
    """

    def __init__(self, trust: TrustContext, client_id: str, request: PlacementRequest) -> None:
        self.trust = trust
        self.client_id = client_id
        self.request = request
        self.verdicts: dict[tuple[str, BlockSpan], Verdict] = {}
        self.attestation_failures: dict[str, TrustError] = {}

    def allows(self, record: pb.ServerRecord, span: BlockSpan) -> bool:
        verdict = self.verdicts.get((record.node_id, span))
        if verdict is not None:
            return verdict.allowed
        if any(
            node == record.node_id and v.allowed and v.span.contains(span)
            for (node, _), v in self.verdicts.items()
        ):
            return True  # assumed; confirm() decides the hops actually chosen
        return self.judge(record, span).allowed

    def judge(self, record: pb.ServerRecord, span: BlockSpan) -> Verdict:
        """The exact verdict on ``span`` of ``record``'s node (computed once, then kept)."""
        verdict = self.verdicts.get((record.node_id, span))
        if verdict is None:
            verdict = self._judge(record, span)
            self.verdicts[(record.node_id, span)] = verdict
        return verdict

    def confirm(self, hops: Sequence[tuple[pb.ServerRecord, BlockSpan]]) -> list[Verdict]:
        """Exact verdicts on the chosen hops; the denied ones are returned (routing plans again)."""
        return [v for v in (self.judge(record, span) for record, span in hops) if not v.allowed]

    def _judge(self, record: pb.ServerRecord, span: BlockSpan) -> Verdict:
        if record.node_id in self.attestation_failures:
            return Verdict(record, span, None, None, (ATTESTATION_REJECTED,))
        try:
            claims, decision = self.trust.decide_route(
                record,
                span,
                client_id=self.client_id,
                classification=self.request.classification,
                model=self.request.model,
            )
        except TrustError as error:
            self.attestation_failures[record.node_id] = error
            log.warning("attestation_rejected", node=record.node_id, reason=str(error))
            return Verdict(record, span, None, None, (ATTESTATION_REJECTED,))
        return self._pinned(Verdict(record, span, claims, decision, decision.reasons))

    def _pinned(self, verdict: Verdict) -> Verdict:
        span = verdict.span
        for blocks, allowed in self.request.pins.items():
            if not (blocks.start < span.end and span.start < blocks.stop):
                continue
            if isinstance(allowed, str):
                tier = verdict.claims.tier.value if verdict.claims is not None else None
                if tier != allowed:
                    reason = f"blocks {blocks.start}:{blocks.stop} are pinned to tier {allowed!r}"
                    return Verdict(
                        verdict.record, span, verdict.claims, verdict.decision, (*verdict.reasons, reason)
                    )
            elif verdict.record.node_id not in allowed:
                reason = f"blocks {blocks.start}:{blocks.stop} are pinned to {', '.join(allowed)}"
                return Verdict(
                    verdict.record, span, verdict.claims, verdict.decision, (*verdict.reasons, reason)
                )
        return verdict

    @property
    def denials(self) -> list[Verdict]:
        return [v for v in self.verdicts.values() if not v.allowed]

    def explain(self, blocks: Sequence[int]) -> str:
        """The denials of nodes that hold any of ``blocks``, for the error message (one per node)."""
        wanted = set(blocks)
        by_node: dict[str, Verdict] = {}
        for verdict in self.denials:
            if wanted & set(range(verdict.record.span.start, verdict.record.span.end)):
                by_node.setdefault(verdict.record.node_id, verdict)
        lines = [f"{node} (blocks {v.span}): " + "; ".join(v.reasons) for node, v in sorted(by_node.items())]
        return " | ".join(lines)
