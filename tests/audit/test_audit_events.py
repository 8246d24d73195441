"""Audit event models and their canonical bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from audit_scenario import CLIENT, MANIFEST, MODEL, NODE_A, Swarm, check_vector
from pydantic import TypeAdapter, ValidationError

from fincluster.audit import AuditEvent, SessionOpenEvent, TransferEvent, canonical_json
from fincluster.audit.checkpoints import seal_message
from fincluster.audit.merkle import leaf_hash
from fincluster.audit.signing import key_id, sign
from fincluster.spans import BlockSpan

EVENTS: TypeAdapter[AuditEvent] = TypeAdapter(AuditEvent)


def session_open(**overrides: object) -> SessionOpenEvent:
    fields: dict[str, object] = dict(
        time=datetime(2025, 3, 1, 9, 0, tzinfo=UTC),
        observer="client",
        session_id="s-1",
        client_id=CLIENT,
        classification="confidential",
        model_id=MODEL,
        manifest_digest=MANIFEST,
    )
    return SessionOpenEvent.model_validate(fields | overrides)


def test_the_kind_field_selects_the_model() -> None:
    event = EVENTS.validate_json(canonical_json(session_open()))
    assert isinstance(event, SessionOpenEvent)


def test_unknown_fields_such_as_a_prompt_are_refused() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        session_open(prompt="Wire 10,000 EUR to account 123")
    with pytest.raises(ValidationError, match="token_ids"):
        session_open(token_ids=[101, 2054, 2003])


def test_identifier_fields_refuse_free_text() -> None:
    with pytest.raises(ValidationError):
        session_open(session_id="what is the balance of account 42")
    with pytest.raises(ValidationError):
        session_open(client_id="analyst-1")  # not a SPIFFE id
    with pytest.raises(ValidationError):
        session_open(manifest_digest="ABC")


def test_naive_times_are_refused_and_aware_times_are_stored_in_utc() -> None:
    with pytest.raises(ValidationError):
        session_open(time=datetime(2025, 3, 1, 9, 0))
    paris = datetime(2025, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=1)))
    event = session_open(time=paris)
    assert event.time == datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
    assert b'"time":"2025-03-01T09:00:00.000000Z"' in canonical_json(event)


def test_an_empty_block_span_is_refused() -> None:
    with pytest.raises(ValidationError, match="empty"):
        BlockSpan(start=4, end=4)


def test_events_are_immutable() -> None:
    event = session_open()
    with pytest.raises(ValidationError):
        event.session_id = "s-2"  # type: ignore[misc]


def test_canonical_bytes_sort_keys_and_drop_whitespace() -> None:
    assert canonical_json(BlockSpan(start=0, end=4)) == b'{"end":4,"start":0}'


def test_records_leaf_hashes_and_seals_match_the_known_answer_vector(swarm: Swarm, writer_key) -> None:
    """Pins the stable record format: canonical bytes, leaf hash and the seal of a fixed Ed25519 key."""
    transfer, _ = swarm.transfer_pair(session_id="s-1", step=0, node_id=NODE_A, span=(0, 4), num_tokens=7)
    records = []
    for index, event in enumerate([session_open(), transfer]):
        body = canonical_json(event)
        leaf = leaf_hash(body)
        records.append(
            {
                "index": index,
                "canonical": body.decode(),
                "leaf_hash": leaf.hex(),
                "seal": sign(writer_key, seal_message("client.analyst-1", index, leaf)).hex(),
            }
        )
        assert EVENTS.validate_json(body) == event
    check_vector(
        "records.json",
        {"origin": "client.analyst-1", "writer_key_id": key_id(writer_key.public_key()), "records": records},
    )


def test_transfer_events_carry_digests_not_payloads(swarm: Swarm) -> None:
    transfer, _ = swarm.transfer_pair(session_id="s-1", step=0, node_id=NODE_A, span=(0, 4), num_tokens=7)
    assert set(TransferEvent.model_fields) >= {"input_sha256", "output_sha256", "num_tokens"}
    assert not {"prompt", "tokens", "token_ids", "activations", "text"} & set(TransferEvent.model_fields)
    assert len(transfer.input_sha256) == 64
