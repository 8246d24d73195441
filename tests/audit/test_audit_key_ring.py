"""Verifying a log whose writer renewed and rotated its certificate: each period checks under the
certificate valid then, found in the CA's archive; wrong or missing keys are one problem, not one
per record."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from audit_scenario import MANIFEST, MODEL
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fincluster.audit import AuditLog, AuditSettings, SessionCloseEvent, SessionOpenEvent, verify
from fincluster.audit.commands import register
from fincluster.audit.keys import KeyRing
from fincluster.audit.node import CredentialSigner
from fincluster.audit.signing import key_id
from fincluster.errors import FinclusterError
from fincluster.trust.archive import load_certificates
from fincluster.trust.pki import CertificateAuthority, Credential, Role, load_certificate

T = datetime(2031, 3, 14, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


class Clock:
    def __init__(self) -> None:
        self.now = T

    def __call__(self) -> datetime:
        return self.now


def opened(clock: Clock, session: str) -> SessionOpenEvent:
    return SessionOpenEvent(
        time=clock(),
        observer="server",
        session_id=session,
        client_id="spiffe://bank.test/client/analyst",
        classification="internal",
        model_id=MODEL,
        manifest_digest=MANIFEST,
    )


def closed(clock: Clock, session: str) -> SessionCloseEvent:
    return SessionCloseEvent(
        time=clock(),
        observer="server",
        session_id=session,
        client_id="spiffe://bank.test/client/analyst",
        outcome="ok",
    )


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "certs", trust_domain="bank.test", now=T - HOUR)


@pytest.fixture
def renewed_log(ca: CertificateAuthority, tmp_path: Path) -> tuple[Path, list[bytes]]:
    """server-a's log across three certificates: issued at T, renewed (same key) at T+40h, rotated
    (new key) at T+80h; one session (open, close) under each, the middle one after the first
    certificate expired (T+48h). Returns the log and the three certificates."""
    credential: Credential = ca.issue(Role.SERVER, "a", now=T)
    clock = Clock()
    log = AuditLog(
        tmp_path / "server-a.sqlite",
        signing_key=CredentialSigner(credential),
        origin="server-a",
        settings=AuditSettings(checkpoint_every_seconds=None),
        clock=clock,
    )
    certificates = [credential.cert_path.read_bytes()]
    for session, (action, at) in enumerate(
        [(None, T + HOUR), ("renew", T + 50 * HOUR), ("rotate", T + 81 * HOUR)]
    ):
        if action is not None:
            getattr(ca, action)(Role.SERVER, "a", now=at - HOUR)
            certificates.append(credential.cert_path.read_bytes())
        clock.now = at
        log.append(opened(clock, f"s-{session}"))
        log.append(closed(clock, f"s-{session}"))  # a session close checkpoints
    log.close()
    return log.path, certificates


def test_a_log_across_renewal_and_rotation_verifies_with_the_archive(ca, renewed_log) -> None:
    path, _ = renewed_log
    report = verify(path, KeyRing.of(load_certificates([ca.archive.directory]), pinned=False))
    assert report.ok, report.problems
    assert report.tree_size == 6 and report.checkpoints_verified == 3
    assert len(report.signers) == 3
    assert all("of spiffe://bank.test/server/a" in signer for signer in report.signers)


def test_with_only_todays_certificate_the_older_records_are_one_problem(renewed_log) -> None:
    path, certificates = renewed_log
    report = verify(path, KeyRing.of([load_certificate(certificates[-1])]))
    assert not report.ok and report.first_bad_record == 0
    assert [p.code for p in report.problems] == ["untrusted_signer"]
    old_key = key_id(load_certificate(certificates[0]).public_key())
    assert report.problems[0].detail == (
        "4 records (0..3) and 2 checkpoints cannot be verified: signed by a key that is not among the "
        f"trusted keys and certificates (key {old_key[:16]})"
    )


def test_a_certificate_counts_only_while_it_was_valid(renewed_log) -> None:
    """The first certificate holds the key that also signed at T+50h, but it had expired by then."""
    path, certificates = renewed_log
    report = verify(path, KeyRing.of([load_certificate(certificates[0]), load_certificate(certificates[2])]))
    old_key = key_id(load_certificate(certificates[0]).public_key())
    assert [p.detail for p in report.problems] == [
        "2 records (2..3) and 1 checkpoint cannot be verified: no certificate of the signing key was "
        f"valid at 2031-03-16 11:00:00 UTC (expired or not yet valid) (key {old_key[:16]})"
    ]


def certificate_for(public_key, spiffe_id: str) -> x509.Certificate:
    """A certificate naming ``spiffe_id`` for ``public_key`` (signed by a throwaway issuer)."""
    issuer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "copy")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(T - HOUR)
        .not_valid_after(T + 100 * HOUR)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .sign(issuer, hashes.SHA256())
    )


def test_an_archived_certificate_speaks_only_for_its_own_node(renewed_log) -> None:
    """A certificate of server b for the key that wrote server-a's log (a copied key) does not vouch
    for that log when it comes from an archive; named by the operator (pinned), it does."""
    path, certificates = renewed_log
    keys = {key_id(k): k for k in (load_certificate(c).public_key() for c in certificates)}
    copies = [certificate_for(key, "spiffe://bank.test/server/b") for key in keys.values()]
    report = verify(path, KeyRing.of(copies, pinned=False))
    assert [p.code for p in report.problems] == ["untrusted_signer"]
    assert "is trusted only for another node than server-a" in report.problems[0].detail
    assert verify(path, KeyRing.of(copies, pinned=True)).ok


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


def test_audit_verify_takes_the_archive(ca, renewed_log, capsys) -> None:
    path, _ = renewed_log
    archive = str(ca.archive.directory)
    assert run(["audit", "verify", str(path), "--archive", archive, "--ca", str(ca.cert_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: OK, 6 records")
    assert out.count("  signed by certificate sha256:") == 3


def test_audit_verify_with_a_wrong_key_says_so_in_one_line(ca, renewed_log, capsys) -> None:
    path, certificates = renewed_log
    keys = sorted({key_id(load_certificate(c).public_key())[:16] for c in certificates})
    stranger = ca.issue(Role.SERVER, "stranger", now=T)
    assert run(["audit", "verify", str(path), "--key", str(stranger.cert_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: FAILED verification, 1 problem(s)"
    assert [line for line in out if line.startswith("  - ")] == [
        "  - untrusted_signer: 6 records (0..5) and 3 checkpoints cannot be verified: signed by a key "
        f"that is not among the trusted keys and certificates (key {', '.join(keys)})"
    ]
    assert (
        out[-1]
        == "  give the writer's certificate (--key CERT) or the CA's archive (--archive CA_DIR/issued)"
    )


def test_audit_verify_without_any_key_is_an_error(renewed_log, capsys) -> None:
    path, _ = renewed_log
    assert run(["audit", "verify", str(path)]) == 2
    assert "give the writer's key or certificate (--key) or a certificate archive (--archive)" in (
        capsys.readouterr().err
    )


def test_a_shared_key_ring_reports_only_the_keys_each_log_used(ca, renewed_log, tmp_path: Path) -> None:
    """One ring for the whole archive, several logs: each report names only its own writer's keys."""
    path, _ = renewed_log
    other = ca.issue(Role.CLIENT, "analyst", now=T)
    clock = Clock()
    clock.now = T + HOUR
    with AuditLog(
        tmp_path / "client-analyst.sqlite",
        signing_key=CredentialSigner(other),
        origin="client-analyst",
        clock=clock,
    ) as log:
        log.append(opened(clock, "c-1"))
    archive = KeyRing.of(load_certificates([ca.archive.directory]), pinned=False)
    client_report = verify(log.path, archive)
    server_report = verify(path, archive)
    assert [s.split(" of ")[1].split(",")[0] for s in client_report.signers] == [
        "spiffe://bank.test/client/analyst"
    ]
    assert len(server_report.signers) == 3
