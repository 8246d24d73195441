"""Attestation documents: signed claims that bind a node's trust tier to its TLS key.

The security team's attestation authority signs a JWT (JWS compact serialisation, RFC 9864
``Ed25519`` algorithm, ``typ`` :data:`ATTESTATION_JWT_TYPE`, ``kid`` = RFC 7638 thumbprint of
the authority key). Claims:

=========================  ==========================================================
``iss``                    :data:`ATTESTATION_ISSUER`
``sub``                    the node's SPIFFE ID
``jti``                    unique attestation id (goes into the audit log)
``iat`` / ``exp``          issued-at / expiry, seconds since the epoch
``tls_key_sha256``         SHA-256 (hex) of the node's TLS SubjectPublicKeyInfo DER
``tier``                   ``trusted`` or ``standard``
``zone``                   zone / jurisdiction, e.g. ``eu-fra``
``hardware``               hardware description, e.g. ``h100-cc``
``software_version``       the node's fincluster build
``model_manifest_sha256``  digest of the model manifest whose weights the node serves
=========================  ==========================================================

A token proves nothing about the connection it arrives on: anyone can replay it. Bind it with
:func:`require_key_binding` (the peer's TLS key hashes to ``tls_key_sha256``) and, at session open,
:func:`verify_possession_proof` (the peer signed the client's fresh nonce with that key).

Every failure raises :class:`~fincluster.errors.TrustError` with a stable reason
(:class:`~fincluster.errors.TrustReason`, ``error.reason``) for local logs and the audit trail; remote
peers must only ever see :data:`ATTESTATION_REJECTED`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fincluster.errors import ConfigurationError, TrustError, TrustReason
from fincluster.logs import get_logger
from fincluster.values import FrozenModel, Sha256Hex, SpiffeId

__all__ = [
    "ATTESTATION_ISSUER",
    "ATTESTATION_JWT_TYPE",
    "ATTESTATION_REJECTED",
    "DEFAULT_LEEWAY",
    "MIN_NONCE_BYTES",
    "SIGNED_SOFTWARE_EVIDENCE",
    "AttestationSubject",
    "AuthorityKeys",
    "TrustTier",
    "VerifiedClaims",
    "authority_key_id",
    "generate_authority_key_files",
    "issue_attestation",
    "load_authority_private_key",
    "load_authority_public_key",
    "new_nonce",
    "possession_proof_message",
    "require_key_binding",
    "sign_possession_proof",
    "verify_attestation",
    "verify_possession_proof",
]

_log = get_logger(__name__)

#: The one message a remote peer gets for any attestation or possession-proof failure.
ATTESTATION_REJECTED: Final = "attestation rejected"
#: Explicit JWT type (RFC 8725 §3.11): a token minted for another purpose never verifies here.
ATTESTATION_JWT_TYPE: Final = "fincluster-attestation+jwt"
ATTESTATION_ISSUER: Final = "fincluster-attestation-authority"
#: ``VerifiedClaims.evidence_kind`` of claims that come from an authority-signed token.
SIGNED_SOFTWARE_EVIDENCE: Final = "signed-software"
#: Tolerated clock skew between the authority, the node and the verifier.
DEFAULT_LEEWAY: Final = timedelta(seconds=30)

_ALGORITHM: Final = "Ed25519"
_MAX_TOKEN_BYTES: Final = 8192
_NONCE_BYTES: Final = 32
MIN_NONCE_BYTES: Final = 16
_MAX_FIELD_BYTES: Final = 1024
_PROOF_CONTEXT: Final = b"fincluster/v1 attestation possession proof\x00"

_Label = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]


class TrustTier(StrEnum):
    """How far a node is trusted; only ``trusted`` nodes may see sensitive-prefix activations."""

    TRUSTED = "trusted"
    STANDARD = "standard"


class AttestationSubject(FrozenModel):
    """What the authority asserts about one node (the input to :func:`issue_attestation`)."""

    node_id: SpiffeId
    tls_key_sha256: Sha256Hex
    tier: TrustTier
    zone: _Label
    hardware: _Label
    software_version: _Label
    model_manifest_sha256: Sha256Hex


class VerifiedClaims(AttestationSubject):
    """Claims that passed verification: the only attestation data policy and routing may read."""

    attestation_id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    issued_at: datetime
    expires_at: datetime
    authority_key_id: str
    evidence_kind: str


class _TokenClaims(BaseModel):
    """The JWT payload as signed; unknown claims are ignored so new claims stay compatible."""

    model_config = ConfigDict(strict=True, extra="ignore")

    iss: Literal["fincluster-attestation-authority"]
    sub: SpiffeId
    jti: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    iat: int = Field(ge=0)
    exp: int = Field(ge=0)
    tls_key_sha256: Sha256Hex
    tier: TrustTier
    zone: _Label
    hardware: _Label
    software_version: _Label
    model_manifest_sha256: Sha256Hex


class AuthorityKeys:
    """The attestation authority public keys a verifier accepts, by key id (several during rotation)."""

    def __init__(self, keys: Iterable[ed25519.Ed25519PublicKey]) -> None:
        self._keys = {authority_key_id(key): key for key in keys}
        if not self._keys:
            raise ConfigurationError("no attestation authority public key configured")

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> AuthorityKeys:
        return cls(load_authority_public_key(path) for path in paths)

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def get(self, key_id: str) -> ed25519.Ed25519PublicKey | None:
        return self._keys.get(key_id)


def authority_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint: the ``kid`` that names an authority key in tokens."""
    return str(OKPKey.import_key(public_key).thumbprint())


