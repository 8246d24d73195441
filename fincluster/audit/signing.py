"""The two signature schemes the audit log accepts, behind four small functions.

Writers sign with their node key (ECDSA P-256, the usual TLS key) or a dedicated Ed25519 key. Every
signed structure names the signer by ``key_id`` (SHA-256 of the public key's SubjectPublicKeyInfo)
and, for a node key, by the fingerprint of the certificate the writer held, so a verifier picks the
key from the set it trusts (``fincluster.audit.keys``) and never from the data it is checking.
A writer signs through a :class:`Signer`, which says which key and certificate are current: a node's
TLS key changes on rotation and its certificate on every renewal (``audit.node.CredentialSigner``).
Each signed message starts with its own domain tag, so a signature over one kind of structure can
never be replayed as another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fincluster.errors import ConfigurationError

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
Algorithm = Literal["ed25519", "ecdsa-p256-sha256"]


def algorithm_of(key: PrivateKey | PublicKey) -> Algorithm:
    """Name the scheme of ``key``; any other curve or key type is a configuration error."""
    if isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        return "ed25519"
    if isinstance(key.curve, ec.SECP256R1):
        return "ecdsa-p256-sha256"
    raise ConfigurationError(f"audit keys must be Ed25519 or ECDSA P-256, not {key.curve.name}")


def public_key_of(key: PrivateKey) -> PublicKey:
    algorithm_of(key)
    return key.public_key()


def key_id(key: PublicKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: a stable name for a public key."""
    algorithm_of(key)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def sign(key: PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature, or a DER-encoded ECDSA-SHA256 signature."""
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(message)
    algorithm_of(key)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def signature_is_valid(key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, message)
        else:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class SignerIdentity:
    """The key a writer signs with now, and the certificate that names it (None for a bare key)."""

    key: PrivateKey
    key_id: str
    algorithm: Algorithm
    cert_fingerprint: str | None = None

    @classmethod
    def of(cls, key: PrivateKey, *, cert_fingerprint: str | None = None) -> SignerIdentity:
        public_key = public_key_of(key)
        return cls(key, key_id(public_key), algorithm_of(public_key), cert_fingerprint)


class Signer(Protocol):
    """Where a writer gets its current signing identity (asked for each batch it signs)."""

    def identity(self) -> SignerIdentity: ...


class FixedSigner:
    """A signer whose key never changes (a dedicated audit key, tests, ``audit prune``)."""

    def __init__(self, key: PrivateKey, *, cert_fingerprint: str | None = None) -> None:
        self._identity = SignerIdentity.of(key, cert_fingerprint=cert_fingerprint)

    def identity(self) -> SignerIdentity:
        return self._identity
