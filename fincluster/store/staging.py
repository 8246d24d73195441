"""Writing a store in a hidden directory beside its destination, published by one rename.

A failed or interrupted import leaves no half store at the destination: the staging directory is
removed on error, and the destination only ever holds a complete store with its manifest.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path, PurePosixPath
from types import TracebackType

from fincluster.errors import ConfigurationError
from fincluster.logs import get_logger
from fincluster.store.digest import sha256_file
from fincluster.store.layout import MANIFEST_FILE
from fincluster.store.manifest import Manifest
from fincluster.values import sha256_hex

log = get_logger(__name__)


def check_destination(out: Path, *, overwrite: bool) -> None:
    """Refuse a destination that is a file, or a non-empty directory unless ``overwrite``."""
    if out.is_symlink():
        raise ConfigurationError(f"cannot import into {out}: it is a symbolic link; name its target instead")
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"cannot import into {out}: it is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigurationError(f"cannot import into {out}: it is not empty (pass overwrite to replace it)")


def _fresh_sibling(out: Path, purpose: str) -> Path:
    """A new hidden directory beside ``out`` (same file system, so renames are atomic).

    Created with ``mkdir`` rather than ``mkdtemp`` so the published store gets the usual umask
    permissions instead of owner-only ones.
    """
    directory = out.parent / f".{out.name}.{secrets.token_hex(8)}.{purpose}"
    directory.mkdir()
    return directory


class StagedStore:
    """Files of a store being written; ``publish`` moves them to ``out`` with their manifest."""

    def __init__(self, out: Path, *, overwrite: bool) -> None:
        check_destination(out, overwrite=overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._out = out
        self._overwrite = overwrite
        self._root = _fresh_sibling(out, "importing")
        self._digests: dict[str, str] = {}

    @property
    def root(self) -> Path:
        """The staging directory, for writers (like ``save_pretrained``) that need a path."""
        return self._root

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write one file durably and record its digest from the bytes written."""
        target = self._root / PurePosixPath(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        self._digests[path] = sha256_hex(data)

    def file_digests(self) -> dict[str, str]:
        """Digests of every staged file; those from other writers (``save_pretrained``) are hashed now."""
        digests: dict[str, str] = {}
        for file in sorted(self._root.rglob("*")):
            if file.is_file():
                path = file.relative_to(self._root).as_posix()
                digests[path] = self._digests.get(path) or sha256_file(file)
        return digests

    def publish(self, manifest: Manifest) -> None:
        """Write the manifest last, then swap the staging directory into place."""
        (self._root / MANIFEST_FILE).write_bytes(manifest.to_json_bytes())
        check_destination(self._out, overwrite=self._overwrite)
        if not self._out.is_dir():
            self._root.rename(self._out)
        else:
            replaced = _fresh_sibling(self._out, "replaced")
            self._out.rename(replaced / "store")
            try:
                self._root.rename(self._out)
            except OSError:
                (replaced / "store").rename(self._out)
                raise
            finally:
                shutil.rmtree(replaced, ignore_errors=True)
        log.info("store_published", store=str(self._out), files=len(manifest.files))

    def __enter__(self) -> StagedStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._root.exists():
            shutil.rmtree(self._root, ignore_errors=True)
