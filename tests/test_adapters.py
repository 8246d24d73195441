"""Signed LoRA adapters: the store, the servers that apply them per request, and the audit trail.

The reference is peft's own LoRA on transformers' model: generation through three servers with the
adapter must equal ``PeftModel.from_pretrained(model, adapter).generate``. Servers apply only adapters
a trusted adapter-signing key signed, whose files match the manifest, made for the model they serve.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from peft import LoraConfig, PeftModel, get_peft_model

from fincluster.adapters import AdapterKeys, AdapterStore
from fincluster.audit import AuditRecorder, TransferEvent
from fincluster.audit.reconcile import reconcile
from fincluster.cli import main
from fincluster.errors import AdapterError, AdapterRefusedError
from fincluster.serving.service import Transfer
from tests.helpers import Pki, running_cluster, tiny_model

pytestmark = pytest.mark.e2e
SIGNER = Ed25519PrivateKey.generate()
ROGUE = Ed25519PrivateKey.generate()


def lora_directory(directory: Path, *, seed: int, **options: object) -> Path:
    """A peft LoRA adapter for the tiny llama with random (non-zero) A and B, saved by peft."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)  # type: ignore[arg-type]
    get_peft_model(tiny_model("llama"), config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_llama_store) -> tuple[AdapterStore, Path]:
    root = tmp_path_factory.mktemp("adapters")
    store = AdapterStore(root / "store")
    source = lora_directory(root / "finance", seed=1, target_modules=["q_proj", "v_proj", "down_proj"])
    base = {
        "base_model_id": tiny_llama_store.model_id,
        "base_manifest_sha256": tiny_llama_store.manifest_digest,
    }
    store.push(source, adapter_id="finance-lora", signing_key=SIGNER, **base)
    store.push(source, adapter_id="unsigned-lora", signing_key=None, **base)
    store.push(source, adapter_id="rogue-lora", signing_key=ROGUE, **base)
    store.push(source, adapter_id="tampered-lora", signing_key=SIGNER, **base)
    weights = root / "store" / "tampered-lora" / "files" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    other = {"base_model_id": "other-model", "base_manifest_sha256": "ab" * 32}
    store.push(source, adapter_id="other-model-lora", signing_key=SIGNER, **other)
    return store, source


@pytest.fixture(scope="module")
def adapter_cluster(pki: Pki, tiny_llama_store, adapters):
    store, _ = adapters
    keys = AdapterKeys([SIGNER.public_key()])
    with running_cluster(
        pki, tiny_llama_store, ["0:2", "2:4", "4:6"], adapter_store=store.url, adapter_keys=keys
    ) as cluster:
        yield cluster


def test_generation_with_a_signed_adapter_equals_local_peft(adapter_cluster, adapters) -> None:
    _, source = adapters
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(31))
    local = PeftModel.from_pretrained(tiny_model("llama"), source)
    with torch.no_grad():
        expected = local.generate(ids, max_new_tokens=8, do_sample=False)
        local_logits = local(input_ids=ids).logits
        plain = tiny_model("llama").generate(ids, max_new_tokens=8, do_sample=False)
    with adapter_cluster.swarm() as swarm:
        model = adapter_cluster.model(swarm)
        with torch.no_grad():
            produced = model.generate(ids, max_new_tokens=8, do_sample=False, adapter="finance-lora")
            logits = model(ids, adapter="finance-lora").logits
            without = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert produced.tolist() == expected.tolist()
    assert (logits - local_logits).abs().max().item() <= 1e-4
    assert expected.tolist() != plain.tolist()  # the adapter matters
    assert without.tolist() == plain.tolist()  # and only for the requests that name it


def test_audit_records_name_the_adapter_digest_on_both_sides(pki, tiny_llama_store, adapters) -> None:
    store, _ = adapters
    digest = store.fetch("finance-lora", keys=AdapterKeys([SIGNER.public_key()])).digest
    received: list[Transfer] = []
    keys = AdapterKeys([SIGNER.public_key()])
    server_log = AuditRecorder()
    with running_cluster(
        pki,
        tiny_llama_store,
        ["0:6"],
        adapter_store=store.url,
        adapter_keys=keys,
        received=received,
        audit=server_log,
    ) as cluster:
        recorder = AuditRecorder()
        ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(32))
        with cluster.swarm(audit=recorder) as swarm, torch.no_grad():
            model = cluster.model(swarm)
            model.generate(ids, max_new_tokens=2, do_sample=False, adapter="finance-lora")
            model(ids)
    client = [(e.operation, e.adapter_sha256) for e in recorder.of_kind(TransferEvent)]
    assert client == [("inference_step", digest), ("inference_step", digest), ("forward", None)]
    assert [(t.operation, t.adapter_sha256) for t in received] == client
    assert reconcile(recorder.events, server_log.events).matched == 3
    forged = [
        e.model_copy(update={"adapter_sha256": None}) if isinstance(e, TransferEvent) else e
        for e in recorder.events
    ]
    mismatches = reconcile(forged, server_log.events).mismatched
    assert [m.reason for m in mismatches] == ["the records name different adapters"] * 2


