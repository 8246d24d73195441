"""The store manifest: what the store holds and the SHA-256 of every file in it.

The manifest is the root of trust for a store: its own digest (``ModelStore.manifest_digest``) is what
attestations and audit records name, and every other file is checked against it before use.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

import pydantic

from fincluster.errors import StoreError
from fincluster.store.layout import CLIENT_FILE, CONFIG_FILE, FORMAT_VERSION, MANIFEST_FILE, block_file
from fincluster.values import TensorDType

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _check_store_path(path: str) -> None:
    """Refuse paths that could point outside the store when joined to its root."""
    parts = PurePosixPath(path).parts
    if not parts or "\\" in path or path.startswith("/") or ".." in parts or not path.isprintable():
        raise ValueError(f"file path {path!r} is not a plain relative path inside the store")
    if path != PurePosixPath(path).as_posix():
        raise ValueError(f"file path {path!r} is not in normal form")


class Manifest(pydantic.BaseModel):
    """Facts about a stored model, and the digest of each file (relative posix path -> SHA-256 hex)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", strict=True)

    format_version: int
    model_id: str = pydantic.Field(min_length=1)
    architecture: str = pydantic.Field(min_length=1)
    num_blocks: int = pydantic.Field(ge=1)
    hidden_size: int = pydantic.Field(ge=1)
    dtype: TensorDType
    tie_word_embeddings: bool
    files: dict[str, str]

    @pydantic.field_validator("format_version")
    @classmethod
    def _known_format(cls, version: int) -> int:
        if version != FORMAT_VERSION:
            raise ValueError(
                f"store format version {version} is not supported (this fincluster reads {FORMAT_VERSION})"
            )
        return version

    @pydantic.field_validator("files")
    @classmethod
    def _valid_files(cls, files: dict[str, str]) -> dict[str, str]:
        for path, digest in files.items():
            _check_store_path(path)
            if path == MANIFEST_FILE:
                raise ValueError("the manifest cannot list its own digest")
            if not _SHA256_HEX.fullmatch(digest):
                raise ValueError(f"digest of {path!r} is not a lowercase SHA-256 hex string")
        return files

    @pydantic.model_validator(mode="after")
    def _lists_every_part(self) -> Manifest:
        required = [CONFIG_FILE, CLIENT_FILE, *(block_file(index) for index in range(self.num_blocks))]
        missing = [path for path in required if path not in self.files]
        if missing:
            raise ValueError(
                f"files does not list {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
        return self

    def to_json_bytes(self) -> bytes:
        """The exact bytes written as manifest.json: sorted keys, indent 2, trailing newline."""
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_json_bytes(cls, data: bytes, *, source: str) -> Manifest:
        """Parse and validate manifest bytes; ``source`` names the file in the error message."""
        try:
            return cls.model_validate_json(data)
        except pydantic.ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in issue['loc']) or 'manifest'}: {issue['msg']}"
                for issue in error.errors(include_url=False)
            )
            raise StoreError(f"{source} is not a valid store manifest: {problems}") from None
