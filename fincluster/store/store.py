"""Reading a model store: every file is checked against the manifest before it is used.

Each loader reads a file's bytes once, hashes those bytes and parses the same bytes, so nothing can
change between the check and the use. Files the manifest does not list are never read by a loader;
``verify`` treats them as an integrity failure so a store directory holds exactly what was imported.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import safetensors.torch
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from fincluster.errors import StoreError, StoreIntegrityError
from fincluster.logs import get_logger
from fincluster.store.digest import sha256_file
from fincluster.store.layout import (
    CLIENT_FILE,
    CONFIG_FILE,
    LEGACY_TOKENIZER_DIR,
    MANIFEST_FILE,
    block_file,
    is_weights_or_config,
)
from fincluster.store.manifest import Manifest
from fincluster.values import sha256_hex

log = get_logger(__name__)


class ModelStore:
    """An imported model on disk; servers load only their blocks, clients only the client part."""

    def __init__(self, path: Path, manifest: Manifest, manifest_digest: str) -> None:
        """Use :meth:`open`; this constructor trusts that ``manifest`` came from ``path``."""
        self._path = path
        self._manifest = manifest
        self._manifest_digest = manifest_digest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ModelStore:
        """Read and validate manifest.json; weights are hashed only when they are loaded."""
        root = Path(path)
        manifest_path = root / MANIFEST_FILE
        if not root.is_dir():
            raise StoreError(f"no model store at {root}: not a directory")
        try:
            data = manifest_path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{root} is not a model store: {MANIFEST_FILE} is missing") from None
        except OSError as error:
            raise StoreError(f"cannot read {manifest_path}: {error}") from error
        manifest = Manifest.from_json_bytes(data, source=str(manifest_path))
        return cls(root, manifest, sha256_hex(data))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def manifest_digest(self) -> str:
        """SHA-256 of manifest.json's exact bytes: one value that pins every file of the store."""
        return self._manifest_digest

    @property
    def model_id(self) -> str:
        return self._manifest.model_id

    @property
    def num_blocks(self) -> int:
        return self._manifest.num_blocks

    def load_config(self) -> PretrainedConfig:
        with self._verified_copy([CONFIG_FILE]) as directory:
            config: PretrainedConfig = AutoConfig.from_pretrained(
                directory, local_files_only=True, trust_remote_code=False
            )
        config.name_or_path = str(self._path)  # not the private copy, which is gone
        return config

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """Load the tokenizer from verified copies of its files (config.json rides along for
        AutoTokenizer). ``AutoTokenizer.from_pretrained(store.path)`` reads the same files unchecked."""
        tokenizer_files = [path for path in self._manifest.files if not is_weights_or_config(path)]
        if not tokenizer_files:
            raise StoreError(f"store {self._path} has no tokenizer: its source had no tokenizer files")
        legacy = all(path.startswith(f"{LEGACY_TOKENIZER_DIR}/") for path in tokenizer_files)
        folder = LEGACY_TOKENIZER_DIR if legacy else "."
        with self._verified_copy([CONFIG_FILE, *tokenizer_files]) as directory:
            tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
                directory / folder, local_files_only=True, trust_remote_code=False
            )
        tokenizer.name_or_path = str(self._path / folder)  # not the private copy, which is gone
        return tokenizer

    def load_client_state(self) -> dict[str, torch.Tensor]:
        """Embeddings, final norm, and the LM head when it is not tied to the embeddings."""
        return self._load_tensors(CLIENT_FILE)

    def load_block_state(self, index: int) -> dict[str, torch.Tensor]:
        """One decoder layer's tensors, keyed relative to the layer (``self_attn.q_proj.weight``, ...)."""
        if isinstance(index, bool) or not 0 <= index < self.num_blocks:
            raise StoreError(
                f"block {index} is out of range: store {self.model_id} has blocks 0..{self.num_blocks - 1}"
            )
        return self._load_tensors(block_file(index))

    def verify(self) -> None:
        """Hash every listed file, and refuse files the manifest does not list."""
        unlisted = sorted(self._unlisted_files())
        if unlisted:
            raise StoreIntegrityError(
                f"store file {unlisted[0]!r} in {self._path} is not listed in the manifest"
            )
        for path, expected in sorted(self._manifest.files.items()):
            try:
                actual = sha256_file(self._path / path)
            except FileNotFoundError:
                raise self._missing(path) from None
            self._check_digest(path, actual, expected)
        log.info("store_verified", store=str(self._path), files=len(self._manifest.files))

    def _unlisted_files(self) -> Iterator[str]:
        listed = set(self._manifest.files)
        for file in self._path.rglob("*"):
            relative = file.relative_to(self._path).as_posix()
            if not file.is_dir() and relative != MANIFEST_FILE and relative not in listed:
                yield relative

    def _read_verified(self, path: str) -> bytes:
        expected = self._manifest.files.get(path)
        if expected is None:
            raise StoreError(f"store {self._path} has no file {path!r} in its manifest")
        try:
            data = (self._path / path).read_bytes()
        except FileNotFoundError:
            raise self._missing(path) from None
        except OSError as error:
            raise StoreError(f"cannot read store file {path!r} in {self._path}: {error}") from error
        self._check_digest(path, sha256_hex(data), expected)
        return data

    def _load_tensors(self, path: str) -> dict[str, torch.Tensor]:
        data = self._read_verified(path)
        try:
            return safetensors.torch.load(data)
        except Exception as error:  # a file that matches its digest but does not parse: a bad import
            raise StoreError(
                f"store file {path!r} in {self._path} is not valid safetensors: {error}"
            ) from error

    @contextmanager
    def _verified_copy(self, paths: Iterable[str]) -> Iterator[Path]:
        """A private directory of verified copies of ``paths``, for loaders that only read directories."""
        with tempfile.TemporaryDirectory(prefix="fincluster-store-") as directory:
            root = Path(directory)
            for path in paths:
                target = root / PurePosixPath(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self._read_verified(path))
            yield root

    def _check_digest(self, path: str, actual: str, expected: str) -> None:
        if actual != expected:
            log.error("store_file_tampered", store=str(self._path), file=path)
            raise StoreIntegrityError(
                f"store file {path!r} in {self._path} is corrupt or was tampered with: "
                f"its SHA-256 is {actual}, the manifest says {expected}"
            )

    def _missing(self, path: str) -> StoreIntegrityError:
        return StoreIntegrityError(f"store file {path!r} listed in the manifest of {self._path} is missing")

    def __repr__(self) -> str:
        return (
            f"ModelStore(path={str(self._path)!r}, model_id={self.model_id!r}, num_blocks={self.num_blocks})"
        )
