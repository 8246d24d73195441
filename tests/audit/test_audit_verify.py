"""verify(): an intact log passes; every kind of tampering is caught and the first bad record named."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from audit_scenario import NODE_A, ScenarioLogs, Swarm, ed25519_key

from fincluster.audit import AuditLog, AuditSettings, Checkpoint, canonical_json, verify
from fincluster.audit.checkpoints import CHECKPOINT_DOMAIN, CheckpointBody
from fincluster.audit.merkle import leaf_hash
from fincluster.audit.signing import key_id, sign
from fincluster.errors import AuditError, AuditIntegrityError

ATTACKER = ed25519_key("attacker")


@pytest.fixture
def big_log(write_log, scenario: ScenarioLogs, swarm: Swarm) -> Path:
    """The scenario's 22 records plus 30 more transfers; checkpoints every 4 records and at close."""
    extra = [
        swarm.transfer_pair(session_id="s-3", step=i, node_id=NODE_A, span=(0, 8), num_tokens=i + 1)[0]
        for i in range(30)
    ]
    return write_log(scenario.client_events + extra)


def rows(db: sqlite3.Connection) -> list[tuple[int, bytes, bytes, str, bytes]]:
    return db.execute("SELECT idx, body, leaf_hash, key_id, seal FROM records ORDER BY idx").fetchall()


def rewrite(db: sqlite3.Connection, new_rows: list[tuple[int, bytes, bytes, str, bytes]]) -> None:
    db.execute("DELETE FROM records")
    db.executemany(
        "INSERT INTO records (idx, body, leaf_hash, key_id, seal) VALUES (?, ?, ?, ?, ?)", new_rows
    )


# -- mutations: each changes the file and returns the index verify must name (None: no record) --------

Mutation = Callable[[sqlite3.Connection, random.Random], int | None]


def _mutate_scalar(value: Any, rng: random.Random) -> Any:
    if isinstance(value, int):
        return value + rng.randint(1, 5)
    if all(c in "0123456789abcdef" for c in value) and value:
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    return value[:-1] + ("x" if value[-1] != "x" else "y")


def _scalar_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for key, child in node.items() for p in _scalar_paths(child, (*path, key))]
    if isinstance(node, list):
        return [p for i, child in enumerate(node) for p in _scalar_paths(child, (*path, i))]
    return [path] if isinstance(node, int | str) and not isinstance(node, bool) else []


def edit_field(db: sqlite3.Connection, rng: random.Random) -> int:
    """Change one value inside a record, keep the JSON canonical, maybe recompute the stored leaf hash."""
    table = rows(db)
    index, body, *_ = rng.choice(table)
    document = json.loads(body)
    path = rng.choice(_scalar_paths(document))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = _mutate_scalar(parent[path[-1]], rng)
    new_body = rfc8785.dumps(document)
    recompute = rng.random() < 0.5
    new_leaf = leaf_hash(new_body) if recompute else None
    db.execute(
        "UPDATE records SET body = ?, leaf_hash = COALESCE(?, leaf_hash) WHERE idx = ?",
        (new_body, new_leaf, index),
    )
    return index


def delete_row(db: sqlite3.Connection, rng: random.Random) -> int:
    """Delete one record; half the time renumber the rest to close the gap."""
    table = rows(db)
    index = rng.randrange(len(table))
    remaining = [row for row in table if row[0] != index]
    if rng.random() < 0.5:
        remaining = [(i, *row[1:]) for i, row in enumerate(remaining)]
    rewrite(db, remaining)
    return index


def insert_row(db: sqlite3.Connection, rng: random.Random) -> int:
    """Insert a copy of an existing record (or a forged one with a correct leaf hash) at some position."""
    table = rows(db)
    position = rng.randrange(len(table) + 1)
    copied, body, leaf, kid, seal = rng.choice(table)
    forged = rng.random() < 0.5
    if forged:
        document = json.loads(body)
        document["time"] = "2025-03-01T10:00:00.000000Z"
        body = rfc8785.dumps(document)
        leaf = leaf_hash(body)
    shifted = [(i + (i >= position), *row) for i, *row in table]
    rewrite(db, [*shifted, (position, body, leaf, kid, seal)])
    # A verbatim copy of the record already at that position leaves it intact; its duplicate is next.
    return position + 1 if copied == position and not forged else position


def swap_rows(db: sqlite3.Connection, rng: random.Random) -> int:
    table = rows(db)
    i, j = sorted(rng.sample(range(len(table)), 2))
    table[i], table[j] = (i, *table[j][1:]), (j, *table[i][1:])
    rewrite(db, table)
    return i


