"""The command line: model import and verify, certificates, and clear errors."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fincluster.cli import build_parser, main
from fincluster.store import ModelStore
from tests.helpers import tiny_model


def test_model_import_and_verify_from_a_transformers_directory(tmp_path: Path, capsys) -> None:
    source = tmp_path / "hf"
    tiny_model("qwen2").save_pretrained(source)
    assert main(["model", "import", str(source), "--out", str(tmp_path / "store")]) == 0
    out = capsys.readouterr()
    assert "imported hf: 6 blocks" in out.out
    assert "blocks: 6/6" in out.err  # progress
    assert main(["model", "verify", str(tmp_path / "store")]) == 0
    assert "all 8 files match the manifest" in capsys.readouterr().out  # config, client part, 6 blocks


def test_tampered_store_fails_verify_with_the_file_named(tmp_path: Path, capsys) -> None:
    source = tmp_path / "hf"
    tiny_model("llama").save_pretrained(source)
    main(["model", "import", str(source), "--out", str(tmp_path / "store")])
    block = tmp_path / "store" / "blocks" / "block_00003.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["model", "verify", str(tmp_path / "store")]) == 2
    assert "block_00003.safetensors" in capsys.readouterr().err


def test_import_refuses_to_overwrite_a_store(tmp_path: Path, capsys) -> None:
    source = tmp_path / "hf"
    tiny_model("llama").save_pretrained(source)
    assert main(["model", "import", str(source), "--out", str(tmp_path / "store")]) == 0
    assert main(["model", "import", str(source), "--out", str(tmp_path / "store")]) == 2
    assert "fincluster: error:" in capsys.readouterr().err
    ModelStore.open(tmp_path / "store").verify()


def test_certs_init_issue_revoke(tmp_path: Path, capsys) -> None:
    certs = tmp_path / "certs"
    assert main(["certs", "init-ca", "--dir", str(certs), "--trust-domain", "bank.example"]) == 0
    assert (
        main(["certs", "issue", "--dir", str(certs), "--role", "server", "--name", "gpu-1", "--ttl", "2h"])
        == 0
    )
    out = capsys.readouterr().out
    assert "spiffe://bank.example/server/gpu-1" in out
    key = certs / "nodes" / "server-gpu-1.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert main(["certs", "revoke", str(certs / "nodes" / "server-gpu-1.pem"), "--dir", str(certs)]) == 0
    assert main(["certs", "issue", "--dir", str(certs), "--role", "server", "--name", "bad name!"]) == 2


def test_serve_without_tls_material_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fincluster", "serve", "--store", str(tmp_path), "--blocks", "0:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "TLS material is required" in result.stderr


@pytest.mark.parametrize("argv", [["model"], ["certs", "issue"], ["nonsense"]])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def operator_parsers() -> dict[str, argparse.ArgumentParser]:
    """The commands an operator runs: certs *, registry, serve, generate, demo."""
    top = subcommands(build_parser())
    found = {f"certs {name}": sub for name, sub in subcommands(top["certs"]).items()}
    found.update({name: top[name] for name in ("registry", "serve", "generate", "demo")})
    return found


def test_every_operator_flag_has_help_and_shows_its_default() -> None:
    parsers = operator_parsers()
    assert sorted(parsers) == [
        "certs init-ca",
        "certs issue",
        "certs list",
        "certs renew",
        "certs revoke",
        "certs rotate",
        "demo",
        "generate",
        "registry",
        "serve",
    ]
    for name, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.default is not None and action.default is not False:
                assert f"(default: {action.default})" in text, f"{name} {action.option_strings}: no default"
    serve = " ".join(parsers["serve"].format_help().split())
    assert (
        "--port PORT port to bind; 0 picks a free port (default: 0; env FINCLUSTER_SERVER__PORT, "
        "TOML [server] port)" in serve
    )
    assert "--host HOST address to bind (0.0.0.0: every interface) (default: 127.0.0.1;" in serve
    assert "FINCLUSTER_SERVER__PUBLIC_ADDRESS, TOML [server] public_address" in serve
    registry = " ".join(parsers["registry"].format_help().split())
    assert "env FINCLUSTER_REGISTRY__PUBLIC_ADDRESS, TOML [registry] public_address" in registry
    assert "4 block servers" in subcommands(build_parser())["demo"].description


def test_top_level_help_lists_exactly_the_commands_that_exist(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    listed = re.findall(r"^    (\w+) ", text, re.MULTILINE)
    assert listed == [
        "attest",
        "adapters",
        "audit",
        "certs",
        "model",
        "registry",
        "serve",
        "generate",
        "status",
        "demo",
    ]
    assert sorted(subcommands(build_parser())) == sorted(listed)
    mentioned = set(re.findall(r"``([a-z]+)``", text.split("positional arguments")[0])) - {"fincluster"}
    assert mentioned == set(listed)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (
            ["serve", "--port", "70000"],
            {},
            "fincluster: error: invalid setting server.port=70000: Input should be less than or equal to "
            "65535 (FINCLUSTER_SERVER__PORT)",
        ),
        (
            ["serve"],
            {"FINCLUSTER_SERVER__CACHE_BUDGET_BYTES": "lots"},
            "fincluster: error: invalid setting server.cache_budget_bytes='lots': Input should be a valid "
            "integer, unable to parse string as an integer (FINCLUSTER_SERVER__CACHE_BUDGET_BYTES)",
        ),
        (
            ["registry", "--host", "0.0.0.0"],
            {"FINCLUSTER_REGISTRY__PROT": "7000"},
            "fincluster: error: invalid setting registry.prot='7000': Extra inputs are not permitted "
            "(FINCLUSTER_REGISTRY__PROT)",
        ),
    ],
    ids=["flag", "environment", "unknown-key"],
)
def test_a_bad_setting_is_one_error_line(argv: list[str], env: dict[str, str], expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fincluster", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [expected]


def test_a_bad_setting_in_the_toml_file_is_one_error_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[server]\nblocks = "ten:twenty"\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "fincluster: error: invalid setting server.blocks='ten:twenty'"
    )


def test_certs_attest_and_audit_commands_never_import_torch(tmp_path: Path, tiny_llama_store) -> None:
    """They start in well under a second because the CLI's import path holds no torch/transformers."""
    code = f"""
import sys
from pathlib import Path
from fincluster.cli import main
d = Path({str(tmp_path)!r})
assert main(["certs", "init-ca", "--dir", str(d / "ca"), "--trust-domain", "bank.example"]) == 0
assert main(["certs", "issue", "--dir", str(d / "ca"), "--role", "server", "--name", "a"]) == 0
assert main(["attest", "keygen", "--private", str(d / "k"), "--public", str(d / "k.pub")]) == 0
assert main(["attest", "issue", "--authority-key", str(d / "k"), "--cert", str(d / "ca/nodes/server-a.pem"),
             "--tier", "trusted", "--zone", "eu-fra", "--hardware", "cpu", "--software-version", "1",
             "--manifest", {str(tiny_llama_store.path / "manifest.json")!r}, "--out", str(d / "a.jwt")]) == 0
for argv in (["--help"], ["audit", "verify", "--help"], ["serve", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(name for name in ("torch", "transformers", "safetensors") if name in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"manifest sha256 {tiny_llama_store.manifest_digest}" in result.stdout


def test_attest_issue_from_the_manifest_alone_binds_the_store_digest(
    tmp_path: Path, tiny_llama_store, capsys
) -> None:
    from fincluster.trust.attestation import AuthorityKeys, verify_attestation

    certs = tmp_path / "certs"
    assert main(["certs", "init-ca", "--dir", str(certs), "--trust-domain", "bank.example"]) == 0
    assert main(["certs", "issue", "--dir", str(certs), "--role", "server", "--name", "gpu-a"]) == 0
    offline = tmp_path / "offline"  # the security machine: a certificate and a manifest, no store
    offline.mkdir()
    shutil.copy(tiny_llama_store.path / "manifest.json", offline / "manifest.json")
    keys = ["--private", str(offline / "authority.key"), "--public", str(offline / "authority.pub")]
    assert main(["attest", "keygen", *keys]) == 0
    argv = ["attest", "issue", "--authority-key", str(offline / "authority.key")]
    argv += ["--cert", str(certs / "nodes" / "server-gpu-a.pem"), "--tier", "trusted", "--zone", "eu-fra"]
    argv += ["--hardware", "h100", "--software-version", "0.1.0", "--out", str(offline / "a.jwt")]
    assert main([*argv, "--manifest", str(offline / "manifest.json")]) == 0
    out = capsys.readouterr().out
    assert f"model   tiny-llama, manifest sha256 {tiny_llama_store.manifest_digest}" in out
    token = (offline / "a.jwt").read_text().strip()
    keys_ = AuthorityKeys.from_files([offline / "authority.pub"])
    claims = verify_attestation(token, authority_keys=keys_, now=datetime.now(UTC))
    assert claims.model_manifest_sha256 == tiny_llama_store.manifest_digest
    (offline / "manifest.json").write_text("{}")
    assert main([*argv, "--manifest", str(offline / "manifest.json")]) == 2
    assert "is not a valid store manifest" in capsys.readouterr().err


def test_serve_blocks_auto_needs_a_registry_to_place_against(
    pki, tiny_llama_store, cli_logging, capsys
) -> None:
    from fincluster.trust.pki import Role

    credential = pki.credential(Role.SERVER, "auto-cli")
    tls = ["--ca-cert", str(credential.ca_cert_path), "--cert", str(credential.cert_path)]
    tls += ["--key", str(credential.key_path)]
    argv = ["serve", "--store", str(tiny_llama_store.path), "--blocks", "auto", "--num-blocks", "3", *tls]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "fincluster: error: --blocks auto needs --registry: the span is chosen from the swarm's records\n"
    )
    serve = " ".join(subcommands(build_parser())["serve"].format_help().split())
    assert 'block span START:END this server hosts, or "auto": chosen where the swarm needs it' in serve
    assert (
        "--num-blocks NUM_BLOCKS with --blocks auto: how many blocks (none: as many as memory holds)" in serve
    )
    assert (
        "--metrics-port METRICS_PORT HTTP port of Prometheus /metrics (none: off; 0: any free port)" in serve
    )
