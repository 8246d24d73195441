"""Importing transformers checkpoints into stores: every tensor arrives unchanged, in its right part."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

import fincluster.store
from fincluster.errors import ConfigurationError, StoreError
from fincluster.store import Manifest, ModelStore, import_from_model, import_model
from fincluster.store.digest import sha256_file

MakeCheckpoint = Callable[..., tuple[Path, PreTrainedModel]]
FAMILIES = ("llama", "mistral", "qwen2")
NUM_LAYERS = 4  # of the tiny models built in conftest.py


def expected_client_state(model: torch.nn.Module, *, tied: bool) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    client = {
        "embed_tokens.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
    }
    if not tied:
        client["lm_head.weight"] = state["lm_head.weight"]
    return client


def expected_block_state(model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{index}."
    return {key[len(prefix) :]: value for key, value in model.state_dict().items() if key.startswith(prefix)}


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def test_public_names_are_pinned() -> None:
    assert fincluster.store.__all__ == [
        "STORE_ALIASES",
        "Manifest",
        "ModelStore",
        "import_from_model",
        "import_model",
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["single", "sharded"])
def test_every_tensor_lands_unchanged_in_its_part(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, family: str, tied: bool, max_shard_size: str | None
) -> None:
    source, model = make_checkpoint(family, tied=tied, max_shard_size=max_shard_size)
    if max_shard_size is not None:
        assert (source / "model.safetensors.index.json").is_file()

    store = import_model(source, tmp_path / "store")

    assert store.manifest.architecture == family
    assert store.manifest.tie_word_embeddings is tied
    assert_same_tensors(store.load_client_state(), expected_client_state(model, tied=tied))
    for index in range(NUM_LAYERS):
        assert_same_tensors(store.load_block_state(index), expected_block_state(model, index))


def test_store_parts_rebuild_the_same_model(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """Client part + blocks, loaded strictly into a model built from the store's config, give equal logits."""
    source, model = make_checkpoint("qwen2")
    store = import_model(source, tmp_path / "store")

    rebuilt = AutoModelForCausalLM.from_config(store.load_config()).eval()  # type: ignore[no-untyped-call]
    rebuilt.model.embed_tokens.load_state_dict({"weight": store.load_client_state()["embed_tokens.weight"]})
    rebuilt.model.norm.load_state_dict({"weight": store.load_client_state()["norm.weight"]})
    rebuilt.lm_head.load_state_dict({"weight": store.load_client_state()["lm_head.weight"]})
    for index, layer in enumerate(rebuilt.model.layers):
        layer.load_state_dict(store.load_block_state(index), strict=True)

    input_ids = torch.tensor([[1, 5, 9, 77, 3]])
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids).logits, model(input_ids).logits)


