"""``fincluster attest``: the attestation authority's key, tokens for nodes, and checking a token.

The security team runs ``keygen`` once (the private key never leaves its machine), ``issue`` for
every node it has inspected, and anyone can ``verify`` a token against the authority's public key
and, with ``--cert``, that the token belongs to that node's TLS key.

``issue`` needs, on that offline machine, only the authority's private key, the node's certificate
(``certs/nodes/server-<name>.pem``) and the model store's ``manifest.json`` (a few kilobytes, which
pins every weight file by SHA-256) — not the store itself, and no torch.
"""

from __future__ import annotations

import argparse
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from fincluster.errors import ConfigurationError, FinclusterError
from fincluster.trust.attestation import (
    AttestationSubject,
    AuthorityKeys,
    TrustTier,
    generate_authority_key_files,
    issue_attestation,
    load_authority_private_key,
    require_key_binding,
    verify_attestation,
)
from fincluster.trust.pki import load_certificate, parse_ttl, public_key_digest, spiffe_id_of
from fincluster.values import sha256_hex

__all__ = ["register"]


def cmd_attest_keygen(args: argparse.Namespace) -> int:
    key_id = generate_authority_key_files(args.private, args.public)
    print(f"attestation authority key {key_id}")
    print(f"  private {args.private} (keep it offline)\n  public  {args.public}")
    return 0


def _manifest_digest(args: argparse.Namespace) -> tuple[str, str]:
    """(model id, SHA-256 of manifest.json's exact bytes): what attestations and stores agree on."""
    from fincluster.store.manifest import Manifest

    path: Path = args.manifest if args.manifest is not None else args.store / "manifest.json"
    data = _read(path, "store manifest")
    try:
        manifest = Manifest.from_json_bytes(data, source=str(path))
    except FinclusterError as error:
        raise ConfigurationError(str(error)) from None
    return manifest.model_id, sha256_hex(data)


def cmd_attest_issue(args: argparse.Namespace) -> int:
    authority_key = load_authority_private_key(args.authority_key)
    model_id, manifest_digest = _manifest_digest(args)
    cert_pem = _read(args.cert, "node certificate")
    try:
        subject = AttestationSubject(
            node_id=spiffe_id_of(load_certificate(cert_pem)),
            tls_key_sha256=public_key_digest(cert_pem),
            tier=TrustTier(args.tier),
            zone=args.zone,
            hardware=args.hardware,
            software_version=args.software_version,
            model_manifest_sha256=manifest_digest,
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigurationError(f"cannot attest {field}={first['input']!r}: {first['msg']}") from error
    now = datetime.now(UTC)
    token = issue_attestation(subject, authority_key=authority_key, now=now, lifetime=parse_ttl(args.ttl))
    # Read our own token back the way every verifier will, and report what they will see.
    claims = verify_attestation(token, authority_keys=AuthorityKeys([authority_key.public_key()]), now=now)
    _write_replacing(args.out, token + "\n")
    print(f"attestation {claims.attestation_id} for {claims.node_id} (tier {claims.tier.value})")
    print(f"  model   {model_id}, manifest sha256 {manifest_digest}")
    expires = claims.expires_at.isoformat().replace("+00:00", "Z")
    print(f"  expires {expires}\n  token   {args.out}")
    return 0


def cmd_attest_verify(args: argparse.Namespace) -> int:
    token = _read(args.token, "attestation token").decode("ascii", errors="replace").strip()
    claims = verify_attestation(
        token, authority_keys=AuthorityKeys.from_files(args.authority_public), now=datetime.now(UTC)
    )
    if args.cert is not None:
        require_key_binding(claims, load_certificate(_read(args.cert, "node certificate")).public_key())
    print(claims.model_dump_json(indent=2))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``attest`` command group to the ``fincluster`` parser's subcommands."""
    attest = commands.add_parser("attest", help="attestation authority: keys, tokens, verification")
    group = attest.add_subparsers(dest="attest_command", required=True)

    keygen = group.add_parser("keygen", help="create the authority's Ed25519 key pair")
    keygen.add_argument("--private", required=True, type=Path, help="private key file to create (0600)")
    keygen.add_argument("--public", required=True, type=Path, help="public key file to create")
    keygen.set_defaults(handler=cmd_attest_keygen)

    issue = group.add_parser("issue", help="sign an attestation token for a node's certificate")
    issue.add_argument("--authority-key", required=True, type=Path, help="authority private key (PEM)")
    issue.add_argument("--cert", required=True, type=Path, help="the node's certificate (PEM)")
    issue.add_argument("--tier", required=True, choices=[tier.value for tier in TrustTier])
    issue.add_argument("--zone", required=True, help="zone / jurisdiction, e.g. eu-fra")
    issue.add_argument("--hardware", required=True, help="hardware description, e.g. h100-cc")
    issue.add_argument("--software-version", required=True, help="the node's fincluster build")
    weights = issue.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--manifest",
        type=Path,
        help="manifest.json of the model store the node serves (all the offline machine needs)",
    )
    weights.add_argument("--store", type=Path, help="the model store the node serves (its manifest.json)")
    issue.add_argument(
        "--ttl",
        default="7d",
        help="token lifetime, e.g. 24h or 7d (default 7d; certs/README.md has the cycle)",
    )
    issue.add_argument("--out", required=True, type=Path, help="token file to write")
    issue.set_defaults(handler=cmd_attest_issue)

    verify = group.add_parser("verify", help="check a token and print its claims as JSON")
    verify.add_argument("token", type=Path, help="token file")
    verify.add_argument(
        "--authority-public",
        required=True,
        action="append",
        type=Path,
        help="trusted authority public key (PEM; repeat during key rotation)",
    )
    verify.add_argument("--cert", type=Path, help="also require the token to bind this certificate's key")
    verify.set_defaults(handler=cmd_attest_verify)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read {what} {path}: {error.strerror}") from error


def _write_replacing(path: Path, text: str) -> None:
    """Write through a temporary file, so a node re-reading its token never sees half of a new one."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        temporary.write_text(text, encoding="ascii")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot write {path}: {error.strerror}") from error
