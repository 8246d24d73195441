"""The swarm's own certificate authority: node identities, issuance, rotation and revocation.

Every node proves who it is with an X.509 certificate from the swarm CA whose single URI SAN is its
SPIFFE id, ``spiffe://<trust-domain>/<role>/<name>``. Keys are ECDSA P-256 (well supported by
gRPC's BoringSSL), stored as unencrypted PKCS#8 PEM files created with mode 0600.

A certificates directory looks like this (``certs/README.md`` has the operator's view)::

    ca.pem          the CA certificate: every node's trust anchor
    ca.key          the CA private key (0600): only the operator's machine needs it
    crl.pem         the CA-signed revocation list, re-signed on every revocation
    nodes/<role>-<name>.pem / .key    issued node material (the current certificate of each node)
    issued/<serial>.pem, index.jsonl  every certificate ever issued (the archive)

Identities, per role:

* every certificate: the SPIFFE URI SAN; clients are limited to the ``clientAuth`` usage, so a client
  certificate can never serve.
* servers and the registry: also ``serverAuth`` and ``clientAuth`` (a server calls the registry), the
  DNS/IP SANs of the hosts it listens on (``localhost`` and ``127.0.0.1`` by default), and one
  *identity host name* ``<name>.<role>.<trust-domain>`` that never resolves anywhere: a client that
  sets gRPC's ``grpc.ssl_target_name_override`` to it makes the TLS handshake itself check that it
  reached that exact node (see :func:`identity_host_name` and ``tls.expected_server_identity``).
  Only names without upper-case letters get one, because host names compare case-insensitively.

Renewal and rotation: :meth:`CertificateAuthority.renew` re-issues a node's certificate for the key it
already has (its attestation, bound to the key, stays valid); :meth:`~CertificateAuthority.rotate`
(like a second ``issue``) gives it a new key and certificate, after which it needs a new attestation.
Files are replaced atomically, and a running server picks them up on its next handshake
(``tls.server_credentials``). Every issued certificate is also kept, never overwritten, in the CA's
archive (``issued/``, :mod:`fincluster.trust.archive`), so that evidence signed under an old
certificate still verifies. Revocation adds the serial number to ``crl.pem``; :class:`RevocationList`
is how running nodes read it.

Time is a parameter everywhere (``now=``), so expiry is testable; naive datetimes are refused.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import ipaddress
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fincluster.errors import CertificateError, ConfigurationError, TrustError, TrustReason
from fincluster.logs import get_logger
from fincluster.trust.archive import ISSUED_DIR, CertificateArchive, IssueAction

log = get_logger(__name__)

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
NODES_DIR = "nodes"

#: Default lifetimes (``certs/README.md`` has the renewal cycle built on them): node certificates
#: live two days and are renewed daily, so a missed renewal leaves a day to notice; the CA lives a year.
NODE_CERTIFICATE_TTL = timedelta(hours=48)
CA_TTL = timedelta(days=365)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_ISSUE_EVENTS = {
    IssueAction.ISSUE: "certificate_issued",
    IssueAction.RENEW: "certificate_renewed",
    IssueAction.ROTATE: "certificate_rotated",
}

# Validity starts this much before "now", so a node whose clock is slightly behind the CA's
# does not reject a certificate that was issued a moment ago.
CLOCK_SKEW = timedelta(minutes=5)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")
_NAME_MAX_LENGTH = 64  # the subject common name holds the node name, and X.509 caps it at 64
_TRUST_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?)*")
_TTL_PART = re.compile(r"(\d+)([smhd])")
_TTL_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class Role(enum.StrEnum):
    """What a node is allowed to be in the swarm; the second segment of its SPIFFE id."""

    SERVER = "server"
    CLIENT = "client"
    REGISTRY = "registry"


@dataclass(frozen=True)
class Credential:
    """Where one node's TLS material lives: its certificate, its private key and the CA to trust."""

    cert_path: Path
    key_path: Path
    ca_cert_path: Path
    spiffe_id: str

    @classmethod
    def from_files(cls, *, cert_path: Path, key_path: Path, ca_cert_path: Path) -> Credential:
        """Describe existing files (from settings); the SPIFFE id is read from the certificate."""
        certificate = load_certificate(_read(cert_path))
        return cls(cert_path, key_path, ca_cert_path, spiffe_id_of(certificate))

    def read(self) -> tuple[bytes, bytes, bytes]:
        """``(ca_pem, cert_pem, key_pem)``, read fresh from disk (they change on rotation).

        Checked before use, because gRPC would report a bad pair only as a failed handshake: the key
        must match the certificate, the CA must have issued it, and it must carry ``spiffe_id``.
        """
        _warn_if_key_readable_by_others(self.key_path)
        ca_pem, cert_pem, key_pem = _read(self.ca_cert_path), _read(self.cert_path), _read(self.key_path)
        certificate = load_certificate(cert_pem)
        if not _same_public_key(_load_ec_key(key_pem, self.key_path), certificate):
            raise CertificateError(f"{self.key_path} does not belong to {self.cert_path}")
        _check_issued_by(certificate, load_certificate(ca_pem))
        if spiffe_id_of(certificate) != self.spiffe_id:
            raise CertificateError(f"{self.cert_path} is not the certificate of {self.spiffe_id}")
        return ca_pem, cert_pem, key_pem

    def file_state(self) -> tuple[tuple[int, int, int, int], ...]:
        """Changes whenever one of the three files is rewritten or replaced: the cue to read again."""
        return tuple(_file_signature(path) for path in (self.cert_path, self.key_path, self.ca_cert_path))


