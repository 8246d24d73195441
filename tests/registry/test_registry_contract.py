"""The ``Registry`` contract, one suite run against every backend: in memory, and on a real etcd.

The etcd backend runs on one etcd member with RBAC on, as the registry service's etcd user (readwrite
on the test prefix only); each test gets its own key prefix. Times are real: TTLs of 1 s.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from fincluster.registry.backend import InMemoryRegistry, Registry
from tests.registry.etcd_cluster import TEST_PREFIX, EtcdCluster
from tests.registry.support import PUT, REMOVED, Watcher, eventually, record

# How late an expired record may still be listed: etcd checks leases every 0.5 s and deletes expired
# keys through its log; the in-memory registry expires on the next call.
EXPIRY_SLACK_S = 3.0


@pytest.fixture(params=["memory", pytest.param("etcd", marks=pytest.mark.e2e)])
def registry(request: pytest.FixtureRequest) -> Iterator[Registry]:
    if request.param == "memory":
        yield InMemoryRegistry()
        return
    etcd: EtcdCluster = request.getfixturevalue("etcd")
    with etcd.registry(prefix=f"{TEST_PREFIX}{uuid.uuid4().hex}/") as backend:
        yield backend


def node_ids(registry: Registry, model: str = "m") -> list[str]:
    return [r.node_id for r in registry.list(model)]


def test_list_returns_live_records_of_the_model_ordered_by_node_id(registry: Registry) -> None:
    for node in ("spiffe://t/server/c", "spiffe://t/server/a", "spiffe://t/server/b"):
        registry.announce(record(node), ttl_seconds=30)
    other = record("spiffe://t/server/x", model="other")
    registry.announce(other, ttl_seconds=30)
    assert registry.list("m") == [
        record("spiffe://t/server/a"),
        record("spiffe://t/server/b"),
        record("spiffe://t/server/c"),
    ]
    assert registry.list("other") == [other]
    assert registry.list("unknown") == []


def test_announce_returns_when_the_record_expires(registry: Registry) -> None:
    before = time.time()
    expires = registry.announce(record("a"), ttl_seconds=30)
    assert before + 30 - 0.5 <= expires <= time.time() + 30 + 0.5


def test_a_changed_record_replaces_the_previous_one(registry: Registry) -> None:
    registry.announce(record("a", address="127.0.0.1:7001"), ttl_seconds=30)
    registry.announce(record("a", address="127.0.0.1:7002", span=(2, 4)), ttl_seconds=30)
    assert registry.list("m") == [record("a", address="127.0.0.1:7002", span=(2, 4))]


def test_announcing_under_another_model_moves_the_node(registry: Registry) -> None:
    registry.announce(record("a"), ttl_seconds=30)
    registry.announce(record("a", model="other"), ttl_seconds=30)
    assert registry.list("m") == []
    assert registry.list("other") == [record("a", model="other")]


def test_withdraw_removes_only_that_node_and_tolerates_unknown_nodes(registry: Registry) -> None:
    registry.announce(record("a"), ttl_seconds=30)
    registry.announce(record("b"), ttl_seconds=30)
    registry.withdraw("a")
    registry.withdraw("a")
    registry.withdraw("never-announced")
    assert node_ids(registry) == ["b"]


def test_a_record_disappears_once_its_ttl_passes_without_refresh(registry: Registry) -> None:
    registry.announce(record("a"), ttl_seconds=1)
    announced = time.monotonic()
    assert node_ids(registry) == ["a"]
    eventually(lambda: node_ids(registry) == [], within=1 + EXPIRY_SLACK_S, what="expiry")
    assert time.monotonic() - announced >= 0.9  # not before its TTL


def test_refreshing_keeps_a_record_alive_past_its_ttl(registry: Registry) -> None:
    registry.announce(record("a"), ttl_seconds=1)
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        time.sleep(0.3)
        registry.announce(record("a"), ttl_seconds=1)
        assert node_ids(registry) == ["a"]


def test_watch_yields_current_records_then_puts_and_removals(registry: Registry) -> None:
    registry.announce(record("b"), ttl_seconds=30)
    registry.announce(record("a"), ttl_seconds=30)
    with Watcher(registry) as watcher:
        current = watcher.take(2)
        assert sorted(current, key=lambda event: event[1].node_id) == [
            (PUT, record("a")),
            (PUT, record("b")),
        ]
        registry.announce(record("c"), ttl_seconds=30)
        assert watcher.next() == (PUT, record("c"))
        registry.withdraw("a")
        assert watcher.next() == (REMOVED, record("a"))


def test_watch_reports_an_expired_record_as_removed(registry: Registry) -> None:
    with Watcher(registry) as watcher:
        registry.announce(record("a"), ttl_seconds=1)
        assert watcher.next() == (PUT, record("a"))
        assert watcher.next(timeout=1 + EXPIRY_SLACK_S) == (REMOVED, record("a"))


def test_refreshing_an_identical_record_emits_no_event_but_a_change_emits_put(registry: Registry) -> None:
    with Watcher(registry) as watcher:
        registry.announce(record("a"), ttl_seconds=30)
        assert watcher.next() == (PUT, record("a"))
        for _ in range(3):
            registry.announce(record("a"), ttl_seconds=30)
        changed = record("a", address="127.0.0.1:7009")
        registry.announce(changed, ttl_seconds=30)
        assert watcher.next() == (PUT, changed)


def test_watch_sees_only_its_model(registry: Registry) -> None:
    with Watcher(registry, model="m") as watcher:
        registry.announce(record("x", model="other"), ttl_seconds=30)
        registry.withdraw("x")
        registry.announce(record("a"), ttl_seconds=30)
        assert watcher.next() == (PUT, record("a"))


def test_setting_stop_ends_the_watch(registry: Registry) -> None:
    registry.announce(record("a"), ttl_seconds=30)
    watcher = Watcher(registry)
    assert watcher.next() == (PUT, record("a"))
    started = time.monotonic()
    assert watcher.close(timeout=3.0), "watch still running 3 s after stop was set"
    assert time.monotonic() - started < 3.0
    assert watcher.failure is None
