"""Pair the client's transfer records with the servers' and report what does not pair.

A transfer is identified on both sides by (session, step, node, block span, input digest): the client
knows them before sending, the server learns them on receipt. For each pair the output digests must
agree, both sides must hold the same receipt, the receipt must describe this transfer, and, when the
nodes' keys are given, its signature must verify: with a :class:`~fincluster.audit.keys.KeyRing` (node
certificates, the CA's archive), under a certificate of that node valid when the receipt was signed,
so receipts signed before and after a renewal or rotation all verify. A transfer only one side
recorded is listed under ``client_only`` or ``server_only``; server-only transfers of sessions that
no given client log mentions at all are also grouped in ``sessions_without_client_log`` (their
client's log is elsewhere, or they came from a tool that keeps none).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from fincluster.audit.events import AuditEvent, Observer, TransferEvent
from fincluster.audit.keys import KeyRing
from fincluster.audit.receipts import issued_at, receipt_body, receipt_is_valid
from fincluster.audit.signing import PublicKey
from fincluster.errors import AuditIntegrityError
from fincluster.spans import BlockSpan
from fincluster.values import FrozenModel


class TransferKey(FrozenModel):
    session_id: str
    step: int
    node_id: str
    block_span: BlockSpan
    input_sha256: str

    @classmethod
    def of(cls, event: TransferEvent) -> TransferKey:
        return cls(
            session_id=event.session_id,
            step=event.step,
            node_id=event.node_id,
            block_span=event.block_span,
            input_sha256=event.input_sha256,
        )


class Mismatch(FrozenModel):
    transfer: TransferKey
    reason: str


class SessionGap(FrozenModel):
    """A session servers recorded that no given client log mentions."""

    session_id: str
    client_id: str
    nodes: tuple[str, ...]
    transfers: int


class ReconcileReport(FrozenModel):
    matched: int
    client_only: tuple[TransferKey, ...]
    """Transfers the client recorded and no server did."""
    server_only: tuple[TransferKey, ...]
    """Transfers a server recorded and the client did not."""
    mismatched: tuple[Mismatch, ...]
    """Paired transfers whose outputs or receipts disagree."""
    sessions_without_client_log: tuple[SessionGap, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.client_only or self.server_only or self.mismatched)


def _transfers_by_key(
    events: Iterable[AuditEvent], observer: Observer
) -> dict[TransferKey, list[TransferEvent]]:
    grouped: dict[TransferKey, list[TransferEvent]] = defaultdict(list)
    for event in events:
        if isinstance(event, TransferEvent) and event.observer == observer:
            grouped[TransferKey.of(event)].append(event)
    return grouped


def reconcile(
    client_events: Iterable[AuditEvent],
    server_events: Iterable[AuditEvent],
    *,
    node_keys: Mapping[str, PublicKey] | KeyRing | None = None,
) -> ReconcileReport:
    """Match the client logs' transfer records against the union of the servers' logs.

    ``node_keys`` (node SPIFFE id -> public key, or a key ring of node certificates): when given,
    every receipt's signature is verified.
    """
    client_events = list(client_events)
    server_events = list(server_events)
    client = _transfers_by_key(client_events, "client")
    server = _transfers_by_key(server_events, "server")
    matched = 0
    client_only: list[TransferKey] = []
    server_only: list[TransferKey] = []
    mismatched: list[Mismatch] = []
    for key in sorted(client.keys() | server.keys(), key=_sort_key):
        sent, received = client.get(key, []), server.get(key, [])
        for client_event, server_event in zip(sent, received, strict=False):
            reason = _disagreement(client_event, server_event, node_keys)
            if reason is None:
                matched += 1
            else:
                mismatched.append(Mismatch(transfer=key, reason=reason))
        client_only += [key] * max(0, len(sent) - len(received))
        server_only += [key] * max(0, len(received) - len(sent))
    known = {e.session_id for e in client_events if e.session_id is not None}
    return ReconcileReport(
        matched=matched,
        client_only=tuple(client_only),
        server_only=tuple(server_only),
        mismatched=tuple(mismatched),
        sessions_without_client_log=_gaps(
            [e for key in server_only if key.session_id not in known for e in server[key][:1]]
        ),
    )


def _gaps(transfers: list[TransferEvent]) -> tuple[SessionGap, ...]:
    by_session: dict[str, list[TransferEvent]] = defaultdict(list)
    for event in transfers:
        by_session[event.session_id].append(event)
    return tuple(
        SessionGap(
            session_id=session_id,
            client_id=events[0].client_id,
            nodes=tuple(sorted({e.node_id for e in events})),
            transfers=len(events),
        )
        for session_id, events in sorted(by_session.items())
    )


def _sort_key(key: TransferKey) -> tuple[str, int, str, int, str]:
    return (key.session_id, key.step, key.node_id, key.block_span.start, key.input_sha256)


def _disagreement(
    client: TransferEvent, server: TransferEvent, node_keys: Mapping[str, PublicKey] | KeyRing | None
) -> str | None:
    if client.receipt_problem is not None:
        return f"the client refused the node's receipt: {client.receipt_problem}"
    if client.output_sha256 != server.output_sha256:
        return "the output digests differ"
    if client.adapter_sha256 != server.adapter_sha256:
        return "the records name different adapters"
    if client.receipt != server.receipt:
        return "the client's receipt is not the one the server logged"
    receipt = client.receipt
    if receipt is None:
        return None if client.output_sha256 is None else "no receipt for a completed transfer"
    try:
        body = receipt_body(receipt)
    except AuditIntegrityError:
        return "the receipt does not parse"
    described = (
        body.session_id,
        body.step,
        body.node_id,
        BlockSpan(body.span.start, body.span.end) if body.span.end > body.span.start else None,
        body.input_sha256,
        body.output_sha256,
        body.adapter_sha256 or None,
    )
    actual = (
        client.session_id,
        client.step,
        client.node_id,
        client.block_span,
        client.input_sha256,
        client.output_sha256,
        client.adapter_sha256,
    )
    if described != actual:
        return "the receipt describes a different transfer"
    if isinstance(node_keys, KeyRing):
        found = node_keys.lookup(
            body.key_id, at=issued_at(body), cert_fingerprint=body.cert_fingerprint, node_id=client.node_id
        )
        if found.key is None:
            return f"the receipt's signer cannot be checked: {found.reason} (key {body.key_id[:16]})"
        key: PublicKey | None = found.key.public_key
    else:
        key = None if node_keys is None else node_keys.get(client.node_id)
        if node_keys is not None and key is None:
            return "no public key is known for the node"
    if key is not None and not receipt_is_valid(receipt, key):
        return "the receipt's signature does not verify"
    return None