class CertificateAuthority:
    """The swarm CA held in one directory. Create it with :meth:`init`, open it with :meth:`load`."""

    def __init__(
        self,
        directory: Path,
        *,
        trust_domain: str,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.certificate = certificate
        self._private_key = private_key

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT_FILE

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    @property
    def nodes_dir(self) -> Path:
        return self.directory / NODES_DIR

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        trust_domain: str,
        ttl: timedelta = CA_TTL,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Create a new CA (``ca.pem``, ``ca.key``, an empty signed ``crl.pem``) in ``directory``.

        Refuses to touch a directory that already holds a CA: overwriting one would silently cut off
        every node issued by it.
        """
        _check_trust_domain(trust_domain)
        _check_ttl(ttl)
        now = _now(now)
        directory = Path(directory)
        for existing in (directory / CA_CERT_FILE, directory / CA_KEY_FILE):
            if existing.exists():
                raise CertificateError(f"{existing} already exists; refusing to overwrite an existing CA")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

        private_key = ec.generate_private_key(ec.SECP256R1())
        public_key = private_key.public_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "fincluster swarm CA"),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            # A SPIFFE signing certificate may carry the trust domain's own id; it is how load()
            # learns the trust domain without a second file.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
            .sign(private_key, hashes.SHA256())
        )
        _write_atomic(directory / CA_KEY_FILE, _private_key_pem(private_key), mode=0o600)
        _write_atomic(directory / CA_CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
        ca = cls(directory, trust_domain=trust_domain, certificate=certificate, private_key=private_key)
        ca._write_crl(revoked=[], number=0, now=now)
        log.info(
            "ca_created",
            directory=str(directory),
            trust_domain=trust_domain,
            not_after=certificate.not_valid_after_utc.isoformat(),
        )
        return ca

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Open the CA in ``directory``, checking that its key is private and matches its certificate."""
        directory = Path(directory)
        key_path = directory / CA_KEY_FILE
        certificate = load_certificate(_read(directory / CA_CERT_FILE))
        mode = _stat(key_path).st_mode
        if mode & 0o077:
            raise CertificateError(
                f"{key_path} is readable by other users (mode {stat.filemode(mode)}); "
                "fix it with chmod 600 and consider the CA key compromised"
            )
        private_key = _load_ec_key(_read(key_path), key_path)
        if not _same_public_key(private_key, certificate):
            raise CertificateError(f"{key_path} does not belong to {directory / CA_CERT_FILE}")
        ca_id = _single_spiffe_uri(certificate)
        trust_domain = ca_id.removeprefix("spiffe://")
        if ca_id == trust_domain or not _TRUST_DOMAIN.fullmatch(trust_domain):
            raise CertificateError(f"{directory / CA_CERT_FILE} does not name a SPIFFE trust domain: {ca_id}")
        return cls(directory, trust_domain=trust_domain, certificate=certificate, private_key=private_key)

    @property
    def archive(self) -> CertificateArchive:
        """Every node certificate this CA issued (``<directory>/issued/``), kept for verifiers."""
        return CertificateArchive(self.directory / ISSUED_DIR)

    def issue(
        self,
        role: Role,
        name: str,
        *,
        ttl: timedelta = NODE_CERTIFICATE_TTL,
        hosts: Sequence[str] = DEFAULT_HOSTS,
        now: datetime | None = None,
        out_dir: Path | None = None,
        action: IssueAction = IssueAction.ISSUE,
    ) -> Credential:
        """Issue a node certificate with a new key and write the key and the certificate.

        Files go to ``<out_dir or directory/nodes>/<role>-<name>.pem`` and ``.key`` and replace any
        earlier ones atomically, key first; the certificate is also kept in :attr:`archive`. ``hosts``
        (DNS names or IP addresses) only apply to servers and the registry; a client certificate is
        never valid for serving. A certificate never outlives the CA: its lifetime is cut at the CA's
        expiry. Issuing again for a node that has a certificate is a rotation (:meth:`rotate`).
        """
        role = Role(role)
        private_key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._sign(role, name, private_key.public_key(), ttl=ttl, hosts=hosts, now=now)
        credential = self._credential_at(role, name, out_dir)
        # Key first: a reader that sees the new certificate always finds its key already in place
        # (tls.server_credentials also refuses a pair that does not match, for the moment in between).
        _write_atomic(credential.key_path, _private_key_pem(private_key), mode=0o600)
        self._publish(credential, certificate, action)
        return credential

    def rotate(
        self,
        role: Role,
        name: str,
        *,
        ttl: timedelta = NODE_CERTIFICATE_TTL,
        hosts: Sequence[str] | None = None,
        now: datetime | None = None,
        out_dir: Path | None = None,
    ) -> Credential:
        """Replace a node's key and certificate with new ones (the node then needs a new attestation:
        attestations bind the key). ``hosts`` default to those of the current certificate."""
        current = self._current_certificate(Role(role), name, out_dir, now=now)
        hosts = _host_sans(current, self.trust_domain) if hosts is None else hosts
        return self.issue(
            role, name, ttl=ttl, hosts=hosts, now=now, out_dir=out_dir, action=IssueAction.ROTATE
        )

    def renew(
        self,
        role: Role,
        name: str,
        *,
        ttl: timedelta = NODE_CERTIFICATE_TTL,
        hosts: Sequence[str] | None = None,
        now: datetime | None = None,
        out_dir: Path | None = None,
    ) -> Credential:
        """Re-issue a node's certificate for the key it already has: only the certificate file is
        replaced, so the node's attestation (bound to the key) stays valid. Needs no private key: the
        new certificate certifies the public key of the current one, which must be this CA's, for this
        node, and not revoked. ``hosts`` default to those of the current certificate."""
        role = Role(role)
        current = self._current_certificate(role, name, out_dir, now=now)
        public_key = current.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CertificateError(f"the certificate of {role.value}-{name} has no ECDSA key to renew")
        hosts = _host_sans(current, self.trust_domain) if hosts is None else hosts
        certificate = self._sign(role, name, public_key, ttl=ttl, hosts=hosts, now=now)
        credential = self._credential_at(role, name, out_dir)
        self._publish(credential, certificate, IssueAction.RENEW)
        return credential

    def _sign(
        self,
        role: Role,
        name: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        ttl: timedelta,
        hosts: Sequence[str],
        now: datetime | None,
    ) -> x509.Certificate:
        """A node certificate for ``public_key``, signed by this CA."""
        identity = spiffe_id(self.trust_domain, role, name)
        _check_ttl(ttl)
        now = _now(now)
        ca_not_after = self.certificate.not_valid_after_utc
        if now >= ca_not_after:
            raise CertificateError(f"the CA expired at {ca_not_after.isoformat()}; create a new one")
        not_after = now + ttl
        if not_after > ca_not_after:
            log.warning(
                "certificate_lifetime_capped", spiffe_id=identity, ca_not_after=ca_not_after.isoformat()
            )
            not_after = ca_not_after
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role is not Role.CLIENT:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
            names.extend(self._host_names(role, name, hosts))
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._private_key.public_key()),
                critical=False,
            )
            .sign(self._private_key, hashes.SHA256())
        )

    def _credential_at(self, role: Role, name: str, out_dir: Path | None) -> Credential:
        directory = Path(out_dir) if out_dir is not None else self.nodes_dir
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stem = f"{role.value}-{name}"
        return Credential(
            cert_path=directory / f"{stem}.pem",
            key_path=directory / f"{stem}.key",
            ca_cert_path=self.cert_path,
            spiffe_id=spiffe_id(self.trust_domain, role, name),
        )

    def _current_certificate(
        self, role: Role, name: str, out_dir: Path | None, *, now: datetime | None
    ) -> x509.Certificate:
        """The node's certificate now in place: this CA's, for this node, not revoked."""
        path = self._credential_at(role, name, out_dir).cert_path
        if not path.is_file():
            raise CertificateError(f"{path} does not exist: issue a first certificate with certs issue")
        current = load_certificate(_read(path))
        _check_issued_by(current, self.certificate)
        if spiffe_id_of(current) != spiffe_id(self.trust_domain, role, name):
            raise CertificateError(f"{path} is not the certificate of {role.value}-{name}")
        if is_revoked(current, load_crl(self.crl_path, self.certificate, now=now)):
            raise CertificateError(f"{path} is revoked; issue a new certificate (certs issue) instead")
        return current

    def _publish(self, credential: Credential, certificate: x509.Certificate, action: IssueAction) -> None:
        """Archive the certificate (kept for good), then put it in place for the node."""
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        with _exclusive_lock(self.directory):
            self.archive.add(
                certificate,
                spiffe_id=credential.spiffe_id,
                fingerprint=certificate_fingerprint(cert_pem),
                key_sha256=public_key_digest(cert_pem),
                action=action,
            )
        _write_atomic(credential.cert_path, cert_pem)
        log.info(
            _ISSUE_EVENTS[action],
            spiffe_id=credential.spiffe_id,
            serial=f"{certificate.serial_number:x}",
            not_after=certificate.not_valid_after_utc.isoformat(),
            cert_path=str(credential.cert_path),
        )

    def revoke(
        self,
        certificate: bytes | str | os.PathLike[str] | x509.Certificate | int,
        *,
        now: datetime | None = None,
    ) -> None:
        """Add a certificate to ``crl.pem`` and re-sign it (atomically, one revocation at a time).

        ``certificate`` is PEM bytes, a path to a PEM file, a parsed certificate, or a bare serial number
        (for a certificate whose file is lost). Revoking twice is harmless.
        """
        now = _now(now)
        if isinstance(certificate, int):
            serial = certificate
        else:
            if isinstance(certificate, x509.Certificate):
                parsed = certificate
            elif isinstance(certificate, bytes):
                parsed = load_certificate(certificate)
            else:
                parsed = load_certificate(_read(Path(certificate)))
            _check_issued_by(parsed, self.certificate)
            serial = parsed.serial_number

        with _exclusive_lock(self.directory):
            current = load_crl(self.crl_path, self.certificate, now=now)
            if current.get_revoked_certificate_by_serial_number(serial) is not None:
                log.info("certificate_already_revoked", serial=f"{serial:x}")
                return
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            self._write_crl(revoked=[*current, entry], number=_crl_number(current) + 1, now=now)
        log.warning("certificate_revoked", serial=f"{serial:x}", crl=str(self.crl_path))

    def _host_names(self, role: Role, name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
        if isinstance(hosts, str):
            raise ConfigurationError("hosts must be a sequence of host names, not one string")
        names: list[x509.GeneralName] = []
        if name == name.lower():
            names.append(x509.DNSName(identity_host_name(self.trust_domain, role, name)))
        reserved = tuple(f".{each.value}.{self.trust_domain}" for each in Role)
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
                continue
            except ValueError:
                pass
            if not host or not re.fullmatch(r"[A-Za-z0-9._-]+", host):
                raise ConfigurationError(f"not a host name or IP address: {host!r}")
            if host.lower().endswith(reserved):
                # Such a name is another node's identity host name; granting it would let this node
                # pass for that one.
                raise ConfigurationError(f"host {host!r} is reserved for node identities")
            names.append(x509.DNSName(host))
        return names

    def _write_crl(self, *, revoked: list[x509.RevokedCertificate], number: int, now: datetime) -> None:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            # The CRL is re-signed only when something is revoked, so it stays current for as long as
            # the CA does; nodes re-read the file whenever it changes.
            .next_update(self.certificate.not_valid_after_utc)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._private_key.public_key()),
                critical=False,
            )
        )
        for entry in revoked:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._private_key, hashes.SHA256())
        _write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


