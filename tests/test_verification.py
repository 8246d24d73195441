"""Verification of what nodes compute: a sample of attested nodes' outputs is re-executed on other
allowed nodes (policy data ``fincluster.verification``); a node whose output disagrees is caught,
quarantined and replaced, the generation still matches transformers, and the audit report says so."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from structlog.testing import capture_logs

from fincluster.audit import AuditLog, AuditRecorder, AuditSettings, VerificationEvent, build_report
from fincluster.audit.render_csv import render_csv
from fincluster.audit.render_html import render_html
from fincluster.client import DistributedModelForCausalLM
from fincluster.client.verification import (
    Comparison,
    Sampling,
    SpotChecker,
    Tolerance,
    VerificationPolicy,
    concatenated,
)
from fincluster.errors import InvalidResponseError, PolicyError, RoutingError
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.attestation import TrustTier
from fincluster.trust.pki import Role
from fincluster.trust.policy import Classification
from fincluster.trust.policy_engine import open_policy_engine
from fincluster.wire.codec import SpanInputs
from tests.helpers import POLICY_DIR, Cluster, Pki, TrustKit, running_cluster, tiny_model

PROMPT = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(61))
SPAN = BlockSpan(2, 4)
TIGHT = Tolerance(atol=1e-4, rtol=1e-4)


# -- the judge, with nodes faked ------------------------------------------------------------------


class FakeNodes:
    """``run_elsewhere`` over nodes that compute ``2 * x`` unless listed as bad (then ``2 * x + 1``)."""

    def __init__(self, nodes: list[str], bad: set[str]) -> None:
        self.nodes, self.bad = nodes, bad
        self.calls: list[frozenset[str]] = []

    def output(self, node: str, inputs: SpanInputs) -> torch.Tensor:
        return inputs.hidden_states * 2 + (1 if node in self.bad else 0)

    def run_elsewhere(
        self, span: BlockSpan, inputs: SpanInputs, exclude: frozenset[str]
    ) -> tuple[tuple[str, ...], torch.Tensor]:
        self.calls.append(exclude)
        free = [n for n in self.nodes if n not in exclude]
        if not free:
            raise RoutingError(f"no other node serves {span}", missing_blocks=tuple(span.blocks))
        return (free[0],), self.output(free[0], inputs)


def checker(nodes: FakeNodes, *, rate: float = 1.0, required: bool = False, rng=None):
    quarantined: list[tuple[str, str]] = []
    recorded: list[Comparison] = []
    spot = SpotChecker(
        Sampling(rate=rate, tiers=frozenset({TrustTier.STANDARD}), required=required),
        lambda dtype: TIGHT,
        run_elsewhere=nodes.run_elsewhere,
        quarantine=lambda node, reason: quarantined.append((node, reason)),
        record=recorded.append,
        rng=rng or random.Random(0),
    )
    return spot, quarantined, recorded


def inputs_of(seq: int = 3) -> SpanInputs:
    return SpanInputs(
        torch.randn(1, seq, 4, generator=torch.Generator().manual_seed(seq)),
        torch.ones(1, seq, dtype=torch.int64),
        torch.arange(seq).unsqueeze(0),
    )


def test_an_honest_output_is_recorded_as_agreed_with_both_digests() -> None:
    nodes = FakeNodes(["checked", "v1"], bad=set())
    spot, quarantined, recorded = checker(nodes)
    inputs = inputs_of()
    spot.check("checked", SPAN, inputs, nodes.output("checked", inputs), session_id="s", step=4)
    (comparison,) = recorded
    assert comparison.agreed and comparison.verifier_node_ids == ("v1",) and comparison.step == 4
    assert comparison.checked_sha256 == comparison.verifier_sha256 and comparison.max_abs_diff == 0.0
    assert quarantined == [] and nodes.calls == [frozenset({"checked"})]


def test_a_wrong_checked_node_is_quarantined_when_the_referee_sides_with_the_verifier() -> None:
    nodes = FakeNodes(["checked", "v1", "v2"], bad={"checked"})
    spot, quarantined, recorded = checker(nodes)
    inputs = inputs_of()
    with pytest.raises(InvalidResponseError) as caught:
        spot.check("checked", SPAN, inputs, nodes.output("checked", inputs), session_id="s", step=0)
    assert caught.value.node_id == "checked" and "the node is quarantined" in str(caught.value)
    assert [node for node, _ in quarantined] == ["checked"]
    (comparison,) = recorded
    assert not comparison.agreed and comparison.referee_node_ids == ("v2",)
    assert comparison.quarantined_node_id == "checked" and comparison.max_abs_diff == pytest.approx(1.0)
    assert nodes.calls == [frozenset({"checked"}), frozenset({"checked", "v1"})]


def test_a_wrong_verifier_is_quarantined_and_the_checked_output_stands() -> None:
    nodes = FakeNodes(["checked", "v1", "v2"], bad={"v1"})
    spot, quarantined, recorded = checker(nodes)
    inputs = inputs_of()
    spot.check("checked", SPAN, inputs, nodes.output("checked", inputs), session_id="s", step=0)
    assert [node for node, _ in quarantined] == ["v1"]
    assert recorded[0].quarantined_node_id == "v1" and recorded[0].referee_node_ids == ("v2",)


def test_without_a_referee_the_checked_node_is_the_one_quarantined() -> None:
    """Two nodes disagree and nobody can say who is right: the output is not used (fail closed)."""
    nodes = FakeNodes(["checked", "v1"], bad={"v1"})
    spot, quarantined, recorded = checker(nodes)
    inputs = inputs_of()
    with pytest.raises(InvalidResponseError):
        spot.check("checked", SPAN, inputs, nodes.output("checked", inputs), session_id="s", step=0)
    assert [node for node, _ in quarantined] == ["checked"] and recorded[0].referee_node_ids == ()


def test_an_output_of_another_shape_disagrees_with_no_difference_recorded() -> None:
    nodes = FakeNodes(["checked", "v1"], bad=set())
    spot, _, recorded = checker(nodes)
    inputs = inputs_of()
    with pytest.raises(InvalidResponseError):
        spot.check("checked", SPAN, inputs, torch.zeros(1, 3, 5), session_id="s", step=0)
    assert not recorded[0].agreed and recorded[0].max_abs_diff is None


def test_no_other_node_skips_the_check_unless_the_policy_requires_it() -> None:
    nodes = FakeNodes(["checked"], bad=set())
    inputs = inputs_of()
    spot, _, recorded = checker(nodes)
    spot.check("checked", SPAN, inputs, nodes.output("checked", inputs), session_id="s", step=0)
    assert recorded == []
    required, _, _ = checker(nodes, required=True)
    with pytest.raises(RoutingError, match="must be verified, but no other allowed node could recompute it"):
        required.check("checked", SPAN, inputs, nodes.output("checked", inputs), session_id="s", step=0)


def test_a_skipped_check_warns_once_per_node_and_span_not_every_step() -> None:
    nodes = FakeNodes(["checked"], bad=set())
    inputs = inputs_of()
    spot, _, _ = checker(nodes)
    with capture_logs() as logs:
        for step in range(5):
            spot.check("checked", SPAN, inputs, nodes.output("checked", inputs), session_id="s", step=step)
        spot.check("checked", BlockSpan(4, 6), inputs, inputs.hidden_states, session_id="s", step=5)
    warned = [entry["blocks"] for entry in logs if entry["log_level"] == "warning"]
    assert warned == ["2:4", "4:6"]  # the four repeats go to debug


def test_sampling_follows_the_rate_and_the_tiers() -> None:
    spot, _, _ = checker(FakeNodes([], set()), rate=0.2, rng=random.Random(7))
    draws = [spot.wants(TrustTier.STANDARD) for _ in range(20_000)]
    assert abs(sum(draws) / len(draws) - 0.2) < 0.01  # 4 standard deviations is 0.0113
    assert not any(spot.wants(TrustTier.TRUSTED) for _ in range(1000))  # tier not listed
    assert not any(spot.wants(None) for _ in range(1000))  # not attested (the client's own blocks)
    # a node corrupting every output: caught within 10 of its outputs in 1 - 0.8**10 = 89 % of runs
    caught = sum(any(spot.wants(TrustTier.STANDARD) for _ in range(10)) for _ in range(4000))
    assert abs(caught / 4000 - (1 - 0.8**10)) < 0.02


def test_session_steps_are_concatenated_into_one_stateless_pass() -> None:
    first = SpanInputs(
        torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.int64), torch.arange(3).expand(2, 3)
    )
    second = SpanInputs(torch.randn(2, 1, 4), torch.ones(2, 4, dtype=torch.int64), torch.full((2, 1), 3))
    joined = concatenated([first, second])
    assert joined.hidden_states.shape == (2, 4, 4) and joined.position_ids.tolist() == [[0, 1, 2, 3]] * 2
    assert joined.attention_mask is second.attention_mask


# -- the policy data -------------------------------------------------------------------------------


def test_the_shipped_policy_data_verifies_more_of_more_sensitive_data() -> None:
    policy = VerificationPolicy.from_policy_data(json.loads((POLICY_DIR / "data.json").read_text()))
    assert policy.sampling(Classification.PUBLIC).rate == 0
    assert policy.sampling(Classification.INTERNAL) == Sampling(
        rate=0.2, tiers=frozenset({TrustTier.STANDARD})
    )
    assert (
        policy.sampling(Classification.RESTRICTED).required
        and policy.sampling(Classification.RESTRICTED).rate == 1
    )
    assert policy.tolerance_for(torch.bfloat16).atol > policy.tolerance_for(torch.float32).atol


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"internal": {"rate": 2.0, "tiers": ["standard"]}}, "less than or equal to 1"),
        ({"internal": {"rate": 0.2, "tiers": ["gold"]}}, "'trusted' or 'standard'"),
        ({"internl": {"rate": 0.2}}, "Extra inputs are not permitted"),
        ({"tolerance": {"float8": {"atol": 1, "rtol": 1}}}, "float8"),
    ],
)
def test_malformed_verification_data_is_refused_not_ignored(section: dict, problem: str) -> None:
    with pytest.raises(PolicyError, match=r"invalid data\.fincluster\.verification") as caught:
        VerificationPolicy.from_policy_data({"fincluster": {"verification": section}})
    assert problem in str(caught.value)


# -- through the swarm --------------------------------------------------------------------------------


def kit_with(pki: Pki, tmp_path: Path, **sections: object) -> TrustKit:
    """A trust kit whose policy data has these verification sections (the shipped rules otherwise)."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy_dir, dirs_exist_ok=True)
    data = json.loads((policy_dir / "data.json").read_text())
    data["fincluster"]["verification"] = {**data["fincluster"]["verification"], **sections}
    (policy_dir / "data.json").write_text(json.dumps(data))
    return TrustKit(pki, Ed25519PrivateKey.generate(), open_policy_engine(policy_dir))


