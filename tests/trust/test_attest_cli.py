"""``fincluster attest``: keygen -> issue -> verify round trip, and the failures that must exit 2."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path

import pytest

from fincluster.errors import FinclusterError
from fincluster.store import ModelStore
from fincluster.trust.commands import register
from fincluster.trust.pki import CertificateAuthority, Credential, Role, public_key_digest

TRUST_DOMAIN = "bank.example"


def run(argv: list[str]) -> int:
    """Parse and dispatch like ``fincluster.cli.main``: a FinclusterError is exit code 2."""
    parser = argparse.ArgumentParser(prog="fincluster")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except FinclusterError as error:
        print(f"fincluster: error: {error}", file=sys.stderr)
        return 2
    return code


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca"), trust_domain=TRUST_DOMAIN)


@pytest.fixture(scope="module")
def server_a(ca: CertificateAuthority) -> Credential:
    return ca.issue(Role.SERVER, "a")


@pytest.fixture(scope="module")
def server_b(ca: CertificateAuthority) -> Credential:
    return ca.issue(Role.SERVER, "b")


@pytest.fixture
def authority(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "authority.key", tmp_path / "authority.pub"
    assert run(["attest", "keygen", "--private", str(private), "--public", str(public)]) == 0
    return private, public


def issue(authority_key: Path, cert: Path, store: ModelStore, out: Path, *extra: str) -> int:
    return run(
        [
            "attest",
            "issue",
            "--authority-key",
            str(authority_key),
            "--cert",
            str(cert),
            "--tier",
            "trusted",
            "--zone",
            "eu-fra",
            "--hardware",
            "h100-cc",
            "--software-version",
            "0.1.0",
            "--store",
            str(store.path),
            "--out",
            str(out),
            *extra,
        ]
    )


def test_keygen_prints_the_key_id_and_keeps_the_private_key_private(tmp_path: Path, capsys) -> None:
    private, public = tmp_path / "authority.key", tmp_path / "authority.pub"
    assert run(["attest", "keygen", "--private", str(private), "--public", str(public)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attestation authority key ")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()


def test_keygen_refuses_to_overwrite_an_authority_key(authority: tuple[Path, Path], capsys) -> None:
    private, public = authority
    assert run(["attest", "keygen", "--private", str(private), "--public", str(public)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_issue_then_verify_round_trips_the_claims(
    authority: tuple[Path, Path], server_a: Credential, tiny_llama_store: ModelStore, tmp_path: Path, capsys
) -> None:
    private, public = authority
    token = tmp_path / "a.jwt"
    capsys.readouterr()
    assert issue(private, server_a.cert_path, tiny_llama_store, token, "--ttl", "2h") == 0
    issued = capsys.readouterr().out
    assert f"for {server_a.spiffe_id} (tier trusted)" in issued and "expires " in issued

    assert run(["attest", "verify", str(token), "--authority-public", str(public)]) == 0
    claims = json.loads(capsys.readouterr().out)
    assert claims["attestation_id"] in issued
    assert claims["node_id"] == server_a.spiffe_id == f"spiffe://{TRUST_DOMAIN}/server/a"
    assert claims["tls_key_sha256"] == public_key_digest(server_a.cert_path.read_bytes())
    assert claims["model_manifest_sha256"] == tiny_llama_store.manifest_digest
    assert (claims["tier"], claims["zone"], claims["hardware"], claims["software_version"]) == (
        "trusted",
        "eu-fra",
        "h100-cc",
        "0.1.0",
    )
    assert claims["expires_at"] in issued

    argv = ["attest", "verify", str(token), "--authority-public", str(public)]
    assert run([*argv, "--cert", str(server_a.cert_path)]) == 0


def test_a_token_checked_against_another_authority_key_exits_2(
    authority: tuple[Path, Path], server_a: Credential, tiny_llama_store: ModelStore, tmp_path: Path, capsys
) -> None:
    private, _ = authority
    token = tmp_path / "a.jwt"
    assert issue(private, server_a.cert_path, tiny_llama_store, token) == 0
    other_private, other_public = tmp_path / "other.key", tmp_path / "other.pub"
    assert run(["attest", "keygen", "--private", str(other_private), "--public", str(other_public)]) == 0
    capsys.readouterr()

    assert run(["attest", "verify", str(token), "--authority-public", str(other_public)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown_key: no trusted authority key" in captured.err


def test_verify_accepts_the_token_when_any_given_authority_key_signed_it(
    authority: tuple[Path, Path], server_a: Credential, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    private, public = authority
    token = tmp_path / "a.jwt"
    assert issue(private, server_a.cert_path, tiny_llama_store, token) == 0
    other_public = tmp_path / "other.pub"
    assert run(["attest", "keygen", "--private", str(tmp_path / "o.key"), "--public", str(other_public)]) == 0
    keys = ["--authority-public", str(other_public), "--authority-public", str(public)]
    assert run(["attest", "verify", str(token), *keys]) == 0


def test_a_token_presented_with_another_nodes_certificate_fails_key_binding(
    authority: tuple[Path, Path],
    server_a: Credential,
    server_b: Credential,
    tiny_llama_store: ModelStore,
    tmp_path: Path,
    capsys,
) -> None:
    private, public = authority
    token = tmp_path / "a.jwt"
    assert issue(private, server_a.cert_path, tiny_llama_store, token) == 0
    capsys.readouterr()

    argv = ["attest", "verify", str(token), "--authority-public", str(public)]
    assert run([*argv, "--cert", str(server_b.cert_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "key_mismatch" in captured.err


def test_a_tampered_token_exits_2(
    authority: tuple[Path, Path], server_a: Credential, tiny_llama_store: ModelStore, tmp_path: Path, capsys
) -> None:
    private, public = authority
    token = tmp_path / "a.jwt"
    assert issue(private, server_a.cert_path, tiny_llama_store, token) == 0
    header, payload, signature = token.read_text().strip().split(".")
    token.write_text(f"{header}.{payload}.{signature[:-4]}AAAA\n")
    capsys.readouterr()
    assert run(["attest", "verify", str(token), "--authority-public", str(public)]) == 2
    assert "bad_signature" in capsys.readouterr().err


def test_issue_refuses_an_invalid_claim_with_exit_2(
    authority: tuple[Path, Path], server_a: Credential, tiny_llama_store: ModelStore, tmp_path: Path, capsys
) -> None:
    private, _ = authority
    token = tmp_path / "a.jwt"
    assert issue(private, server_a.cert_path, tiny_llama_store, token, "--ttl", "soon") == 2
    assert "not a duration" in capsys.readouterr().err
    argv = ["attest", "issue", "--authority-key", str(private), "--cert", str(server_a.cert_path)]
    argv += ["--tier", "standard", "--zone", "eu fra", "--hardware", "cpu", "--software-version", "0.1.0"]
    assert run([*argv, "--store", str(tiny_llama_store.path), "--out", str(token)]) == 2
    assert "cannot attest zone='eu fra'" in capsys.readouterr().err
    assert not token.exists()