class RevocationList:
    """A node's live view of ``crl.pem``: re-read (and re-verified) whenever the file changes.

    Fails closed: a missing, unsigned, forged, stale or rolled-back CRL raises :class:`TrustError`
    from :meth:`is_revoked`, and callers refuse the peer. Safe to share between threads.
    """

    def __init__(self, crl_path: Path, ca_certificate: x509.Certificate) -> None:
        self.crl_path = Path(crl_path)
        self._ca_certificate = ca_certificate
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._crl: x509.CertificateRevocationList | None = None

    def is_revoked(self, certificate: bytes | x509.Certificate, *, now: datetime | None = None) -> bool:
        """Whether ``certificate`` (PEM or parsed) is on the CA's current revocation list."""
        crl = self.current(now=now)
        parsed = load_certificate(certificate) if isinstance(certificate, bytes) else certificate
        return is_revoked(parsed, crl)

    def current(self, *, now: datetime | None = None) -> x509.CertificateRevocationList:
        """The verified CRL, re-loaded if the file changed since the last look."""
        now = _now(now)
        with self._lock:
            signature = _file_signature(self.crl_path, _crl_error)
            if signature != self._signature or self._crl is None:
                crl = load_crl(self.crl_path, self._ca_certificate, now=now)
                if self._crl is not None and _crl_number(crl) < _crl_number(self._crl):
                    # An older CRL put back in place would quietly un-revoke certificates.
                    raise TrustError(
                        TrustReason.CRL_UNUSABLE,
                        f"{self.crl_path} is older than the revocation list already seen",
                    )
                if self._crl is not None:
                    log.info("crl_reloaded", crl=str(self.crl_path), revoked=len(crl))
                self._crl, self._signature = crl, signature
            elif (next_update := self._crl.next_update_utc) is not None and now > next_update:
                raise TrustError(
                    TrustReason.CRL_UNUSABLE, f"{self.crl_path} is stale since {next_update.isoformat()}"
                )
            return self._crl


