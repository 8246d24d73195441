"""Turning a model (transformers safetensors directory, GGUF file, or alias) into a store."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path

import safetensors.torch
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fincluster.errors import ConfigurationError
from fincluster.logs import get_logger
from fincluster.store.aliases import STORE_ALIASES
from fincluster.store.checkpoint import SafetensorsCheckpoint, load_checkpoint_config, tokenizer_files
from fincluster.store.layout import CLIENT_FILE, CONFIG_FILE, FORMAT_VERSION, block_file
from fincluster.store.manifest import Manifest
from fincluster.store.partition import plan_store
from fincluster.store.staging import StagedStore, check_destination
from fincluster.store.store import ModelStore
from fincluster.values import TensorDType

log = get_logger(__name__)

ProgressCallback = Callable[[str, int, int], None]
TokenizerWriter = Callable[[Path], None]

_GGUF_MAGIC = b"GGUF"
# Config entries that must not reach the store: the GGUF quantization marker (the store holds plain
# dequantized weights) and the source path (machine-specific).
_DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path")


class ImportStage(StrEnum):
    """The ``stage`` argument of progress callbacks."""

    LOAD = "load"  # reading and dequantizing a GGUF file (done 0 then 1, of 1)
    CLIENT = "client"  # the client part was written (1 of 1)
    BLOCKS = "blocks"  # blocks written so far, of num_blocks


def import_model(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> ModelStore:
    """Import a store alias, a GGUF file, or a transformers directory with safetensors weights.

    An alias (a key of ``STORE_ALIASES``) wins over a local path of the same name. ``model_id``
    defaults to the alias, the GGUF file's name without its suffix, or the directory's name.
    """
    out_path = Path(out)
    if model_id is not None and not model_id:
        raise ConfigurationError("model_id must not be empty")
    check_destination(out_path, overwrite=overwrite)
    alias = STORE_ALIASES.get(os.fspath(source))
    source_path = (alias.locate() if alias is not None else Path(source)).resolve()
    _refuse_overlap(source_path, out_path)
    if source_path.is_file() and _is_gguf(source_path):
        name = model_id or (os.fspath(source) if alias is not None else source_path.stem)
        log.info(
            "model_import_started", format="gguf", source=str(source_path), out=str(out_path), model_id=name
        )
        model, tokenizer = _load_gguf(source_path, progress)
        return import_from_model(
            model, tokenizer, out_path, model_id=name, progress=progress, overwrite=overwrite
        )
    if source_path.is_dir() and (source_path / CONFIG_FILE).is_file():
        name = model_id or source_path.name
        log.info(
            "model_import_started",
            format="checkpoint",
            source=str(source_path),
            out=str(out_path),
            model_id=name,
        )
        return _import_checkpoint(
            source_path, out_path, model_id=name, progress=progress, overwrite=overwrite
        )
    raise ConfigurationError(
        f"cannot import {source}: not a store alias ({', '.join(STORE_ALIASES)}), a GGUF file, "
        "or a transformers directory with config.json"
    )


def import_from_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | os.PathLike[str],
    *,
    model_id: str,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> ModelStore:
    """Import an in-memory ``*ForCausalLM`` (for example one transformers loaded from GGUF)."""
    state = model.state_dict()
    return _write_store(
        Path(out),
        config=model.config,
        model_id=model_id,
        source_keys=state,
        get_tensor=state.__getitem__,
        write_tokenizer=None if tokenizer is None else _tokenizer_saver(tokenizer),
        progress=progress,
        overwrite=overwrite,
    )


def _tokenizer_saver(tokenizer: PreTrainedTokenizerBase) -> TokenizerWriter:
    def save(target: Path) -> None:
        tokenizer.save_pretrained(target)

    return save


def _import_checkpoint(
    directory: Path, out: Path, *, model_id: str, progress: ProgressCallback | None, overwrite: bool
) -> ModelStore:
    config = load_checkpoint_config(directory)
    files = tokenizer_files(directory)

    def copy_tokenizer(target: Path) -> None:
        for file in files:
            shutil.copyfile(file, target / file.name)

    with SafetensorsCheckpoint(directory) as checkpoint:
        return _write_store(
            out,
            config=config,
            model_id=model_id,
            source_keys=checkpoint.keys(),
            get_tensor=checkpoint.get,
            write_tokenizer=copy_tokenizer if files else None,
            progress=progress,
            overwrite=overwrite,
        )


def _write_store(
    out: Path,
    *,
    config: PretrainedConfig,
    model_id: str,
    source_keys: Iterable[str],
    get_tensor: Callable[[str], torch.Tensor],
    write_tokenizer: TokenizerWriter | None,
    progress: ProgressCallback | None,
    overwrite: bool,
) -> ModelStore:
    """The one import path: the client part first (its embeddings fix the store dtype), then each block."""
    num_blocks = int(config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = plan_store(source_keys, num_blocks=num_blocks, tie_word_embeddings=tied)
    report = progress or (lambda stage, done, total: None)
    with StagedStore(out, overwrite=overwrite) as staged:
        dtype = _store_dtype(get_tensor(plan.client["embed_tokens.weight"]))
        staged.write_bytes(CLIENT_FILE, _serialize(plan.client, get_tensor, dtype.torch_dtype))
        report(ImportStage.CLIENT, 1, 1)
        report(ImportStage.BLOCKS, 0, num_blocks)
        for index, block in enumerate(plan.blocks):
            staged.write_bytes(block_file(index), _serialize(block, get_tensor, dtype.torch_dtype))
            report(ImportStage.BLOCKS, index + 1, num_blocks)
        if write_tokenizer is not None:  # beside config.json, where AutoTokenizer looks for it
            write_tokenizer(staged.root)
        staged.write_bytes(CONFIG_FILE, _config_json(config, dtype))
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model_id=model_id,
            architecture=str(config.model_type),
            num_blocks=num_blocks,
            hidden_size=int(config.hidden_size),
            dtype=dtype,
            tie_word_embeddings=tied,
            files=staged.file_digests(),
        )
        staged.publish(manifest)
    log.info("model_imported", store=str(out), model_id=model_id, blocks=num_blocks, dtype=dtype.value)
    return ModelStore.open(out)


def _store_dtype(embeddings: torch.Tensor) -> TensorDType:
    try:
        return TensorDType.of(embeddings.dtype)
    except ValueError:
        raise ConfigurationError(
            f"embeddings are {embeddings.dtype}; stores hold float32, float16 or bfloat16"
        ) from None


def _serialize(
    keys: Mapping[str, str], get_tensor: Callable[[str], torch.Tensor], dtype: torch.dtype
) -> bytes:
    """One store file's bytes; floating tensors of another dtype (rare mixed checkpoints) are cast."""
    tensors: dict[str, torch.Tensor] = {}
    for store_key, source_key in keys.items():
        tensor = get_tensor(source_key).detach()
        if not tensor.is_floating_point():
            raise ConfigurationError(
                f"tensor {source_key} is {tensor.dtype}; quantized weights are not supported"
            )
        # A fresh contiguous copy: safetensors refuses tensors that share memory (views, tied weights).
        tensors[store_key] = tensor.to(device="cpu", dtype=dtype, copy=True).contiguous()
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def _config_json(config: PretrainedConfig, dtype: TensorDType) -> bytes:
    data = json.loads(config.to_json_string(use_diff=False))
    for key in _DROPPED_CONFIG_KEYS:
        data.pop(key, None)
    data["dtype"] = dtype.value
    return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode()


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC


def _load_gguf(
    path: Path, progress: ProgressCallback | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Let transformers read and dequantize the GGUF file (to float32)."""
    if progress is not None:
        progress(ImportStage.LOAD, 0, 1)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if progress is not None:
        progress(ImportStage.LOAD, 1, 1)
    return model, tokenizer


def _refuse_overlap(source: Path, out: Path) -> None:
    """Replacing ``out`` must never delete the (resolved) source."""
    resolved_out = out.resolve()
    if source == resolved_out or resolved_out in source.parents:
        raise ConfigurationError(f"cannot import {source} into {out}: the source lies inside the destination")