def generate_authority_key_files(private_key_path: Path, public_key_path: Path) -> str:
    """Create a new authority key pair as PEM files and return its key id.

    The private key file is created with mode 0600 and never overwrites an existing file.
    """
    private_key = ed25519.Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new_file(private_key_path, private_pem, mode=0o600)
    _write_new_file(public_key_path, public_pem, mode=0o644)
    return authority_key_id(private_key.public_key())


def load_authority_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigurationError(f"cannot load attestation authority private key {path}: {error}") from error
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigurationError(f"attestation authority key {path} is not an Ed25519 private key")
    return key


def load_authority_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"cannot load attestation authority public key {path}: {error}") from error
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigurationError(f"attestation authority key {path} is not an Ed25519 public key")
    return key


def issue_attestation(
    subject: AttestationSubject,
    *,
    authority_key: ed25519.Ed25519PrivateKey,
    now: datetime,
    lifetime: timedelta,
    attestation_id: str | None = None,
) -> str:
    """Sign an attestation token for ``subject``, valid from ``now`` for ``lifetime``."""
    issued_at = int(_aware(now).timestamp())
    seconds = int(lifetime.total_seconds())
    if seconds <= 0:
        raise ConfigurationError(f"attestation lifetime must be positive, got {lifetime}")
    claims = {
        "iss": ATTESTATION_ISSUER,
        "sub": subject.node_id,
        "jti": attestation_id if attestation_id is not None else str(uuid.uuid4()),
        "iat": issued_at,
        "exp": issued_at + seconds,
        "tls_key_sha256": subject.tls_key_sha256,
        "tier": subject.tier.value,
        "zone": subject.zone,
        "hardware": subject.hardware,
        "software_version": subject.software_version,
        "model_manifest_sha256": subject.model_manifest_sha256,
    }
    header = {
        "alg": _ALGORITHM,
        "typ": ATTESTATION_JWT_TYPE,
        "kid": authority_key_id(authority_key.public_key()),
    }
    payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode()
    return jws.serialize_compact(header, payload, OKPKey.import_key(authority_key), algorithms=[_ALGORITHM])


def verify_attestation(
    token: str,
    *,
    authority_keys: AuthorityKeys,
    now: datetime,
    leeway: timedelta = DEFAULT_LEEWAY,
) -> VerifiedClaims:
    """Check signature, type and validity period; return the claims.

    The claims are not yet bound to any connection: see :func:`require_key_binding`.
    """
    now = _aware(now)
    if len(token) > _MAX_TOKEN_BYTES:
        raise _rejected(TrustReason.MALFORMED, f"token is {len(token)} bytes, limit {_MAX_TOKEN_BYTES}")
    try:
        signed = jws.extract_compact(token.encode("ascii"))
        header = signed.headers()
    except (JoseError, ValueError, TypeError) as error:
        raise _rejected(TrustReason.MALFORMED, f"not a JWS compact token ({error})") from error
    if header.get("alg") != _ALGORITHM or header.get("typ") != ATTESTATION_JWT_TYPE:
        raise _rejected(
            TrustReason.MALFORMED, f"unexpected header alg={header.get('alg')!r} typ={header.get('typ')!r}"
        )
    key_id = header.get("kid")
    if not isinstance(key_id, str):
        raise _rejected(TrustReason.MALFORMED, "header names no authority key id")
    public_key = authority_keys.get(key_id)
    if public_key is None:
        raise _rejected(TrustReason.UNKNOWN_KEY, f"no trusted authority key with kid={key_id!r}")
    try:
        valid = jws.validate_compact(signed, OKPKey.import_key(public_key), algorithms=[_ALGORITHM])
    except JoseError as error:
        raise _rejected(TrustReason.BAD_SIGNATURE, str(error), kid=key_id) from error
    if not valid:
        raise _rejected(TrustReason.BAD_SIGNATURE, "signature does not verify", kid=key_id)
    try:
        claims = _TokenClaims.model_validate_json(signed.payload)
    except ValidationError as error:
        raise _rejected(
            TrustReason.MALFORMED, f"invalid claims: {_first_error(error)}", kid=key_id
        ) from error
    issued_at = datetime.fromtimestamp(claims.iat, UTC)
    expires_at = datetime.fromtimestamp(claims.exp, UTC)
    if expires_at <= issued_at:
        raise _rejected(TrustReason.MALFORMED, "expiry is not after issue time", jti=claims.jti)
    if issued_at > now + leeway:
        raise _rejected(
            TrustReason.NOT_YET_VALID,
            f"issued at {issued_at.isoformat()}, now {now.isoformat()}",
            jti=claims.jti,
        )
    if expires_at <= now - leeway:
        raise _rejected(
            TrustReason.EXPIRED, f"expired at {expires_at.isoformat()}, now {now.isoformat()}", jti=claims.jti
        )
    return VerifiedClaims(
        node_id=claims.sub,
        tls_key_sha256=claims.tls_key_sha256,
        tier=claims.tier,
        zone=claims.zone,
        hardware=claims.hardware,
        software_version=claims.software_version,
        model_manifest_sha256=claims.model_manifest_sha256,
        attestation_id=claims.jti,
        issued_at=issued_at,
        expires_at=expires_at,
        authority_key_id=key_id,
        evidence_kind=SIGNED_SOFTWARE_EVIDENCE,
    )


