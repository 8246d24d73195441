"""The AuditLog writer: pipeline, checkpoint schedule, lifecycle, proofs, retention, export."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from audit_scenario import (
    CLIENT,
    NODE_A,
    FakeClock,
    Swarm,
    cert_fingerprint,
    check_vector,
    ed25519_key,
    p256_key,
)

from fincluster.audit import (
    AuditLog,
    AuditSettings,
    SessionCloseEvent,
    TransferEvent,
    canonical_json,
    export_jsonl,
    verify,
)
from fincluster.audit.checkpoints import sign_checkpoint
from fincluster.audit.merkle import EMPTY_ROOT, Frontier, leaf_hash, verify_consistency, verify_inclusion
from fincluster.audit.signing import SignerIdentity
from fincluster.errors import AuditError, ClosedError, ConfigurationError


def open_log(path: Path, key, clock: FakeClock, **settings) -> AuditLog:
    origin = settings.pop("origin", "client.analyst-1")
    return AuditLog(path, signing_key=key, origin=origin, settings=AuditSettings(**settings), clock=clock)


def transfers(swarm: Swarm, count: int, session_id: str = "s-1") -> list[TransferEvent]:
    return [
        swarm.transfer_pair(session_id=session_id, step=i, node_id=NODE_A, span=(0, 4), num_tokens=1)[0]
        for i in range(count)
    ]


def close_event(clock: FakeClock, session_id: str = "s-1") -> SessionCloseEvent:
    return SessionCloseEvent(
        time=clock(), observer="client", session_id=session_id, client_id=CLIENT, outcome="ok"
    )


def test_append_returns_consecutive_indices_and_the_tree_grows(tmp_path, writer_key, clock, swarm) -> None:
    with open_log(tmp_path / "a.db", writer_key, clock) as log:
        indices = [log.append(event) for event in transfers(swarm, 3)]
        assert indices == [0, 1, 2]
        assert log.tree_size == 3


def test_a_checkpoint_is_signed_every_n_records(tmp_path, writer_key, clock, swarm) -> None:
    with open_log(tmp_path / "a.db", writer_key, clock, checkpoint_every_records=5) as log:
        for event in transfers(swarm, 12):
            log.append(event)
        assert log.last_checkpoint is not None
        assert log.last_checkpoint.body.tree_size == 10


def test_a_checkpoint_is_signed_when_the_interval_has_passed(tmp_path, writer_key, clock, swarm) -> None:
    events = transfers(swarm, 3)
    with open_log(
        tmp_path / "a.db", writer_key, clock, checkpoint_every_records=None, checkpoint_every_seconds=30
    ) as log:
        log.append(events[0])
        assert log.last_checkpoint is None
        assert log.checkpoint_if_due() is None
        clock.advance(seconds=31)
        checkpoint = log.checkpoint_if_due()
        assert checkpoint is not None and checkpoint.body.tree_size == 1
        log.append(events[1])
        clock.advance(seconds=31)
        log.append(events[2])  # the schedule is also checked on append
        assert log.last_checkpoint is not None and log.last_checkpoint.body.tree_size == 3


def test_closing_a_session_signs_a_checkpoint(tmp_path, writer_key, clock, swarm) -> None:
    with open_log(tmp_path / "a.db", writer_key, clock, checkpoint_every_records=None) as log:
        log.append(transfers(swarm, 1)[0])
        log.append(close_event(clock))
        assert log.last_checkpoint is not None and log.last_checkpoint.body.tree_size == 2


def test_checkpoint_without_new_records_returns_the_last_one(tmp_path, writer_key, clock, swarm) -> None:
    with open_log(tmp_path / "a.db", writer_key, clock) as log:
        log.append(transfers(swarm, 1)[0])
        first = log.checkpoint()
        assert log.checkpoint() == first


def test_close_checkpoints_pending_records_and_closed_logs_refuse_use(
    tmp_path, writer_key, clock, swarm
) -> None:
    log = open_log(tmp_path / "a.db", writer_key, clock, checkpoint_every_records=None)
    log.append(transfers(swarm, 1)[0])
    log.close()
    log.close()
    report = verify(tmp_path / "a.db", [writer_key.public_key()])
    assert report.ok and report.unanchored_records == 0
    with pytest.raises(ClosedError):
        log.append(transfers(swarm, 1)[0])


def test_reopening_continues_the_same_tree(tmp_path, writer_key, clock, swarm) -> None:
    events = transfers(swarm, 7)
    with open_log(tmp_path / "a.db", writer_key, clock) as log:
        for event in events[:4]:
            log.append(event)
    with open_log(tmp_path / "a.db", writer_key, clock) as log:
        for event in events[4:]:
            log.append(event)
        root = log.root_hash
    expected = Frontier()
    for event in events:
        expected.append(leaf_hash(canonical_json(event)))
    assert root == expected.root()
    assert verify(tmp_path / "a.db", [writer_key.public_key()]).ok


def test_a_log_keeps_its_origin(tmp_path, writer_key, clock) -> None:
    open_log(tmp_path / "a.db", writer_key, clock).close()
    with pytest.raises(AuditError, match=r"client\.analyst-1"):
        open_log(tmp_path / "a.db", writer_key, clock, origin="someone-else")


def test_a_second_writer_on_the_same_file_is_refused(tmp_path, writer_key, clock, swarm) -> None:
    events = transfers(swarm, 2)
    first = open_log(tmp_path / "a.db", writer_key, clock)
    second = open_log(tmp_path / "a.db", writer_key, clock)
    first.append(events[0])
    with pytest.raises(AuditError, match="another writer"):
        second.append(events[1])
    first.close()


def test_events_that_bypassed_validation_are_refused(tmp_path, writer_key, clock, swarm) -> None:
    valid = transfers(swarm, 1)[0]
    smuggled = TransferEvent.model_construct(**(dict(valid) | {"num_tokens": [101, 2054, 2003]}))
    with open_log(tmp_path / "a.db", writer_key, clock) as log:
        with pytest.raises(AuditError, match="invalid audit event"):
            log.append(smuggled)
        assert log.tree_size == 0


def test_ecdsa_p256_node_keys_can_sign_the_log(tmp_path, clock, swarm) -> None:
    key = p256_key("server a tls key")
    with open_log(tmp_path / "a.db", key, clock) as log:
        for event in transfers(swarm, 5):
            log.append(event)
    assert verify(tmp_path / "a.db", [key.public_key()]).ok


def test_other_curves_are_a_configuration_error(tmp_path, clock) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(ConfigurationError, match="P-256"):
        open_log(tmp_path / "a.db", ec.generate_private_key(ec.SECP384R1()), clock)


def test_inclusion_and_consistency_proofs_check_against_signed_checkpoints(
    tmp_path, writer_key, clock, swarm
) -> None:
    events = transfers(swarm, 11)
    with open_log(tmp_path / "a.db", writer_key, clock, checkpoint_every_records=4) as log:
        for event in events:
            log.append(event)
        old = log.last_checkpoint
        assert old is not None and old.body.tree_size == 8
        new = log.checkpoint()
        proof = log.consistency_proof(8, 11)
        assert verify_consistency(
            8, 11, bytes.fromhex(old.body.root_hash), bytes.fromhex(new.body.root_hash), proof
        )
        path = log.inclusion_proof(5)
        leaf = leaf_hash(canonical_json(events[5]))
        assert verify_inclusion(5, 11, leaf, path, bytes.fromhex(new.body.root_hash))
        with pytest.raises(AuditError):
            log.inclusion_proof(11)


def test_concurrent_appends_from_many_threads_verify(tmp_path, writer_key, clock, swarm) -> None:
    per_thread, threads = 25, 8
    batches = [transfers(swarm, per_thread, session_id=f"s-{t}") for t in range(threads)]
    errors: list[BaseException] = []
    with open_log(tmp_path / "a.db", writer_key, clock, checkpoint_every_records=7) as log:

        def work(batch: list[TransferEvent]) -> None:
            try:
                for event in batch:
                    log.append(event)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(batch,)) for batch in batches]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert errors == []
    report = verify(tmp_path / "a.db", [writer_key.public_key()])
    assert report.ok, report.problems
    assert report.tree_size == per_thread * threads
    assert report.checkpoints_verified >= (per_thread * threads) // 7


def test_retention_prunes_whole_checkpointed_prefixes_and_verify_still_passes(
    tmp_path, writer_key, clock, swarm
) -> None:
    events = transfers(swarm, 10)
    path = tmp_path / "a.db"
    with open_log(path, writer_key, clock, checkpoint_every_records=3, retention_days=30) as log:
        for event in events[:7]:
            log.append(event)  # checkpoints at 3 and 6
        assert log.prune() is None  # nothing is 30 days old yet
        clock.advance(days=31)
        for event in events[7:]:
            log.append(event)  # checkpoint at 9, dated now
        marker = log.prune()
        assert marker is not None and marker.body.pruned_size == 6
        assert log.prune() is None
        log.append(transfers(swarm, 1, session_id="s-2")[0])
    report = verify(path, [writer_key.public_key()])
    assert report.ok, report.problems
    assert (report.pruned_before, report.record_count, report.tree_size) == (6, 5, 11)
    with open_log(path, writer_key, clock) as log:
        assert log.tree_size == 11
        with pytest.raises(AuditError, match="pruned"):
            log.inclusion_proof(7)


def test_pruned_records_cannot_be_hidden_by_deleting_the_marker(tmp_path, writer_key, clock, swarm) -> None:
    import sqlite3

    path = tmp_path / "a.db"
    with open_log(path, writer_key, clock, checkpoint_every_records=3, retention_days=1) as log:
        for event in transfers(swarm, 7):
            log.append(event)
        clock.advance(days=2)
        assert log.prune() is not None
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM prune_markers")
    report = verify(path, [writer_key.public_key()])
    assert not report.ok and report.first_bad_record == 0


def test_jsonl_export_reproduces_the_stored_records(tmp_path, writer_key, clock, swarm) -> None:
    events = transfers(swarm, 6)
    with open_log(tmp_path / "a.db", writer_key, clock, checkpoint_every_records=4) as log:
        for event in events:
            log.append(event)
    out = io.StringIO()
    assert export_jsonl(tmp_path / "a.db", out) == 6 + 2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["type"] for line in lines] == ["record"] * 4 + ["checkpoint"] + ["record"] * 2 + [
        "checkpoint"
    ]
    records = [line for line in lines if line["type"] == "record"]
    for line, event in zip(records, events, strict=True):
        assert line["leaf_hash"] == leaf_hash(canonical_json(event)).hex()
        assert line["event"] == json.loads(canonical_json(event))


def test_checkpoint_matches_the_known_answer_vector() -> None:
    """Pins the checkpoint format: canonical body (naming the signer's key and certificate) and the
    Ed25519 signature over a fixed tree."""
    frontier = Frontier()
    for i in range(5):
        frontier.append(leaf_hash(f"record {i}".encode()))
    clock = FakeClock()
    signer = SignerIdentity.of(ed25519_key("client audit writer"), cert_fingerprint=cert_fingerprint(CLIENT))
    checkpoint = sign_checkpoint(signer, origin="client.analyst-1", frontier=frontier, time=clock())
    check_vector(
        "checkpoint.json",
        {
            "leaf_entries": [f"record {i}" for i in range(5)],
            "signed_message": "fincluster-audit-checkpoint-v1\n" + canonical_json(checkpoint.body).decode(),
            "checkpoint": json.loads(canonical_json(checkpoint)),
        },
    )


def test_an_empty_log_closes_with_an_empty_tree_checkpoint_and_verifies(tmp_path, writer_key, clock) -> None:
    with open_log(tmp_path / "a.db", writer_key, clock) as log:
        pass
    assert log.last_checkpoint is not None
    assert log.last_checkpoint.body.root_hash == EMPTY_ROOT.hex()
    report = verify(tmp_path / "a.db", [writer_key.public_key()])
    assert report.ok and report.tree_size == 0 and report.checkpoints_verified == 1
