"""Attestation tokens, key binding, possession proofs and the evidence-verifier interface."""

from __future__ import annotations

import hashlib
import json
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import ValidationError

from fincluster.errors import ConfigurationError, TrustError
from fincluster.trust.attestation import (
    ATTESTATION_REJECTED,
    SIGNED_SOFTWARE_EVIDENCE,
    AttestationSubject,
    AuthorityKeys,
    TrustTier,
    VerifiedClaims,
    authority_key_id,
    generate_authority_key_files,
    issue_attestation,
    load_authority_private_key,
    load_authority_public_key,
    new_nonce,
    possession_proof_message,
    require_key_binding,
    sign_possession_proof,
    verify_attestation,
    verify_possession_proof,
)
from fincluster.trust.verifiers import EvidenceVerifier, SignedSoftwareVerifier, VerifierSet

VECTORS = Path(__file__).parent.parent / "vectors" / "attestation"
VALID = json.loads((VECTORS / "token_valid.json").read_text())
REJECTIONS = json.loads((VECTORS / "token_rejections.json").read_text())
POSSESSION = json.loads((VECTORS / "possession_proof.json").read_text())

AUTHORITY = ed25519.Ed25519PrivateKey.from_private_bytes(
    bytes.fromhex(VALID["authority_private_key_seed"]["hex"])
)
NODE_TLS = ed25519.Ed25519PrivateKey.from_private_bytes(
    bytes.fromhex(VALID["node_tls_private_key_seed"]["hex"])
)
SUBJECT = AttestationSubject.model_validate(VALID["subject"])
ISSUED_AT = datetime.fromisoformat(VALID["issued_at"])
VERIFY_AT = datetime.fromisoformat(VALID["verify_at"])
KEYS = AuthorityKeys([AUTHORITY.public_key()])


def _verified() -> VerifiedClaims:
    return verify_attestation(VALID["token"], authority_keys=KEYS, now=VERIFY_AT)


def _reason(error: pytest.ExceptionInfo[TrustError]) -> str:
    return str(error.value).split(":", 1)[0]


# --- known-answer vectors ---------------------------------------------------------------------


def test_issuing_the_vector_claims_reproduces_the_vector_token() -> None:
    token = issue_attestation(
        SUBJECT,
        authority_key=AUTHORITY,
        now=ISSUED_AT,
        lifetime=timedelta(seconds=VALID["lifetime_seconds"]),
        attestation_id=VALID["attestation_id"],
    )
    assert token == VALID["token"]


def test_verifying_the_vector_token_gives_the_vector_claims() -> None:
    assert _verified().model_dump(mode="json") == VALID["expected_claims"]


def test_vector_key_id_is_the_rfc7638_thumbprint_of_the_authority_key() -> None:
    assert authority_key_id(AUTHORITY.public_key()) == VALID["authority_key_id"]


@pytest.mark.parametrize("case", REJECTIONS["cases"], ids=[case["name"] for case in REJECTIONS["cases"]])
def test_rejection_vector_fails_with_its_reason(case: dict[str, Any]) -> None:
    with pytest.raises(TrustError) as error:
        verify_attestation(case["token"], authority_keys=KEYS, now=datetime.fromisoformat(case["verify_at"]))
    assert _reason(error) == case["reason"]


def test_possession_vector_message_and_proof_are_fixed() -> None:
    nonce = bytes.fromhex(POSSESSION["nonce_hex"])
    context = {"nonce": nonce, "session_id": POSSESSION["session_id"], "client_id": POSSESSION["client_id"]}
    assert possession_proof_message(**context).hex() == POSSESSION["message_hex"]
    assert sign_possession_proof(NODE_TLS, **context).hex() == POSSESSION["proof_hex"]
    verify_possession_proof(
        bytes.fromhex(POSSESSION["proof_hex"]),
        claims=_verified(),
        tls_public_key=NODE_TLS.public_key(),
        **context,
    )


