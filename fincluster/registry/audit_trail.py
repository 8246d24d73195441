"""What the registry writes to its own audit log: announcements it accepted and refused, with why.

Servers re-announce every few seconds; the log gets a record when something changes — a node's first
accepted announcement, a new address, span, token or certificate, a refusal, a different refusal —
not one per heartbeat. A refused node (an unattested one offering the sensitive prefix, say) thus
shows up once in the registry's report, with the policy's reasons and decision id.
"""

from __future__ import annotations

import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fincluster.audit import AnnounceEvent, AttestationClaims, AuditSink, DenialEvent, record_event
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import VerifiedClaims
from fincluster.trust.policy import Decision
from fincluster.values import Clock, short_reason, utc_now
from fincluster.wire import fincluster_pb2 as pb


class RegistryAuditTrail:
    def __init__(self, sink: AuditSink | None, *, clock: Clock = utc_now) -> None:
        self.sink = sink
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, tuple[object, ...]] = {}  # node -> what was last recorded for it

    def accepted(
        self,
        record: pb.ServerRecord,
        peer: x509.Certificate,
        claims: VerifiedClaims | None,
        decision: Decision,
    ) -> None:
        fingerprint = "sha256:" + peer.fingerprint(hashes.SHA256()).hex()
        seen = (
            "accepted",
            record.address,
            record.model_id,
            record.manifest_digest,
            record.span.start,
            record.span.end,
            record.attestation,
            fingerprint,
        )
        if not self._changed(record.node_id, seen):
            return
        record_event(
            self.sink,
            AnnounceEvent(
                time=self._clock(),
                observer="registry",
                node_id=record.node_id,
                model_id=record.model_id,
                manifest_digest=record.manifest_digest or None,
                block_span=BlockSpan(record.span.start, record.span.end),
                cert_fingerprint=fingerprint,
                attestation=AttestationClaims.of(claims),
                policy_decision_id=decision.decision_id,
                policy_bundle_digest=decision.bundle_digest,
            ),
        )

    def refused(
        self,
        caller: str,
        record: pb.ServerRecord,
        reasons: tuple[str, ...],
        decision: Decision | None,
        claims: VerifiedClaims | None = None,
    ) -> None:
        """``caller`` is the SPIFFE id of the certificate that called (the record may claim another)."""
        reasons = tuple(short_reason(r) for r in reasons[:16]) or ("refused",)
        seen = ("refused", record.span.start, record.span.end, record.attestation, reasons)
        if not self._changed(caller, seen):
            return
        valid_span = 0 <= record.span.start < record.span.end
        record_event(
            self.sink,
            DenialEvent(
                time=self._clock(),
                observer="registry",
                enforced_at="registry",
                node_id=caller,
                block_span=BlockSpan(record.span.start, record.span.end) if valid_span else None,
                reasons=reasons,
                attestation=AttestationClaims.of(claims),
                policy_decision_id=decision.decision_id if decision is not None else None,
                policy_bundle_digest=decision.bundle_digest if decision is not None else None,
            ),
        )

    def _changed(self, node: str, seen: tuple[object, ...]) -> bool:
        with self._lock:
            if self._last.get(node) == seen:
                return False
            self._last[node] = seen
            return True
