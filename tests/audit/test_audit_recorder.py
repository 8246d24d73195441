"""capture_audit_events(): users' tests can see the events a call produced."""

from __future__ import annotations

import threading

from audit_scenario import NODE_A, Swarm

from fincluster.audit import AuditRecorder, TransferEvent, capture_audit_events, record_event


def test_captured_events_arrive_in_order_from_any_thread(swarm: Swarm) -> None:
    events = [
        swarm.transfer_pair(session_id="s", step=i, node_id=NODE_A, span=(0, 4), num_tokens=1)[0]
        for i in range(3)
    ]
    with capture_audit_events() as captured:
        record_event(None, events[0])
        worker = threading.Thread(target=record_event, args=(None, events[1]))
        worker.start()
        worker.join()
    record_event(None, events[2])  # after the block: not captured
    assert captured.events == (events[0], events[1])
    assert captured.of_kind(TransferEvent) == [events[0], events[1]]


def test_the_sink_receives_the_event_as_well(swarm: Swarm) -> None:
    sink = AuditRecorder()
    event = swarm.transfer_pair(session_id="s", step=0, node_id=NODE_A, span=(0, 4), num_tokens=1)[0]
    with capture_audit_events() as captured:
        record_event(sink, event)
    assert sink.events == captured.events == (event,)


def test_nested_captures_each_see_the_events_of_their_block(swarm: Swarm) -> None:
    first, second = (
        swarm.transfer_pair(session_id="s", step=i, node_id=NODE_A, span=(0, 4), num_tokens=1)[0]
        for i in range(2)
    )
    with capture_audit_events() as outer:
        record_event(None, first)
        with capture_audit_events() as inner:
            record_event(None, second)
    assert outer.events == (first, second)
    assert inner.events == (second,)
