"""Reading a transformers checkpoint directory tensor by tensor, without loading the whole model."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from fincluster.errors import ConfigurationError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def load_checkpoint_config(directory: Path) -> PretrainedConfig:
    """The checkpoint's config, refusing remote code and pre-quantized weights."""
    raw: dict[str, Any] = json.loads((directory / "config.json").read_text())
    if "quantization_config" in raw:
        raise ConfigurationError(
            f"{directory} holds pre-quantized weights; import the unquantized checkpoint "
            "or a GGUF file instead"
        )
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(
            directory, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"cannot read the transformers config in {directory}: {error}") from error
    return config


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def _weight_files(directory: Path) -> list[Path]:
    """The shards named by the index, else the single model.safetensors; other files are not weights.

    (Mistral repositories also ship ``consolidated.safetensors`` with Mistral's own key names.)
    """
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SINGLE_SAFETENSORS).is_file():
        return [directory / SINGLE_SAFETENSORS]
    raise ConfigurationError(
        f"{directory} has neither {SAFETENSORS_INDEX} nor {SINGLE_SAFETENSORS} "
        "(only safetensors checkpoints are supported)"
    )


class SafetensorsCheckpoint:
    """Memory-mapped shards of a checkpoint; ``get`` reads one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self._files = _weight_files(directory)
        self._handles = ExitStack()
        self._where: dict[str, Any] = {}

    def __enter__(self) -> SafetensorsCheckpoint:
        try:
            for path in self._files:
                self._open(path)
        except BaseException:
            self._handles.close()
            raise
        return self

    def _open(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigurationError(f"checkpoint shard {path} is missing")
        handle = self._handles.enter_context(safe_open(path, framework="pt"))
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if key in self._where:
                raise ConfigurationError(f"tensor {key} appears in more than one shard of {path.parent}")
            self._where[key] = handle

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._handles.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        tensor: torch.Tensor = self._where[key].get_tensor(key)
        return tensor
