"""``fincluster certs``: the swarm CA, node certificates, their daily renewal, rotation and revocation.

``renew`` keeps the node's key (its attestation stays valid), ``rotate`` gives it a new key (the
security team then issues a new attestation, which the running server picks up). Every certificate
issued is kept in the CA's archive (``<dir>/issued/``); ``list`` shows it. ``certs/README.md`` has
the lifetimes and the daily cycle.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from fincluster.trust.pki import (
    CA_TTL,
    DEFAULT_HOSTS,
    NODE_CERTIFICATE_TTL,
    CertificateAuthority,
    Credential,
    Role,
    parse_ttl,
    public_key_digest,
)

__all__ = ["register"]

_ROLES = [role.value for role in Role]


def cmd_certs_init_ca(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(args.dir, trust_domain=args.trust_domain, ttl=parse_ttl(args.ttl))
    print(f"created CA for trust domain {ca.trust_domain} in {args.dir}")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.dir)
    hosts = tuple(args.host) if args.host else DEFAULT_HOSTS
    _print(ca.issue(Role(args.role), args.name, ttl=parse_ttl(args.ttl), hosts=hosts), "issued")
    return 0


def cmd_certs_renew(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.dir)
    hosts = tuple(args.host) if args.host else None
    credential = ca.renew(Role(args.role), args.name, ttl=parse_ttl(args.ttl), hosts=hosts)
    _print(credential, "renewed (same key: the node's attestation stays valid)")
    return 0


def cmd_certs_rotate(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.dir)
    hosts = tuple(args.host) if args.host else None
    credential = ca.rotate(Role(args.role), args.name, ttl=parse_ttl(args.ttl), hosts=hosts)
    _print(credential, "rotated (new key)")
    if Role(args.role) is Role.SERVER:
        print(
            "  the server's attestation is bound to its old key: issue a new one for this certificate "
            "(fincluster attest issue --cert ...) and replace its token file; the server picks it up"
        )
    return 0


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    CertificateAuthority.load(args.dir).revoke(Path(args.cert))
    print(f"revoked {args.cert}; CRL updated in {args.dir}")
    return 0


def cmd_certs_list(args: argparse.Namespace) -> int:
    ca = CertificateAuthority.load(args.dir)
    entries = [e for e in ca.archive.entries() if args.node is None or e.spiffe_id.endswith(f"/{args.node}")]
    now = datetime.now(UTC)
    for entry in entries:
        state = "valid" if entry.not_before <= now <= entry.not_after else "expired"
        if now < entry.not_before:
            state = "not yet valid"
        print(
            f"{entry.serial:>40}  {entry.action.value:<6}  {entry.spiffe_id}  key {entry.key_sha256[:16]}  "
            f"until {entry.not_after.isoformat().replace('+00:00', 'Z')} ({state})"
        )
    print(f"{len(entries)} certificate(s) in {ca.archive.directory}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``certs`` command group to the ``fincluster`` parser's subcommands."""
    certs = commands.add_parser(
        "certs", help="swarm CA: issue, renew (same key), rotate (new key), revoke, list node certificates"
    )
    group = certs.add_subparsers(dest="certs_command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help_text, description=help_text)
        parser.add_argument(
            "--dir", type=Path, default=Path("certs"), help="the CA's directory (default: certs)"
        )
        return parser

    init = add("init-ca", "create the swarm CA (refuses to overwrite one)")
    init.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. bank.example")
    init.add_argument("--ttl", default=f"{CA_TTL.days}d", help=f"CA lifetime (default: {CA_TTL.days}d)")
    init.set_defaults(handler=cmd_certs_init_ca)

    node_ttl = f"{int(NODE_CERTIFICATE_TTL.total_seconds() // 3600)}h"
    for name, help_text, handler, host_default in (
        ("issue", "issue a node's first certificate (a new key)", cmd_certs_issue, "localhost and 127.0.0.1"),
        (
            "renew",
            "re-issue a node's certificate for its current key (daily)",
            cmd_certs_renew,
            "the current",
        ),
        (
            "rotate",
            "replace a node's key and certificate (needs a new attestation)",
            cmd_certs_rotate,
            "the current",
        ),
    ):
        node = add(name, help_text)
        node.add_argument("--role", required=True, choices=_ROLES, help="what the node is")
        node.add_argument("--name", required=True, help="node name (letters, digits, '-', '_', dots)")
        node.add_argument(
            "--ttl", default=node_ttl, help=f"certificate lifetime, e.g. 48h or 7d (default: {node_ttl})"
        )
        node.add_argument(
            "--host",
            action="append",
            help=f"DNS name or IP the node is reached at (repeatable; default: {host_default} hosts)",
        )
        node.set_defaults(handler=handler)

    revoke = add("revoke", "revoke a certificate and re-sign the CRL")
    revoke.add_argument("cert", help="certificate file to revoke")
    revoke.set_defaults(handler=cmd_certs_revoke)

    listing = add("list", "list every certificate the CA issued (its archive)")
    listing.add_argument("--node", help="only this node, as ROLE/NAME, e.g. server/gpu-a")
    listing.set_defaults(handler=cmd_certs_list)


def _print(credential: Credential, what: str) -> None:
    digest = public_key_digest(credential.cert_path.read_bytes())
    print(f"{credential.spiffe_id} {what}")
    print(f"  cert {credential.cert_path}\n  key  {credential.key_path} (sha256 {digest[:16]}…)")
