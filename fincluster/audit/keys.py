"""Which public keys a verifier trusts, and for what: the key ring behind ``verify`` and ``reconcile``.

Every signed thing in an audit log (record seals, checkpoints, prune markers, receipts) names its
signer by key id and, since renewal and rotation exist, by the fingerprint of the certificate the
writer held, and carries the time it was made. A :class:`KeyRing` answers "which trusted key made
this?" under three rules:

* the key must be one the verifier was given, by key id (never a key taken from the data);
* a key that came with a certificate counts only while that certificate was valid at the signing
  time, so a log keeps verifying after its writer's certificate was renewed (same key, new
  certificate) or rotated (new key, new certificate), as long as the old certificates are given
  (the CA's archive, ``fincluster.trust.archive``);
* a certificate from an archive speaks only for its own node: its SPIFFE id must be the log's
  writer (origin ``<role>-<name>``) or the receipt's node. A key or certificate named on the command
  line (``--key``) is *pinned*: the operator chose it for this log, so only its validity is checked.

The ring remembers which keys it used, which is how reports say which key verified the log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fincluster.audit.signing import PublicKey, key_id


@dataclass(frozen=True)
class TrustedKey:
    """One key a verifier accepts, with the certificate it came from (None for a bare public key)."""

    public_key: PublicKey
    key_id: str
    certificate: x509.Certificate | None = None
    pinned: bool = True

    @property
    def fingerprint(self) -> str | None:
        if self.certificate is None:
            return None
        return "sha256:" + self.certificate.fingerprint(hashes.SHA256()).hex()

    @property
    def identity(self) -> str | None:
        """The certificate's SPIFFE id, if it names one."""
        return None if self.certificate is None else _spiffe_uri(self.certificate)

    def valid_at(self, when: datetime | None) -> bool:
        if self.certificate is None or when is None:
            return True
        return self.certificate.not_valid_before_utc <= when <= self.certificate.not_valid_after_utc

    def describe(self) -> str:
        """One line for people: what the key is, and for which node and period."""
        if self.certificate is None:
            return f"public key {self.key_id[:16]}"
        cert, period = self.certificate, "%Y-%m-%d %H:%M"
        return (
            f"certificate {self.fingerprint} (serial {cert.serial_number:x}) of "
            f"{self.identity or 'no identity'}, valid {cert.not_valid_before_utc:{period}} to "
            f"{cert.not_valid_after_utc:{period}} UTC, key {self.key_id[:16]}"
        )


@dataclass(frozen=True)
class Lookup:
    """The outcome of one lookup: the key that verifies, or why none does."""

    key: TrustedKey | None
    reason: str = ""


@dataclass
class KeyRing:
    """The trusted keys of one verification (see the module docstring)."""

    keys: list[TrustedKey]
    used: dict[str, TrustedKey] = field(default_factory=dict)
    """Keys that verified something, by ``key_id + fingerprint``; read by reports."""

    @classmethod
    def of(
        cls, items: Iterable[PublicKey | x509.Certificate | TrustedKey], *, pinned: bool = True
    ) -> KeyRing:
        """A ring of public keys and certificates (pinned: chosen for this log by the operator)."""
        keys = []
        for item in items:
            if isinstance(item, TrustedKey):
                keys.append(item)
            elif isinstance(item, x509.Certificate):
                public_key = item.public_key()
                if _usable(public_key):
                    keys.append(TrustedKey(public_key, key_id(public_key), item, pinned))  # type: ignore[arg-type]
            else:
                keys.append(TrustedKey(item, key_id(item), None, pinned))
        return cls(keys)

    def __add__(self, other: KeyRing) -> KeyRing:
        return KeyRing([*self.keys, *other.keys])

    def __bool__(self) -> bool:
        return bool(self.keys)

    def lookup(
        self,
        kid: str,
        *,
        at: datetime | None,
        cert_fingerprint: str | None = None,
        log_origin: str | None = None,
        node_id: str | None = None,
    ) -> Lookup:
        """The trusted key with id ``kid`` that may have signed, at time ``at``, for this log
        (``log_origin``) or this node (``node_id``, a receipt's signer; every certificate must name it).
        A certificate named by ``cert_fingerprint`` is preferred; any valid one for the key will do."""
        candidates = [k for k in self.keys if k.key_id == kid]
        if not candidates:
            return Lookup(None, "signed by a key that is not among the trusted keys and certificates")
        if node_id is not None:
            candidates = [k for k in candidates if k.certificate is None or k.identity == node_id]
        if log_origin is not None:
            candidates = [k for k in candidates if k.pinned or _origin_of(k.identity) == log_origin]
        if not candidates:
            who = node_id or log_origin
            return Lookup(None, f"signed by a key that is trusted only for another node than {who}")
        valid = [k for k in candidates if k.valid_at(at)]
        if not valid:
            when = f"{at:%Y-%m-%d %H:%M:%S} UTC" if at else "then"
            return Lookup(
                None, f"no certificate of the signing key was valid at {when} (expired or not yet valid)"
            )
        chosen = next((k for k in valid if k.fingerprint == cert_fingerprint), valid[0])
        self.used.setdefault(chosen.key_id + (chosen.fingerprint or ""), chosen)
        return Lookup(chosen)


def _usable(public_key: object) -> bool:
    """Ed25519 and ECDSA P-256 keys sign audit data; any other key in a certificate is no signer."""
    if isinstance(public_key, Ed25519PublicKey):
        return True
    return isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)


def _spiffe_uri(certificate: x509.Certificate) -> str | None:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def _origin_of(identity: str | None) -> str | None:
    """``spiffe://td/server/a`` writes the log of origin ``server-a`` (``audit.node``)."""
    if identity is None:
        return None
    parts = identity.removeprefix("spiffe://").split("/")
    return f"{parts[1]}-{parts[2]}" if len(parts) == 3 else None