@pytest.mark.parametrize(
    "case", POSSESSION["rejections"], ids=[case["name"] for case in POSSESSION["rejections"]]
)
def test_possession_rejection_vector_fails_with_its_reason(case: dict[str, Any]) -> None:
    presented = NODE_TLS
    if "presented_key_seed_hex" in case:
        presented = ed25519.Ed25519PrivateKey.from_private_bytes(
            bytes.fromhex(case["presented_key_seed_hex"])
        )
    nonce = bytes.fromhex(POSSESSION["nonce_hex"])
    proof = sign_possession_proof(
        presented, nonce=nonce, session_id=POSSESSION["session_id"], client_id=POSSESSION["client_id"]
    )
    with pytest.raises(TrustError) as error:
        verify_possession_proof(
            proof,
            claims=_verified(),
            tls_public_key=presented.public_key(),
            nonce=nonce,
            session_id=case.get("session_id", POSSESSION["session_id"]),
            client_id=case.get("client_id", POSSESSION["client_id"]),
        )
    assert _reason(error) == case["reason"]


# --- verification details -----------------------------------------------------------------------


def test_expiry_tolerates_the_leeway_and_no_more() -> None:
    expires_at = datetime.fromisoformat(VALID["expected_claims"]["expires_at"])
    verify_attestation(VALID["token"], authority_keys=KEYS, now=expires_at + timedelta(seconds=29))
    with pytest.raises(TrustError, match=r"^expired:"):
        verify_attestation(VALID["token"], authority_keys=KEYS, now=expires_at, leeway=timedelta(0))


def test_any_of_several_authority_keys_verifies_during_rotation() -> None:
    rotated = AuthorityKeys([ed25519.Ed25519PrivateKey.generate().public_key(), AUTHORITY.public_key()])
    assert (
        verify_attestation(VALID["token"], authority_keys=rotated, now=VERIFY_AT).attestation_id
        == VALID["attestation_id"]
    )


def test_oversized_token_is_malformed_before_parsing() -> None:
    with pytest.raises(TrustError, match=r"^malformed:"):
        verify_attestation("a" * 9000, authority_keys=KEYS, now=VERIFY_AT)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        verify_attestation(VALID["token"], authority_keys=KEYS, now=datetime(2026, 1, 15, 12))


def test_rejection_is_logged_locally_with_its_precise_reason() -> None:
    with structlog.testing.capture_logs() as logs, pytest.raises(TrustError):
        verify_attestation(VALID["token"], authority_keys=KEYS, now=VERIFY_AT + timedelta(days=2))
    assert logs[0]["event"] == "attestation_rejected"
    assert logs[0]["reason"] == "expired"
    assert logs[0]["jti"] == VALID["attestation_id"]


def test_remote_peers_get_one_opaque_message() -> None:
    assert ATTESTATION_REJECTED == "attestation rejected"


def test_verified_claims_are_frozen() -> None:
    claims = _verified()
    with pytest.raises(ValidationError):
        claims.tier = TrustTier.STANDARD  # type: ignore[misc]


def test_non_positive_lifetime_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        issue_attestation(SUBJECT, authority_key=AUTHORITY, now=ISSUED_AT, lifetime=timedelta(0))


def test_subject_rejects_a_non_spiffe_node_id() -> None:
    with pytest.raises(ValidationError):
        AttestationSubject.model_validate({**VALID["subject"], "node_id": "https://bank.example/server/a"})


# --- key binding and possession ------------------------------------------------------------------


def test_token_is_bound_to_the_attested_tls_key() -> None:
    require_key_binding(_verified(), NODE_TLS.public_key())


def test_token_replayed_with_another_key_is_refused() -> None:
    with pytest.raises(TrustError, match=r"^key_mismatch:"):
        require_key_binding(_verified(), ed25519.Ed25519PrivateKey.generate().public_key())


def test_ecdsa_tls_keys_prove_possession() -> None:
    tls_key = ec.generate_private_key(ec.SECP256R1())
    der = tls_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    subject = SUBJECT.model_copy(update={"tls_key_sha256": hashlib.sha256(der).hexdigest()})
    token = issue_attestation(subject, authority_key=AUTHORITY, now=ISSUED_AT, lifetime=timedelta(hours=1))
    claims = verify_attestation(token, authority_keys=KEYS, now=ISSUED_AT)
    nonce, session_id, client_id = new_nonce(), "s-1", "spiffe://bank.example/client/analyst"
    proof = sign_possession_proof(tls_key, nonce=nonce, session_id=session_id, client_id=client_id)
    verify_possession_proof(
        proof,
        claims=claims,
        tls_public_key=tls_key.public_key(),
        nonce=nonce,
        session_id=session_id,
        client_id=client_id,
    )


