"""The CA's archive of every node certificate it ever issued, and loading certificates for verifiers.

Signed evidence outlives the certificate it was signed under: a receipt or an audit record made
yesterday is checked today, after the node's certificate was renewed (same key) or rotated (new key).
So the CA keeps a copy of every certificate it issues, and never overwrites one::

    <ca-dir>/issued/index.jsonl          one JSON line per issuance, appended (serial, identity,
                                         fingerprint, key digest, validity, issue / renew / rotate)
    <ca-dir>/issued/<serial-hex>.pem     the certificate itself, written once

Certificates are public, so the archive can be copied to whoever verifies audit logs
(``fincluster audit verify --archive DIR``). Verifiers read the PEM files, never the index: the index
is for people (``fincluster certs list``) and says nothing a certificate does not.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from fincluster.errors import CertificateError, ConfigurationError

ISSUED_DIR = "issued"
INDEX_FILE = "index.jsonl"


class IssueAction(enum.StrEnum):
    """Why a certificate was issued: first issue, renewal (same key) or rotation (new key)."""

    ISSUE = "issue"
    RENEW = "renew"
    ROTATE = "rotate"


@dataclass(frozen=True)
class ArchivedCertificate:
    """One line of the archive's index."""

    serial: str
    spiffe_id: str
    fingerprint: str
    key_sha256: str
    not_before: datetime
    not_after: datetime
    action: IssueAction
    path: Path


class CertificateArchive:
    """Append-only directory of issued certificates (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_FILE

    def add(
        self,
        certificate: x509.Certificate,
        *,
        spiffe_id: str,
        fingerprint: str,
        key_sha256: str,
        action: IssueAction,
    ) -> Path:
        """Keep ``certificate`` for good. The caller holds the CA's lock (one writer at a time)."""
        self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        serial = f"{certificate.serial_number:x}"
        path = self.directory / f"{serial}.pem"
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise CertificateError(
                f"{path} already exists: archived certificates are never replaced"
            ) from None
        with os.fdopen(descriptor, "wb") as file:
            file.write(certificate.public_bytes(serialization.Encoding.PEM))
            file.flush()
            os.fsync(file.fileno())
        line = {
            "serial": serial,
            "spiffe_id": spiffe_id,
            "fingerprint": fingerprint,
            "key_sha256": key_sha256,
            "not_before": certificate.not_valid_before_utc.isoformat(),
            "not_after": certificate.not_valid_after_utc.isoformat(),
            "action": action.value,
        }
        with self.index_path.open("a", encoding="utf-8") as index:
            index.write(json.dumps(line, sort_keys=True) + "\n")
            index.flush()
            os.fsync(index.fileno())
        return path

    def entries(self) -> list[ArchivedCertificate]:
        """Every issuance in the order it happened (empty for a CA that has issued nothing yet)."""
        if not self.index_path.is_file():
            return []
        entries = []
        for number, line in enumerate(self.index_path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                item = json.loads(line)
                entries.append(
                    ArchivedCertificate(
                        serial=item["serial"],
                        spiffe_id=item["spiffe_id"],
                        fingerprint=item["fingerprint"],
                        key_sha256=item["key_sha256"],
                        not_before=datetime.fromisoformat(item["not_before"]),
                        not_after=datetime.fromisoformat(item["not_after"]),
                        action=IssueAction(item["action"]),
                        path=self.directory / f"{item['serial']}.pem",
                    )
                )
            except (ValueError, KeyError, TypeError) as error:
                raise CertificateError(
                    f"{self.index_path}:{number}: not an archive entry ({error})"
                ) from None
        return entries


def load_certificates(
    sources: Iterable[Path], *, issued_by: x509.Certificate | None = None
) -> list[x509.Certificate]:
    """Every node certificate in ``sources`` (PEM files, or directories searched recursively for
    ``*.pem``), CA certificates left out. With ``issued_by``, certificates that CA did not sign are
    refused (:class:`CertificateError` naming the file)."""
    certificates: dict[bytes, x509.Certificate] = {}
    for path in _pem_files(sources):
        try:
            found = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue  # keys, CRLs and other PEM files live beside certificates
        for certificate in found:
            if _is_ca(certificate):
                continue
            if issued_by is not None:
                try:
                    certificate.verify_directly_issued_by(issued_by)
                except (InvalidSignature, TypeError, ValueError):
                    raise CertificateError(f"{path} holds a certificate the given CA did not issue") from None
            certificates[certificate.fingerprint(hashes.SHA256())] = certificate
    return list(certificates.values())


def _pem_files(sources: Iterable[Path]) -> Iterator[Path]:
    for source in sources:
        source = Path(source)
        if source.is_dir():
            yield from sorted(source.rglob("*.pem"))
        elif source.is_file():
            yield source
        else:
            raise ConfigurationError(f"no certificate file or directory at {source}")


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