def spiffe_id(trust_domain: str, role: Role, name: str) -> str:
    """The SPIFFE id of a node: ``spiffe://<trust-domain>/<role>/<name>``."""
    _check_trust_domain(trust_domain)
    _check_name(name)
    return f"spiffe://{trust_domain}/{Role(role).value}/{name}"


def parse_spiffe_id(identity: str) -> tuple[str, Role, str]:
    """Split a node's SPIFFE id into ``(trust_domain, role, name)``; :class:`TrustError` if it is not one."""
    match = re.fullmatch(r"spiffe://([^/]+)/([^/]+)/([^/]+)", identity)
    if match is None or match[2] not in {role.value for role in Role}:
        raise TrustError(TrustReason.MALFORMED, f"not a fincluster node identity: {identity!r}")
    trust_domain, role, name = match[1], Role(match[2]), match[3]
    if not _TRUST_DOMAIN.fullmatch(trust_domain) or not _valid_name(name):
        raise TrustError(TrustReason.MALFORMED, f"not a fincluster node identity: {identity!r}")
    return trust_domain, role, name


def identity_host_name(trust_domain: str, role: Role, name: str) -> str:
    """The never-resolved DNS SAN ``<name>.<role>.<trust-domain>`` that pins a server's identity in TLS.

    Only lower-case names have one (host names compare case-insensitively, so ``A`` and ``a`` would
    collide); :class:`ConfigurationError` for others.
    """
    spiffe_id(trust_domain, role, name)  # validates
    if name != name.lower():
        raise ConfigurationError(f"node name {name!r} has upper-case letters; it cannot be pinned in TLS")
    return f"{name}.{Role(role).value}.{trust_domain}"