NOISE = lambda out: out + 0.01 * torch.randn_like(out)  # noqa: E731
ZEROS = torch.zeros_like
SKIP = lambda honest, hidden_states, *args, **kwargs: hidden_states  # noqa: E731  # skips its blocks


@contextlib.contextmanager
def internal_swarm(
    kit: TrustKit, store: ModelStore, standard: dict[str, str], **bad: dict
) -> Iterator[Cluster]:
    """t (trusted, 0:2) and attested standard nodes ``standard`` (name -> span); ``bad`` names the
    ones that misbehave (name -> add_server keyword arguments)."""
    trust = kit.context(clearances={kit.pki.credential(Role.CLIENT, "analyst").spiffe_id: "internal"})
    with running_cluster(kit.pki, store, [], registry_trust=trust) as cluster:
        cluster.add_server("t", "0:2", trust=trust, attestation=kit.attest("t", store))
        for name, span in standard.items():
            cluster.add_server(
                name,
                span,
                trust=trust,
                attestation=kit.attest(name, store, tier="standard"),
                **bad.get(name, {}),
            )
        cluster.wait_until_listed(1 + len(standard))
        cluster.trust = trust  # type: ignore[attr-defined]
        yield cluster


@pytest.mark.parametrize(
    ("kind", "misbehaviour"),
    [("noise", {"corrupt": NOISE}), ("zeros", {"corrupt": ZEROS}), ("skip", {"tamper": SKIP})],
)
def test_a_node_computing_wrong_answers_is_caught_quarantined_and_the_generation_stays_exact(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path, kind: str, misbehaviour: dict
) -> None:
    kit = kit_with(pki, tmp_path, internal={"rate": 1.0, "tiers": ["standard"]})
    expected = tiny_model("llama").generate(PROMPT, max_new_tokens=6, do_sample=False)
    standard = {"h1": "2:4", "h2": "2:4", f"bad-{kind}": "2:4", "b": "4:6"}
    with internal_swarm(kit, tiny_llama_store, standard, **{f"bad-{kind}": misbehaviour}) as cluster:
        bad = next(s.node_id for s in cluster.servers if f"bad-{kind}" in s.node_id)
        recorder = AuditRecorder()
        with cluster.swarm(trust=cluster.trust, audit=recorder) as swarm:
            model = cluster.model(swarm, classification="internal")
            with model.inference_session(max_length=PROMPT.shape[1] + 6) as session:
                first = model.generate(PROMPT, max_new_tokens=2, do_sample=False)
                model.move_hop(1, bad)  # whoever routing chose, the bad node now computes 2:4
                produced = model.generate(first, max_new_tokens=4, do_sample=False)
                assert session.hops[1].client.node_id != bad  # it was caught and replaced
            assert swarm.bans.is_banned(bad) and "quarantined" in swarm.bans.reason(bad)
            honest = [s.node_id for s in cluster.servers if s.node_id != bad]
            assert not any(swarm.bans.is_banned(node) for node in honest)
    assert produced.tolist() == expected.tolist()
    failures = [e for e in recorder.of_kind(VerificationEvent) if not e.agreed]
    # every disagreement quarantined the bad node: as the checked node after the move (and before it,
    # if routing chose it first), and maybe as a verifier of an honest node's output
    assert failures and {e.quarantined_node_id for e in failures} == {bad}
    assert any(e.checked_node_id == bad and e.step >= 2 for e in failures)  # the moved hop's first step
    assert all(e.referee_node_ids for e in failures)  # a third node refereed every time
    assert any(e.kind == "failover" and e.failed_node_id == bad for e in recorder.events)


