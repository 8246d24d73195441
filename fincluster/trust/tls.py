"""Mutual TLS for every gRPC link of the swarm, and who is on the other end of a call.

What each side gets:

* :func:`server_credentials` — servers and the registry always require a client certificate from the
  swarm CA. The certificate and key are re-read on the first handshake after their files change
  (``issue`` rewrites them on rotation), so renewal needs no restart. Connections opened before a
  rotation keep the old certificate until they close; set the server option
  ``grpc.max_connection_age_ms`` well below the certificate lifetime to bound that.
* :func:`channel_credentials` — clients present their own certificate and trust only the swarm CA.
  The files are read when it is called: after a rotation, build new credentials and a new channel;
  :class:`RenewingChannel` does that by itself (a server's channel to the registry uses it, so that
  after a rotation the registry sees the key the server's new attestation is bound to).
* :func:`expected_server_identity` — channel options that make the TLS handshake check *which* server
  answered. gRPC checks the target host against the server certificate's DNS/IP SANs, and every
  server certificate carries ``127.0.0.1`` and ``localhost``, so on its own the handshake only proves
  "some server of this swarm". Server certificates also carry a never-resolved identity host name,
  ``<name>.<role>.<trust-domain>``; setting ``grpc.ssl_target_name_override`` to it makes the
  handshake fail (``UNAVAILABLE``) unless the server holds that node's certificate. gRPC Python gives a
  client no access to the server's certificate, so this is the only TLS-level check a client can make;
  binding attestations to the server's key is left to the signed-nonce proof at session open.

Revocation. gRPC Python cannot consult a CRL during the handshake, so it is enforced per call:

* :class:`~fincluster.trust.pki.RevocationList` holds the CA-verified ``crl.pem`` and re-reads it when
  the file changes. It fails closed: a missing, forged, stale or rolled-back CRL is an error, never
  "nothing is revoked".
* :func:`check_peer_not_revoked` takes the client certificate that TLS already verified from the
  call's auth context and refuses it if it is revoked, or expired since the connection was opened
  (HTTP/2 connections outlive short certificates). It returns the peer's SPIFFE id.
* The servers (block servers and the registry, both ``grpc.aio``) run
  :func:`check_certificate_current` at the start of every call and again at every step of an
  inference session, so a revoked node is cut off at its next call or step even on a connection or
  stream it already has. The peer sees only ``UNAUTHENTICATED``; the reason goes to the local log.

Clients check a server's certificate against the CRL when the server presents it in the signed
proof at session open (the transport cannot show it to them).

What a refused peer sees (gRPC 1.85): every failure in the handshake — no client certificate, one
from another CA, an expired one, a plaintext client, a server of another CA or not the pinned one —
reaches the client as ``UNAVAILABLE``; a per-call refusal is ``UNAUTHENTICATED``.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509

from fincluster.errors import CertificateError, TrustError, TrustReason
from fincluster.logs import get_logger
from fincluster.trust.pki import (
    Credential,
    RevocationList,
    identity_host_name,
    load_certificate,
    parse_spiffe_id,
    spiffe_id_of,
)

log = get_logger(__name__)

_PEER_REJECTED = "peer certificate not accepted"


def server_credentials(credential: Credential) -> grpc.ServerCredentials:
    """TLS credentials for a server: client certificates required, renewed files picked up live."""
    loader = _ServerCertificateLoader(credential)
    return grpc.dynamic_ssl_server_credentials(
        loader.initial(), loader.fetch, require_client_authentication=True
    )


def channel_credentials(credential: Credential) -> grpc.ChannelCredentials:
    """TLS credentials for a client: its own certificate and key, and the swarm CA as the only root."""
    ca_pem, cert_pem, key_pem = credential.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


class RenewingChannel:
    """A channel to one address whose TLS credentials follow the node's certificate files: the next
    call after a renewal or rotation goes over a new channel (the old one is left to finish)."""

    def __init__(
        self, address: str, credential: Credential, *, options: tuple[tuple[str, Any], ...] = ()
    ) -> None:
        self.address = address
        self.credential = credential
        self._options = options
        self._lock = threading.Lock()
        self._state: object = None
        self._channel: grpc.Channel | None = None

    def current(self) -> grpc.Channel:
        with self._lock:
            state = self.credential.file_state()
            if self._channel is None or state != self._state:
                try:
                    credentials = channel_credentials(self.credential)
                except CertificateError:
                    if self._channel is None:
                        raise
                    return self._channel  # key and certificate are being replaced: keep the old pair
                self._channel = grpc.secure_channel(self.address, credentials, options=self._options)
                self._state = state
            return self._channel


def expected_server_identity(spiffe_id: str) -> tuple[tuple[str, str], ...]:
    """Channel options under which the handshake only succeeds with the server holding ``spiffe_id``.

    Pass them to ``grpc.secure_channel(address, channel_credentials(...), options=...)``; the address
    stays the real host and port. :class:`ConfigurationError` for names that cannot be pinned
    (upper-case letters), :class:`TrustError` for a malformed id.
    """
    trust_domain, role, name = parse_spiffe_id(spiffe_id)
    return (("grpc.ssl_target_name_override", identity_host_name(trust_domain, role, name)),)


def peer_certificate(context: grpc.ServicerContext) -> x509.Certificate:
    """The certificate the peer of this call authenticated with (verified by TLS against the CA)."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        raise CertificateError("the call did not arrive over TLS")
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise CertificateError("the peer presented no certificate")
    return load_certificate(pems[0])


