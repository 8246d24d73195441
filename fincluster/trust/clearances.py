"""Clearances: which client may send which data classification, from the operator, never the peer.

They come from settings (``trust.clearances``, a mapping in the node's own config) and from a file
every node of the swarm can share (``trust.clearances_file``, JSON or TOML, a flat mapping of client
SPIFFE id to classification)::

    # clearances.toml
    "spiffe://bank.example/client/alice" = "confidential"
    "spiffe://bank.example/client/etl"   = "internal"

The file is re-read when it changes, so granting or withdrawing a clearance needs no restart. A file
that stops parsing fails closed: its entries are dropped (those clients fall back to ``public``) and
the error is logged, until it is fixed. An id listed in both places with different levels is refused.
"""

from __future__ import annotations

import json
import os
import threading
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

from fincluster.errors import ConfigurationError
from fincluster.logs import get_logger
from fincluster.trust.policy import Classification

log = get_logger(__name__)


def parse_clearances(entries: Mapping[str, object], *, source: str) -> dict[str, Classification]:
    """Validate a mapping of client SPIFFE id -> classification name."""
    names = ", ".join(level.value for level in Classification)
    parsed: dict[str, Classification] = {}
    for identity, level in entries.items():
        if not identity.startswith("spiffe://") or "/client/" not in identity:
            raise ConfigurationError(f"{source}: {identity!r} is not a client SPIFFE id")
        try:
            parsed[identity] = Classification(str(level))
        except ValueError:
            raise ConfigurationError(
                f"{source}: {identity} has clearance {level!r}; use one of {names}"
            ) from None
    return parsed


def read_clearances_file(path: Path) -> dict[str, Classification]:
    """The clearances in a JSON (``.json``) or TOML (any other suffix) file; ConfigurationError if not."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(f"cannot read the clearances file {path}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ConfigurationError(f"the clearances file {path} does not parse: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
        raise ConfigurationError(
            f"the clearances file {path} must be a flat mapping of client SPIFFE id to classification"
        )
    return parse_clearances(data, source=str(path))


class Clearances(Mapping[str, Classification]):
    """Inline clearances plus those of a shared file, re-read when the file changes."""

    def __init__(self, inline: Mapping[str, Classification], file: Path | None = None) -> None:
        self._inline = dict(inline)
        self._file = file
        self._lock = threading.Lock()
        self._state: tuple[int, int, int] | None = None
        self._merged = dict(inline)
        if file is not None:
            self._merged = self._merge(read_clearances_file(file))  # a bad file at start is an error
            self._state = self._file_state()

    def _file_state(self) -> tuple[int, int, int] | None:
        if self._file is None:
            return None
        try:
            info = os.stat(self._file)
        except OSError:
            return (-1, -1, -1)
        return info.st_mtime_ns, info.st_ino, info.st_size

    def _merge(self, from_file: Mapping[str, Classification]) -> dict[str, Classification]:
        for identity, level in from_file.items():
            if identity in self._inline and self._inline[identity] is not level:
                raise ConfigurationError(
                    f"{identity} is cleared for {self._inline[identity].value} in trust.clearances but "
                    f"for {level.value} in {self._file}; keep one"
                )
        return {**from_file, **self._inline}

    def _current(self) -> dict[str, Classification]:
        if self._file is None:
            return self._merged
        with self._lock:
            state = self._file_state()
            if state != self._state:
                self._state = state
                try:
                    self._merged = self._merge(read_clearances_file(self._file))
                    log.info("clearances_reloaded", file=str(self._file), clients=len(self._merged))
                except ConfigurationError as error:
                    self._merged = dict(self._inline)
                    log.error("clearances_file_unusable", file=str(self._file), error=str(error))
            return self._merged

    def __getitem__(self, identity: str) -> Classification:
        return self._current()[identity]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())