def truncate(db: sqlite3.Connection, rng: random.Random) -> int:
    """Cut the log's tail (the last checkpoint, written at close, stays)."""
    count = len(rows(db))
    keep = rng.randrange(count)
    db.execute("DELETE FROM records WHERE idx >= ?", (keep,))
    return keep


def resign_checkpoint(db: sqlite3.Connection, rng: random.Random) -> None:
    """Re-sign a checkpoint with a key the verifier does not trust (optionally with a new root)."""
    sizes = [size for (size,) in db.execute("SELECT tree_size FROM checkpoints")]
    size = rng.choice(sizes)
    (body,) = db.execute("SELECT body FROM checkpoints WHERE tree_size = ?", (size,)).fetchone()
    checkpoint = Checkpoint.model_validate_json(body)
    fields = checkpoint.body.model_dump()
    if rng.random() < 0.5:
        fields["key_id"] = key_id(ATTACKER.public_key())
    if rng.random() < 0.5:
        fields["root_hash"] = "0" * 64
    new_body = CheckpointBody.model_validate(fields)
    signature = sign(ATTACKER, CHECKPOINT_DOMAIN + canonical_json(new_body)).hex()
    forged = Checkpoint(body=new_body, signature=signature)
    db.execute("UPDATE checkpoints SET body = ? WHERE tree_size = ?", (canonical_json(forged), size))
    return None


MUTATIONS: list[Mutation] = [edit_field, delete_row, insert_row, swap_rows, truncate, resign_checkpoint]


def tampered_copy(original: Path, target: Path, mutation: Mutation, rng: random.Random) -> int | None:
    shutil.copyfile(original, target)
    db = sqlite3.connect(target)
    db.execute("PRAGMA synchronous=OFF")  # a throwaway copy: no need to wait for the disk
    with db:
        expected = mutation(db, rng)
    db.close()
    return expected


def test_an_untouched_log_verifies(big_log: Path, writer_key) -> None:
    report = verify(big_log, [writer_key.public_key()])
    assert report.ok, report.problems
    assert (report.tree_size, report.record_count, report.unanchored_records) == (52, 52, 0)
    assert report.checkpoints_verified == 14  # 4, 8, ..., 52
    assert report.first_bad_record is None


def test_two_hundred_and_forty_random_mutations_are_all_detected(big_log: Path, writer_key, tmp_path) -> None:
    rng = random.Random(20250301)
    trusted = [writer_key.public_key()]
    assert not Path(f"{big_log}-wal").exists()
    misses: list[str] = []
    for round_ in range(40):
        for mutation in MUTATIONS:
            target = tmp_path / f"tampered-{round_}-{mutation.__name__}.db"
            expected = tampered_copy(big_log, target, mutation, rng)
            report = verify(target, trusted)
            if report.ok:
                misses.append(f"{mutation.__name__} round {round_}: not detected")
            elif report.first_bad_record != expected:
                misses.append(
                    f"{mutation.__name__} round {round_}: named {report.first_bad_record}, not {expected}"
                )
            target.unlink()
    assert misses == []


def test_an_edited_field_is_named_even_when_the_attacker_recomputes_the_leaf_hash(
    big_log, writer_key
) -> None:
    with sqlite3.connect(big_log) as db:
        (body,) = db.execute("SELECT body FROM records WHERE idx = 5").fetchone()
        edited = body.replace(b'"num_tokens":1', b'"num_tokens":2')
        assert edited != body
        db.execute("UPDATE records SET body = ?, leaf_hash = ? WHERE idx = 5", (edited, leaf_hash(edited)))
    report = verify(big_log, [writer_key.public_key()])
    assert report.first_bad_record == 5
    assert report.problems[0].code == "bad_seal"
    with pytest.raises(AuditIntegrityError, match="first bad record 5"):
        report.raise_for_problems()


def test_a_non_canonical_rewrite_of_the_same_event_is_caught(big_log, writer_key) -> None:
    with sqlite3.connect(big_log) as db:
        (body,) = db.execute("SELECT body FROM records WHERE idx = 3").fetchone()
        db.execute("UPDATE records SET body = ? WHERE idx = 3", (json.dumps(json.loads(body), indent=1),))
    report = verify(big_log, [writer_key.public_key()])
    assert report.first_bad_record == 3
    assert report.problems[0].code == "non_canonical_record"


