"""What a server enforces and signs on every call: its serve policy, proofs of key possession, and
receipts over what it received and returned."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fincluster.audit import sign_receipt
from fincluster.audit.node import CredentialSigner
from fincluster.errors import PolicyDenied
from fincluster.logs import get_logger
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import VerifiedClaims
from fincluster.trust.enforcement import TrustContext, prove_possession
from fincluster.trust.pki import Credential
from fincluster.trust.policy import Decision, ModelRef
from fincluster.values import Clock, utc_now
from fincluster.wire import fincluster_pb2 as pb

log = get_logger(__name__)

DenialListener = Callable[["Denial"], None]


@dataclass(frozen=True)
class Denial:
    """A call the serve policy refused: who asked, for what, and why (for the server's audit trail)."""

    client_id: str
    session_id: str | None
    classification: str
    span: BlockSpan
    reasons: tuple[str, ...]
    decision_id: str | None


class ServeGuard:
    """Server-side enforcement point: the serve recipe of ``trust`` on every call."""

    def __init__(
        self,
        credential: Credential,
        model: ModelRef,
        *,
        trust: TrustContext,
        own_claims: VerifiedClaims | None = None,
        clock: Clock = utc_now,
        on_denial: DenialListener | None = None,
    ) -> None:
        self.credential = credential
        self.node_id = credential.spiffe_id
        self.model = model
        self.trust = trust
        self.own_claims = own_claims
        self._clock = clock
        self._on_denial = on_denial
        self.signer = CredentialSigner(credential)  # follows renewal and rotation of the TLS files

    def authorize(
        self, client_id: str, classification: str, span: BlockSpan, *, session_id: str | None = None
    ) -> Decision:
        """Enforce the serve policy for this call; PolicyDenied carries the reasons (logged and audited,
        never sent to the peer) and the decision id (which the peer does get)."""
        decision = self.trust.decide_serve(
            client_id=client_id,
            classification=classification,
            model=self.model,
            span=span,
            node_id=self.node_id,
            claims=self.own_claims,
        )
        if not decision.allow:
            log.warning(
                "serve_refused",
                client=client_id,
                session=session_id,
                blocks=str(span),
                decision=decision.decision_id,
                reasons=list(decision.reasons),
            )
            if self._on_denial is not None:
                self._on_denial(
                    Denial(
                        client_id,
                        session_id,
                        classification,
                        span,
                        decision.reasons,
                        decision.decision_id,
                    )
                )
            raise PolicyDenied(
                "policy denied serve", reasons=decision.reasons, decision_id=decision.decision_id
            )
        return decision

    def prove(self, *, nonce: bytes, session_id: str, client_id: str) -> pb.PossessionProof:
        identity, cert_pem = self.signer.current()
        return prove_possession(
            identity.key, cert_pem, nonce=nonce, session_id=session_id, client_id=client_id
        )

    def receipt(
        self,
        *,
        session_id: str,
        step: int,
        span: BlockSpan,
        input_sha256: str,
        output_sha256: str,
        adapter_sha256: str = "",
    ) -> pb.Receipt:
        """A receipt signed with the current TLS key, naming its certificate (and the adapter applied)."""
        identity = self.signer.identity()
        return sign_receipt(
            identity.key,
            session_id=session_id,
            step=step,
            span=span,
            input_sha256=input_sha256,
            output_sha256=output_sha256,
            node_id=self.node_id,
            cert_fingerprint=identity.cert_fingerprint or "",
            issued_at=self._clock(),
            adapter_sha256=adapter_sha256,
        )
