"""What the client writes to its audit log: metadata and digests of every transfer, never raw data.

One ``ClientAuditTrail`` per swarm connection turns what routing and the span clients report into
audit events: routing decisions, denials, attestation failures, session open/close, failovers,
re-executions of a node's output elsewhere (verification), and
one transfer record per call per node with the server's checked receipt. A call that fails is
recorded too (:meth:`ClientAuditTrail.recording`): a server's refusal as a denial at the server, a
failed possession proof or receipt (key mismatch, revoked certificate) as an attestation failure,
a request no allowed chain covers as a denial at the router — each with its reason.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence

from fincluster.audit import (
    AttestationClaims,
    AttestationFailureEvent,
    AuditEvent,
    AuditSink,
    DenialEvent,
    FailoverEvent,
    RouteHop,
    RoutingEvent,
    SessionCloseEvent,
    SessionOpenEvent,
    TransferEvent,
    VerificationEvent,
    record_event,
    record_events,
)
from fincluster.client.placement import PlacementGuard, PlacementRequest, Verdict
from fincluster.client.transport import CallRecord
from fincluster.client.verification import Comparison
from fincluster.errors import FinclusterError, RefusedError, RoutingError, TrustError
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import ATTESTATION_REJECTED
from fincluster.values import Clock, short_reason, utc_now

_DECISION = re.compile(r"\(decision ([\x21-\x7e]+?)\)")
"""The decision id a refusing server gives (``wire.status.abort_for``)."""


class ClientAuditTrail:
    """Records a client's view of the swarm into ``sink`` (and to ``capture_audit_events`` in tests)."""

    def __init__(self, sink: AuditSink | None, *, client_id: str, clock: Clock = utc_now) -> None:
        self.sink = sink
        self.client_id = client_id
        self._clock = clock
        self._local = threading.local()
        self._failures: dict[str, str] = {}  # session id -> why its last call failed (for the close)

    def _record(self, event: AuditEvent) -> None:
        buffer: list[AuditEvent] | None = getattr(self._local, "buffer", None)
        if buffer is not None:
            buffer.append(event)
        else:
            record_event(self.sink, event)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Collect this thread's events and write them in one durable transaction at the end (also
        when the block fails: transfers that happened are always recorded). One per generation step."""
        if getattr(self._local, "buffer", None) is not None:
            yield
            return
        self._local.buffer = []
        try:
            yield
        finally:
            events, self._local.buffer = self._local.buffer, None
            record_events(self.sink, events)

    @contextlib.contextmanager
    def recording(
        self, session_id: str, request: PlacementRequest | None, *, stateless: bool
    ) -> Iterator[None]:
        """:meth:`batch`, and a record of why the block failed, if it fails with a fincluster error; a
        failed stateless pass (which has no session to close) is also closed with that error."""
        with self.batch():
            try:
                yield
            except FinclusterError as error:
                self.failure(session_id, request, error)
                if stateless:
                    self.session_close(session_id, ok=False)
                raise

    def failure(self, session_id: str, request: PlacementRequest | None, error: FinclusterError) -> None:
        """What made a call of ``session_id`` fail, as the denial or attestation failure it was."""
        reason = short_reason(str(error))
        self._failures[session_id] = reason
        classification = request.classification.value if request is not None else None
        if isinstance(error, TrustError) and error.node_id is not None:
            self._record(
                AttestationFailureEvent(
                    time=self._clock(),
                    observer="client",
                    session_id=session_id,
                    node_id=error.node_id,
                    reason=reason,
                )
            )
        elif isinstance(error, RefusedError):
            decision = _DECISION.search(error.reason)
            self._record(
                DenialEvent(
                    time=self._clock(),
                    observer="client",
                    enforced_at="server",
                    session_id=session_id,
                    client_id=self.client_id,
                    node_id=error.node_id,
                    block_span=error.span,
                    classification=classification,
                    reasons=(short_reason(f"the server refused the call: {error.reason}"),),
                    policy_decision_id=decision[1] if decision else None,
                )
            )
        elif isinstance(error, RoutingError):
            missing = sorted(error.missing_blocks)
            self._record(
                DenialEvent(
                    time=self._clock(),
                    observer="client",
                    enforced_at="router",
                    session_id=session_id,
                    client_id=self.client_id,
                    block_span=BlockSpan(missing[0], missing[-1] + 1) if missing else None,
                    classification=classification,
                    reasons=(reason,),
                )
            )

    def transfer(self, request: PlacementRequest, call: CallRecord) -> None:
        claims, decision = call.binding.claims, call.binding.decision
        self._record(
            TransferEvent(
                time=self._clock(),
                observer="client",
                session_id=call.session_id,
                operation=call.operation,  # type: ignore[arg-type]
                step=call.step,
                client_id=self.client_id,
                classification=request.classification.value,
                model_id=request.model.id,
                manifest_digest=request.model.manifest_sha256 or "0" * 64,
                node_id=call.node_id,
                cert_fingerprint=call.cert_fingerprint,
                attestation=AttestationClaims.of(claims),
                block_span=call.span,
                num_tokens=call.num_tokens,
                input_sha256=call.input_sha256,
                output_sha256=call.output_sha256,
                policy_decision_id=decision.decision_id if decision is not None else None,
                policy_bundle_digest=decision.bundle_digest if decision is not None else None,
                receipt=call.receipt,
                receipt_problem=short_reason(call.receipt_problem) if call.receipt_problem else None,
                adapter_sha256=call.adapter_sha256,
            )
        )

    def routing(self, session_id: str, hops: Sequence[tuple[BlockSpan, Verdict]]) -> None:
        chain = tuple(
            RouteHop(
                block_span=span,
                node_id=verdict.record.node_id,
                attestation=AttestationClaims.of(verdict.claims),
                policy_decision_id=verdict.decision.decision_id if verdict.decision is not None else None,
            )
            for span, verdict in hops
        )
        if not chain:
            return
        digests = {v.decision.bundle_digest for _, v in hops if v.decision is not None}
        self._record(
            RoutingEvent(
                time=self._clock(),
                observer="client",
                session_id=session_id,
                client_id=self.client_id,
                chain=chain,
                policy_bundle_digest=digests.pop() if len(digests) == 1 else None,
            )
        )

    def judged(self, guard: PlacementGuard, session_id: str) -> None:
        """Denials and attestation failures the router met while placing this request."""
        for node_id, error in guard.attestation_failures.items():
            self._record(
                AttestationFailureEvent(
                    time=self._clock(),
                    observer="client",
                    session_id=session_id,
                    node_id=node_id,
                    reason=short_reason(str(error)),
                )
            )
        for verdict in guard.denials:
            if verdict.reasons == (ATTESTATION_REJECTED,):
                continue
            record = verdict.record
            self._record(
                DenialEvent(
                    time=self._clock(),
                    observer="client",
                    enforced_at="router",
                    session_id=session_id,
                    client_id=self.client_id,
                    node_id=record.node_id,
                    block_span=verdict.span,
                    classification=guard.request.classification.value,
                    reasons=tuple(short_reason(r) for r in verdict.reasons[:16]),
                    policy_decision_id=verdict.decision.decision_id if verdict.decision is not None else None,
                    policy_bundle_digest=verdict.decision.bundle_digest
                    if verdict.decision is not None
                    else None,
                )
            )

    def session_open(self, session_id: str, request: PlacementRequest) -> None:
        self._record(
            SessionOpenEvent(
                time=self._clock(),
                observer="client",
                session_id=session_id,
                client_id=self.client_id,
                classification=request.classification.value,
                model_id=request.model.id,
                manifest_digest=request.model.manifest_sha256 or "0" * 64,
            )
        )

    def session_close(self, session_id: str, *, ok: bool) -> None:
        self._record(
            SessionCloseEvent(
                time=self._clock(),
                observer="client",
                session_id=session_id,
                client_id=self.client_id,
                outcome="ok" if ok else "error",
                reason=None if ok else self._failures.pop(session_id, None),
            )
        )
        if self.sink is not None:
            self.sink.checkpoint()

    def failover(
        self,
        session_id: str,
        span: BlockSpan,
        failed: str,
        replacement: str | None,
        reason: str,
        replayed: int,
    ) -> None:
        self._record(
            FailoverEvent(
                time=self._clock(),
                observer="client",
                session_id=session_id,
                block_span=span,
                failed_node_id=failed,
                replacement_node_id=replacement,
                reason=short_reason(reason),
                replayed_steps=replayed,
            )
        )

    def verification(self, comparison: Comparison) -> None:
        self._record(
            VerificationEvent(
                time=self._clock(),
                session_id=comparison.session_id,
                step=comparison.step,
                block_span=comparison.span,
                checked_node_id=comparison.checked_node_id,
                verifier_node_ids=comparison.verifier_node_ids,
                checked_output_sha256=comparison.checked_sha256,
                verifier_output_sha256=comparison.verifier_sha256,
                max_abs_diff=comparison.max_abs_diff,
                agreed=comparison.agreed,
                referee_node_ids=comparison.referee_node_ids,
                quarantined_node_id=comparison.quarantined_node_id,
            )
        )
