"""Mutual TLS over real gRPC on loopback: who gets in, who is refused, and with which status."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from structlog.testing import capture_logs

from fincluster.errors import CertificateError
from fincluster.trust import (
    CertificateAuthority,
    Credential,
    Role,
    channel_credentials,
    expected_server_identity,
    peer_identity,
    server_credentials,
)

pytestmark = pytest.mark.e2e

DOMAIN = "bank.test"
TIMEOUT = 5.0

Serve = Callable[..., int]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    # gRPC checks validity against the real clock, so these certificates are issued at the real time.
    return CertificateAuthority.init(tmp_path / "certs", trust_domain=DOMAIN)


@pytest.fixture
def server(ca: CertificateAuthority) -> Credential:
    return ca.issue(Role.SERVER, "alpha")


@pytest.fixture
def client(ca: CertificateAuthority) -> Credential:
    return ca.issue(Role.CLIENT, "analyst")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    """A CA with the very same trust domain and subject name, but its own key."""
    return CertificateAuthority.init(tmp_path / "other", trust_domain=DOMAIN)


def _whoami(_: bytes, context: grpc.ServicerContext) -> bytes:
    return peer_identity(context).encode()


def _whoami_stream(_: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield peer_identity(context).encode()


def _whoami_of_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    for _ in requests:
        pass
    return peer_identity(context).encode()


def _whoami_stream_of_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in requests:
        yield peer_identity(context).encode()


HANDLERS = grpc.method_handlers_generic_handler(
    "test.Identity",
    {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(_whoami),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(_whoami_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(_whoami_of_stream),
        "StreamStream": grpc.stream_stream_rpc_method_handler(_whoami_stream_of_stream),
    },
)


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start identity-echo servers on 127.0.0.1, port 0; returns the port. Stopped after the test."""
    servers: list[Any] = []

    def start(credential: Credential, *, interceptors: Sequence[Any] = ()) -> int:
        instance = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        instance.add_generic_rpc_handlers((HANDLERS,))
        port: int = instance.add_secure_port("127.0.0.1:0", server_credentials(credential))
        instance.start()
        servers.append(instance)
        return port

    yield start
    for instance in servers:
        instance.stop(None)


def call(channel: grpc.Channel, kind: str = "UnaryUnary") -> bytes:
    with channel:
        return invoke(channel, kind)


def invoke(channel: grpc.Channel, kind: str = "UnaryUnary") -> bytes:
    method = f"/test.Identity/{kind}"
    if kind == "UnaryUnary":
        reply: bytes = channel.unary_unary(method)(b"ping", timeout=TIMEOUT)
    elif kind == "UnaryStream":
        (reply,) = channel.unary_stream(method)(b"ping", timeout=TIMEOUT)
    elif kind == "StreamUnary":
        reply = channel.stream_unary(method)(iter([b"ping"]), timeout=TIMEOUT)
    else:
        (reply,) = channel.stream_stream(method)(iter([b"ping"]), timeout=TIMEOUT)
    return reply


def refusal(channel: grpc.Channel, kind: str = "UnaryUnary") -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call(channel, kind)
    code: grpc.StatusCode = raised.value.code()
    return code


def secure(port: int, credential: Credential, *, host: str = "127.0.0.1", **kwargs: Any) -> grpc.Channel:
    return grpc.secure_channel(f"{host}:{port}", channel_credentials(credential), **kwargs)


