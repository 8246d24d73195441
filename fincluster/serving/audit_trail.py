"""What a server writes to its own audit log: every transfer it received (digests, never data) with the
receipt it signed, and every request its policy refused."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fincluster.audit import AuditSink, DenialEvent, Receipt, TransferEvent, record_event
from fincluster.audit import BlockSpan as AuditSpan
from fincluster.serving.service import Transfer
from fincluster.serving.span_model import BlockSpan
from fincluster.trust.attestation import VerifiedClaims
from fincluster.trust.enforcement import utc_now
from fincluster.trust.pki import Credential, certificate_fingerprint

MAX_REASON = 500


class ServerAuditTrail:
    def __init__(
        self,
        sink: AuditSink | None,
        *,
        credential: Credential,
        model_id: str,
        manifest_digest: str,
        claims: VerifiedClaims | None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.sink = sink
        self.credential = credential
        self.node_id = credential.spiffe_id
        self.model_id = model_id
        self.manifest_digest = manifest_digest
        self.claims = claims
        self._clock = clock
        self._fingerprint: tuple[object, str] | None = None

    def _cert_fingerprint(self) -> str:
        """Fingerprint of the certificate serving now (re-read only when its files change: rotation)."""
        state = self.credential.file_state()
        if self._fingerprint is None or self._fingerprint[0] != state:
            _, cert_pem, _ = self.credential.read()
            self._fingerprint = (state, certificate_fingerprint(cert_pem))
        return self._fingerprint[1]

    def transfer(self, transfer: Transfer) -> None:
        record_event(
            self.sink,
            TransferEvent(
                time=self._clock(),
                observer="server",
                session_id=transfer.session_id,
                request_id=transfer.request_id,
                operation=transfer.operation,  # type: ignore[arg-type]
                step=transfer.step,
                client_id=transfer.client_id,
                classification=transfer.classification,
                model_id=self.model_id,
                manifest_digest=self.manifest_digest,
                node_id=self.node_id,
                node_tier=self.claims.tier.value if self.claims is not None else None,
                cert_fingerprint=self._cert_fingerprint(),
                attestation_id=self.claims.attestation_id if self.claims is not None else None,
                block_span=AuditSpan(start=transfer.span.start, end=transfer.span.end),
                num_tokens=transfer.num_tokens,
                input_sha256=transfer.input_sha256,
                output_sha256=transfer.output_sha256,
                receipt=Receipt.model_validate_json(transfer.receipt),
            ),
        )

    def denial(self, client_id: str, classification: str, span: BlockSpan, reasons: tuple[str, ...]) -> None:
        record_event(
            self.sink,
            DenialEvent(
                time=self._clock(),
                observer="server",
                enforced_at="server",
                client_id=client_id,
                node_id=self.node_id,
                block_span=AuditSpan(start=span.start, end=span.end),
                classification=classification[:64] or None,
                reasons=tuple(r[:MAX_REASON] for r in reasons[:16]) or ("refused",),
            ),
        )
