"""Fine-tuning through three real block servers over mTLS gRPC: exact gradients for the input embeddings
and the deep prompts, frozen server weights, independent concurrent trainers, audited training calls,
and generation with the trained prompts equal to local peft's."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

from fincluster.audit import AuditRecorder, TransferEvent
from fincluster.client.transport import GrpcSpanClient
from fincluster.serving.server import BlockServer
from fincluster.values import sha256_hex
from tests.helpers import Cluster, tiny_model

pytestmark = pytest.mark.e2e
TOLERANCE = 1e-4


def reference():
    return tiny_model("llama")  # the tiny_llama_store fixture's weights


def prefix_config(tokens: int = 3) -> PrefixTuningConfig:
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens)


def weight_digests(server: BlockServer) -> dict[str, str]:
    """SHA-256 of every weight and buffer a server computes with."""
    state = server.model.base.state_dict()
    return {name: hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest() for name, t in state.items()}


def swarm_peft(cluster: Cluster, config, source, *, client: str = "analyst", audit=None):
    swarm = cluster.swarm(client, audit=audit)
    model = get_peft_model(cluster.model(swarm), config)
    set_peft_model_state_dict(model, get_peft_model_state_dict(source))
    return swarm, model


def test_gradients_of_input_embeddings_and_deep_prompts_through_three_servers_equal_local_autograd(
    tiny_cluster: Cluster,
) -> None:
    assert [str(s.model.span) for s in tiny_cluster.servers] == ["0:2", "2:4", "4:6"]
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(21))
    torch.manual_seed(1)
    local = get_peft_model(reference(), prefix_config())
    local_embeds = local.get_input_embeddings()(ids).detach().requires_grad_(True)
    local(inputs_embeds=local_embeds).logits.square().mean().backward()
    swarm, remote = swarm_peft(tiny_cluster, prefix_config(), local)
    with swarm:
        embeds = remote.get_input_embeddings()(ids).detach().requires_grad_(True)
        remote(inputs_embeds=embeds).logits.square().mean().backward()
    assert local_embeds.grad is not None and embeds.grad is not None
    assert (embeds.grad - local_embeds.grad).abs().max().item() <= TOLERANCE
    (want,) = [p.grad for p in local.parameters() if p.requires_grad]
    (got,) = [p.grad for p in remote.parameters() if p.requires_grad]
    assert want is not None and got is not None and want.abs().sum().item() > 0
    assert (got - want).abs().max().item() <= TOLERANCE


def test_training_prompts_leaves_every_server_weight_digest_unchanged(tiny_cluster: Cluster) -> None:
    before = [weight_digests(server) for server in tiny_cluster.servers]
    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(22))
    torch.manual_seed(2)
    swarm, model = swarm_peft(tiny_cluster, prefix_config(), get_peft_model(reference(), prefix_config()))
    prompts = model.prompt_encoder["default"].embedding.weight
    start = prompts.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with swarm:
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert (prompts.detach() - start).abs().max().item() > 1e-3  # the client's prompts trained
    assert losses[-1] < losses[0]
    assert [weight_digests(server) for server in tiny_cluster.servers] == before


def test_two_clients_training_different_prompts_at_once_get_their_solo_gradients(
    tiny_cluster: Cluster,
) -> None:
    jobs = {
        "alice": (
            prefix_config(3),
            torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(23)),
        ),
        "bob": (
            PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
            torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(24)),
        ),
    }
    sources = {}
    for seed, (name, (config, _)) in enumerate(jobs.items()):
        torch.manual_seed(seed + 10)
        sources[name] = get_peft_model(reference(), config)

    def gradients(name: str, rounds: int) -> list[torch.Tensor]:
        config, ids = jobs[name]
        swarm, model = swarm_peft(tiny_cluster, config, sources[name], client=name)
        found = []
        with swarm:
            for _ in range(rounds):
                model.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                (grad,) = [p.grad.clone() for p in model.parameters() if p.requires_grad]
                found.append(grad)
        return found

    solo = {name: gradients(name, 1)[0] for name in jobs}
    together: dict[str, list[torch.Tensor]] = {}
    threads = [
        threading.Thread(target=lambda n=name: together.__setitem__(n, gradients(n, 3))) for name in jobs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(together) == ["alice", "bob"]
    for name, grads in together.items():
        assert all((grad - solo[name]).abs().max().item() <= 1e-6 for grad in grads), name
    assert solo["alice"].shape != solo["bob"].shape  # different prompts, not one shared parameter


def test_training_calls_are_audited_per_node_with_digests_of_activations_and_gradients(
    tiny_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each forward and backward is one record per node; a backward's input digest covers what was
    sent (activations, deep prompts and the incoming gradient), its output digest every gradient
    returned, the deep prompts' included — the exact bytes both sides signed and recorded."""
    sent: list[tuple[str, bytes, bytes]] = []
    observe = GrpcSpanClient.observe

    def capture(self, operation, session_id, step, sent_message, received_message, receipt, **kwargs):
        sent.append(
            (
                operation,
                sent_message.SerializeToString(deterministic=True),
                received_message.SerializeToString(deterministic=True),
            )
        )
        return observe(self, operation, session_id, step, sent_message, received_message, receipt, **kwargs)

    monkeypatch.setattr(GrpcSpanClient, "observe", capture)
    recorder = AuditRecorder()
    torch.manual_seed(3)
    swarm, model = swarm_peft(
        tiny_cluster, prefix_config(), get_peft_model(reference(), prefix_config()), audit=recorder
    )
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(25))
    with swarm:
        model(input_ids=ids, labels=ids).loss.backward()
    transfers = [e for e in recorder.events if isinstance(e, TransferEvent)]
    assert [(t.operation, str(t.block_span)) for t in transfers] == [
        ("forward", "0:2"),
        ("forward", "2:4"),
        ("forward", "4:6"),
        ("backward", "4:6"),
        ("backward", "2:4"),
        ("backward", "0:2"),
    ]
    assert len({t.session_id for t in transfers if t.operation == "forward"}) == 1
    assert len({t.session_id for t in transfers if t.operation == "backward"}) == 1
    for transfer, (operation, request, response) in zip(transfers, sent, strict=True):
        assert transfer.operation == operation
        assert (transfer.input_sha256, transfer.output_sha256) == (sha256_hex(request), sha256_hex(response))
        assert transfer.receipt is not None and transfer.adapter_sha256 is None
    from fincluster.wire import fincluster_pb2 as pb

    backward_request, backward_response = pb.BackwardRequest(), pb.BackwardResponse()
    backward_request.ParseFromString(sent[3][1])
    backward_response.ParseFromString(sent[3][2])
    assert backward_request.inputs.HasField("prefixes") and backward_request.HasField("grad_outputs")
    assert list(backward_response.grad_prefixes.keys.shape) == [2, 2, 2, 3, 16]  # blocks 4:6 only


def test_generation_with_trained_deep_prompts_equals_local_peft(tiny_cluster: Cluster, tmp_path) -> None:
    torch.manual_seed(4)
    swarm, model = swarm_peft(tiny_cluster, prefix_config(4), get_peft_model(reference(), prefix_config(4)))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(26))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=5.0)
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(27))
    with swarm:
        for _ in range(2):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        model.save_pretrained(tmp_path / "trained")
        with torch.no_grad():
            produced = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    local = PeftModel.from_pretrained(reference(), tmp_path / "trained")
    with torch.no_grad():
        expected = local.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert produced.tolist() == expected.tolist()
    assert produced.shape == (1, 13)
