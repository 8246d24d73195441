"""Who is who in the swarm: the swarm CA, node certificates, revocation, and mutual TLS for gRPC.

The high-level recipes most code needs: :class:`CertificateAuthority` (``init`` / ``load`` / ``issue``
/ ``renew`` / ``rotate`` / ``revoke``, and the archive of every certificate it issued),
:func:`server_credentials` and :func:`channel_credentials` for gRPC, :func:`peer_identity` and
:func:`check_certificate_current` (every call, every session step) on the serving side. ``pki`` and
``tls`` explain the design.
"""

from fincluster.trust.pki import (
    CertificateAuthority,
    Credential,
    RevocationList,
    Role,
    certificate_fingerprint,
    identity_host_name,
    is_revoked,
    load_certificate,
    load_crl,
    parse_spiffe_id,
    parse_ttl,
    public_key_digest,
    spiffe_id,
    spiffe_id_of,
)
from fincluster.trust.tls import (
    channel_credentials,
    check_certificate_current,
    check_peer_not_revoked,
    expected_server_identity,
    peer_certificate,
    peer_identity,
    server_credentials,
)

__all__ = [
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
