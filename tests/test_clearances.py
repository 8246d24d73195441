"""Clearances come from the operator: inline settings and a file every node shares, re-read on change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fincluster.bootstrap import trust_from_settings
from fincluster.errors import ConfigurationError
from fincluster.settings import TrustSettings
from fincluster.trust.clearances import Clearances, read_clearances_file
from fincluster.trust.pki import Role
from fincluster.trust.policy import Classification
from tests.helpers import POLICY_DIR, Pki

ALICE = "spiffe://bank.example/client/alice"
BOB = "spiffe://bank.example/client/bob"


def rewrite(path: Path, text: str) -> None:
    """Replace the file the way config management does (a new inode), so the change is seen at once."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_toml_and_json_files_give_the_same_clearances(tmp_path: Path) -> None:
    toml = tmp_path / "clearances.toml"
    toml.write_text(f'"{ALICE}" = "confidential"\n"{BOB}" = "internal"\n')
    json_file = tmp_path / "clearances.json"
    json_file.write_text(f'{{"{ALICE}": "confidential", "{BOB}": "internal"}}')
    expected = {ALICE: Classification.CONFIDENTIAL, BOB: Classification.INTERNAL}
    assert read_clearances_file(toml) == read_clearances_file(json_file) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'"{ALICE}" = "secret"',
            rf"{ALICE} has clearance 'secret'; use one of public, internal, confidential",
        ),
        ('"spiffe://bank.example/server/a" = "public"', "is not a client SPIFFE id"),
        ("[alice]\nlevel = 'internal'", "must be a flat mapping"),
        ("= broken", "does not parse"),
    ],
    ids=["unknown-level", "not-a-client", "nested", "syntax"],
)
def test_a_bad_clearances_file_is_refused_at_start(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "clearances.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        Clearances({}, path)


def test_the_file_is_reread_when_it_changes_and_fails_closed_when_it_breaks(tmp_path: Path) -> None:
    path = tmp_path / "clearances.toml"
    path.write_text(f'"{ALICE}" = "internal"\n')
    clearances = Clearances({BOB: Classification.PUBLIC}, path)
    assert dict(clearances) == {ALICE: Classification.INTERNAL, BOB: Classification.PUBLIC}
    rewrite(path, f'"{ALICE}" = "restricted"\n')
    assert clearances.get(ALICE) is Classification.RESTRICTED
    rewrite(path, "not toml at all [")
    assert clearances.get(ALICE) is None  # fail closed: alice falls back to public
    assert dict(clearances) == {BOB: Classification.PUBLIC}
    rewrite(path, f'"{ALICE}" = "internal"\n')
    assert clearances.get(ALICE) is Classification.INTERNAL


def test_one_client_with_two_different_levels_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "clearances.toml"
    path.write_text(f'"{ALICE}" = "internal"\n')
    with pytest.raises(
        ConfigurationError, match=r"cleared for confidential in trust\.clearances but for internal"
    ):
        Clearances({ALICE: Classification.CONFIDENTIAL}, path)


def test_trust_settings_read_the_shared_file(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "clearances.json"
    path.write_text(f'{{"{ALICE}": "confidential"}}')
    settings = TrustSettings(policy_dir=POLICY_DIR, clearances={BOB: "internal"}, clearances_file=path)
    trust = trust_from_settings(settings, pki.credential(Role.CLIENT, "analyst"))
    assert trust.clearance_of(ALICE) is Classification.CONFIDENTIAL
    assert trust.clearance_of(BOB) is Classification.INTERNAL
    assert trust.clearance_of("spiffe://bank.example/client/eve") is Classification.PUBLIC
