"""The swarm CA: what it issues, where it writes it, and how it revokes."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import fincluster.trust
from fincluster.errors import CertificateError, ConfigurationError, TrustError
from fincluster.trust import (
    CertificateAuthority,
    Credential,
    RevocationList,
    Role,
    certificate_fingerprint,
    identity_host_name,
    is_revoked,
    load_crl,
    parse_spiffe_id,
    parse_ttl,
    public_key_digest,
    spiffe_id,
    spiffe_id_of,
)

NOW = datetime(2031, 3, 14, 9, 0, tzinfo=UTC)
DOMAIN = "bank.test"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "certs", trust_domain=DOMAIN, now=NOW)


def certificate_of(credential: Credential) -> x509.Certificate:
    return x509.load_pem_x509_certificate(credential.cert_path.read_bytes())


def san_of(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_public_names_are_pinned() -> None:
    assert sorted(fincluster.trust.__all__) == [
        "CertificateAuthority",
        "Credential",
        "RevocationList",
        "Role",
        "certificate_fingerprint",
        "channel_credentials",
        "check_certificate_current",
        "check_peer_not_revoked",
        "expected_server_identity",
        "identity_host_name",
        "is_revoked",
        "load_certificate",
        "load_crl",
        "parse_spiffe_id",
        "parse_ttl",
        "peer_certificate",
        "peer_identity",
        "public_key_digest",
        "server_credentials",
        "spiffe_id",
        "spiffe_id_of",
    ]


def test_init_writes_ca_key_and_an_empty_signed_crl(ca: CertificateAuthority, tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert sorted(p.name for p in directory.iterdir()) == ["ca.key", "ca.pem", "crl.pem"]
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert spiffe_id_of(ca.certificate) == "spiffe://bank.test"
    assert ca.certificate.not_valid_after_utc == NOW + timedelta(days=365)
    crl = load_crl(directory / "crl.pem", ca.certificate, now=NOW)
    assert len(crl) == 0


def test_init_refuses_to_overwrite_an_existing_ca(ca: CertificateAuthority) -> None:
    before = ca.cert_path.read_bytes()
    with pytest.raises(CertificateError, match="refusing to overwrite"):
        CertificateAuthority.init(ca.directory, trust_domain=DOMAIN, now=NOW)
    assert ca.cert_path.read_bytes() == before


def test_init_rejects_a_trust_domain_that_is_not_spiffe(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        CertificateAuthority.init(tmp_path, trust_domain="Bank.Test/x")


def test_load_recovers_the_trust_domain_and_key(ca: CertificateAuthority) -> None:
    loaded = CertificateAuthority.load(ca.directory)
    assert loaded.trust_domain == DOMAIN
    assert loaded.certificate == ca.certificate
    credential = loaded.issue(Role.CLIENT, "analyst", now=NOW)
    certificate_of(credential).verify_directly_issued_by(ca.certificate)


def test_load_refuses_a_ca_key_readable_by_others(ca: CertificateAuthority) -> None:
    os.chmod(ca.directory / "ca.key", 0o644)
    with pytest.raises(CertificateError, match="readable by other users"):
        CertificateAuthority.load(ca.directory)


def test_server_certificate_carries_spiffe_id_hosts_and_identity_host(ca: CertificateAuthority) -> None:
    credential = ca.issue(Role.SERVER, "gpu-a1", hosts=("localhost", "127.0.0.1", "gpu1.bank.test"), now=NOW)
    cert = certificate_of(credential)
    san = san_of(cert)
    assert credential.spiffe_id == "spiffe://bank.test/server/gpu-a1"
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://bank.test/server/gpu-a1"]
    assert san.get_values_for_type(x509.DNSName) == ["gpu-a1.server.bank.test", "localhost", "gpu1.bank.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_registry_certificate_is_a_serving_certificate(ca: CertificateAuthority) -> None:
    cert = certificate_of(ca.issue(Role.REGISTRY, "main", now=NOW))
    assert spiffe_id_of(cert) == "spiffe://bank.test/registry/main"
    assert "localhost" in san_of(cert).get_values_for_type(x509.DNSName)


def test_client_certificate_has_no_host_names_and_cannot_serve(ca: CertificateAuthority) -> None:
    cert = certificate_of(ca.issue(Role.CLIENT, "analyst", now=NOW))
    san = san_of(cert)
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://bank.test/client/analyst")]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_issue_writes_pkcs8_key_with_mode_0600_under_nodes(ca: CertificateAuthority) -> None:
    credential = ca.issue(Role.SERVER, "alpha", now=NOW)
    assert credential.cert_path == ca.directory / "nodes" / "server-alpha.pem"
    assert credential.key_path == ca.directory / "nodes" / "server-alpha.key"
    assert credential.ca_cert_path == ca.directory / "ca.pem"
    assert stat.S_IMODE(credential.key_path.stat().st_mode) == 0o600
    key_pem = credential.key_path.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == certificate_of(credential).public_key()


def test_key_is_private_even_under_a_permissive_umask(ca: CertificateAuthority) -> None:
    previous = os.umask(0)
    try:
        credential = ca.issue(Role.CLIENT, "analyst", now=NOW)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(credential.key_path.stat().st_mode) == 0o600


def test_issue_to_another_directory(ca: CertificateAuthority, tmp_path: Path) -> None:
    credential = ca.issue(Role.CLIENT, "analyst", now=NOW, out_dir=tmp_path / "analyst")
    assert credential.cert_path == tmp_path / "analyst" / "client-analyst.pem"
    assert credential.read()[0] == ca.cert_path.read_bytes()


def test_lifetime_follows_ttl_and_now(ca: CertificateAuthority) -> None:
    cert = certificate_of(ca.issue(Role.SERVER, "alpha", ttl=timedelta(minutes=10), now=NOW))
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(minutes=10)


def test_lifetime_is_cut_at_the_ca_expiry(ca: CertificateAuthority) -> None:
    late = NOW + timedelta(days=364)
    cert = certificate_of(ca.issue(Role.SERVER, "alpha", ttl=timedelta(days=30), now=late))
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_an_expired_ca_issues_nothing(ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match="expired"):
        ca.issue(Role.SERVER, "alpha", now=NOW + timedelta(days=366))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../etc"}, "not a node name"),
        ({"name": "a b"}, "not a node name"),
        ({"name": ".hidden"}, "not a node name"),
        ({"name": "a..b"}, "not a node name"),
        ({"name": "x" * 65}, "not a node name"),
        ({"name": "alpha", "ttl": timedelta(0)}, "positive"),
        ({"name": "alpha", "hosts": ("beta.server.bank.test",)}, "reserved"),
        ({"name": "alpha", "hosts": ("bad host",)}, "not a host name"),
        ({"name": "alpha", "now": datetime(2031, 3, 14)}, "timezone-aware"),
    ],
)
def test_issue_rejects_bad_arguments(
    ca: CertificateAuthority, kwargs: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"now": NOW, **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        ca.issue(Role.SERVER, **arguments)  # type: ignore[arg-type]


def test_upper_case_names_get_no_identity_host_name(ca: CertificateAuthority) -> None:
    cert = certificate_of(ca.issue(Role.SERVER, "Alpha_1", now=NOW))
    assert san_of(cert).get_values_for_type(x509.DNSName) == ["localhost"]
    with pytest.raises(ConfigurationError, match="upper-case"):
        identity_host_name(DOMAIN, Role.SERVER, "Alpha_1")


def test_reissuing_replaces_certificate_and_key(ca: CertificateAuthority) -> None:
    first = ca.issue(Role.SERVER, "alpha", now=NOW)
    first_cert, first_key = first.cert_path.read_bytes(), first.key_path.read_bytes()
    second = ca.issue(Role.SERVER, "alpha", now=NOW + timedelta(hours=12))
    assert second == first
    assert second.cert_path.read_bytes() != first_cert
    assert second.key_path.read_bytes() != first_key
    assert sorted(p.name for p in second.cert_path.parent.iterdir()) == [
        "server-alpha.key",
        "server-alpha.pem",
    ]
    second.read()  # the new key matches the new certificate


def test_credential_read_refuses_a_key_of_another_certificate(ca: CertificateAuthority) -> None:
    alpha = ca.issue(Role.SERVER, "alpha", now=NOW)
    beta = ca.issue(Role.SERVER, "beta", now=NOW)
    mixed = Credential(alpha.cert_path, beta.key_path, alpha.ca_cert_path, alpha.spiffe_id)
    with pytest.raises(CertificateError, match="does not belong"):
        mixed.read()


def test_credential_from_files_reads_the_identity(ca: CertificateAuthority) -> None:
    issued = ca.issue(Role.CLIENT, "analyst", now=NOW)
    described = Credential.from_files(
        cert_path=issued.cert_path, key_path=issued.key_path, ca_cert_path=issued.ca_cert_path
    )
    assert described == issued


def test_revoke_lists_the_serial_in_a_ca_signed_crl(ca: CertificateAuthority) -> None:
    credential = ca.issue(Role.SERVER, "alpha", now=NOW)
    kept = certificate_of(ca.issue(Role.SERVER, "beta", now=NOW))
    cert = certificate_of(credential)
    ca.revoke(credential.cert_path, now=NOW + timedelta(hours=1))

    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert entry.revocation_date_utc == NOW + timedelta(hours=1)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    verified = load_crl(ca.crl_path, ca.certificate, now=NOW + timedelta(hours=2))
    assert is_revoked(cert, verified) is True
    assert is_revoked(kept, verified) is False


def test_revoke_accepts_pem_and_bare_serials_and_is_idempotent(ca: CertificateAuthority) -> None:
    alpha = ca.issue(Role.SERVER, "alpha", now=NOW)
    beta = certificate_of(ca.issue(Role.SERVER, "beta", now=NOW))
    ca.revoke(alpha.cert_path.read_bytes(), now=NOW)
    ca.revoke(alpha.cert_path.read_bytes(), now=NOW)
    ca.revoke(beta.serial_number, now=NOW)
    crl = load_crl(ca.crl_path, ca.certificate, now=NOW)
    assert sorted(entry.serial_number for entry in crl) == sorted(
        [certificate_of(alpha).serial_number, beta.serial_number]
    )


def test_revoke_refuses_a_certificate_of_another_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", trust_domain=DOMAIN, now=NOW)
    foreign = other.issue(Role.CLIENT, "analyst", now=NOW)
    with pytest.raises(CertificateError, match="not issued by this CA"):
        ca.revoke(foreign.cert_path, now=NOW)


def test_a_crl_signed_by_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    # Same subject name, different key: only the signature tells them apart.
    other = CertificateAuthority.init(tmp_path / "other", trust_domain=DOMAIN, now=NOW)
    with pytest.raises(TrustError, match="signature"):
        load_crl(other.crl_path, ca.certificate, now=NOW)


def test_a_stale_crl_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(TrustError, match="stale"):
        load_crl(ca.crl_path, ca.certificate, now=NOW + timedelta(days=400))


def test_revocation_list_follows_the_file(ca: CertificateAuthority) -> None:
    pem = ca.issue(Role.CLIENT, "analyst", now=NOW).cert_path.read_bytes()
    revocations = RevocationList(ca.crl_path, ca.certificate)
    assert revocations.is_revoked(pem, now=NOW) is False
    ca.revoke(pem, now=NOW)
    assert revocations.is_revoked(pem, now=NOW) is True


def test_revocation_list_refuses_a_rolled_back_crl(ca: CertificateAuthority) -> None:
    pem = ca.issue(Role.CLIENT, "analyst", now=NOW).cert_path.read_bytes()
    empty = ca.crl_path.read_bytes()
    revocations = RevocationList(ca.crl_path, ca.certificate)
    ca.revoke(pem, now=NOW)
    assert revocations.is_revoked(pem, now=NOW) is True
    ca.crl_path.write_bytes(empty)
    with pytest.raises(TrustError, match="older"):
        revocations.is_revoked(pem, now=NOW)


def test_revocation_list_fails_closed_without_a_crl(ca: CertificateAuthority) -> None:
    pem = ca.issue(Role.CLIENT, "analyst", now=NOW).cert_path.read_bytes()
    ca.crl_path.unlink()
    with pytest.raises(TrustError, match="cannot read"):
        RevocationList(ca.crl_path, ca.certificate).is_revoked(pem, now=NOW)


def test_spiffe_ids_round_trip() -> None:
    identity = spiffe_id(DOMAIN, Role.REGISTRY, "main")
    assert identity == "spiffe://bank.test/registry/main"
    assert parse_spiffe_id(identity) == (DOMAIN, Role.REGISTRY, "main")
    for malformed in (
        "spiffe://bank.test/admin/x",
        "https://bank.test/server/x",
        "spiffe://bank.test/server/a/b",
    ):
        with pytest.raises(TrustError):
            parse_spiffe_id(malformed)


def test_spiffe_id_of_requires_exactly_one_spiffe_uri(ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError):
        spiffe_id_of(_self_signed([]))
    with pytest.raises(CertificateError, match="found 2"):
        spiffe_id_of(
            _self_signed(
                [
                    x509.UniformResourceIdentifier("spiffe://bank.test/server/a"),
                    x509.UniformResourceIdentifier("spiffe://bank.test/server/b"),
                ]
            )
        )


def test_fingerprint_and_public_key_digest(ca: CertificateAuthority) -> None:
    pem = ca.issue(Role.SERVER, "alpha", now=NOW).cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert certificate_fingerprint(pem) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert public_key_digest(pem) == hashlib.sha256(spki).hexdigest()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24h", timedelta(hours=24)), ("90m", timedelta(minutes=90)), ("1h30m", timedelta(minutes=90))],
)
def test_parse_ttl(text: str, expected: timedelta) -> None:
    assert parse_ttl(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "1.5h", "-1h", "0s", "1w"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_ttl(text)


def _self_signed(names: list[x509.GeneralName]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())
