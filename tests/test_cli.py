"""The command line: model import and verify, certificates, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fincluster.cli import main
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
