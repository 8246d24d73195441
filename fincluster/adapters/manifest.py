"""An adapter's manifest and its signature: what a server checks before it applies a LoRA adapter.

The manifest pins every file of a peft adapter directory by SHA-256, names the base model (by its
store manifest's digest) the adapter was trained for, and lists the modules it changes. Its digest is
the SHA-256 of ``manifest.json``'s exact bytes; that is the adapter's identity in receipts and audit
records. The signature is an adapter-signing key's Ed25519 signature over a domain-separated line and
those bytes; a verifier accepts it only from a key it was configured to trust (``trust.adapter_keys``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import Field, ValidationError

from fincluster.errors import AdapterError, ConfigurationError
from fincluster.trust.attestation import authority_key_id
from fincluster.values import FrozenModel, OpaqueId, Sha256Hex, sha256_hex

SIGNATURE_DOMAIN = b"fincluster-adapter-signature-v1\n"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

AdapterId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]
"""An adapter's name in a store: lowercase letters, digits, ``.``, ``_`` and ``-`` (a directory name)."""

_LORA_KEY = re.compile(r"^(?:.+\.)?layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
"""A LoRA weight inside transformer block N, as peft saves it."""


@dataclass(frozen=True)
class AdapterRef:
    """The LoRA adapter a client asks servers to apply: its id in their adapter store and, optionally,
    the manifest digest it must have (servers sign the digest they applied; the client checks it)."""

    adapter_id: str
    sha256: str | None = None


class AdapterManifest(FrozenModel):
    format: Literal["fincluster-adapter-v1"] = "fincluster-adapter-v1"
    adapter_id: AdapterId
    peft_type: Literal["LORA"] = "LORA"
    base_model_id: OpaqueId
    base_manifest_sha256: Sha256Hex
    """The digest of the base model's store manifest (what attestations name): the adapter applies
    to exactly those weights."""
    target_modules: tuple[str, ...] = Field(min_length=1)
    """Modules of a transformer block the adapter changes (``self_attn.q_proj`` ...)."""
    blocks: tuple[int, ...] = Field(min_length=1)
    """Blocks that carry adapter weights."""
    files: dict[str, Sha256Hex]

    def to_bytes(self) -> bytes:
        """The canonical bytes (RFC 8785) written as ``manifest.json``."""
        return bytes(rfc8785.dumps(self.model_dump(mode="json")))

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> AdapterManifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as error:
            raise AdapterError(f"{source}: not an adapter manifest ({_first_error(error)})") from None


class AdapterSignature(FrozenModel):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: OpaqueId
    """RFC 7638 thumbprint of the signing key."""
    signature: str

    def to_bytes(self) -> bytes:
        return bytes(rfc8785.dumps(self.model_dump(mode="json")))


class AdapterKeys:
    """The adapter-signing public keys a server accepts, by key id."""

    def __init__(self, keys: Iterable[ed25519.Ed25519PublicKey]) -> None:
        self._keys = {authority_key_id(key): key for key in keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> AdapterKeys:
        return cls(load_adapter_public_key(path) for path in paths)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def get(self, key_id: str) -> ed25519.Ed25519PublicKey | None:
        return self._keys.get(key_id)


def sign_manifest(manifest_bytes: bytes, key: ed25519.Ed25519PrivateKey) -> AdapterSignature:
    signature = key.sign(SIGNATURE_DOMAIN + manifest_bytes)
    return AdapterSignature(
        key_id=authority_key_id(key.public_key()),
        signature=base64.urlsafe_b64encode(signature).decode("ascii"),
    )


def verify_signature(
    manifest_bytes: bytes, signature_bytes: bytes | None, keys: AdapterKeys, *, adapter_id: str
) -> str:
    """The id of the trusted key that signed ``manifest_bytes``; AdapterError otherwise."""
    if signature_bytes is None:
        raise AdapterError(f"adapter {adapter_id!r} is not signed; only signed adapters are applied")
    try:
        signature = AdapterSignature.model_validate_json(signature_bytes)
        raw = base64.urlsafe_b64decode(signature.signature.encode("ascii"))
    except (ValidationError, ValueError):
        raise AdapterError(f"adapter {adapter_id!r}: its signature file is malformed") from None
    key = keys.get(signature.key_id)
    if key is None:
        raise AdapterError(
            f"adapter {adapter_id!r} is signed by key {signature.key_id}, which is not one of the trusted "
            f"adapter keys (trust.adapter_keys: {sorted(keys.key_ids) or 'none configured'})"
        )
    try:
        key.verify(raw, SIGNATURE_DOMAIN + manifest_bytes)
    except InvalidSignature:
        raise AdapterError(
            f"adapter {adapter_id!r}: the signature does not match its manifest (altered after signing, "
            f"or not made by key {signature.key_id})"
        ) from None
    return signature.key_id


def signer_of(signature_bytes: bytes) -> str:
    """The key id a signature file names, unverified (for listings)."""
    try:
        return AdapterSignature.model_validate_json(signature_bytes).key_id
    except ValidationError:
        return "malformed signature"


def check_files(manifest: AdapterManifest, files: Mapping[str, bytes]) -> None:
    """Every file the manifest lists is present with its SHA-256, and nothing else."""
    if set(files) != set(manifest.files):
        raise AdapterError(
            f"adapter {manifest.adapter_id!r}: files {sorted(files)} do not match its manifest's "
            f"{sorted(manifest.files)}"
        )
    for name, expected in manifest.files.items():
        if sha256_hex(files[name]) != expected:
            raise AdapterError(
                f"adapter {manifest.adapter_id!r}: {name} does not match the SHA-256 in its manifest "
                "(tampered with or corrupt)"
            )


def lora_layout(config: Mapping[str, object], weight_names: Iterable[str]) -> tuple[list[str], list[int]]:
    """(target modules, blocks) of a peft LoRA adapter that only changes transformer blocks.

    Servers apply adapters to their blocks only, so anything else (an adapted LM head or embedding,
    modules_to_save, per-layer patterns keyed by whole-model names, DoRA, trained biases) is refused.
    """
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"only LoRA adapters can be served, not {config.get('peft_type')!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, used in unsupported.items() if used)
        raise AdapterError(f"LoRA options the servers do not apply: {names}")
    modules: set[str] = set()
    blocks: set[int] = set()
    for name in weight_names:
        match = _LORA_KEY.match(name)
        if match is None:
            raise AdapterError(
                f"adapter weight {name!r} is outside the transformer blocks; servers apply adapters to "
                "their blocks only"
            )
        blocks.add(int(match[1]))
        modules.add(match[2])
    if not modules:
        raise AdapterError("the adapter has no LoRA weights")
    return sorted(modules), sorted(blocks)


def parse_config(data: bytes, *, adapter_id: str) -> dict[str, object]:
    try:
        config = json.loads(data)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE} is not a JSON object")
    return config


def load_adapter_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigurationError(f"cannot load adapter-signing private key {path}: {error}") from error
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigurationError(f"adapter-signing key {path} is not an Ed25519 private key")
    return key


def load_adapter_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"cannot load adapter-signing public key {path}: {error}") from error
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigurationError(f"adapter-signing key {path} is not an Ed25519 public key")
    return key


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
