"""Settings come from arguments, then FINCLUSTER_* environment variables, then a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fincluster.errors import ConfigurationError
from fincluster.settings import load_settings


def test_toml_file_then_environment_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "fincluster.toml"
    config.write_text(
        "[server]\nport = 7001\nmax_session_length = 512\n"
        '[trust]\nclearances = {"spiffe://b/client/a" = "internal"}\n'
    )
    monkeypatch.delenv("FINCLUSTER_CONFIG", raising=False)
    settings = load_settings(config)
    assert settings.server.port == 7001 and settings.server.max_session_length == 512
    assert settings.trust.clearances == {"spiffe://b/client/a": "internal"}
    monkeypatch.setenv("FINCLUSTER_SERVER__PORT", "7002")
    assert load_settings(config).server.port == 7002
    assert load_settings(config, server={"port": 7003}).server.port == 7003
    assert load_settings(config, server={"port": 7003}).server.max_session_length == 512


def test_unknown_or_invalid_settings_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINCLUSTER_CONFIG", raising=False)
    with pytest.raises(ValidationError, match="port"):
        load_settings(server={"port": 70000})
    with pytest.raises(ValidationError, match="dtype"):
        load_settings(server={"dtype": "float64"})
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
