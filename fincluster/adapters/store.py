"""The internal adapter store: signed LoRA adapters in a directory or any fsspec location.

Layout, one folder per adapter (adapters are immutable: a pushed id is never overwritten)::

    <store>/<adapter id>/manifest.json        AdapterManifest (canonical JSON)
    <store>/<adapter id>/signature.json       AdapterSignature over manifest.json
    <store>/<adapter id>/files/adapter_config.json
    <store>/<adapter id>/files/adapter_model.safetensors

``push`` checks that a peft adapter directory only changes transformer blocks, writes its manifest
and signs it; ``fetch`` (what servers call) and ``pull`` read an adapter back and accept it only when
a trusted key signed the manifest and every file matches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fsspec
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import TypeAdapter, ValidationError
from safetensors import safe_open

from fincluster.adapters.manifest import (
    ADAPTER_FILES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterId,
    AdapterKeys,
    AdapterManifest,
    check_files,
    lora_layout,
    parse_config,
    sign_manifest,
    signer_of,
    verify_signature,
)
from fincluster.errors import AdapterError
from fincluster.values import sha256_hex

_ADAPTER_ID: TypeAdapter[str] = TypeAdapter(AdapterId)


@dataclass(frozen=True)
class VerifiedAdapter:
    """An adapter whose signature and files checked out: its manifest, digest, signer and file bytes."""

    manifest: AdapterManifest
    digest: str
    key_id: str
    files: dict[str, bytes]

    @property
    def adapter_id(self) -> str:
        return self.manifest.adapter_id


@dataclass(frozen=True)
class ListedAdapter:
    """What ``list`` shows: read from the manifest, signature not checked."""

    adapter_id: str
    digest: str
    base_model_id: str
    target_modules: tuple[str, ...]
    signed_by: str | None


def checked_adapter_id(value: str) -> str:
    try:
        return _ADAPTER_ID.validate_python(value)
    except ValidationError:
        raise AdapterError(
            f"invalid adapter id {value!r}: 1 to 128 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        ) from None


class AdapterStore:
    """Adapters under ``url``: a local directory or any fsspec URL (``s3://bucket/adapters`` ...)."""

    def __init__(self, url: str | Path) -> None:
        self.url = str(url)
        self._fs, self._root = fsspec.core.url_to_fs(self.url)

    def _path(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *parts])

    def _read(self, *parts: str) -> bytes | None:
        path = self._path(*parts)
        try:
            with self._fs.open(path, "rb") as file:
                data: bytes = file.read()
                return data
        except FileNotFoundError:
            return None

    def _write(self, data: bytes, *parts: str) -> None:
        self._fs.makedirs(self._path(*parts[:-1]), exist_ok=True)
        with self._fs.open(self._path(*parts), "wb") as file:
            file.write(data)

    def push(
        self,
        source: Path,
        *,
        adapter_id: str,
        base_model_id: str,
        base_manifest_sha256: str,
        signing_key: ed25519.Ed25519PrivateKey | None,
    ) -> AdapterManifest:
        """Add the peft adapter directory ``source`` (``save_pretrained``'s output) as ``adapter_id``,
        signed with ``signing_key`` (None leaves it unsigned: servers will refuse it)."""
        adapter_id = checked_adapter_id(adapter_id)
        if self._read(adapter_id, "manifest.json") is not None:
            raise AdapterError(f"adapter {adapter_id!r} already exists in {self.url}; adapters are immutable")
        files: dict[str, bytes] = {}
        for name in ADAPTER_FILES:
            try:
                files[name] = (source / name).read_bytes()
            except OSError as error:
                raise AdapterError(f"{source} is not a peft adapter directory: {error}") from None
        with safe_open(str(source / WEIGHTS_FILE), framework="numpy") as weights:
            names = list(weights.keys())
        modules, blocks = lora_layout(parse_config(files[CONFIG_FILE], adapter_id=adapter_id), names)
        manifest = AdapterManifest(
            adapter_id=adapter_id,
            base_model_id=base_model_id,
            base_manifest_sha256=base_manifest_sha256,
            target_modules=tuple(modules),
            blocks=tuple(blocks),
            files={name: sha256_hex(data) for name, data in files.items()},
        )
        for name, data in files.items():
            self._write(data, adapter_id, "files", name)
        manifest_bytes = manifest.to_bytes()
        if signing_key is not None:
            self._write(sign_manifest(manifest_bytes, signing_key).to_bytes(), adapter_id, "signature.json")
        self._write(manifest_bytes, adapter_id, "manifest.json")  # last: an adapter exists once complete
        return manifest

    def fetch(self, adapter_id: str, *, keys: AdapterKeys) -> VerifiedAdapter:
        """The adapter, if a trusted key signed its manifest and every file matches; else AdapterError."""
        adapter_id = checked_adapter_id(adapter_id)
        manifest_bytes = self._read(adapter_id, "manifest.json")
        if manifest_bytes is None:
            raise AdapterError(f"no adapter {adapter_id!r} in the adapter store")
        key_id = verify_signature(
            manifest_bytes, self._read(adapter_id, "signature.json"), keys, adapter_id=adapter_id
        )
        manifest = AdapterManifest.from_bytes(manifest_bytes, source=f"adapter {adapter_id!r}")
        if manifest.adapter_id != adapter_id:
            raise AdapterError(f"adapter {adapter_id!r}: its manifest names {manifest.adapter_id!r}")
        files: dict[str, bytes] = {}
        for name in manifest.files:
            data = self._read(adapter_id, "files", name)
            if data is None:
                raise AdapterError(f"adapter {adapter_id!r}: {name} is missing from the store")
            files[name] = data
        check_files(manifest, files)
        return VerifiedAdapter(manifest, sha256_hex(manifest_bytes), key_id, files)

    def pull(self, adapter_id: str, out: Path, *, keys: AdapterKeys) -> VerifiedAdapter:
        """Fetch (verified) and write the peft adapter files to ``out`` (``PeftModel.from_pretrained``
        reads them)."""
        adapter = self.fetch(adapter_id, keys=keys)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in adapter.files.items():
            (out / name).write_bytes(data)
        return adapter

    def list(self) -> list[ListedAdapter]:
        if not self._fs.exists(self._root):
            return []
        listed = []
        for entry in sorted(self._fs.ls(self._root, detail=False)):
            adapter_id = str(entry).rstrip("/").rsplit("/", 1)[-1]
            data = self._read(adapter_id, "manifest.json")
            if data is None:
                continue
            manifest = AdapterManifest.from_bytes(data, source=f"adapter {adapter_id!r}")
            signature = self._read(adapter_id, "signature.json")
            listed.append(
                ListedAdapter(
                    adapter_id=manifest.adapter_id,
                    digest=sha256_hex(data),
                    base_model_id=manifest.base_model_id,
                    target_modules=manifest.target_modules,
                    signed_by=signer_of(signature) if signature is not None else None,
                )
            )
        return listed
