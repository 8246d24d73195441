"""``DistributedModelForSequenceClassification``: a classifier head over blocks that run on a swarm.

It is transformers' ``*ForSequenceClassification`` recipe — a bias-free linear ``score`` over the
final-normed hidden state of each sequence's last non-padding token — on top of
:class:`~fincluster.client.model.DistributedModelForCausalLM` (held as ``model``). peft treats it as it
treats a local classifier: ``get_peft_model(model, PromptTuningConfig(task_type="SEQ_CLS", ...))``
trains the prompts and, by peft's convention for classifiers, a copy of ``score`` (``modules_to_save``);
``save_pretrained`` writes both. The head and the prompts live in the client process only.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from fincluster.client.model import DistributedModelForCausalLM
from fincluster.client.swarm import ChainPlanner
from fincluster.errors import ConfigurationError
from fincluster.store import ModelStore


class DistributedModelForSequenceClassification(PreTrainedModel):  # type: ignore[misc]
    """Sequence classifier whose transformer blocks run on the swarm (see module docstring).

    Pooling follows transformers: the rightmost token that is not ``pad_token_id`` when ``input_ids``
    are given, else the last position — so pad on the left when prompts come as ``inputs_embeds``
    (prompt tuning does).
    """

    config_class = PretrainedConfig
    base_model_prefix = "fincluster"
    main_input_name = "input_ids"

    def __init__(self, config: PretrainedConfig, *, backbone: DistributedModelForCausalLM) -> None:
        super().__init__(config)
        self.model = backbone
        labels = config.num_labels
        if labels is None or labels < 2:
            raise ConfigurationError("a sequence classifier needs config.num_labels of at least 2")
        self.num_labels: int = labels
        self.score = torch.nn.Linear(config.hidden_size, self.num_labels, bias=False, dtype=backbone.dtype)
        torch.nn.init.normal_(self.score.weight, std=float(getattr(config, "initializer_range", 0.02)))

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        store: str | os.PathLike[str] | ModelStore,
        *,
        swarm: ChainPlanner,
        labels: list[str],
        **options: Any,
    ) -> DistributedModelForSequenceClassification:
        """The client part of ``store`` connected to ``swarm`` (``options`` as for
        :meth:`DistributedModelForCausalLM.from_pretrained`), with a new ``score`` head for ``labels``
        (initialised from torch's default generator: seed it for repeatable runs)."""
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ConfigurationError(f"labels must be at least two distinct names, not {labels}")
        backbone = DistributedModelForCausalLM.from_pretrained(store, swarm=swarm, **options)
        config = copy.deepcopy(backbone.config)
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: index for index, label in enumerate(labels)}
        model = cls(config, backbone=backbone)
        model.eval()  # type: ignore[no-untyped-call]
        return model

    def get_input_embeddings(self) -> torch.nn.Embedding:
        embeddings: torch.nn.Embedding = self.model.embed_tokens
        return embeddings

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The backbone comes from the store; the head is initialised in ``__init__``."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        backbone = self.model
        with backbone.call_options(
            classification=kwargs.pop("classification", None), adapter=kwargs.pop("adapter", None)
        ):
            hidden = backbone.blocks_output(
                input_ids, attention_mask, position_ids, past_key_values, inputs_embeds
            )
        logits = self.score(backbone.norm(hidden)).float()  # [batch, seq, labels]
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if input_ids is not None and pad is not None:
            not_pad = (input_ids != pad).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (positions * not_pad).argmax(-1)
        else:
            last = torch.full((batch,), logits.shape[1] - 1, device=logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)