def test_nonce_comes_from_the_injected_randomness() -> None:
    assert new_nonce(random_bytes=lambda size: b"\x07" * size) == b"\x07" * 32


def test_short_nonce_is_refused() -> None:
    with pytest.raises(TrustError, match=r"^malformed:"):
        sign_possession_proof(NODE_TLS, nonce=b"\x00" * 8, session_id="s-1", client_id="c")


# --- authority key files ------------------------------------------------------------------------


def test_generated_private_key_file_is_owner_only(tmp_path: Path) -> None:
    generate_authority_key_files(tmp_path / "authority.key", tmp_path / "authority.pub")
    assert stat.S_IMODE((tmp_path / "authority.key").stat().st_mode) == 0o600


def test_generated_key_files_issue_and_verify(tmp_path: Path) -> None:
    key_id = generate_authority_key_files(tmp_path / "authority.key", tmp_path / "authority.pub")
    private_key = load_authority_private_key(tmp_path / "authority.key")
    keys = AuthorityKeys.from_files([tmp_path / "authority.pub"])
    token = issue_attestation(SUBJECT, authority_key=private_key, now=ISSUED_AT, lifetime=timedelta(hours=1))
    assert keys.key_ids == {key_id}
    assert verify_attestation(token, authority_keys=keys, now=ISSUED_AT).authority_key_id == key_id


def test_key_generation_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "authority.key").write_text("keep me")
    with pytest.raises(ConfigurationError, match="overwrite"):
        generate_authority_key_files(tmp_path / "authority.key", tmp_path / "authority.pub")
    assert (tmp_path / "authority.key").read_text() == "keep me"


def test_non_ed25519_authority_key_is_refused(tmp_path: Path) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pub").write_bytes(pem)
    with pytest.raises(ConfigurationError, match="not an Ed25519"):
        load_authority_public_key(tmp_path / "ec.pub")


def test_verifier_needs_at_least_one_authority_key() -> None:
    with pytest.raises(ConfigurationError):
        AuthorityKeys([])


# --- evidence verifiers --------------------------------------------------------------------------


class _HardwareVerifierReturningWrongKind:
    evidence_kind = "amd-sev-snp"

    def verify(self, evidence: bytes, *, now: datetime) -> VerifiedClaims:
        return _verified()


def test_signed_software_verifier_implements_the_interface() -> None:
    verifier = SignedSoftwareVerifier(KEYS)
    assert isinstance(verifier, EvidenceVerifier)
    assert verifier.verify(VALID["token"].encode(), now=VERIFY_AT) == _verified()


def test_signed_software_verifier_rejects_non_ascii_evidence() -> None:
    with pytest.raises(TrustError, match=r"^malformed:"):
        SignedSoftwareVerifier(KEYS).verify("é".encode(), now=VERIFY_AT)


def test_verifier_set_dispatches_by_evidence_kind() -> None:
    verifiers = VerifierSet([SignedSoftwareVerifier(KEYS)])
    claims = verifiers.verify(SIGNED_SOFTWARE_EVIDENCE, VALID["token"].encode(), now=VERIFY_AT)
    assert claims.evidence_kind == SIGNED_SOFTWARE_EVIDENCE


def test_verifier_set_rejects_unconfigured_evidence_kinds() -> None:
    with pytest.raises(TrustError, match=r"^unknown_evidence:"):
        VerifierSet([SignedSoftwareVerifier(KEYS)]).verify("intel-tdx", b"quote", now=VERIFY_AT)


def test_verifier_set_rejects_claims_of_another_kind() -> None:
    with pytest.raises(TrustError, match=r"^malformed:"):
        VerifierSet([_HardwareVerifierReturningWrongKind()]).verify("amd-sev-snp", b"report", now=VERIFY_AT)


def test_verifier_set_refuses_two_verifiers_for_one_kind() -> None:
    with pytest.raises(ConfigurationError):
        VerifierSet([SignedSoftwareVerifier(KEYS), SignedSoftwareVerifier(KEYS)])
