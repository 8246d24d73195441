"""Loading checks every file against the manifest, and refuses tampered, missing or unlisted files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from fincluster.errors import StoreError, StoreIntegrityError
from fincluster.store import ModelStore, import_model

NUM_LAYERS = 4  # of the tiny models built in conftest.py


@pytest.fixture
def store(make_checkpoint: Callable[..., tuple[Path, PreTrainedModel]], tmp_path: Path) -> ModelStore:
    return import_model(make_checkpoint("llama", with_tokenizer=True)[0], tmp_path / "store")


def flip_last_byte(path: Path) -> None:
    """Change one weight byte; the file still parses as safetensors, only its digest differs."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_fresh_store_verifies(store: ModelStore) -> None:
    store.verify()


def test_tampered_block_is_refused_by_name_and_other_blocks_still_load(store: ModelStore) -> None:
    flip_last_byte(store.path / "blocks/block_00002.safetensors")

    with pytest.raises(StoreIntegrityError, match=r"'blocks/block_00002\.safetensors'.*tampered"):
        store.load_block_state(2)
    for index in (0, 1, 3):
        assert store.load_block_state(index)
    with pytest.raises(StoreIntegrityError, match=r"'blocks/block_00002\.safetensors'"):
        store.verify()


def test_tampered_client_part_is_refused(store: ModelStore) -> None:
    flip_last_byte(store.path / "client.safetensors")
    with pytest.raises(StoreIntegrityError, match=r"'client\.safetensors'"):
        store.load_client_state()


def test_tampered_config_is_refused(store: ModelStore) -> None:
    config_path = store.path / "config.json"
    config_path.write_text(
        config_path.read_text().replace('"num_hidden_layers": 4', '"num_hidden_layers": 3')
    )
    with pytest.raises(StoreIntegrityError, match=r"'config\.json'"):
        store.load_config()


def test_tampered_tokenizer_is_refused(store: ModelStore) -> None:
    with (store.path / "tokenizer.json").open("a") as file:
        file.write(" ")
    with pytest.raises(StoreIntegrityError, match=r"'tokenizer\.json'"):
        store.load_tokenizer()


def test_missing_block_is_reported(store: ModelStore) -> None:
    (store.path / "blocks/block_00001.safetensors").unlink()
    with pytest.raises(StoreIntegrityError, match=r"'blocks/block_00001\.safetensors'.*missing"):
        store.load_block_state(1)
    with pytest.raises(StoreIntegrityError, match=r"'blocks/block_00001\.safetensors'.*missing"):
        store.verify()


def test_unlisted_file_fails_verify_but_is_never_loaded(store: ModelStore) -> None:
    (store.path / "blocks/block_00004.safetensors").write_bytes(b"not a block")
    (store.path / "extra.json").write_text("{}")

    with pytest.raises(StoreIntegrityError, match=r"'blocks/block_00004\.safetensors'.*not listed"):
        store.verify()
    assert store.load_tokenizer()("hello")["input_ids"] == [3]
    with pytest.raises(StoreError, match="out of range"):
        store.load_block_state(NUM_LAYERS)


@pytest.mark.parametrize("index", [-1, NUM_LAYERS])
def test_block_index_out_of_range(store: ModelStore, index: int) -> None:
    with pytest.raises(StoreError, match=rf"block {index} is out of range.*blocks 0\.\.{NUM_LAYERS - 1}"):
        store.load_block_state(index)


def test_missing_manifest_is_not_a_store(store: ModelStore) -> None:
    (store.path / "manifest.json").unlink()
    with pytest.raises(StoreError, match=r"manifest\.json is missing"):
        ModelStore.open(store.path)


def test_missing_directory_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no model store"):
        ModelStore.open(tmp_path / "nowhere")


def test_malformed_manifest_is_refused(store: ModelStore) -> None:
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a valid store manifest"):
        ModelStore.open(store.path)


def rewrite_manifest(store: ModelStore, **changes: object) -> None:
    manifest = json.loads((store.path / "manifest.json").read_text())
    (store.path / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_unknown_format_version_is_refused(store: ModelStore) -> None:
    rewrite_manifest(store, format_version=2)
    with pytest.raises(StoreError, match="format version 2 is not supported"):
        ModelStore.open(store.path)


def test_manifest_paths_cannot_leave_the_store(store: ModelStore) -> None:
    rewrite_manifest(store, files={**store.manifest.files, "../outside.json": "0" * 64})
    with pytest.raises(StoreError, match="not a plain relative path"):
        ModelStore.open(store.path)


def test_manifest_must_list_every_block(store: ModelStore) -> None:
    files = dict(store.manifest.files)
    del files["blocks/block_00003.safetensors"]
    rewrite_manifest(store, files=files)
    with pytest.raises(StoreError, match=r"does not list blocks/block_00003\.safetensors"):
        ModelStore.open(store.path)


def test_edited_manifest_changes_its_digest(store: ModelStore) -> None:
    rewrite_manifest(store, model_id="renamed")
    assert ModelStore.open(store.path).manifest_digest != store.manifest_digest
