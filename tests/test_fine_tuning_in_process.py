"""peft prompt learning on the client model over in-process spans equals peft on transformers' model.

The reference is peft itself on the same model run locally: the same adapter weights (copied with
peft's own state-dict helpers) must give the same loss, the same gradients, the same generations and,
through transformers' ``Trainer``, the same trained prompts.
"""

from __future__ import annotations

import copy

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

from fincluster.errors import UsageError
from fincluster.serving.local import LocalSpanClient
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from tests.helpers import store_of, tiny_model
from tests.test_exact_match_in_process import in_process_model

SPANS = ("0:1", "1:4", "4:6")
CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return store_of(tiny_model("llama", seed=3), tmp_path_factory.mktemp("tuning") / "store", "tiny-llama")


def peft_pair(store: ModelStore, kind: str, seed: int = 0, **options: object):
    """peft on the local reference and on the client model, with the same (random) prompt weights."""
    torch.manual_seed(seed)
    local = get_peft_model(tiny_model("llama", seed=3), CONFIGS[kind]())
    remote = get_peft_model(in_process_model(store, SPANS, **options), CONFIGS[kind]())
    set_peft_model_state_dict(remote, get_peft_model_state_dict(local))
    return local, remote


def trainable_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_peft_prompt_gradients_through_the_hops_equal_local_peft(store, kind) -> None:
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    local, remote = peft_pair(store, kind)
    expected = local(input_ids=ids, attention_mask=mask, labels=ids)
    produced = remote(input_ids=ids, attention_mask=mask, labels=ids)
    expected.loss.backward()
    produced.loss.backward()
    assert abs(produced.loss.item() - expected.loss.item()) <= 1e-5
    pairs = list(zip(trainable_grads(local), trainable_grads(remote), strict=True))
    assert len(pairs) == 1  # the prompt encoder's embedding
    assert all((got - want).abs().max().item() <= 1e-5 for want, got in pairs)
    assert pairs[0][0].abs().sum().item() > 0


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_generation_with_saved_prompts_equals_local_peft(store, kind, tmp_path) -> None:
    """save_pretrained / PeftModel.from_pretrained work on the client model as on a local one."""
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(11))
    local, _ = peft_pair(store, kind, seed=5)
    local.save_pretrained(tmp_path / "adapter")
    local = PeftModel.from_pretrained(tiny_model("llama", seed=3), tmp_path / "adapter")
    remote = PeftModel.from_pretrained(in_process_model(store, SPANS), tmp_path / "adapter")
    with torch.no_grad():
        expected = local.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        produced = remote.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert produced.tolist() == expected.tolist()
    plain = tiny_model("llama", seed=3).generate(ids, max_new_tokens=8, do_sample=False)
    assert plain.tolist() != expected.tolist()  # the prompts change what is generated


def test_micro_batches_give_the_same_gradients_in_bounded_requests(store) -> None:
    """A pass over more than max_batch_tokens goes as several requests of at most that many tokens."""
    ids = torch.randint(3, 128, (6, 5), generator=torch.Generator().manual_seed(12))
    local, _ = peft_pair(store, "prefix")
    sizes: list[int] = []
    original = LocalSpanClient.forward

    def counting(self, inputs, **kwargs):
        sizes.append(inputs.num_tokens + inputs.hidden_states.shape[0] * inputs.prefixes.length)
        return original(self, inputs, **kwargs)

    _, remote = peft_pair(store, "prefix", max_batch_tokens=16)
    local(input_ids=ids, labels=ids).loss.backward()
    LocalSpanClient.forward = counting  # type: ignore[method-assign]
    try:
        remote(input_ids=ids, labels=ids).loss.backward()
    finally:
        LocalSpanClient.forward = original  # type: ignore[method-assign]
    # 6 rows of 3 prefix + 5 tokens = 8 each: two rows (16 tokens) per request, three requests per hop
    assert sizes == [16] * 3 * len(SPANS)
    (want,), (got,) = trainable_grads(local), trainable_grads(remote)
    assert (got - want).abs().max().item() <= 1e-5


def test_a_session_refuses_other_deep_prompts_after_its_first_step(store) -> None:
    _, remote = peft_pair(store, "prefix")
    base = remote.get_base_model()
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(13))
    with torch.no_grad(), base.inference_session(max_length=8):
        remote(input_ids=ids)
        with torch.no_grad():
            for parameter in remote.prompt_encoder.parameters():
                parameter.add_(1.0)
        with pytest.raises(UsageError, match="deep prompts are fixed for an inference session"):
            remote(input_ids=ids[:, :1], attention_mask=torch.ones(1, 5, dtype=torch.int64))


def test_trainer_steps_through_the_hops_equal_local_trainer(store, tmp_path) -> None:
    """transformers' Trainer trains the client model's prompts exactly as it trains local peft's."""
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(14)
    rows = [{"input_ids": torch.randint(3, 128, (6,), generator=generator)} for _ in range(8)]
    data = [{**row, "labels": row["input_ids"]} for row in rows]
    local, remote = peft_pair(store, "prompt", seed=7)

    def trained(model: torch.nn.Module, name: str) -> torch.Tensor:
        arguments = TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=4,
            max_steps=2,
            learning_rate=1.0,
            optim="sgd",  # Adam would magnify float rounding in near-zero gradient elements
            report_to=[],
            use_cpu=True,
            seed=3,
            remove_unused_columns=False,
            save_strategy="no",
            logging_strategy="no",
        )
        Trainer(model=model, args=arguments, train_dataset=data).train()
        return copy.deepcopy(model.prompt_encoder["default"].embedding.weight.detach())

    before = remote.prompt_encoder["default"].embedding.weight.detach().clone()
    expected, produced = trained(local, "local"), trained(remote, "remote")
    assert (produced - before).abs().max().item() > 1e-3  # two steps moved the prompts
    assert (produced - expected).abs().max().item() <= 1e-5


