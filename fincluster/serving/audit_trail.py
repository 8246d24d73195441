"""What a server writes to its own audit log: every transfer it received (digests, never data) with the
receipt it signed, every request its policy refused, and how each inference session ended (closed by
the client, or the stream ended without a close, or it expired idle, or the server shut down)."""

from __future__ import annotations

from fincluster.audit import (
    AttestationClaims,
    AuditSink,
    DenialEvent,
    SessionCloseEvent,
    TransferEvent,
    receipt_body,
    record_event,
)
from fincluster.serving.guard import Denial
from fincluster.serving.service import Transfer
from fincluster.serving.sessions import CLIENT_CLOSED, Session
from fincluster.trust.attestation import VerifiedClaims
from fincluster.trust.policy import Classification, ModelRef
from fincluster.values import Clock, short_reason, utc_now

_LEVELS = frozenset(level.value for level in Classification)


class ServerAuditTrail:
    def __init__(
        self,
        sink: AuditSink | None,
        *,
        node_id: str,
        model: ModelRef,
        claims: VerifiedClaims | None,
        clock: Clock = utc_now,
    ) -> None:
        self.sink = sink
        self.node_id = node_id
        self.model = model
        self.claims = claims
        self._clock = clock

    def transfer(self, transfer: Transfer) -> None:
        model = self.model
        record_event(
            self.sink,
            TransferEvent(
                time=self._clock(),
                observer="server",
                session_id=transfer.session_id,
                operation=transfer.operation,  # type: ignore[arg-type]
                step=transfer.step,
                client_id=transfer.client_id,
                classification=transfer.classification,
                model_id=model.id,
                manifest_digest=model.manifest_sha256 or "0" * 64,
                node_id=self.node_id,
                cert_fingerprint=receipt_body(transfer.receipt).cert_fingerprint,
                attestation=AttestationClaims.of(self.claims),
                block_span=transfer.span,
                num_tokens=transfer.num_tokens,
                input_sha256=transfer.input_sha256,
                output_sha256=transfer.output_sha256,
                receipt=transfer.receipt,
                adapter_sha256=transfer.adapter_sha256,
            ),
        )

    def session_closed(self, session: Session, reason: str) -> None:
        """``reason`` as the session manager gives it; "closed" is the client's own close."""
        by_client = reason == CLIENT_CLOSED
        record_event(
            self.sink,
            SessionCloseEvent(
                time=self._clock(),
                observer="server",
                session_id=session.session_id,
                client_id=session.client_id,
                outcome="ok" if by_client else "error",
                reason="closed by the client" if by_client else short_reason(reason.removeprefix("closed: ")),
            ),
        )

    def denial(self, denial: Denial) -> None:
        record_event(
            self.sink,
            DenialEvent(
                time=self._clock(),
                observer="server",
                enforced_at="server",
                session_id=denial.session_id,
                client_id=denial.client_id,
                node_id=self.node_id,
                block_span=denial.span,
                # a peer may send any string; only known classifications are labels
                classification=denial.classification if denial.classification in _LEVELS else None,
                reasons=tuple(short_reason(r) for r in denial.reasons[:16]) or ("refused",),
                policy_decision_id=denial.decision_id,
            ),
        )
