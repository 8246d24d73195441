"""The README's "Deploying a swarm", run for real: ``deploy/example.sh`` step by step, with every
host on a loopback address of its own (127.0.0.11 registry, .12 the trusted server, .13 a standard
server), certificates for those addresses, the deploy/*.toml configs, and a client sending
``internal`` data end to end through ``fincluster generate``. The README must show the steps verbatim.
"""

from __future__ import annotations

import os
import queue
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from fincluster.cli import build_parser
from fincluster.settings import load_settings
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "example.sh"
HOSTS = {"REGISTRY_HOST": "127.0.0.11", "GPU_A_HOST": "127.0.0.12", "GPU_B_HOST": "127.0.0.13"}
PROMPT = "What does a repo rate measure?"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def script_steps() -> dict[str, str]:
    """Each step function of deploy/example.sh: name -> its header comment and body, as in README."""
    text = SCRIPT.read_text()
    steps = {}
    for match in re.finditer(r"^(\w+)\(\) \{  (# .*?)\n(.*?)^\}\n", text, re.MULTILINE | re.DOTALL):
        name, comment, body = match.groups()
        lines = [line.removeprefix("    ") for line in body.rstrip("\n").split("\n")]
        steps[name] = "\n".join([f"# {name}: {comment.removeprefix('# ')}", *lines])
    return steps


def test_the_readme_shows_every_step_of_the_deploy_script_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    steps = script_steps()
    assert list(steps) == ["store", "pki", "attest", "registry", "serve_a", "serve_b", "client"]
    for name, block in steps.items():
        assert block in readme, f"README.md does not show step {name} of deploy/example.sh as:\n{block}"


def test_every_deploy_config_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FINCLUSTER_CONFIG", raising=False)
    for name in ("registry", "server-trusted", "server-standard", "client"):
        settings = load_settings(DEPLOY / f"{name}.toml")
        assert settings.tls is not None and settings.tls.ca_cert == Path("certs/ca.pem")
    trusted = load_settings(DEPLOY / "server-trusted.toml")
    assert str(trusted.server.blocks) == "0:10" and trusted.trust.attestation == Path("gpu-a.jwt")


def test_the_systemd_units_run_commands_the_cli_accepts() -> None:
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        exec_start = next(
            line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith("ExecStart=")
        )
        argv = shlex.split(exec_start.replace("%i", "trusted"))
        assert argv[0].endswith("/fincluster")
        args = build_parser().parse_args(argv[1:])
        assert args.config.name in {"registry.toml", "server-trusted.toml"}
        assert (DEPLOY / args.config.name).is_file()


# -- the rehearsal ----------------------------------------------------------------------------------


def loopback_addresses_work() -> bool:
    try:
        for host in HOSTS.values():
            with socket.socket() as probe:
                probe.bind((host, 0))
    except OSError:
        return False
    return True


def free_port(*hosts: str) -> int:
    """A port that is free on every one of ``hosts``."""
    for _ in range(200):
        port = random.randint(20000, 60000)
        try:
            for host in hosts:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def tiny_checkpoint(directory: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A 30-block random Llama (the README's spans 0:10 and 10:30 fit it) and a word tokenizer."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=30, **TINY)).eval()
    words = [*SPECIALS, *PROMPT.replace("?", " ?").split()]
    words += [f"w{index}" for index in range(TINY["vocab_size"] - len(words))]
    backend = Tokenizer(
        models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@dataclass
class Step:
    """One long-running step of the script (a registry or a server) in its own process."""

    name: str
    popen: subprocess.Popen[str]
    log: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        assert self.popen.stdout is not None
        stdout = self.popen.stdout
        threading.Thread(target=lambda: [self.lines.put(line) for line in stdout], daemon=True).start()

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.popen.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited {self.popen.returncode}:\n{self.log.read_text()}"
                    ) from None
                continue
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"{self.name} did not print {prefix!r}:\n{self.log.read_text()}")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if not loopback_addresses_work():
        pytest.skip("this system has no loopback addresses beyond 127.0.0.1 (Linux has 127.0.0.0/8)")
    base = tmp_path_factory.mktemp("deploy")
    home = base / "fincluster"  # the fincluster directory every "host" works in
    home.mkdir()
    for config in ("registry", "server-trusted", "server-standard", "client", "clearances"):
        shutil.copy(DEPLOY / f"{config}.toml", home)
    shutil.copytree(ROOT / "policies", home / "policies")
    reference, tokenizer = tiny_checkpoint(base / "tiny-llama-30")
    shim = base / "bin" / "fincluster"  # `fincluster` on PATH, running this checkout
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fincluster "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        **HOSTS,
        "REGISTRY_PORT": str(free_port(HOSTS["REGISTRY_HOST"])),
        "SERVER_PORT": str(free_port(HOSTS["GPU_A_HOST"], HOSTS["GPU_B_HOST"])),
        "MODEL": str(base / "tiny-llama-30"),
        "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",  # several processes share CI's two cores
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("FINCLUSTER_CONFIG", None)

    def run(step: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), step],
            cwd=home,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    for step in ("store", "pki", "attest"):
        done = run(step)
        assert done.returncode == 0, f"step {step} failed:\n{done.stdout}\n{done.stderr}"
    running: list[Step] = []

    def start(step: str) -> Step:
        log = base / f"{step}.log"
        popen = subprocess.Popen(
            ["bash", str(SCRIPT), step],
            cwd=home,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            start_new_session=True,
        )
        running.append(Step(step, popen, log))
        return running[-1]

    try:
        registry = start("registry")
        listening = registry.wait_line("registry listening on", 60)
        servers = [start("serve_a"), start("serve_b")]
        serving = [server.wait_line("serving blocks", 120) for server in servers]
        yield {
            "run": run,
            "home": home,
            "env": env,
            "logs": {step.name: step.log for step in running},
            "listening": listening,
            "serving": serving,
            "reference": reference,
            "tokenizer": tokenizer,
        }
    finally:
        for step in reversed(running):  # servers first, so they can withdraw from the registry
            if step.popen.poll() is None:
                os.killpg(step.popen.pid, 15)
            try:
                step.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(step.popen.pid, 9)
                step.popen.wait()