def test_manifest_describes_the_store(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source, model = make_checkpoint("mistral", name="tiny-mistral-0.1")
    store = import_model(source, tmp_path / "store")
    manifest_bytes = (store.path / "manifest.json").read_bytes()

    assert store.model_id == "tiny-mistral-0.1"
    assert store.num_blocks == NUM_LAYERS
    assert store.manifest.hidden_size == model.config.hidden_size == 64
    assert store.manifest.dtype == "float32"
    assert store.manifest.format_version == 1
    assert sorted(store.manifest.files) == [
        "blocks/block_00000.safetensors",
        "blocks/block_00001.safetensors",
        "blocks/block_00002.safetensors",
        "blocks/block_00003.safetensors",
        "client.safetensors",
        "config.json",
    ]
    assert manifest_bytes == json.dumps(json.loads(manifest_bytes), sort_keys=True, indent=2).encode() + b"\n"
    assert store.manifest_digest == sha256_file(store.path / "manifest.json")
    for path, digest in store.manifest.files.items():
        assert sha256_file(store.path / path) == digest


def test_config_loads_as_a_plain_model_config(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    store = import_model(make_checkpoint("llama")[0], tmp_path / "store")
    config = store.load_config()

    assert config.model_type == "llama"
    assert config.num_hidden_layers == NUM_LAYERS
    assert getattr(config, "quantization_config", None) is None
    assert "_name_or_path" not in json.loads((store.path / "config.json").read_text())


def test_same_source_gives_the_same_manifest(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source = make_checkpoint("llama", with_tokenizer=True)[0]
    first = import_model(source, tmp_path / "first", model_id="m")
    second = import_model(source, tmp_path / "second", model_id="m")
    assert first.manifest_digest == second.manifest_digest


def test_tokenizer_round_trip(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    store = import_model(make_checkpoint("llama", with_tokenizer=True)[0], tmp_path / "store")

    assert store.load_tokenizer()("hello bank ledger")["input_ids"] == [3, 5, 6]
    assert "tokenizer.json" in store.manifest.files


def test_transformers_reads_the_tokenizer_from_the_store_root(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """The analyst's habit, AutoTokenizer.from_pretrained(store_path), works on a store."""
    from transformers import AutoTokenizer

    store = import_model(make_checkpoint("llama", with_tokenizer=True)[0], tmp_path / "store")
    assert AutoTokenizer.from_pretrained(store.path)("hello bank ledger")["input_ids"] == [3, 5, 6]


def test_stores_with_the_tokenizer_in_a_subfolder_still_load_it(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    """Stores imported before the tokenizer moved to the root keep working."""
    from fincluster.store import Manifest, ModelStore

    store = import_model(make_checkpoint("llama", with_tokenizer=True)[0], tmp_path / "store")
    moved = dict(store.manifest.files)
    (store.path / "tokenizer").mkdir()
    for path in [p for p in moved if p.startswith("tokenizer") or p == "special_tokens_map.json"]:
        (store.path / path).rename(store.path / "tokenizer" / path)
        moved[f"tokenizer/{path}"] = moved.pop(path)
    manifest = store.manifest.model_copy(update={"files": moved})
    (store.path / "manifest.json").write_bytes(Manifest.to_json_bytes(manifest))
    assert ModelStore.open(store.path).load_tokenizer()("hello bank ledger")["input_ids"] == [3, 5, 6]


def test_store_without_tokenizer_says_so(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    store = import_model(make_checkpoint("llama")[0], tmp_path / "store")
    with pytest.raises(StoreError, match="has no tokenizer"):
        store.load_tokenizer()


def test_bfloat16_weights_stay_bfloat16(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source, model = make_checkpoint("llama", dtype=torch.bfloat16)
    store = import_model(source, tmp_path / "store")

    assert store.manifest.dtype == "bfloat16"
    assert store.load_config().dtype == torch.bfloat16
    assert_same_tensors(store.load_block_state(1), expected_block_state(model, 1))


def test_import_from_an_in_memory_model(
    tiny_model: Callable[..., PreTrainedModel], tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = tiny_model("llama", tied=True)
    store = import_from_model(model, tiny_tokenizer, tmp_path / "store", model_id="in-memory")

    assert store.model_id == "in-memory"
    assert_same_tensors(store.load_client_state(), expected_client_state(model, tied=True))
    assert_same_tensors(store.load_block_state(3), expected_block_state(model, 3))
    assert store.load_tokenizer()("world")["input_ids"] == [4]


def test_progress_reports_client_then_each_block(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    import_model(make_checkpoint()[0], tmp_path / "store", progress=lambda *call: calls.append(call))
    assert calls == [("client", 1, 1), *(("blocks", done, NUM_LAYERS) for done in range(NUM_LAYERS + 1))]


def test_non_empty_destination_is_refused_unless_overwrite(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    source = make_checkpoint()[0]

    with pytest.raises(ConfigurationError, match="not empty"):
        import_model(source, out)
    assert (out / "notes.txt").read_text() == "keep me"

    store = import_model(source, out, overwrite=True)
    assert not (out / "notes.txt").exists()
    store.verify()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store", "tiny-model"]


def test_empty_destination_directory_is_used(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    import_model(make_checkpoint()[0], tmp_path / "store").verify()


def test_failed_import_leaves_no_half_store(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source = make_checkpoint()[0]
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": NUM_LAYERS + 1}))

    with pytest.raises(ConfigurationError, match=r"model\.layers\.4\.\*"):
        import_model(source, tmp_path / "store")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny-model"]


def test_tensors_outside_the_layout_are_refused(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source = make_checkpoint()[0]
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": NUM_LAYERS - 1}))

    with pytest.raises(ConfigurationError, match=r"model\.layers\.3\."):
        import_model(source, tmp_path / "store")


def test_untied_source_without_lm_head_is_refused(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source = make_checkpoint(tied=True)[0]
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))

    with pytest.raises(ConfigurationError, match=r"lacks tensor\(s\): lm_head\.weight"):
        import_model(source, tmp_path / "store")


def test_pre_quantized_checkpoint_is_refused(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    source = make_checkpoint()[0]
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (source / "config.json").write_text(json.dumps(config))

    with pytest.raises(ConfigurationError, match="pre-quantized"):
        import_model(source, tmp_path / "store")


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ConfigurationError, match="cannot import"):
        import_model(tmp_path / "weights.bin", tmp_path / "store")
    with pytest.raises(ConfigurationError, match="cannot import"):
        import_model("no-such-model", tmp_path / "store")


def test_destination_inside_source_cannot_replace_it(make_checkpoint: MakeCheckpoint) -> None:
    source = make_checkpoint()[0]
    with pytest.raises(ConfigurationError, match="inside the destination"):
        import_model(source, source, overwrite=True)
    assert (source / "config.json").is_file()


def test_returned_store_is_the_one_on_disk(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    store = import_model(make_checkpoint()[0], tmp_path / "store")
    reopened = ModelStore.open(tmp_path / "store")
    assert reopened.manifest == store.manifest
    assert isinstance(reopened.manifest, Manifest)
    assert reopened.manifest_digest == store.manifest_digest


def test_store_directory_gets_ordinary_permissions(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> None:
    """Servers may run as another user: the store is not left owner-only like a temp directory."""
    store = import_model(make_checkpoint()[0], tmp_path / "store")
    (tmp_path / "plain").mkdir()
    assert store.path.stat().st_mode == (tmp_path / "plain").stat().st_mode
