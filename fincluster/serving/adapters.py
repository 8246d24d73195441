"""LoRA adapters a server applies to its span, chosen per request.

A request names an adapter by id; the server fetches it from its adapter store once, accepts it only
when a trusted adapter-signing key signed its manifest, every file matches that manifest and it was
made for the model this server serves, and then injects it into its span with peft's own LoRA layers
(``peft.inject_adapter_in_model``) under a name of its own. Only that adapter is enabled while a request
that names it computes; every other computation runs the frozen base weights. The adapter's manifest
digest is what receipts and audit records name.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors

from fincluster.adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterKeys, parse_config
from fincluster.adapters.store import AdapterStore
from fincluster.errors import AdapterError
from fincluster.logs import get_logger
from fincluster.serving.span_model import SpanModel

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer

log = get_logger(__name__)
_LORA_KEY = re.compile(r"^(?:.+\.)?layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter injected into this span: its store id, manifest digest and peft adapter name."""

    adapter_id: str
    digest: str
    name: str


class SpanAdapters:
    """The adapters of one span model: fetched, verified and injected on first use, then cached."""

    def __init__(
        self,
        model: SpanModel,
        *,
        store: AdapterStore | None,
        keys: AdapterKeys,
        base_manifest_sha256: str | None,
    ) -> None:
        self._model = model
        self._store = store
        self._keys = keys
        self._base = base_manifest_sha256
        self._loaded: dict[str, LoadedAdapter] = {}
        self._lock = threading.RLock()

    @classmethod
    def none(cls, model: SpanModel) -> SpanAdapters:
        """A span that serves no adapters (a request naming one is refused)."""
        return cls(model, store=None, keys=AdapterKeys([]), base_manifest_sha256=None)

    def resolve(self, adapter_id: str) -> LoadedAdapter | None:
        """The adapter a request names ("" for none), loaded if needed; AdapterError if refused."""
        if not adapter_id:
            return None
        with self._lock:
            loaded = self._loaded.get(adapter_id)
            if loaded is not None:
                return loaded
            if self._store is None:
                raise AdapterError(
                    f"adapter {adapter_id!r} requested; this server has no adapter store "
                    "(server.adapter_store)"
                )
            adapter = self._store.fetch(adapter_id, keys=self._keys)
            if adapter.manifest.base_manifest_sha256 != self._base:
                raise AdapterError(
                    f"adapter {adapter_id!r} was made for model manifest "
                    f"{adapter.manifest.base_manifest_sha256}, not {self._base} which this server serves"
                )
            loaded = LoadedAdapter(adapter_id, adapter.digest, f"fincluster_{adapter.digest[:16]}")
            self._inject(loaded, adapter.files[CONFIG_FILE], adapter.files[WEIGHTS_FILE])
            self._loaded[adapter_id] = loaded
            log.info("adapter_loaded", adapter=adapter_id, digest=adapter.digest, signed_by=adapter.key_id)
            return loaded

    def _inject(self, loaded: LoadedAdapter, config_bytes: bytes, weights_bytes: bytes) -> None:
        """Put the adapter's weights for this span's blocks into peft LoRA layers named ``loaded.name``."""
        config = parse_config(config_bytes, adapter_id=loaded.adapter_id)
        span = self._model.span
        state: dict[str, torch.Tensor] = {}
        for key, tensor in load_safetensors(weights_bytes).items():
            match = _LORA_KEY.match(key)
            if match is None:
                raise AdapterError(f"adapter {loaded.adapter_id!r}: weight {key!r} is outside the blocks")
            block, module, half = int(match[1]), match[2], match[3]
            if block in span.blocks:
                name = f"layers.{block - span.start}.{module}.lora_{half}.{loaded.name}.weight"
                state[name] = tensor.to(self._model.dtype)
        targets = sorted({key.split(".lora_")[0] for key in state})
        if not targets:  # the adapter leaves this span's blocks as they are
            return
        from peft import LoraConfig, inject_adapter_in_model  # only servers that apply adapters load peft

        lora = LoraConfig(
            r=int(config["r"]),  # type: ignore[call-overload]
            lora_alpha=float(config["lora_alpha"]),  # type: ignore[arg-type]
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
        )
        base = self._model.base
        inject_adapter_in_model(lora, base, adapter_name=loaded.name)
        base.requires_grad_(False)
        _, unexpected = base.load_state_dict(state, strict=False, assign=False)
        expected = {name for name, _ in base.named_parameters() if f".{loaded.name}." in name}
        if unexpected or expected != set(state):
            raise AdapterError(
                f"adapter {loaded.adapter_id!r} does not fit blocks {span}: "
                f"{sorted(set(unexpected) | (expected ^ set(state)))[:5]}"
            )
        base.to(self._model.device)  # peft creates the LoRA weights on the CPU

    def _layers(self) -> list[BaseTunerLayer]:
        if not self._loaded:
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [module for module in self._model.base.modules() if isinstance(module, BaseTunerLayer)]

    @contextlib.contextmanager
    def applied(self, adapter: LoadedAdapter | None) -> Iterator[None]:
        """Enable ``adapter`` alone (None: none) in this span for the computation inside the block."""
        with self._lock:
            layers = self._layers()
            for layer in layers:
                layer.enable_adapters(adapter is not None)
                if adapter is not None:
                    layer.set_adapter(adapter.name, inference_mode=True)
            try:
                yield
            finally:
                for layer in layers:
                    layer.enable_adapters(False)
