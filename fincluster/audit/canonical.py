"""Canonical bytes (RFC 8785, JSON Canonicalization Scheme) and the digest helper.

A record's canonical bytes are what the Merkle tree hashes and what the database stores, so the same
event always yields the same leaf hash, on any machine and in any Python version.
"""

from __future__ import annotations

import rfc8785
from pydantic import BaseModel

from fincluster.values import sha256_hex

__all__ = ["canonical_json", "sha256_hex"]


def canonical_json(value: BaseModel) -> bytes:
    """RFC 8785 bytes of a model's JSON form (``None`` fields are kept as ``null``)."""
    return rfc8785.dumps(value.model_dump(mode="json"))
