"""Export a log as JSON Lines for a SIEM, in log order, one object per line.

``{"type": "prune_marker", "marker": {...}}`` first if the log was pruned, then every
``{"type": "record", "index": i, "leaf_hash": ..., "key_id": ..., "seal": ..., "event": {...}}``
with each ``{"type": "checkpoint", "checkpoint": {...}}`` right after the record it closes.
Lines are RFC 8785 canonical JSON, and the embedded ``event`` re-canonicalises to the exact stored
record bytes, so a SIEM copy can be checked against the same leaf hashes and checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import rfc8785

from fincluster.audit.store import SqliteStore

JsonObject = dict[str, Any]


def export_jsonl(db_path: Path | str, out: TextIO) -> int:
    """Write the log to ``out``; return the number of lines written."""
    store = SqliteStore(db_path, read_only=True)
    try:
        lines = 0
        for item in _items(store):
            out.write(rfc8785.dumps(item).decode() + "\n")
            lines += 1
    finally:
        store.close()
    return lines


def _items(store: SqliteStore) -> Iterator[JsonObject]:
    for _, body in store.prune_markers():
        yield {"type": "prune_marker", "marker": _json(body)}
    checkpoints = store.checkpoints()
    pending = 0
    for record in store.records():
        while pending < len(checkpoints) and checkpoints[pending][0] <= record.index:
            yield {"type": "checkpoint", "checkpoint": _json(checkpoints[pending][1])}
            pending += 1
        yield {
            "type": "record",
            "index": record.index,
            "leaf_hash": record.leaf_hash.hex(),
            "key_id": record.key_id,
            "seal": record.seal.hex(),
            "event": _json(record.body),
        }
    for _, body in checkpoints[pending:]:
        yield {"type": "checkpoint", "checkpoint": _json(body)}


def _json(body: bytes) -> Any:
    """The stored JSON; a body that is not JSON (a damaged file) is exported as text, not dropped."""
    try:
        return json.loads(body)
    except ValueError:
        return {"unparseable": body.decode(errors="replace")}