def peer_identity(context: grpc.ServicerContext) -> str:
    """The SPIFFE id of the peer of this call; :class:`CertificateError` if it has none."""
    return spiffe_id_of(peer_certificate(context))


def check_peer_not_revoked(
    context: grpc.ServicerContext, revocations: RevocationList, *, now: datetime | None = None
) -> str:
    """The peer's SPIFFE id, after checking its certificate is neither revoked nor expired at ``now``.

    :class:`TrustError` if it is revoked or expired, or if the CRL cannot be trusted (fail closed);
    :class:`CertificateError` if the peer has no usable certificate.
    """
    certificate = peer_certificate(context)
    check_certificate_current(certificate, revocations, now=now if now is not None else datetime.now(UTC))
    return spiffe_id_of(certificate)


def check_certificate_current(
    certificate: x509.Certificate, revocations: RevocationList | None, *, now: datetime
) -> None:
    """:class:`TrustError` unless ``certificate`` is inside its validity period at ``now`` and not on the
    CA's revocation list (checked on every call and every session step: authorisation is continuous)."""
    identity = spiffe_id_of(certificate)
    if revocations is not None and revocations.is_revoked(certificate, now=now):
        raise TrustError(
            TrustReason.REVOKED,
            f"certificate (serial {certificate.serial_number:x}) is revoked",
            node_id=identity,
        )
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not not_before <= now <= not_after:
        raise TrustError(
            TrustReason.OUTSIDE_VALIDITY,
            f"certificate is outside its validity ({not_before.isoformat()} to {not_after.isoformat()})",
            node_id=identity,
        )


class _ServerCertificateLoader:
    """Feeds gRPC the server's certificate; gRPC asks before every handshake (``fetch``).

    A new configuration is built only when one of the three files changed, and only from material
    that ``Credential.read`` accepts (key matches certificate, certificate issued by the CA); otherwise
    the server keeps what it has and tries again once the files change again.
    """

    def __init__(self, credential: Credential) -> None:
        self._credential = credential
        self._lock = threading.Lock()
        self._loaded: tuple[object, ...] | None = None
        self._failed: tuple[object, ...] | None = None

    def initial(self) -> grpc.ServerCertificateConfiguration:
        signature = self._credential.file_state()
        configuration = self._configuration()
        self._loaded = signature
        return configuration

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Runs on a gRPC thread: it must never raise, or the handshake fails instead of falling back.
        try:
            with self._lock:
                signature = self._credential.file_state()
                if signature in (self._loaded, self._failed):
                    return None
                try:
                    configuration = self._configuration()
                except CertificateError as error:
                    self._failed = signature
                    log.warning(
                        "server_certificate_reload_failed",
                        cert_path=str(self._credential.cert_path),
                        reason=str(error),
                    )
                    return None
                self._loaded = signature
                return configuration
        except Exception:
            log.exception("server_certificate_fetch_failed", cert_path=str(self._credential.cert_path))
            return None

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        ca_pem, cert_pem, key_pem = self._credential.read()
        certificate = load_certificate(cert_pem)
        log.info(
            "server_certificate_loaded",
            spiffe_id=spiffe_id_of(certificate),
            serial=f"{certificate.serial_number:x}",
            not_after=certificate.not_valid_after_utc.isoformat(),
        )
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)