def wait_for_log(path: Path, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{path.name} never logged {text!r}:\n{path.read_text()}")


@pytest.mark.e2e
def test_the_deployed_swarm_answers_internal_data_through_the_attested_prefix(rehearsal) -> None:
    env = rehearsal["env"]
    registry_port, server_port = env["REGISTRY_PORT"], env["SERVER_PORT"]
    assert rehearsal["listening"] == (
        f"registry listening on 127.0.0.11:{registry_port} "
        f"(servers and clients dial 127.0.0.11:{registry_port})"
    )
    assert rehearsal["serving"] == [
        f"serving blocks 0:10 of tiny-llama-30 on 127.0.0.12:{server_port} as spiffe://bank.example/server/gpu-a",
        f"serving blocks 10:30 of tiny-llama-30 on 127.0.0.13:{server_port} as spiffe://bank.example/server/gpu-b",
    ]
    logs = rehearsal["logs"]
    for step in ("serve_a", "serve_b"):
        wait_for_log(logs[step], '"event": "server_announced"')
    registry_log = wait_for_log(logs["registry"], "spiffe://bank.example/server/gpu-b")
    assert registry_log.count('"event": "server_listed"') == 2
    assert "loading blocks 0:10 of tiny-llama-30: 10/10" in logs["serve_a"].read_text()

    done = rehearsal["run"]("client")
    assert done.returncode == 0, done.stderr
    tokenizer, reference = rehearsal["tokenizer"], rehearsal["reference"]
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = tokenizer.decode(
        reference.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :],
        skip_special_tokens=True,
    ).strip()
    lines = done.stdout.splitlines()
    assert lines[0] == expected and expected  # the same tokens as transformers, locally
    assert lines[2] == "placement (internal data, tiny-llama-30)"
    assert re.fullmatch(
        rf"  blocks +0:10  trusted     spiffe://bank\.example/server/gpu-a  127\.0\.0\.12:{server_port}",
        lines[3],
    )
    assert re.fullmatch(
        rf"  blocks +10:30  standard    spiffe://bank\.example/server/gpu-b  127\.0\.0\.13:{server_port}",
        lines[4],
    )
    assert lines[5] == "audit log: audit/client-alice.sqlite"
    assert (rehearsal["home"] / "audit" / "client-alice.sqlite").is_file()


@pytest.mark.e2e
def test_a_client_the_servers_have_not_cleared_gets_the_decision_id_and_the_server_logs_why(
    rehearsal,
) -> None:
    """bob's own config claims internal clearance; the servers' shared clearances file does not list
    him: the trusted server refuses, bob's error carries the decision id, the server's log line the
    client, session, decision and reasons."""
    home, env = rehearsal["home"], rehearsal["env"]
    issued = subprocess.run(
        ["fincluster", "certs", "issue", "--dir", "certs", "--role", "client", "--name", "bob"],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "spiffe://bank.example/client/bob" in issued.stdout
    done = subprocess.run(
        [
            "fincluster",
            "generate",
            "--config",
            "client.toml",
            "--registry",
            f"127.0.0.11:{env['REGISTRY_PORT']}",
            "--ca-cert",
            "certs/ca.pem",
            "--cert",
            "certs/nodes/client-bob.pem",
            "--key",
            "certs/nodes/client-bob.key",
            "--max-new-tokens",
            "2",
            PROMPT,
        ],
        cwd=home,
        env={**env, "FINCLUSTER_TRUST__CLEARANCES": '{"spiffe://bank.example/client/bob": "internal"}'},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    # gpu-a refused, and no other allowed server holds the prefix: the client's one error line says both
    match = re.fullmatch(
        r"fincluster: error: spiffe://bank\.example/server/gpu-a failed on blocks 0:10 \(request refused by "
        r"policy \(decision ([0-9a-f-]{36})\) \(node=spiffe://bank\.example/server/gpu-a, blocks=0:10, "
        r"session=([0-9a-f]{32}), status=PERMISSION_DENIED\)\); no other allowed server can take them "
        r"over .*",
        error,
    )
    assert match, error
    decision, session = match.groups()
    refusal = next(line for line in rehearsal["logs"]["serve_a"].read_text().splitlines() if decision in line)
    assert '"event": "serve_refused"' in refusal
    assert '"client": "spiffe://bank.example/client/bob"' in refusal and f'"session": "{session}"' in refusal
    assert "client clearance does not cover the data classification" in refusal