def require_key_binding(claims: VerifiedClaims, tls_public_key: PublicKeyTypes) -> None:
    """Refuse claims attested for another key (a token replayed by a node that does not own it)."""
    presented = _spki_sha256(tls_public_key)
    if not secrets.compare_digest(presented, claims.tls_key_sha256):
        raise _rejected(
            TrustReason.KEY_MISMATCH,
            f"{claims.node_id} presents TLS key {presented[:16]}… but its attestation "
            f"{claims.attestation_id} is for key {claims.tls_key_sha256[:16]}…: the node's key changed "
            "since it was attested (a rotation needs a new attestation)",
            jti=claims.attestation_id,
            node=claims.node_id,
        )


def new_nonce(*, random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    """A fresh session-open challenge for :func:`sign_possession_proof`."""
    return random_bytes(_NONCE_BYTES)


def possession_proof_message(*, nonce: bytes, session_id: str, client_id: str) -> bytes:
    """The exact bytes a possession proof signs (low level; exposed for test vectors).

    A fixed context label (so the signature cannot be confused with any other use of the TLS
    key) followed by length-prefixed session id, client id and nonce. The client id is the caller
    as the server sees it over mTLS, so a proof relayed through another client does not verify.
    """
    if len(nonce) < MIN_NONCE_BYTES:
        raise TrustError(
            TrustReason.MALFORMED, f"nonce of {len(nonce)} bytes, need at least {MIN_NONCE_BYTES}"
        )
    fields = (session_id.encode(), client_id.encode(), nonce)
    if any(not field or len(field) > _MAX_FIELD_BYTES for field in fields):
        raise TrustError(TrustReason.MALFORMED, "empty or oversized possession proof field")
    return _PROOF_CONTEXT + b"".join(len(field).to_bytes(4, "big") + field for field in fields)


def sign_possession_proof(
    tls_private_key: PrivateKeyTypes, *, nonce: bytes, session_id: str, client_id: str
) -> bytes:
    """Server side of session open: sign the client's challenge with the node's TLS key."""
    message = possession_proof_message(nonce=nonce, session_id=session_id, client_id=client_id)
    if isinstance(tls_private_key, ed25519.Ed25519PrivateKey):
        return tls_private_key.sign(message)
    if isinstance(tls_private_key, ec.EllipticCurvePrivateKey):
        return tls_private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    raise ConfigurationError(
        f"unsupported TLS key type for possession proofs: {type(tls_private_key).__name__}"
    )


def verify_possession_proof(
    proof: bytes,
    *,
    claims: VerifiedClaims | None,
    tls_public_key: PublicKeyTypes,
    nonce: bytes,
    session_id: str,
    client_id: str,
) -> None:
    """Client side of session open: the peer holds the attested key (or, for an unattested node, the
    key of the certificate it showed) and answered this challenge."""
    if claims is not None:
        require_key_binding(claims, tls_public_key)
    message = possession_proof_message(nonce=nonce, session_id=session_id, client_id=client_id)
    try:
        if isinstance(tls_public_key, ed25519.Ed25519PublicKey):
            tls_public_key.verify(proof, message)
        elif isinstance(tls_public_key, ec.EllipticCurvePublicKey):
            tls_public_key.verify(proof, message, ec.ECDSA(hashes.SHA256()))
        else:
            raise _rejected(TrustReason.BAD_PROOF, f"unsupported key type {type(tls_public_key).__name__}")
    except InvalidSignature as error:
        raise _rejected(
            TrustReason.BAD_PROOF,
            "possession proof does not verify",
            jti=claims.attestation_id if claims is not None else None,
            session=session_id,
        ) from error


def _spki_sha256(public_key: PublicKeyTypes) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _rejected(reason: TrustReason, detail: str, **context: object) -> TrustError:
    _log.warning("attestation_rejected", reason=reason.value, detail=detail, **context)
    node = context.get("node")
    return TrustError(reason, detail, node_id=node if isinstance(node, str) else None)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ConfigurationError("now must be a timezone-aware datetime")
    return now


def _write_new_file(path: Path, content: bytes, *, mode: int) -> None:
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as error:
        raise ConfigurationError(f"refusing to overwrite {path}") from error
    except OSError as error:
        raise ConfigurationError(f"cannot create {path}: {error}") from error
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
