"""``DistributedModelForCausalLM``: a transformers model whose blocks run on a swarm.

The client holds the embeddings, final norm and LM head (from the store's client part); hidden states
travel through a chain of servers. It is a ``PreTrainedModel`` with ``GenerationMixin``, so
``generate`` (greedy, sampling, repetition penalty, stop strings, streamers, padded batches) and
``model(input_ids)`` with autograd behave as with a local transformers model. peft's prompt learning
works on it unchanged (``fincluster.client.tuning``): prompt tuning through ``inputs_embeds``, prefix
tuning through a prefilled ``past_key_values``, whose per-block keys and values go to the servers
with each hop's request. ``adapter=`` names a LoRA adapter the servers apply to their blocks.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from fincluster.adapters.manifest import AdapterRef
from fincluster.client.chain import InferenceSession, chain_forward
from fincluster.client.placement import Pins, PlacementRequest
from fincluster.client.swarm import ChainPlanner, Swarm
from fincluster.client.transport import SpanClient
from fincluster.client.tuning import RemoteSessionCache, deep_prompts, micro_batches, without_prefix_columns
from fincluster.client.usage import (
    check_dtype_change,
    check_fits_session,
    check_pins,
    generation_length,
    requested_dtype,
)
from fincluster.errors import ClosedError, ConfigurationError, FinclusterError, UsageError
from fincluster.serving.local import LocalSpanClient
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.store.partition import cut_config, empty_model
from fincluster.trust.policy import Classification, ModelRef
from fincluster.wire.codec import BlockPrefixes, SpanInputs
from fincluster.wire.compression import WireCompression

AdapterChoice = str | AdapterRef | None
"""A LoRA adapter by id in the servers' adapter store (or with its pinned manifest digest), or none."""


def adapter_ref(adapter: AdapterChoice) -> AdapterRef | None:
    return AdapterRef(adapter) if isinstance(adapter, str) else adapter


