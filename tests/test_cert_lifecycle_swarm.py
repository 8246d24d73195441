"""Certificates renewed and rotated under a running swarm: sessions survive a renewal, every log still
verifies and reconciles 100 %, and a rotated node serves classified data again once its new
attestation file is in place, without a restart.

Tiny Llama store (6 blocks); the sensitive prefix is 0:2 and needs an attested trusted node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
import torch

from fincluster.audit import AuditLog, AuditSettings, TransferEvent, read_events, reconcile, verify
from fincluster.audit.keys import KeyRing
from fincluster.audit.node import open_node_audit_log
from fincluster.errors import RoutingError, TrustError
from fincluster.store import ModelStore
from fincluster.trust.archive import load_certificates
from fincluster.trust.pki import Role, public_key_digest
from tests.helpers import Cluster, Pki, TrustKit, running_cluster, tiny_model

pytestmark = pytest.mark.e2e
PROMPT = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(5))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def kit(pki: Pki) -> TrustKit:
    return TrustKit.create(pki)


class Swarm3:
    """lc-t (trusted 0:2, token in a file), lc-a (standard 2:4), lc-b (standard 4:6); every party
    enforces and keeps a real audit log signed with its own (renewable) credential."""

    def __init__(self, cluster: Cluster, kit: TrustKit, directory: Path, tokens: dict[str, Path]) -> None:
        self.cluster, self.kit, self.directory, self.tokens = cluster, kit, directory, tokens
        analyst = kit.pki.credential(Role.CLIENT, "lc-analyst")
        self.trust = kit.context(clearances={analyst.spiffe_id: "confidential"})
        self.client_log = open_node_audit_log(AuditSettings(directory=directory), analyst)

    def server(self, name: str):
        return next(s for s in self.cluster.servers if s.node_id.endswith(f"/{name}"))

    def logs(self) -> list[Path]:
        return sorted(self.directory.glob("*.sqlite"))


@pytest.fixture()
def swarm3(kit: TrustKit, tiny_llama_store: ModelStore, tmp_path: Path) -> Iterator[Swarm3]:
    logs: list[AuditLog] = []
    tokens: dict[str, Path] = {}
    trust = kit.context(clearances={kit.pki.credential(Role.CLIENT, "lc-analyst").spiffe_id: "confidential"})
    with running_cluster(kit.pki, tiny_llama_store, [], registry_trust=trust) as cluster:
        for name, span, tier in (
            ("lc-t", "0:2", "trusted"),
            ("lc-a", "2:4", "standard"),
            ("lc-b", "4:6", "standard"),
        ):
            tokens[name] = tmp_path / f"{name}.jwt"
            tokens[name].write_text(kit.attest(name, tiny_llama_store, tier=tier))
            log = open_node_audit_log(
                AuditSettings(directory=tmp_path), kit.pki.credential(Role.SERVER, name)
            )
            logs.append(log)
            cluster.add_server(name, span, trust=trust, audit=log, attestation=tokens[name])
        cluster.wait_until_listed(3)
        swarm = Swarm3(cluster, kit, tmp_path, tokens)
        yield swarm
        swarm.client_log.close()
    for log in logs:
        log.close()


def all_server_transfers_recorded(swarm: Swarm3, expected: int) -> None:
    def count() -> int:
        paths = [p for p in swarm.logs() if p.name.startswith("server-")]
        return sum(isinstance(e, TransferEvent) for p in paths for e in read_events(p))

    wait_for(lambda: count() >= expected, f"{expected} server transfer records")


def test_logs_verify_and_reconcile_across_renewal_and_rotation(swarm3: Swarm3, tiny_llama_store) -> None:
    """Session 1 runs while lc-t's and the client's certificates are renewed (same key) between its
    generate calls; then lc-b's key is rotated, and session 2 runs on its new key. Every log verifies
    against the CA's archive, and every receipt on both sides reconciles."""
    cluster, ca = swarm3.cluster, swarm3.kit.pki.ca
    reference = tiny_model("llama").generate(PROMPT, max_new_tokens=6, do_sample=False)
    with cluster.swarm("lc-analyst", trust=swarm3.trust, audit=swarm3.client_log) as swarm:
        model = cluster.model(swarm, classification="internal")
        with model.inference_session(max_length=PROMPT.shape[1] + 6):
            first = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
            ca.renew(Role.SERVER, "lc-t")
            ca.renew(Role.CLIENT, "lc-analyst")
            produced = model.generate(first, max_new_tokens=3, do_sample=False)
        assert produced.tolist() == reference.tolist()  # the open session survived the renewals
        old_b = public_key_digest(swarm3.server("lc-b").credential.cert_path.read_bytes())
        ca.rotate(Role.SERVER, "lc-b")
        wait_for(lambda: swarm3.server("lc-b").claims is None, "lc-b dropping its token for the old key")
        assert public_key_digest(swarm3.server("lc-b").credential.cert_path.read_bytes()) != old_b
        time.sleep(1.0)  # lc-b's next announcement carries no token (internal data may use it on 4:6)
        again = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert again.tolist() == reference.tolist()
    swarm3.client_log.checkpoint()
    transfers = [e for e in read_events(swarm3.client_log.path) if isinstance(e, TransferEvent)]
    assert len(transfers) == 2 * 3 * 6
    certificates_of = {
        name: {e.cert_fingerprint for e in transfers if e.node_id.endswith(f"/{name}")}
        for name in ("lc-t", "lc-a", "lc-b")
    }
    assert {name: len(fps) for name, fps in certificates_of.items()} == {"lc-t": 2, "lc-a": 1, "lc-b": 2}
    all_server_transfers_recorded(swarm3, len(transfers))

    archive = KeyRing.of(load_certificates([ca.archive.directory], issued_by=ca.certificate), pinned=False)
    for path in swarm3.logs():
        report = verify(path, archive)
        assert report.ok, (path.name, report.problems)
    server_events = [e for p in swarm3.logs() if p.name.startswith("server-") for e in read_events(p)]
    result = reconcile(read_events(swarm3.client_log.path), server_events, node_keys=archive)
    assert result.ok and result.matched == len(transfers), result
    # without the archive, today's certificates alone cannot vouch for yesterday's records
    todays = KeyRing.of(load_certificates([ca.nodes_dir]), pinned=False)
    b_log = next(p for p in swarm3.logs() if p.name == "server-lc-b.sqlite")
    assert [p.detail.split(" (key ")[0] for p in verify(b_log, todays).problems] == [
        "7 records (0..6) and 1 checkpoint cannot be verified: signed by a key that is not among the "
        "trusted keys and certificates"  # session 1's six steps and its close, sealed with the old key
    ]


