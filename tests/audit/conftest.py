"""Fixtures for the audit tests (the building blocks live in ``audit_scenario``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from audit_scenario import FakeClock, ScenarioLogs, Swarm, client_scenario, ed25519_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fincluster.audit import AuditLog, AuditSettings

WriteLog = Callable[..., Path]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def writer_key() -> Ed25519PrivateKey:
    return ed25519_key("client audit writer")


@pytest.fixture
def swarm(clock: FakeClock) -> Swarm:
    return Swarm(clock=clock)


@pytest.fixture
def scenario(swarm: Swarm) -> ScenarioLogs:
    return client_scenario(swarm)


@pytest.fixture
def write_log(tmp_path: Path, writer_key: Ed25519PrivateKey, clock: FakeClock) -> WriteLog:
    """Write events to a new log file (checkpoint every 4 records by default) and close it."""

    def write(events: list[Any], *, name: str = "audit.db", **settings: Any) -> Path:
        path = tmp_path / name
        options: dict[str, Any] = {"checkpoint_every_records": 4} | settings
        origin = options.pop("origin", "client.analyst-1")
        with AuditLog(
            path, signing_key=writer_key, origin=origin, settings=AuditSettings(**options), clock=clock
        ) as log:
            for event in events:
                log.append(event)
        return path

    return write


@pytest.fixture
def fixture_log(write_log: WriteLog, scenario: ScenarioLogs) -> Path:
    """The client log of :func:`client_scenario`; byte-for-byte deterministic."""
    return write_log(scenario.client_events)