def _client_modules(
    config: PretrainedConfig, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[torch.nn.Embedding, torch.nn.Module, torch.nn.Linear]:
    """Embeddings, final norm and LM head of the model family, loaded from the store's client part."""
    skeleton = empty_model(cut_config(config, range(0)), AutoModelForCausalLM.from_config)
    embed, norm, head = skeleton.model.embed_tokens, skeleton.model.norm, skeleton.lm_head
    embed.load_state_dict({"weight": state["embed_tokens.weight"].to(dtype)}, assign=True)
    norm.load_state_dict({"weight": state["norm.weight"].to(dtype)}, assign=True)
    if "lm_head.weight" in state:
        head.load_state_dict({"weight": state["lm_head.weight"].to(dtype)}, assign=True)
    else:
        head.weight = embed.weight
    return embed, norm, head


def parse_classification(value: str) -> Classification:
    try:
        return Classification(value)
    except ValueError:
        names = ", ".join(level.value for level in Classification)
        raise ConfigurationError(f"unknown classification {value!r}; use one of {names}") from None


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):  # type: ignore[misc]
    """Causal LM whose transformer blocks run on the swarm (see module docstring).

    ``repr(model)`` shows where the blocks run (and the chain of the last call); the modules it lists
    (and :meth:`num_parameters`) are only the client part held in this process.
    """

    config_class = PretrainedConfig
    base_model_prefix = "fincluster"
    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        store: ModelStore,
        swarm: ChainPlanner,
        client_state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        classification: Classification,
        local: LocalSpanClient | None = None,
        pin: Pins | None = None,
        compression: WireCompression = WireCompression.NONE,
        adapter: AdapterChoice = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        check_pins(pin or {}, verifies_attestations=swarm.verifies_attestations)
        super().__init__(config)
        self.compression = compression
        self.store = store
        self.swarm = swarm
        self.model_id = store.model_id
        self.classification = classification
        self.local = local
        self.pin: Pins = dict(pin or {})
        self._call_classification: Classification | None = None
        self.adapter = adapter_ref(adapter)
        """The LoRA adapter requests name by default (per call: ``adapter=``)."""
        self._call_adapter: AdapterRef | None = None
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else swarm.max_batch_tokens
        """A stateless pass over more tokens than this is sent as several micro-batches."""
        self.embed_tokens, self.norm, self.lm_head = _client_modules(config, client_state, dtype)
        self.requires_grad_(False)
        self._session: InferenceSession | None = None
        self._closed = False
        self.last_chain: tuple[tuple[str, BlockSpan], ...] = ()
        """(node id, blocks) of each hop of the last planned chain (local blocks included)."""
        self.generation_config = GenerationConfig.from_model_config(config)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        store: str | os.PathLike[str] | ModelStore,
        *,
        swarm: ChainPlanner,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        classification: str = "internal",
        local_blocks: int = 0,
        pin: Pins | None = None,
        compression: str = "none",
        adapter: AdapterChoice = None,
        max_batch_tokens: int | None = None,
    ) -> DistributedModelForCausalLM:
        """Load the client part of ``store`` (digests checked) and connect it to ``swarm``.

        ``dtype`` is the wire dtype (servers check it; it cannot change later); ``device`` is where the
        embeddings, final norm, LM head and any local blocks run (``model.to(device)`` moves them later):
        activations come back from the servers onto it. ``compression``: how hidden states of inference
        sessions travel (``none``, ``float16``, ``bfloat16``, ``blockwise8``; negotiated at open).

        ``classification`` is the default data classification of requests (``public``, ``internal``,
        ``confidential``, ``restricted``; per call with ``classification=``). ``local_blocks=k`` runs
        blocks ``0:k`` in this process, so their activations never leave it. ``pin`` narrows placement:
        ``{range(0, 8): ["spiffe://bank/server/a"]}`` or ``{range(0, 8): "trusted"}``. ``adapter``: the
        LoRA adapter (an id in the servers' adapter store) the servers apply by default (per call with
        ``adapter=``). ``max_batch_tokens``: micro-batch size of stateless passes (default: the swarm's
        ``client.max_batch_tokens``).
        """
        store = store if isinstance(store, ModelStore) else ModelStore.open(store)
        try:
            mode = WireCompression(compression)
        except ValueError:
            names = ", ".join(m.value for m in WireCompression)
            raise ConfigurationError(f"unknown compression {compression!r}; use one of {names}") from None
        config = store.load_config()
        level = parse_classification(classification)
        check_pins(pin or {}, verifies_attestations=swarm.verifies_attestations)  # before loading weights
        if not 0 <= local_blocks <= config.num_hidden_layers:
            raise ConfigurationError(
                f"local_blocks must be within 0..{config.num_hidden_layers}, not {local_blocks}"
            )
        local = (
            LocalSpanClient.from_store(
                store, BlockSpan(0, local_blocks), dtype=dtype, node_id="client", device=device
            )
            if local_blocks
            else None
        )
        model = cls(
            config,
            store=store,
            swarm=swarm,
            client_state=store.load_client_state(),
            dtype=dtype,
            classification=level,
            local=local,
            pin=pin,
            compression=mode,
            adapter=adapter,
            max_batch_tokens=max_batch_tokens,
        )
        model.eval()  # type: ignore[no-untyped-call]
        return model.to(device)

    # transformers hooks -------------------------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        head: torch.nn.Module = self.lm_head
        return head

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the store; nothing is initialised randomly."""

    # routing ------------------------------------------------------------------------------------
    def plan(self, session_id: str) -> Sequence[SpanClient]:
        """The chain of span clients that covers every block, chosen now from the registry."""
        if self._closed:
            raise ClosedError("model is closed")
        total = self.config.num_hidden_layers
        start = self.local.span.end if self.local is not None else 0
        request = self._placement_request()
        remote = (
            self.swarm.plan_chain(request, BlockSpan(start, total), session_id=session_id)
            if start < total
            else []
        )
        chain = [self.local, *remote] if self.local is not None else list(remote)
        for client in remote:
            client.compression = self.compression
        self.last_chain = tuple((client.node_id, client.span) for client in chain)
        return chain

    def _placement_request(self) -> PlacementRequest:
        if self.swarm.closed:
            raise ClosedError(
                "the swarm connection of this model is closed (its `with Swarm(...)` block ended): "
                "open a new Swarm and load the model with it"
            )
        classification = self._call_classification or self.classification
        if (
            classification is not Classification.PUBLIC
            and self.swarm.trail is not None
            and self.swarm.audit is None
        ):
            raise ConfigurationError(
                f"audit is off for this swarm connection, so only public data may be sent "
                f"({classification.value} requested); audit cannot be disabled for internal data and above"
            )
        return PlacementRequest(
            classification=classification,
            model=ModelRef(
                id=self.model_id,
                num_blocks=self.config.num_hidden_layers,
                manifest_sha256=self.store.manifest_digest,
            ),
            pins=self.pin,
        )

    @contextlib.contextmanager
    def _classified(self, classification: str | None) -> Iterator[None]:
        if classification is None:
            yield
            return
        previous, self._call_classification = self._call_classification, parse_classification(classification)
        try:
            yield
        finally:
            self._call_classification = previous

    @contextlib.contextmanager
    def _adapted(self, adapter: AdapterChoice) -> Iterator[None]:
        if adapter is None:
            yield
            return
        previous, self._call_adapter = self._call_adapter, adapter_ref(adapter)
        try:
            yield
        finally:
            self._call_adapter = previous

    @contextlib.contextmanager
    def call_options(
        self, *, classification: str | None = None, adapter: AdapterChoice = None
    ) -> Iterator[None]:
        """The data classification and LoRA adapter of the calls made inside the block (what the
        ``classification=`` / ``adapter=`` keywords of ``forward`` and ``generate`` set)."""
        with self._classified(classification), self._adapted(adapter):
            yield

    @property
    def active_adapter_ref(self) -> AdapterRef | None:
        """The LoRA adapter of the current call (its ``adapter=``, else the model's default)."""
        return self._call_adapter or self.adapter

    @contextlib.contextmanager
    def inference_session(self, *, max_length: int) -> Iterator[InferenceSession]:
        """Keep one KV-cached session across several ``generate``/forward calls.

        ``max_length`` counts every token sent through the session, a prompt-tuning adapter's virtual
        tokens included (deep prompts of prefix tuning are not tokens: servers make room for them).
        """
        with self._opened_session(max_length=max_length) as session:
            yield session

    @contextlib.contextmanager
    def _opened_session(
        self, *, max_length: int, prompt_length: int | None = None
    ) -> Iterator[InferenceSession]:
        if self._session is not None:
            raise ConfigurationError("an inference session is already active on this model")
        request = self._placement_request()
        trail = self.swarm.trail
        session = InferenceSession(
            self,
            max_length=max_length,
            policy=self.swarm.failover,
            on_failover=self._record_failover,
            prompt_length=prompt_length,
            adapter=self.active_adapter_ref,
        )
        if trail is not None:
            trail.session_open(session.session_id, request)
        self._session = session
        ok = False
        try:
            yield session
            ok = not session.failed
        finally:
            self._session = None
            session.close()
            if trail is not None:
                trail.session_close(session.session_id, ok=ok)

    def failed(self, span: BlockSpan, *, session_id: str, node: SpanClient, error: BaseException) -> None:
        """``HopPlanner``: why the hop failed goes to the audit trail (a refusal with its decision id, a
        failed proof or receipt); the swarm avoids the node if it is unhealthy."""
        if self.swarm.trail is not None and isinstance(error, FinclusterError):
            self.swarm.trail.failure(session_id, self._placement_request(), error)
        self.swarm.node_failed(node, error, span=span)

    def replace(self, span: BlockSpan, *, session_id: str, exclude: frozenset[str]) -> Sequence[SpanClient]:
        """``HopPlanner``: span clients for ``span``, none of ``exclude``, judged by the same policy and
        pins as the first routing."""
        clients = self.swarm.plan_chain(
            self._placement_request(), span, session_id=session_id, exclude=exclude
        )
        for client in clients:
            client.compression = self.compression
        return clients

    def verify(
        self,
        node: SpanClient,
        inputs: Callable[[], SpanInputs],
        output: torch.Tensor,
        *,
        session_id: str,
        step: int,
        adapter: AdapterRef | None,
    ) -> None:
        """``HopPlanner``: re-execute a sample of ``node``'s outputs on other nodes the same policy and
        pins allow (with the same adapter), as the policy data's verification section asks for this
        call's classification."""
        request = self._placement_request()
        checker = self.swarm.spot_checker(
            request.classification,
            partial(self._run_elsewhere, request, session_id=session_id, adapter=adapter),
        )
        if checker is None or not checker.wants(node.tier):
            return
        checker.check(node.node_id, node.span, inputs(), output, session_id=session_id, step=step)

    def _run_elsewhere(
        self,
        request: PlacementRequest,
        span: BlockSpan,
        inputs: SpanInputs,
        exclude: frozenset[str],
        *,
        session_id: str,
        adapter: AdapterRef | None,
    ) -> tuple[tuple[str, ...], torch.Tensor]:
        """One stateless pass of ``inputs`` over ``span`` on allowed nodes none of ``exclude``, chosen
        at random so a node cannot predict who checks it. Its transfers are the session's: those nodes
        see its activations, and the audit trail says so."""
        clients = self.swarm.plan_chain(request, span, session_id=session_id, exclude=exclude, at_random=True)
        hidden, offset = inputs.hidden_states, 0
        for client in clients:
            part = SpanInputs(
                hidden,
                inputs.attention_mask,
                inputs.position_ids,
                prefixes=(
                    inputs.prefixes.blocks(offset, offset + len(client.span))
                    if inputs.prefixes is not None
                    else None
                ),
            )
            hidden = client.forward(part, session_id=session_id, adapter=adapter)
            offset += len(client.span)
        return tuple(client.node_id for client in clients), hidden

    def move_hop(self, index: int, node_id: str) -> int:
        """Move hop ``index`` of the active session to server ``node_id`` (same blocks), replaying the
        inputs the old node received so the new one rebuilds the KV cache. The new node must pass the
        same attestation and policy checks as at routing; replays are audited as transfers.

        Returns the number of replayed steps. Failover does the same automatically.
        """
        session = self._session
        if session is None or not session.hops:
            raise UsageError("no active inference session with open hops")
        hop = session.hops[index]
        if not isinstance(self.swarm, Swarm):
            raise UsageError("moving a hop needs a swarm with a registry")
        replacement = self.swarm.pinned_hop(
            self._placement_request(), hop.client.span, node_id, session_id=session.session_id
        )
        replayed = session.replace_hop(index, [replacement])
        self._record_failover(
            session.session_id,
            hop.client.span,
            hop.client.node_id,
            [replacement],
            "hop moved by the client",
            replayed,
        )
        return replayed

    def _record_failover(
        self,
        session_id: str,
        span: BlockSpan,
        failed: str,
        replacements: Sequence[SpanClient],
        reason: BaseException | str,
        replayed: int,
    ) -> None:
        if self.swarm.trail is None:
            return
        for replacement in replacements:
            self.swarm.trail.failover(
                session_id, replacement.span, failed, replacement.node_id, str(reason), replayed
            )

    # forward ------------------------------------------------------------------------------------
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
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``logits_to_keep`` (transformers' convention, which ``generate`` uses): an int ``k`` computes
        the LM head for the last ``k`` positions only (0: all), a 1-D tensor for those positions."""
        if (input_ids is None) == (inputs_embeds is None):
            raise UsageError("pass exactly one of input_ids or inputs_embeds")
        with self.call_options(
            classification=kwargs.pop("classification", None), adapter=kwargs.pop("adapter", None)
        ):
            hidden = self.blocks_output(
                input_ids, attention_mask, position_ids, past_key_values, inputs_embeds
            )
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(self.norm(hidden[:, kept])).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(  # Trainer passes num_items_in_batch (gradient accumulation)
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=self.returned_cache(past_key_values)
        )

    def returned_cache(self, past_key_values: Any) -> Any:
        """The ``past_key_values`` a forward returns: deep prompts as given (constant for a session),
        else, in a session, a stand-in that reports the positions the servers hold."""
        session = self._session
        if session is None or deep_prompts(past_key_values, self.config.num_hidden_layers) is not None:
            return past_key_values
        return RemoteSessionCache(session)

    def blocks_output(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: Any,
        inputs_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """Hidden states after the last block (before the final norm), [batch, new tokens, hidden]:
        what every head of the client part (LM head, a classifier) starts from. A prefilled
        ``past_key_values`` holds deep prompts (peft prefix tuning); its positions come first."""
        session = self._session
        past = session.position if session is not None else 0
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # hidden: [batch, seq, hidden]
        batch, seq = hidden.shape[:2]
        prefixes = deep_prompts(past_key_values, self.config.num_hidden_layers)
        prefix = prefixes.length if prefixes is not None else 0
        if attention_mask is not None:
            attention_mask = without_prefix_columns(attention_mask, prefix)
        if attention_mask is not None:  # transformers' convention: the mask spans held + new tokens
            new = attention_mask.shape[1] - past
        elif session is not None and input_ids is not None and session.holds_prefix_of(input_ids):
            new = seq - past
        else:
            new = seq
        if not 1 <= new <= seq:
            raise UsageError(
                f"{seq} tokens given with a mask of "
                f"{attention_mask.shape[1] if attention_mask is not None else None}"
                f" while the session holds {past}: the mask must cover the held tokens plus 1..{seq} new ones"
            )
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + new, dtype=torch.int64, device=hidden.device)
        if session is not None:
            session.record_tokens(input_ids, new)
        hidden = hidden[:, seq - new :]
        if position_ids is None:  # transformers' default: after everything the cache holds
            first = prefix + past
            positions = torch.arange(first, first + new, device=hidden.device).unsqueeze(0).expand(batch, -1)
        else:
            positions = position_ids[..., -new:]
        positions = positions.to(torch.int64).contiguous()
        mask = attention_mask.to(torch.int64).contiguous()
        wire_dtype = self.embed_tokens.weight.dtype
        hidden = hidden.to(wire_dtype).contiguous()
        if prefixes is not None:
            prefixes = BlockPrefixes(
                prefixes.keys.to(hidden.device, wire_dtype), prefixes.values.to(hidden.device, wire_dtype)
            )
        trail = self.swarm.trail
        session_id = session.session_id if session is not None else uuid.uuid4().hex
        request = self._placement_request()
        recording = (
            trail.recording(session_id, request, stateless=session is None)
            if trail is not None
            else contextlib.nullcontext()
        )
        with recording:  # one transaction per step; a failure is recorded with its reason
            if session is not None:
                output = session.step(hidden, mask, positions, prefixes)
            else:
                output = self._stateless_pass(hidden, mask, positions, prefixes, session_id=session_id)
        return output.to(self.embed_tokens.weight.device)  # servers answer in host memory

    def _stateless_pass(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        prefixes: BlockPrefixes | None,
        *,
        session_id: str,
    ) -> torch.Tensor:
        """One stateless pass (one session id), in micro-batches of at most ``max_batch_tokens``."""
        batch, seq = hidden.shape[:2]
        prefix = prefixes.length if prefixes is not None else 0
        chain = self.plan(session_id)
        outputs = []
        for rows in micro_batches(batch, seq + prefix, self.max_batch_tokens):
            part = None
            if prefixes is not None:
                part = BlockPrefixes(prefixes.keys[:, rows], prefixes.values[:, rows])
            outputs.append(
                chain_forward(
                    chain,
                    hidden[rows],
                    mask[rows],
                    positions[rows],
                    session_id=session_id,
                    planner=self,
                    policy=self.swarm.failover,
                    prefixes=part,
                    adapter=self.active_adapter_ref,
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """transformers' ``generate``; opens a session sized for the request unless one is active.

        ``classification=`` overrides the model's default data classification for this call, and
        ``adapter=`` its LoRA adapter.
        """
        with self.call_options(
            classification=kwargs.pop("classification", None), adapter=kwargs.pop("adapter", None)
        ):
            return self._generate(inputs, **kwargs)

    def _generate(self, inputs: torch.Tensor | None, **kwargs: Any) -> Any:
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt is None:
            raise UsageError("generate needs input_ids (or inputs_embeds)")
        total_length = generation_length(
            self.generation_config,
            prompt.shape[1],
            kwargs,
            max_position_embeddings=getattr(self.config, "max_position_embeddings", None),
        )
        session = self._session
        if session is not None:
            check_fits_session(
                total_length=total_length,
                prompt_length=prompt.shape[1],
                continues_session=session.position == 0
                or kwargs.get("attention_mask") is not None
                or (not prompt.is_floating_point() and session.holds_prefix_of(prompt)),
                position=session.position,
                max_length=session.max_length,
            )
            return GenerationMixin.generate(self, inputs, **kwargs)  # type: ignore[arg-type]
        # sized for the prompt; a first step with virtual tokens ahead of it (prompt tuning) adds them
        with self._opened_session(max_length=total_length, prompt_length=prompt.shape[1]):
            return GenerationMixin.generate(self, inputs, **kwargs)  # type: ignore[arg-type]

    # the client part in this process ----------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> DistributedModelForCausalLM:  # type: ignore[override]
        """Move the client part (and local blocks) to a device; its dtype is fixed at loading (the
        servers check it)."""
        check_dtype_change(self.dtype, requested_dtype(args, kwargs))
        moved: DistributedModelForCausalLM = super().to(*args, **kwargs)
        if self.local is not None:
            self.local.to(self.embed_tokens.weight.device)
        return moved

    def half(self, *args: Any) -> DistributedModelForCausalLM:  # type: ignore[override]
        return self.to(torch.float16)

    def bfloat16(self, *args: Any) -> DistributedModelForCausalLM:  # type: ignore[override]
        return self.to(torch.bfloat16)

    def float(self, *args: Any) -> DistributedModelForCausalLM:  # type: ignore[override]
        return self.to(torch.float32)

    def double(self, *args: Any) -> DistributedModelForCausalLM:  # type: ignore[override]
        return self.to(torch.float64)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the client part held in this process: embeddings, final norm and LM head.

        Blocks that run on servers are not counted, nor local blocks (``local_blocks=k``, run by a
        span runner beside the model); ``repr(model)`` shows where every block runs.
        """
        count: int = super().num_parameters(
            only_trainable=only_trainable, exclude_embeddings=exclude_embeddings
        )
        return count

    def extra_repr(self) -> str:
        total = self.config.num_hidden_layers
        start = self.local.span.end if self.local is not None else 0
        lines = [
            f"model_id={self.model_id!r}, blocks={total}, classification={self.classification.value}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}"
        ]
        if self.local is not None:
            lines.append(f"blocks {self.local.span} run in this process (local_blocks={start})")
        if start < total:
            remote = BlockSpan(start, total)
            hops = [f"{span} {node}" for node, span in self.last_chain if span.start >= start]
            chain = f"last chain: {', '.join(hops)}" if hops else "no call routed yet"
            lines.append(f"blocks {remote} run on the swarm, routed per call ({chain})")
        lines.append("client part below (num_parameters counts only it):")
        return "\n".join(lines)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