def test_a_rotated_node_serves_again_after_its_new_attestation_without_restart(
    swarm3: Swarm3, tiny_llama_store
) -> None:
    cluster, ca, kit = swarm3.cluster, swarm3.kit.pki.ca, swarm3.kit
    trusted = swarm3.server("lc-t")

    def listed() -> set[str]:
        return {r.node_id for r in cluster.registry.backend.list(tiny_llama_store.model_id)}

    with cluster.swarm("lc-analyst", trust=swarm3.trust, audit=swarm3.client_log) as swarm:
        model = cluster.model(swarm, classification="internal")  # the prefix needs a trusted node
        model.generate(PROMPT, max_new_tokens=2, do_sample=False)
        first_attestation = trusted.claims.attestation_id  # type: ignore[union-attr]

        with structlog.testing.capture_logs() as logs:
            ca.rotate(Role.SERVER, "lc-t")
            wait_for(lambda: trusted.claims is None, "lc-t refusing its token for the old key")
        refused = [line for line in logs if line["event"] == "attestation_refused"]
        assert refused[0]["node"] == trusted.node_id
        assert "key_mismatch" in refused[0]["reason"] and trusted.node_id in refused[0]["reason"]
        assert refused[0]["action"].startswith("the node's TLS key changed since it was attested")
        wait_for(lambda: trusted.node_id not in listed(), "lc-t's announcement refused and expired")
        with pytest.raises(RoutingError, match="blocks 0,1 have no server"):
            model.generate(PROMPT, max_new_tokens=2, do_sample=False)  # nothing trusted for 0:2 now

        swarm3.tokens["lc-t"].write_text(kit.attest("lc-t", tiny_llama_store, tier="trusted"))
        wait_for(lambda: trusted.claims is not None, "lc-t adopting its new token")
        assert trusted.claims.attestation_id != first_attestation  # type: ignore[union-attr]
        wait_for(lambda: trusted.node_id in listed(), "lc-t announced with its new token")
        produced = model.generate(PROMPT, max_new_tokens=2, do_sample=False)
    assert produced.shape[1] == PROMPT.shape[1] + 2
    assert trusted is swarm3.server("lc-t")  # the same server object: no restart
    events = read_events(swarm3.client_log.path)
    attested = {
        e.attestation_id for e in events if isinstance(e, TransferEvent) and e.node_id == trusted.node_id
    }
    assert attested == {first_attestation, trusted.claims.attestation_id}  # type: ignore[union-attr]


def test_a_key_mismatch_names_the_node(kit: TrustKit, tiny_llama_store: ModelStore) -> None:
    """A record announcing a token for the node's previous key: the client's error says which node."""
    stale = kit.attest("lc-stale", tiny_llama_store)  # for its current key ...
    kit.pki.ca.rotate(Role.SERVER, "lc-stale")  # ... which it no longer has
    with running_cluster(kit.pki, tiny_llama_store, []) as cluster:
        server = cluster.add_server("lc-stale", "0:6")
        server.attestation = stale
        time.sleep(1.0)
        with cluster.swarm(trust=kit.context()) as swarm:
            model = cluster.model(swarm, classification="public")
            with pytest.raises(
                RoutingError
            ) as caught:  # the only node fails its proof: nothing to fail over to
                model(PROMPT)
    mismatch = caught.value.__cause__
    assert isinstance(mismatch, TrustError)
    message = str(mismatch)
    assert message.startswith(f"key_mismatch: {server.node_id} presents TLS key ")
    assert "the node's key changed since it was attested (a rotation needs a new attestation)" in message
    assert mismatch.node_id == server.node_id and message in str(caught.value)
