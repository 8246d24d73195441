"""Certificate lifecycle at the CA: renewal keeps the key, rotation replaces it, the archive keeps all."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from fincluster.errors import CertificateError, FinclusterError
from fincluster.trust.archive import IssueAction, load_certificates
from fincluster.trust.cert_commands import register
from fincluster.trust.pki import (
    NODE_CERTIFICATE_TTL,
    CertificateAuthority,
    Role,
    certificate_fingerprint,
    public_key_digest,
)

NOW = datetime(2031, 3, 14, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "certs", trust_domain="bank.test", now=NOW)


def pem(path: Path) -> bytes:
    return path.read_bytes()


def test_renewal_keeps_the_key_and_replaces_only_the_certificate(ca: CertificateAuthority) -> None:
    first = ca.issue(Role.SERVER, "gpu-a", now=NOW)
    key_before, cert_before = pem(first.key_path), pem(first.cert_path)
    renewed = ca.renew(Role.SERVER, "gpu-a", now=NOW + DAY)
    assert pem(renewed.key_path) == key_before  # the key file is untouched
    assert pem(renewed.cert_path) != cert_before
    assert public_key_digest(pem(renewed.cert_path)) == public_key_digest(cert_before)
    renewed.read()  # the untouched key matches the new certificate
    cert = x509.load_pem_x509_certificate(pem(renewed.cert_path))
    assert cert.not_valid_after_utc == NOW + DAY + NODE_CERTIFICATE_TTL


def test_rotation_replaces_the_key(ca: CertificateAuthority) -> None:
    first = ca.issue(Role.SERVER, "gpu-a", now=NOW)
    digest_before = public_key_digest(pem(first.cert_path))
    rotated = ca.rotate(Role.SERVER, "gpu-a", now=NOW + DAY)
    assert public_key_digest(pem(rotated.cert_path)) != digest_before
    rotated.read()


def test_the_archive_keeps_every_certificate_ever_issued(ca: CertificateAuthority) -> None:
    first = ca.issue(Role.SERVER, "gpu-a", now=NOW)
    certificates = [pem(first.cert_path)]
    certificates.append(pem(ca.renew(Role.SERVER, "gpu-a", now=NOW + DAY).cert_path))
    certificates.append(pem(ca.rotate(Role.SERVER, "gpu-a", now=NOW + 2 * DAY).cert_path))
    entries = ca.archive.entries()
    assert [e.action for e in entries] == [IssueAction.ISSUE, IssueAction.RENEW, IssueAction.ROTATE]
    assert [e.fingerprint for e in entries] == [certificate_fingerprint(c) for c in certificates]
    assert [pem(e.path) for e in entries] == certificates  # the files themselves, byte for byte
    assert entries[0].key_sha256 == entries[1].key_sha256 != entries[2].key_sha256
    assert {e.spiffe_id for e in entries} == {"spiffe://bank.test/server/gpu-a"}
    index = [json.loads(line) for line in ca.archive.index_path.read_text().splitlines()]
    assert [line["action"] for line in index] == ["issue", "renew", "rotate"]


def test_an_archived_certificate_is_never_overwritten(ca: CertificateAuthority) -> None:
    credential = ca.issue(Role.CLIENT, "analyst", now=NOW)
    certificate = x509.load_pem_x509_certificate(pem(credential.cert_path))
    with pytest.raises(CertificateError, match="never replaced"):
        ca.archive.add(certificate, spiffe_id="x", fingerprint="x", key_sha256="x", action=IssueAction.ISSUE)
    assert len(ca.archive.entries()) == 1


def test_renewal_keeps_the_host_names_unless_given(ca: CertificateAuthority) -> None:
    ca.issue(Role.SERVER, "gpu-a", hosts=("gpu-a.bank.test", "10.0.0.7"), now=NOW)

    def hosts(credential) -> set[str]:
        cert = x509.load_pem_x509_certificate(pem(credential.cert_path))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))}

    renewed = ca.renew(Role.SERVER, "gpu-a", now=NOW + DAY)
    assert hosts(renewed) == {"gpu-a.bank.test", "10.0.0.7", "gpu-a.server.bank.test"}
    moved = ca.renew(Role.SERVER, "gpu-a", hosts=("gpu-b.bank.test",), now=NOW + DAY)
    assert hosts(moved) == {"gpu-b.bank.test", "gpu-a.server.bank.test"}


def test_renewal_needs_a_current_certificate_that_is_not_revoked(ca: CertificateAuthority) -> None:
    with pytest.raises(CertificateError, match="does not exist: issue a first certificate"):
        ca.renew(Role.SERVER, "gpu-a", now=NOW)
    credential = ca.issue(Role.SERVER, "gpu-a", now=NOW)
    ca.revoke(credential.cert_path, now=NOW)
    with pytest.raises(CertificateError, match="is revoked"):
        ca.renew(Role.SERVER, "gpu-a", now=NOW + DAY)
    with pytest.raises(CertificateError, match="is revoked"):
        ca.rotate(Role.SERVER, "gpu-a", now=NOW + DAY)


def test_load_certificates_reads_a_directory_and_leaves_out_the_ca(ca: CertificateAuthority) -> None:
    ca.issue(Role.SERVER, "gpu-a", now=NOW)
    ca.renew(Role.SERVER, "gpu-a", now=NOW + DAY)
    found = load_certificates([ca.directory], issued_by=ca.certificate)  # nodes/ and issued/ and ca.pem
    assert len(found) == 2  # the renewed certificate is in nodes/ and issued/: counted once
    assert all(not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca for c in found)


def test_load_certificates_refuses_a_certificate_of_another_ca(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.init(tmp_path / "other", trust_domain="bank.test", now=NOW)
    other.issue(Role.SERVER, "gpu-a", now=NOW)
    with pytest.raises(CertificateError, match="the given CA did not issue"):
        load_certificates([other.archive.directory], issued_by=ca.certificate)


# -- the CLI -----------------------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fincluster")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except FinclusterError as error:
        print(f"fincluster: error: {error}", file=sys.stderr)
        return 2
    return code


def test_certs_renew_rotate_and_list_from_the_command_line(tmp_path: Path, capsys) -> None:
    certs = str(tmp_path / "certs")
    assert run(["certs", "init-ca", "--dir", certs, "--trust-domain", "bank.test"]) == 0
    assert run(["certs", "issue", "--dir", certs, "--role", "server", "--name", "gpu-a"]) == 0
    key = (tmp_path / "certs/nodes/server-gpu-a.key").read_bytes()
    capsys.readouterr()
    assert run(["certs", "renew", "--dir", certs, "--role", "server", "--name", "gpu-a"]) == 0
    out = capsys.readouterr().out
    assert "spiffe://bank.test/server/gpu-a renewed (same key: the node's attestation stays valid)" in out
    assert (tmp_path / "certs/nodes/server-gpu-a.key").read_bytes() == key
    assert run(["certs", "rotate", "--dir", certs, "--role", "server", "--name", "gpu-a"]) == 0
    out = capsys.readouterr().out
    assert "rotated (new key)" in out and "issue a new one for this certificate" in out
    assert (tmp_path / "certs/nodes/server-gpu-a.key").read_bytes() != key
    assert run(["certs", "list", "--dir", certs, "--node", "server/gpu-a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["issue", "renew", "rotate"]
    assert lines[-1] == f"3 certificate(s) in {tmp_path / 'certs/issued'}"


def test_certs_renew_of_an_unknown_node_is_one_error_line(tmp_path: Path, capsys) -> None:
    certs = str(tmp_path / "certs")
    assert run(["certs", "init-ca", "--dir", certs, "--trust-domain", "bank.test"]) == 0
    assert run(["certs", "renew", "--dir", certs, "--role", "server", "--name", "nobody"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "server-nobody.pem does not exist: issue a first certificate" in err[0]
