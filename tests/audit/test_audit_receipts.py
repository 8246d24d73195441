"""Server receipts (protobuf, signed over their exact body bytes) and the reconciliation of client and
server logs."""

from __future__ import annotations

import json

import pytest
from audit_scenario import NODE_A, NODE_B, T0, VECTORS, ScenarioLogs, Swarm, ed25519_key, p256_key

from fincluster.audit import (
    TransferEvent,
    read_events,
    receipt_body,
    receipt_is_valid,
    reconcile,
    sha256_hex,
    sign_receipt,
    verify_receipt,
)
from fincluster.audit.receipts import RECEIPT_DOMAIN
from fincluster.errors import AuditIntegrityError
from fincluster.spans import BlockSpan
from fincluster.wire import fincluster_pb2 as pb

FINGERPRINT = "sha256:" + sha256_hex(b"certificate of server a")


def receipt_for(key, **overrides):
    fields = (
        dict(
            session_id="s-1",
            step=3,
            span=BlockSpan(0, 4),
            input_sha256=sha256_hex(b"request bytes"),
            output_sha256=sha256_hex(b"response bytes"),
            node_id=NODE_A,
            cert_fingerprint=FINGERPRINT,
            issued_at=T0,
        )
        | overrides
    )
    return sign_receipt(key, **fields)


@pytest.mark.parametrize(
    "key", [ed25519_key("server a"), p256_key("server a tls key")], ids=["ed25519", "p256"]
)
def test_a_receipt_verifies_under_the_signing_servers_key(key) -> None:
    receipt = receipt_for(key)
    body = verify_receipt(receipt, key.public_key())
    assert receipt_is_valid(receipt, key.public_key())
    assert body.algorithm == ("ed25519" if "Ed25519" in type(key).__name__ else "ecdsa-p256-sha256")
    assert (body.session_id, body.step, body.span.start, body.span.end) == ("s-1", 3, 0, 4)
    assert body.cert_fingerprint == FINGERPRINT


def test_a_receipt_fails_under_another_key() -> None:
    receipt = receipt_for(ed25519_key("server a"))
    with pytest.raises(AuditIntegrityError, match="invalid signature"):
        verify_receipt(receipt, ed25519_key("server b").public_key())


def test_a_receipt_whose_body_was_changed_fails() -> None:
    key = ed25519_key("server a")
    receipt = receipt_for(key)
    body = receipt_body(receipt)
    body.step = 4
    altered = pb.Receipt(body=body.SerializeToString(deterministic=True), signature=receipt.signature)
    assert not receipt_is_valid(altered, key.public_key())


def test_a_receipt_body_that_does_not_parse_is_invalid_not_an_exception() -> None:
    key = ed25519_key("server a")
    garbage = pb.Receipt(body=b"\xff\xff\xff", signature=b"\x00" * 64)
    assert not receipt_is_valid(garbage, key.public_key())
    with pytest.raises(AuditIntegrityError, match="does not parse"):
        receipt_body(garbage)


def test_receipt_encoding_matches_the_known_answer_vector() -> None:
    """The signed bytes are the domain line plus the body exactly as pinned, written out field by field
    in the vector; Ed25519 signatures are deterministic, so the signature is pinned too."""
    vector = json.loads((VECTORS / "receipt.json").read_text())
    receipt = receipt_for(ed25519_key("server a"))
    assert vector["domain"].encode() == RECEIPT_DOMAIN
    assert receipt.body.hex() == vector["body_hex"]
    assert receipt.signature.hex() == vector["signature_hex"]
    body = receipt_body(receipt)
    assert {field.name: value for field, value in body.ListFields() if field.name != "span"} == vector[
        "fields"
    ]
    assert (body.span.start, body.span.end) == tuple(vector["span"])


def node_keys(swarm: Swarm):
    return {node: key.public_key() for node, key in swarm.node_keys.items()}


def test_matching_client_and_server_logs_reconcile_with_nothing_unmatched(
    scenario: ScenarioLogs, swarm
) -> None:
    report = reconcile(scenario.client_events, scenario.server_events, node_keys=node_keys(swarm))
    assert report.ok
    assert (report.matched, report.client_only, report.server_only, report.mismatched) == (12, (), (), ())


def test_a_transfer_only_the_server_logged_is_reported(scenario: ScenarioLogs, swarm: Swarm) -> None:
    _, ghost = swarm.transfer_pair(session_id="s-1", step=9, node_id=NODE_B, span=(4, 8), num_tokens=1)
    report = reconcile(scenario.client_events, [*scenario.server_events, ghost])
    assert report.matched == 12
    assert [(k.session_id, k.step, k.node_id) for k in report.server_only] == [("s-1", 9, NODE_B)]
    assert report.client_only == ()


def test_a_transfer_only_the_client_logged_is_reported(scenario: ScenarioLogs) -> None:
    dropped = next(e for e in scenario.server_events if e.step == 1 and e.node_id == NODE_A)
    report = reconcile(scenario.client_events, [e for e in scenario.server_events if e is not dropped])
    assert [(k.session_id, k.step, k.node_id) for k in report.client_only] == [("s-1", 1, NODE_A)]
    assert report.server_only == ()


def test_disagreeing_outputs_and_forged_receipts_are_mismatches(scenario: ScenarioLogs, swarm: Swarm) -> None:
    server = list(scenario.server_events)
    first: TransferEvent = server[0]
    server[0] = first.model_copy(update={"output_sha256": sha256_hex(b"something else")})
    client = list(scenario.client_events)
    index = next(i for i, e in enumerate(client) if isinstance(e, TransferEvent) and e.node_id == NODE_B)
    forged = receipt_for(ed25519_key("impostor"), node_id=NODE_B)
    client[index] = client[index].model_copy(update={"receipt": forged})
    report = reconcile(client, server, node_keys=node_keys(swarm))
    assert [m.reason for m in report.mismatched] == [
        "the output digests differ",
        "the client's receipt is not the one the server logged",
    ]


def test_a_receipt_signed_by_the_wrong_key_is_caught_when_keys_are_given(
    scenario: ScenarioLogs, swarm
) -> None:
    keys = node_keys(swarm) | {NODE_A: ed25519_key("not a").public_key()}
    report = reconcile(scenario.client_events, scenario.server_events, node_keys=keys)
    assert {m.reason for m in report.mismatched} == {"the receipt's signature does not verify"}
    assert len(report.mismatched) == 6  # every transfer to node a


def test_reconcile_works_on_logs_read_back_from_disk(write_log, scenario: ScenarioLogs, swarm) -> None:
    client_db = write_log(scenario.client_events, name="client.db")
    server_db = write_log(scenario.server_events, name="server.db", origin="server.a")
    report = reconcile(read_events(client_db), read_events(server_db), node_keys=node_keys(swarm))
    assert report.ok and report.matched == 12