def test_local_blocks_get_their_own_deep_prompts(store) -> None:
    """With local_blocks=k, blocks 0:k run here with their prefixes; the hops get the rest."""
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(15))
    torch.manual_seed(0)
    local = get_peft_model(tiny_model("llama", seed=3), CONFIGS["prefix"]())
    remote = get_peft_model(in_process_model(store, SPANS[1:], local_blocks=1), CONFIGS["prefix"]())
    set_peft_model_state_dict(remote, get_peft_model_state_dict(local))
    assert remote.get_base_model().local.span == BlockSpan(0, 1)
    local(input_ids=ids, labels=ids).loss.backward()
    remote(input_ids=ids, labels=ids).loss.backward()
    (want,), (got,) = trainable_grads(local), trainable_grads(remote)
    assert (got - want).abs().max().item() <= 1e-5


def test_sequence_classifier_with_prompts_equals_transformers_classifier_under_peft(store) -> None:
    """The swarm classifier (score head over the last token) and transformers' LlamaForSequenceClassification
    with the same weights give the same loss and gradients for peft's prompts and its trained score copy."""
    from transformers import AutoModelForSequenceClassification

    from fincluster.client import DistributedModelForSequenceClassification, LocalSwarm
    from tests.helpers import tiny_config

    clients = [
        LocalSpanClient.from_store(store, BlockSpan.parse(span), dtype=torch.float32, node_id=span)
        for span in SPANS
    ]
    torch.manual_seed(8)
    remote_base = DistributedModelForSequenceClassification.from_pretrained(
        store, swarm=LocalSwarm(clients), labels=["negative", "neutral", "positive"], classification="public"
    )
    reference_config = tiny_config("llama")
    reference_config.num_labels = 3
    local_base = AutoModelForSequenceClassification.from_config(reference_config).eval()
    local_base.model.load_state_dict(tiny_model("llama", seed=3).model.state_dict())
    local_base.score.load_state_dict(remote_base.score.state_dict())
    config = lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4)  # noqa: E731
    torch.manual_seed(9)
    local = get_peft_model(local_base, config())
    remote = get_peft_model(remote_base, config())
    set_peft_model_state_dict(remote, get_peft_model_state_dict(local))
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(16))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    labels = torch.tensor([0, 2, 1])
    expected = local(input_ids=ids, attention_mask=mask, labels=labels)
    produced = remote(input_ids=ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    produced.loss.backward()
    assert produced.logits.shape == (3, 3)
    assert (produced.logits - expected.logits).abs().max().item() <= 1e-5
    pairs = list(zip(trainable_grads(local), trainable_grads(remote), strict=True))
    assert len(pairs) == 2  # the prompts and peft's trainable copy of the score head
    assert all((got - want).abs().max().item() <= 1e-5 for want, got in pairs)


class _FailsOnBackward:
    """A hop whose node dies between the forward and the backward."""

    def __init__(self, client: LocalSpanClient) -> None:
        self.client, self.node_id, self.span = client, "flaky", client.span

    def forward(self, inputs, **kwargs):
        return self.client.forward(inputs, **kwargs)

    def backward(self, inputs, grad_outputs, **kwargs):
        from fincluster.errors import UnavailableError

        raise UnavailableError("node gone", node_id=self.node_id, span=self.span)


def test_a_hop_that_fails_in_the_backward_is_replaced_by_a_split_with_exact_prompt_gradients(store) -> None:
    """The replacements (two nodes for the failed hop's blocks) each get their own blocks' prefixes, and
    the gradients of the input and of every block's prefix equal those of a pass without failure."""
    from fincluster.client.chain import FailoverPolicy, chain_forward
    from fincluster.wire.codec import BlockPrefixes

    def local(span: str) -> LocalSpanClient:
        return LocalSpanClient.from_store(store, BlockSpan.parse(span), dtype=torch.float32, node_id=span)

    class Planner:
        replaced: list[BlockSpan] = []

        def plan(self, session_id):
            raise AssertionError("not asked")

        def failed(self, span, *, session_id, node, error):
            pass

        def replace(self, span, *, session_id, exclude):
            self.replaced.append(span)
            return [local("0:2"), local("2:4")]

        def verify(self, node, inputs, output, *, session_id, step, adapter):
            pass  # in-process spans are never re-executed

    generator = torch.Generator().manual_seed(17)
    hidden = torch.randn(2, 5, 64, generator=generator)
    mask = torch.ones(2, 5, dtype=torch.int64)
    positions = torch.arange(3, 8).expand(2, -1).contiguous()
    keys, values = torch.randn(2, 6, 2, 2, 3, 16, generator=generator)

    def gradients(clients, planner=None):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, keys, values)]
        output = chain_forward(
            clients,
            leaves[0],
            mask,
            positions,
            session_id="pass",
            planner=planner,
            policy=FailoverPolicy(attempts=1, sleep=lambda _: None),
            prefixes=BlockPrefixes(leaves[1], leaves[2]),
        )
        output.square().sum().backward()
        return [leaf.grad for leaf in leaves]

    expected = gradients([local("0:4"), local("4:6")])
    planner = Planner()
    produced = gradients([_FailsOnBackward(local("0:4")), local("4:6")], planner)
    assert planner.replaced == [BlockSpan(0, 4)]
    assert all((got - want).abs().max().item() <= 1e-5 for want, got in zip(expected, produced, strict=True))
    assert all(grad.abs().sum().item() > 0 for grad in produced)