@pytest.mark.parametrize(
    ("adapter_id", "message"),
    [
        ("unsigned-lora", "'unsigned-lora' is not signed; only signed adapters are applied"),
        ("rogue-lora", "not one of the trusted adapter keys"),
        ("tampered-lora", "adapter_model.safetensors does not match the SHA-256 in its manifest"),
        ("other-model-lora", "was made for model manifest abab"),
        ("no-such-lora", "no adapter 'no-such-lora' in the adapter store"),
    ],
)
def test_an_adapter_the_server_may_not_apply_is_refused_with_the_reason(
    adapter_cluster, adapter_id, message
) -> None:
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(33))
    with adapter_cluster.swarm() as swarm:
        model = adapter_cluster.model(swarm)
        with pytest.raises(AdapterRefusedError, match=message) as refused, torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False, adapter=adapter_id)
    assert refused.value.node_id is not None


def test_a_server_without_an_adapter_store_refuses_adapters(tiny_cluster) -> None:
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(34))
    with (
        tiny_cluster.swarm() as swarm,
        torch.no_grad(),
        pytest.raises(AdapterRefusedError, match="this server has no adapter store"),
    ):
        tiny_cluster.model(swarm)(ids, adapter="finance-lora")


def test_push_refuses_adapters_that_change_modules_outside_the_blocks(tmp_path, tiny_llama_store) -> None:
    source = lora_directory(tmp_path / "head", seed=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="outside the transformer blocks"):
        AdapterStore(tmp_path / "store").push(
            source,
            adapter_id="head-lora",
            base_model_id=tiny_llama_store.model_id,
            base_manifest_sha256=tiny_llama_store.manifest_digest,
            signing_key=SIGNER,
        )
    assert AdapterStore(tmp_path / "store").list() == []


def test_adapters_cli_keygen_push_list_and_pull(tmp_path, tiny_llama_store, adapters, capsys) -> None:
    _, source = adapters
    store = f"file://{tmp_path / 'cli-store'}"  # any fsspec URL
    key, public = tmp_path / "signing.key", tmp_path / "signing.pub"
    assert main(["adapters", "keygen", "--private", str(key), "--public", str(public)]) == 0
    manifest = tiny_llama_store.path / "manifest.json"
    push = ["adapters", "push", str(source), "--store", store, "--id", "finance-lora"]
    assert main([*push, "--base-manifest", str(manifest), "--signing-key", str(key)]) == 0
    assert main(["adapters", "list", "--store", store]) == 0
    out = tmp_path / "pulled"
    assert (
        main(["adapters", "pull", "finance-lora", "--store", store, "--key", str(public), "--out", str(out)])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("pushed adapter finance-lora for tiny-llama (mlp.down_proj, self_attn.q_proj")
    assert lines[4].startswith("finance-lora  tiny-llama  sha256:")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()
    # a second push of the same id is refused: adapters are immutable
    assert main([*push, "--base-manifest", str(manifest), "--signing-key", str(key)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_receipt_for_another_adapter_than_the_pinned_digest_is_not_accepted(adapter_cluster) -> None:
    """With AdapterRef(id, sha256) the client accepts only receipts that name exactly that digest."""
    from fincluster.adapters import AdapterRef
    from fincluster.errors import FinclusterError

    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(35))
    pinned = AdapterRef("finance-lora", sha256="0" * 64)
    with (
        adapter_cluster.swarm() as swarm,
        torch.no_grad(),
        pytest.raises(
            FinclusterError, match=f"receipt names adapter [0-9a-f]{{64}}; 'finance-lora' is {'0' * 64}"
        ),
    ):
        adapter_cluster.model(swarm)(ids, adapter=pinned)
