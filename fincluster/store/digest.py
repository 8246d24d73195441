"""SHA-256 digests of store files."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_SIZE = 1 << 20


def sha256_file(path: Path) -> str:
    """Hash a file in 1 MiB chunks, so a multi-gigabyte block never sits in memory whole."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()