def spiffe_id_of(cert: x509.Certificate) -> str:
    """The node identity in ``cert``: its one ``spiffe://`` URI SAN (:class:`CertificateError` otherwise)."""
    return _single_spiffe_uri(cert)


def certificate_fingerprint(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding, as recorded in the audit log."""
    der = load_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return f"sha256:{hashlib.sha256(der).hexdigest()}"


def public_key_digest(cert_pem: bytes) -> str:
    """SHA-256 hex of the certificate's SubjectPublicKeyInfo DER: what attestations bind to.

    It survives :meth:`CertificateAuthority.renew` (same key), not ``issue`` or ``rotate`` (new key).
    """
    spki = (
        load_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).hexdigest()


def load_certificate(cert_pem: bytes) -> x509.Certificate:
    """Parse one PEM certificate, raising :class:`CertificateError` (not ``ValueError``) if it is not one."""
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        raise CertificateError(f"not a PEM certificate: {error}") from error


def load_crl(
    source: Path | bytes, ca_certificate: x509.Certificate, *, now: datetime | None = None
) -> x509.CertificateRevocationList:
    """Read a CRL (a path or PEM bytes) and verify it: issued and signed by the CA, and current at ``now``."""
    now = _now(now)
    pem = _read(source, _crl_error) if isinstance(source, Path) else source
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as error:
        raise TrustError(TrustReason.CRL_UNUSABLE, f"not a PEM CRL: {error}") from error
    ca_key = ca_certificate.public_key()
    if crl.issuer != ca_certificate.subject or not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise TrustError(TrustReason.CRL_UNUSABLE, "the CRL was not issued by the swarm CA")
    try:
        valid = crl.is_signature_valid(ca_key)
    except (InvalidSignature, TypeError, ValueError):
        valid = False
    if not valid:
        raise TrustError(TrustReason.CRL_UNUSABLE, "the CRL signature does not verify against the swarm CA")
    if (next_update := crl.next_update_utc) is not None and now > next_update:
        raise TrustError(TrustReason.CRL_UNUSABLE, f"the CRL is stale since {next_update.isoformat()}")
    return crl


def is_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList) -> bool:
    """Whether a verified ``crl`` lists ``cert``; :class:`TrustError` if the CRL cannot speak for it."""
    if cert.issuer != crl.issuer:
        raise TrustError(TrustReason.CRL_UNUSABLE, "the certificate was not issued by the CRL's issuer")
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def parse_ttl(text: str) -> timedelta:
    """Read a lifetime such as ``24h``, ``90m``, ``7d`` or ``1h30m`` (for the CLI's ``--ttl``)."""
    parts = _TTL_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text.strip():
        raise ConfigurationError(f"not a duration like 24h, 90m, 7d or 1h30m: {text!r}")
    ttl = timedelta()
    for number, unit in parts:
        ttl += timedelta(**{_TTL_UNITS[unit]: int(number)})
    _check_ttl(ttl)
    return ttl


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ConfigurationError("now must be a timezone-aware datetime")
    return now


def _check_ttl(ttl: timedelta) -> None:
    if ttl <= timedelta():
        raise ConfigurationError(f"a certificate lifetime must be positive, got {ttl}")


def _check_trust_domain(trust_domain: str) -> None:
    if len(trust_domain) > 255 or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ConfigurationError(
            f"not a trust domain (lower-case letters, digits, '-', '_' and dots): {trust_domain!r}"
        )


def _valid_name(name: str) -> bool:
    return len(name) <= _NAME_MAX_LENGTH and _NAME.fullmatch(name) is not None


def _check_name(name: str) -> None:
    if not _valid_name(name):
        raise ConfigurationError(
            f"not a node name (up to {_NAME_MAX_LENGTH} letters, digits, '-', '_' and single dots, "
            f"starting with a letter or digit): {name!r}"
        )


def _single_spiffe_uri(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError("the certificate has no subject alternative names") from None
    uris = [
        uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")
    ]
    if len(uris) != 1:
        raise CertificateError(f"the certificate must carry exactly one spiffe:// URI SAN, found {len(uris)}")
    return uris[0]


def _host_sans(cert: x509.Certificate, trust_domain: str) -> tuple[str, ...]:
    """The DNS and IP names a node certificate is valid for, less its identity host name (re-added
    by every issuance): what a renewal or rotation keeps."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    identity = tuple(f".{role.value}.{trust_domain}" for role in Role)  # never granted as a host
    dns = [name for name in san.get_values_for_type(x509.DNSName) if not name.lower().endswith(identity)]
    return (*dns, *(str(address) for address in san.get_values_for_type(x509.IPAddress)))


def _check_issued_by(cert: x509.Certificate, ca_certificate: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(ca_certificate)
    except (InvalidSignature, TypeError, ValueError) as error:
        raise CertificateError("the certificate was not issued by this CA") from error


def _same_public_key(private_key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    return private_key.public_key() == cert.public_key()


SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def load_signing_key(pem: bytes, *, source: object = "the key") -> SigningKey:
    """A node's TLS private key as a signing key (proofs, receipts, audit seals); ``source`` names it
    in errors (a path, usually)."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise CertificateError(f"{source} is not an unencrypted PEM private key") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CertificateError(
            f"{source}: unsupported key type {type(key).__name__}, ECDSA or Ed25519 expected"
        )
    return key


def _load_ec_key(pem: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    """CA and node keys are ECDSA P-256 (what gRPC's BoringSSL supports best)."""
    key = load_signing_key(pem, source=path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} is not an ECDSA private key")
    return key


def _private_key_pem(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise TrustError(TrustReason.CRL_UNUSABLE, "the CRL has no CRL number") from None


def _warn_if_key_readable_by_others(key_path: Path) -> None:
    mode = _stat(key_path).st_mode
    if mode & 0o077:
        log.warning("private_key_readable_by_others", key_path=str(key_path), mode=stat.filemode(mode))


ErrorFactory = Callable[[str], Exception]


def _crl_error(message: str) -> Exception:
    return TrustError(TrustReason.CRL_UNUSABLE, message)


def _read(path: Path, error: ErrorFactory = CertificateError) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from exc


def _stat(path: Path, error: ErrorFactory = CertificateError) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from exc


def _file_signature(path: Path, error: ErrorFactory = CertificateError) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten in place or replaced: compare it to spot a new version."""
    info = _stat(path, error)
    return info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_size


def _write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``path`` through a temporary file and ``os.replace``: readers see the old or the new file.

    The temporary file is created with its final ``mode`` (never widened afterwards), so a private key
    is not readable by others at any moment.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _exclusive_lock(directory: Path) -> Iterator[None]:
    """Serialise read-modify-write of the CA directory between processes (an advisory lock on it)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
