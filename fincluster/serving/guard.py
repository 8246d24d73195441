"""What a server enforces and signs on every call: its serve policy, proofs of key possession, and
receipts over what it received and returned."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

import structlog

from fincluster.audit import BlockSpan as AuditSpan
from fincluster.audit import sign_receipt
from fincluster.errors import PolicyDenied
from fincluster.serving.span_model import BlockSpan
from fincluster.trust.attestation import VerifiedClaims
from fincluster.trust.enforcement import TrustContext, prove_possession, utc_now
from fincluster.trust.pki import Credential, SigningKey, load_signing_key
from fincluster.trust.policy import BlockSpan as PolicySpan
from fincluster.trust.policy import (
    Classification,
    ClientIdentity,
    Decision,
    DecisionKind,
    ModelRef,
    NodeRef,
    PolicyInput,
)
from fincluster.wire import fincluster_pb2 as pb

log = structlog.get_logger(__name__)


class ServeGuard:
    """Server-side enforcement point. Without a ``TrustContext`` a server serves public data only."""

    def __init__(
        self,
        credential: Credential,
        model: ModelRef,
        *,
        trust: TrustContext | None = None,
        own_claims: VerifiedClaims | None = None,
        clock: Callable[[], datetime] = utc_now,
        on_denial: Callable[[str, str, BlockSpan, tuple[str, ...]], None] | None = None,
    ) -> None:
        self.credential = credential
        self.node_id = credential.spiffe_id
        self.model = model
        self.trust = trust
        self.own_claims = own_claims
        self._clock = clock
        self._on_denial = on_denial
        self._key_lock = threading.Lock()
        self._key_state: object = None
        self._key: tuple[SigningKey, bytes] | None = None

    def authorize(self, client_id: str, classification: str, span: BlockSpan) -> Decision | None:
        """Enforce the serve policy for this call; PolicyDenied carries the reasons (logged and audited,
        never sent to the peer)."""
        try:
            return self._decide(client_id, classification, span)
        except PolicyDenied as denied:
            if self._on_denial is not None:
                self._on_denial(client_id, classification, span, denied.reasons)
            raise

    def _decide(self, client_id: str, classification: str, span: BlockSpan) -> Decision | None:
        try:
            level = Classification(classification)
        except ValueError:
            raise PolicyDenied(
                "policy denied serve", reasons=(f"unknown classification {classification!r}",)
            ) from None
        if self.trust is None:
            if level is not Classification.PUBLIC:
                raise PolicyDenied(
                    "policy denied serve",
                    reasons=("this server has no policy engine and serves public data only",),
                )
            return None
        decision = self.trust.policy.decide(
            DecisionKind.SERVE,
            PolicyInput(
                client=ClientIdentity(id=client_id, clearance=self.trust.clearance_of(client_id)),
                classification=level,
                model=self.model,
                span=PolicySpan(start=span.start, end=span.end),
                node=NodeRef(id=self.node_id, claims=self.own_claims),
            ),
        )
        decision.enforce()
        return decision

    def prove(self, *, nonce: bytes, session_id: str, client_id: str) -> pb.PossessionProof:
        key, cert_pem = self._current_key()
        return prove_possession(key, cert_pem, nonce=nonce, session_id=session_id, client_id=client_id)

    def receipt(
        self, *, session_id: str, step: int, span: BlockSpan, input_sha256: str, output_sha256: str
    ) -> str:
        """A receipt signed with the current TLS key, as JSON."""
        receipt = sign_receipt(
            self._current_key()[0],
            session_id=session_id,
            step=step,
            block_span=AuditSpan(start=span.start, end=span.end),
            input_sha256=input_sha256,
            output_sha256=output_sha256,
            node_id=self.node_id,
            issued_at=self._clock(),
        )
        return receipt.model_dump_json()

    def _current_key(self) -> tuple[SigningKey, bytes]:
        """The TLS key and its certificate, re-read when their files change (certificate rotation)."""
        with self._key_lock:
            state = self.credential.file_state()
            if self._key is None or state != self._key_state:
                _, cert_pem, key_pem = self.credential.read()
                self._key, self._key_state = (load_signing_key(key_pem), cert_pem), state
            return self._key