def test_truncation_is_named_by_the_first_missing_record(big_log, writer_key) -> None:
    with sqlite3.connect(big_log) as db:
        db.execute("DELETE FROM records WHERE idx >= 50")
    report = verify(big_log, [writer_key.public_key()])
    assert report.first_bad_record == 50
    assert [p.code for p in report.problems] == ["checkpoint_beyond_log"]


def test_truncating_records_and_their_checkpoints_is_caught_by_an_anchor(big_log, writer_key) -> None:
    trusted = [writer_key.public_key()]
    with sqlite3.connect(big_log) as db:
        (anchor_body,) = db.execute("SELECT body FROM checkpoints WHERE tree_size = 52").fetchone()
        db.execute("DELETE FROM records WHERE idx >= 45")
        db.execute("DELETE FROM checkpoints WHERE tree_size > 44")
    assert verify(big_log, trusted).ok  # without an outside copy, a clean cut looks like a shorter log
    report = verify(big_log, trusted, anchor=Checkpoint.model_validate_json(anchor_body))
    assert not report.ok and report.first_bad_record == 45


def test_an_anchor_from_the_same_log_passes(big_log, writer_key) -> None:
    with sqlite3.connect(big_log) as db:
        (anchor_body,) = db.execute("SELECT body FROM checkpoints WHERE tree_size = 20").fetchone()
    assert verify(big_log, [writer_key.public_key()], anchor=Checkpoint.model_validate_json(anchor_body)).ok


def test_a_checkpoint_resigned_with_a_wrong_key_is_reported(big_log, writer_key) -> None:
    with sqlite3.connect(big_log) as db:
        resign_checkpoint(db, random.Random(1))
    report = verify(big_log, [writer_key.public_key()])
    assert [p.code for p in report.problems][:1] == ["checkpoint_signature"]


def test_a_log_checked_against_the_wrong_key_fails_from_record_zero(big_log) -> None:
    report = verify(big_log, [ATTACKER.public_key()])
    assert not report.ok and report.first_bad_record == 0
    assert report.problem_count > len(report.problems) or report.problem_count == len(report.problems)


def test_records_after_the_last_checkpoint_are_counted_as_unanchored(
    tmp_path, writer_key, clock, swarm
) -> None:
    path = tmp_path / "open.db"
    log = AuditLog(
        path, signing_key=writer_key, settings=AuditSettings(checkpoint_every_records=4), clock=clock
    )
    for i in range(6):
        log.append(swarm.transfer_pair(session_id="s", step=i, node_id=NODE_A, span=(0, 4), num_tokens=1)[0])
    report = verify(path, [writer_key.public_key()])  # read while the writer is still open
    assert report.ok and report.unanchored_records == 2
    log.close()


def test_a_missing_file_or_a_foreign_database_is_an_audit_error(tmp_path) -> None:
    with pytest.raises(AuditError, match="no audit log"):
        verify(tmp_path / "absent.db", [])
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(AuditError):
        verify(foreign, [])


def test_deleting_every_checkpoint_is_reported(big_log: Path, writer_key, tmp_path) -> None:
    copy = tmp_path / "no-checkpoints.db"
    shutil.copyfile(big_log, copy)
    with sqlite3.connect(copy) as db:
        db.execute("DELETE FROM checkpoints")
    report = verify(copy, [writer_key.public_key()])
    assert not report.ok
    assert [p.code for p in report.problems] == ["no_checkpoint"]
    assert report.problems[0].detail == "the log has 52 records and no checkpoint"


def test_cutting_the_tail_with_the_checkpoints_behind_it_is_reported_at_the_session_close(
    write_log, scenario: ScenarioLogs, writer_key, tmp_path
) -> None:
    """Records and the checkpoints that covered them are cut; a session close is left uncovered."""
    path = write_log(scenario.client_events, checkpoint_every_records=1000)  # checkpoints at closes only
    with sqlite3.connect(path) as db:
        sizes = [size for (size,) in db.execute("SELECT tree_size FROM checkpoints ORDER BY tree_size")]
        assert len(sizes) >= 2
        db.execute("DELETE FROM checkpoints WHERE tree_size > ?", (sizes[0],))
    report = verify(path, [writer_key.public_key()])
    assert not report.ok
    (problem,) = [p for p in report.problems if p.code == "close_not_checkpointed"]
    assert problem.detail.startswith("session close at record ")
    assert f"checkpoints after record {sizes[0] - 1} are missing" in problem.detail