def test_a_wrong_node_is_caught_in_forward_passes_whichever_role_it_plays(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    """Three nodes for 2:4, one adds noise; stateless passes (scoring, training) check every output,
    so the bad node is caught whether it is routed first or asked to verify."""
    kit = kit_with(pki, tmp_path, internal={"rate": 1.0, "tiers": ["standard"]})
    reference = tiny_model("llama")
    with torch.no_grad():
        expected = reference(PROMPT).logits
    standard = {"h1": "2:4", "h2": "2:4", "bad": "2:4", "b": "4:6"}
    with internal_swarm(kit, tiny_llama_store, standard, bad={"corrupt": NOISE}) as cluster:
        bad = next(s.node_id for s in cluster.servers if s.node_id.endswith("/bad"))
        recorder = AuditRecorder()
        with cluster.swarm(trust=cluster.trust, audit=recorder) as swarm, torch.no_grad():
            model = cluster.model(swarm, classification="internal")
            for _ in range(20):
                torch.testing.assert_close(model(PROMPT).logits, expected, rtol=1e-4, atol=1e-4)
                if swarm.bans.is_banned(bad):
                    break
            assert swarm.bans.is_banned(bad) and "quarantined" in swarm.bans.reason(bad)
            torch.testing.assert_close(model(PROMPT).logits, expected, rtol=1e-4, atol=1e-4)
    quarantined = {e.quarantined_node_id for e in recorder.of_kind(VerificationEvent) if not e.agreed}
    assert quarantined == {bad}


def test_honest_nodes_raise_no_false_alarm_over_fifty_generations(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    """Every output of two honest nodes per span is recomputed by the other (prompts of several
    lengths, padded batches, sessions that continue): nothing is found wrong."""
    kit = kit_with(pki, tmp_path, internal={"rate": 1.0, "tiers": ["standard"]})
    standard = {"a1": "2:4", "a2": "2:4", "b1": "4:6", "b2": "4:6"}
    generator = torch.Generator().manual_seed(5)
    with internal_swarm(kit, tiny_llama_store, standard) as cluster:
        recorder = AuditRecorder()
        with cluster.swarm(trust=cluster.trust, audit=recorder) as swarm:
            model = cluster.model(swarm, classification="internal")
            for index in range(50):
                batch = 1 + index % 2
                length = 2 + index % 9
                prompt = torch.randint(3, 128, (batch, length), generator=generator)
                mask = torch.ones_like(prompt)
                if batch == 2:
                    mask[1, : index % 3] = 0  # left padding
                model.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)
            assert not any(swarm.bans.is_banned(s.node_id) for s in cluster.servers)
    events = recorder.of_kind(VerificationEvent)
    assert len(events) == 50 * 3 * 2  # every step of both standard hops, 50 generations
    assert all(e.agreed for e in events), [e for e in events if not e.agreed][:3]
    assert max(e.max_abs_diff or 0.0 for e in events) < 1e-4


def test_required_verification_without_another_node_fails_closed(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    kit = kit_with(pki, tmp_path, internal={"rate": 1.0, "tiers": ["standard"], "required": True})
    standard = {"a": "2:4", "b1": "4:6", "b2": "4:6"}
    with (
        internal_swarm(kit, tiny_llama_store, standard) as cluster,
        cluster.swarm(trust=cluster.trust) as swarm,
    ):
        model = cluster.model(swarm, classification="internal")
        with pytest.raises(RoutingError, match="must be verified, but no other allowed node"):
            model.generate(PROMPT, max_new_tokens=2, do_sample=False)


def test_verification_is_in_the_compliance_report(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path
) -> None:
    kit = kit_with(pki, tmp_path, internal={"rate": 1.0, "tiers": ["standard"]})
    standard = {"h1": "2:4", "h2": "2:4", "bad": "2:4", "b": "4:6"}
    with internal_swarm(kit, tiny_llama_store, standard, bad={"corrupt": ZEROS}) as cluster:
        bad = next(s.node_id for s in cluster.servers if s.node_id.endswith("/bad"))
        _, _, key_pem = pki.credential(Role.CLIENT, "analyst").read()
        log = AuditLog(
            tmp_path / "client.sqlite",
            signing_key=load_pem_private_key(key_pem, password=None),  # type: ignore[arg-type]
            origin="client-analyst",
            settings=AuditSettings(),
        )
        with cluster.swarm(trust=cluster.trust, audit=log) as swarm, torch.no_grad():
            model = cluster.model(swarm, classification="internal")
            for _ in range(20):  # until the bad node is checked or asked to verify (random verifiers)
                model(PROMPT)
                if swarm.bans.is_banned(bad):
                    break
        log.close()
    report = build_report(tmp_path / "client.sqlite")
    assert report.totals.verifications >= 1 and report.totals.verification_failures == 1
    (row,) = [v for s in report.sessions for v in s.verification_failures]
    assert row.quarantined_node_id == bad
    (node,) = [n for n in report.nodes if n.node_id == bad]
    assert node.outputs_found_wrong == 1
    html = render_html(report)
    assert "Verification failures" in html and "Outputs verified" in html
    assert "verification_failure" in render_csv(report)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_honest_half_precision_nodes_stay_within_the_shipped_tolerance(
    pki: Pki, tiny_llama_store: ModelStore, tmp_path: Path, dtype: str
) -> None:
    """A recomputed session step is one pass over every position instead of a cached step: in half
    precision the two differ by rounding, which the shipped tolerance for the dtype must absorb."""
    kit = kit_with(pki, tmp_path, internal={"rate": 1.0, "tiers": ["standard"]})
    trust = kit.context(clearances={kit.pki.credential(Role.CLIENT, "analyst").spiffe_id: "internal"})
    generator = torch.Generator().manual_seed(9)
    with running_cluster(kit.pki, tiny_llama_store, [], registry_trust=trust) as cluster:
        cluster.add_server(
            "t", "0:2", trust=trust, attestation=kit.attest("t", tiny_llama_store), dtype=dtype
        )
        for name, span in {"a1": "2:4", "a2": "2:4", "b1": "4:6", "b2": "4:6"}.items():
            attestation = kit.attest(name, tiny_llama_store, tier="standard")
            cluster.add_server(name, span, trust=trust, attestation=attestation, dtype=dtype)
        cluster.wait_until_listed(5)
        recorder = AuditRecorder()
        with cluster.swarm(trust=trust, audit=recorder) as swarm:
            model = DistributedModelForCausalLM.from_pretrained(
                tiny_llama_store, swarm=swarm, classification="internal", dtype=getattr(torch, dtype)
            )
            for index in range(10):
                prompt = torch.randint(3, 128, (1, 4 + index), generator=generator)
                model.generate(prompt, max_new_tokens=6, do_sample=False)
    events = recorder.of_kind(VerificationEvent)
    assert len(events) == 10 * 6 * 2
    assert all(e.agreed for e in events), max(e.max_abs_diff or 0 for e in events)
