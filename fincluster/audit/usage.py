"""Usage from audit logs: tokens per client, department and node (``fincluster audit usage``).

What a node computed for whom is what its own log records (``observer="server"``); a client's log
says what it sent. Each row counts the transfers and tokens of one (client, node) pair, and the
token-blocks (tokens times blocks computed: what department quotas on a server are charged in).
Replays after a failover and re-executions for verification count: the node did that work.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime

from fincluster.audit.events import AuditEvent, Observer, TransferEvent
from fincluster.audit.names import UNASSIGNED
from fincluster.values import FrozenModel


class UsageRow(FrozenModel):
    client_id: str
    department: str
    node_id: str
    transfers: int
    tokens: int
    token_blocks: int
    first: datetime
    last: datetime


def usage(
    events: Iterable[AuditEvent],
    *,
    observer: Observer,
    departments: Mapping[str, str],
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[UsageRow, ...]:
    """Rows sorted by department, client and node, of the transfers ``observer`` recorded in the
    window (``since`` inclusive, ``until`` exclusive)."""
    groups: dict[tuple[str, str], list[TransferEvent]] = defaultdict(list)
    for event in events:
        if not isinstance(event, TransferEvent) or event.observer != observer:
            continue
        if (since is not None and event.time < since) or (until is not None and event.time >= until):
            continue
        groups[(event.client_id, event.node_id)].append(event)
    rows = [
        UsageRow(
            client_id=client_id,
            department=departments.get(client_id, UNASSIGNED),
            node_id=node_id,
            transfers=len(transfers),
            tokens=sum(e.num_tokens for e in transfers),
            token_blocks=sum(e.num_tokens * len(e.block_span) for e in transfers),
            first=min(e.time for e in transfers),
            last=max(e.time for e in transfers),
        )
        for (client_id, node_id), transfers in groups.items()
    ]
    return tuple(sorted(rows, key=lambda r: (r.department, r.client_id, r.node_id)))