def served_certificate(port: int, credential: Credential) -> x509.Certificate:
    """Handshake with the Python ssl module to see which certificate the server presents right now."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(credential.ca_cert_path))
    context.load_cert_chain(str(credential.cert_path), str(credential.key_path))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def serial_of(credential: Credential) -> int:
    return x509.load_pem_x509_certificate(credential.cert_path.read_bytes()).serial_number


def test_client_with_a_swarm_certificate_is_served_and_identified(
    serve: Serve, server: Credential, client: Credential
) -> None:
    port = serve(server)
    assert call(secure(port, client)) == b"spiffe://bank.test/client/analyst"
    assert call(secure(port, client, host="localhost")) == b"spiffe://bank.test/client/analyst"


def test_a_server_certificate_also_works_as_a_client_certificate(
    serve: Serve, ca: CertificateAuthority, server: Credential
) -> None:
    port = serve(server)
    assert call(secure(port, ca.issue(Role.SERVER, "beta"))) == b"spiffe://bank.test/server/beta"


def test_client_without_a_certificate_is_refused(serve: Serve, server: Credential) -> None:
    port = serve(server)
    anonymous = grpc.ssl_channel_credentials(root_certificates=server.ca_cert_path.read_bytes())
    assert refusal(grpc.secure_channel(f"127.0.0.1:{port}", anonymous)) is grpc.StatusCode.UNAVAILABLE


def test_client_with_a_certificate_of_another_ca_is_refused(
    serve: Serve, server: Credential, other_ca: CertificateAuthority
) -> None:
    port = serve(server)
    foreign = other_ca.issue(Role.CLIENT, "analyst")
    # The client trusts the right CA, so only the server's check of the client can fail.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server.ca_cert_path.read_bytes(),
        private_key=foreign.key_path.read_bytes(),
        certificate_chain=foreign.cert_path.read_bytes(),
    )
    assert refusal(grpc.secure_channel(f"127.0.0.1:{port}", credentials)) is grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused(serve: Serve, server: Credential) -> None:
    port = serve(server)
    assert refusal(grpc.insecure_channel(f"127.0.0.1:{port}")) is grpc.StatusCode.UNAVAILABLE


def test_expired_client_certificate_is_refused(serve: Serve, tmp_path: Path) -> None:
    issued_at = datetime.now(UTC) - timedelta(days=2)
    ca = CertificateAuthority.init(tmp_path / "old", trust_domain=DOMAIN, now=issued_at)
    port = serve(ca.issue(Role.SERVER, "alpha"))
    expired = ca.issue(Role.CLIENT, "analyst", ttl=timedelta(hours=1), now=issued_at)
    assert refusal(secure(port, expired)) is grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_of_another_ca(
    serve: Serve, client: Credential, other_ca: CertificateAuthority
) -> None:
    port = serve(other_ca.issue(Role.SERVER, "alpha"))
    assert refusal(secure(port, client)) is grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_cannot_serve(
    serve: Serve, ca: CertificateAuthority, client: Credential
) -> None:
    port = serve(ca.issue(Role.CLIENT, "impostor"))
    assert refusal(secure(port, client)) is grpc.StatusCode.UNAVAILABLE


def test_expected_server_identity_pins_the_server(
    serve: Serve, ca: CertificateAuthority, server: Credential, client: Credential
) -> None:
    port = serve(server)
    pinned = expected_server_identity("spiffe://bank.test/server/alpha")
    assert pinned == (("grpc.ssl_target_name_override", "alpha.server.bank.test"),)
    assert call(secure(port, client, options=pinned)) == b"spiffe://bank.test/client/analyst"
    ca.issue(Role.SERVER, "beta")
    elsewhere = expected_server_identity("spiffe://bank.test/server/beta")
    assert refusal(secure(port, client, options=elsewhere)) is grpc.StatusCode.UNAVAILABLE


def test_renewed_server_certificate_is_served_without_restart(
    serve: Serve, ca: CertificateAuthority, server: Credential, client: Credential
) -> None:
    port = serve(server)
    first = serial_of(server)
    assert served_certificate(port, client).serial_number == first
    existing = secure(port, client)
    assert invoke(existing) == b"spiffe://bank.test/client/analyst"

    renewed = ca.issue(Role.SERVER, "alpha")

    assert serial_of(renewed) != first
    assert served_certificate(port, client).serial_number == serial_of(renewed)
    assert call(secure(port, client)) == b"spiffe://bank.test/client/analyst"
    assert call(existing) == b"spiffe://bank.test/client/analyst"


def test_a_key_that_does_not_match_keeps_the_current_certificate(
    serve: Serve, ca: CertificateAuthority, server: Credential, client: Credential
) -> None:
    port = serve(server)
    first = serial_of(server)
    stranger = ca.issue(Role.SERVER, "beta")
    server.key_path.write_bytes(stranger.key_path.read_bytes())  # a rotation caught half-way

    with capture_logs() as logs:
        assert served_certificate(port, client).serial_number == first
    assert [entry["event"] for entry in logs] == ["server_certificate_reload_failed"]
    assert call(secure(port, client)) == b"spiffe://bank.test/client/analyst"


def test_server_credentials_refuse_inconsistent_files(ca: CertificateAuthority, server: Credential) -> None:
    stranger = ca.issue(Role.SERVER, "beta")
    with pytest.raises(CertificateError, match="does not belong"):
        server_credentials(
            Credential(server.cert_path, stranger.key_path, server.ca_cert_path, server.spiffe_id)
        )


class _Context:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


@pytest.mark.parametrize(
    "auth",
    [{}, {"transport_security_type": [b"insecure"]}, {"transport_security_type": [b"ssl"]}],
)
def test_peer_identity_needs_a_tls_client_certificate(auth: dict[str, list[bytes]]) -> None:
    with pytest.raises(CertificateError):
        peer_identity(_Context(auth))
