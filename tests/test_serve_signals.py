"""``fincluster serve`` stops on SIGTERM: it withdraws, drains, closes its audit log and exits 0.

On a GPU host the signal was ignored: CUDA's driver threads can be the ones the kernel delivers a
process signal to, and a main thread blocked in an untimed ``Event.wait()`` never ran the handler.
The first test reproduces exactly that delivery on CPU (``pthread_kill`` to a non-main thread).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fincluster.audit import verify
from fincluster.audit.keys import KeyRing
from fincluster.registry.server import RegistryServer
from fincluster.store import ModelStore
from fincluster.trust.pki import Role, load_certificate
from tests.helpers import Pki, spawn_server

ROOT = Path(__file__).resolve().parents[1]


def test_a_signal_delivered_to_another_thread_still_stops_the_wait() -> None:
    program = textwrap.dedent(
        """
        import signal, threading, time
        from fincluster.cli import _wait_for_signal

        def deliver_to_a_worker_thread():
            time.sleep(0.3)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # this thread, not the main one
            time.sleep(5)

        threading.Thread(target=deliver_to_a_worker_thread, daemon=True).start()
        started = time.monotonic()
        _wait_for_signal(lambda: print(f"stopped after {time.monotonic() - started:.2f}", flush=True))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    seconds = float(result.stdout.split()[-1])
    assert 0.3 <= seconds < 1.5


@pytest.mark.e2e
def test_serve_withdraws_closes_its_audit_log_and_exits_0_on_sigterm(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    from fincluster.client import DistributedModelForCausalLM, Swarm

    registry = RegistryServer(pki.credential(Role.REGISTRY, "registry"))
    address = registry.start()
    audit_dir = tmp_path / "audit"
    process = spawn_server(
        pki,
        tiny_llama_store,
        "sigterm",
        "0:6",
        address,
        extra_args=["--audit-dir", str(audit_dir)],
        ttl_seconds=60,  # a withdrawal, not an expiry, must be what removes it
    )
    try:
        with Swarm(registry=address, credential=pki.credential(Role.CLIENT, "analyst")) as swarm:
            model = DistributedModelForCausalLM.from_pretrained(
                tiny_llama_store, swarm=swarm, classification="public"
            )
            ids = torch.tensor([[5, 6, 7]])
            assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
        assert len(registry.backend.list(tiny_llama_store.model_id)) == 1
        started = time.monotonic()
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=15) == 0
        assert time.monotonic() - started < 5
        assert registry.backend.list(tiny_llama_store.model_id) == []
    finally:
        process.kill()
        registry.stop(0)
    credential = pki.credential(Role.SERVER, "sigterm")
    report = verify(audit_dir / "server-sigterm.sqlite", KeyRing.of([load_certificate(credential.read()[1])]))
    assert report.ok and report.record_count >= 3
    assert report.unanchored_records == 0  # the close wrote its final checkpoint
