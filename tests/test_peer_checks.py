"""Authorisation is continuous: the registry and block servers check the caller's certificate on every
call (and every session step), so a revoked or expired certificate is cut off on a connection it
already holds, and a missing CRL refuses everyone (fail closed)."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from cryptography import x509

from fincluster.registry.server import RegistryServer
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import RevocationList, Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from tests.helpers import Pki

pytestmark = pytest.mark.e2e


def registry_with_crl(pki: Pki, **clock) -> RegistryServer:
    trust = TrustContext(
        ca_certificate=pki.ca.certificate,
        revocations=RevocationList(pki.ca.crl_path, pki.ca.certificate),
        **clock,
    )
    server = RegistryServer(pki.credential(Role.REGISTRY, "checks"), trust=trust)
    server.start()
    return server


def list_call(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        pb_grpc.RegistryServiceStub(channel).List(pb.ListRequest(model_id="m"), timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_revoked_client_is_cut_off_on_its_open_connection_and_others_are_not(pki: Pki) -> None:
    registry = registry_with_crl(pki)
    try:
        leaver, stayer = pki.ca.issue(Role.CLIENT, "pc-leaver"), pki.ca.issue(Role.CLIENT, "pc-stayer")
        with grpc.secure_channel(registry.address, channel_credentials(leaver)) as channel:
            assert list_call(channel) is grpc.StatusCode.OK
            pki.ca.revoke(leaver.cert_path)
            assert list_call(channel) is grpc.StatusCode.UNAUTHENTICATED
        with grpc.secure_channel(registry.address, channel_credentials(stayer)) as channel:
            assert list_call(channel) is grpc.StatusCode.OK
    finally:
        registry.stop(0)


def test_a_certificate_expired_since_the_connection_opened_is_refused(pki: Pki) -> None:
    client = pki.ca.issue(Role.CLIENT, "pc-expiring")
    expired = x509.load_pem_x509_certificate(client.cert_path.read_bytes()).not_valid_after_utc
    registry = registry_with_crl(pki, clock=lambda: expired + timedelta(seconds=1))
    try:
        with grpc.secure_channel(registry.address, channel_credentials(client)) as channel:
            assert list_call(channel) is grpc.StatusCode.UNAUTHENTICATED
    finally:
        registry.stop(0)


def test_a_missing_crl_refuses_everyone(pki: Pki, tmp_path) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(pki.ca.crl_path.read_bytes())
    trust = TrustContext(
        ca_certificate=pki.ca.certificate, revocations=RevocationList(crl, pki.ca.certificate)
    )
    registry = RegistryServer(pki.credential(Role.REGISTRY, "checks"), trust=trust)
    registry.start()
    try:
        client = pki.credential(Role.CLIENT, "analyst")
        with grpc.secure_channel(registry.address, channel_credentials(client)) as channel:
            assert list_call(channel) is grpc.StatusCode.OK
            crl.unlink()
            assert list_call(channel) is grpc.StatusCode.UNAUTHENTICATED
    finally:
        registry.stop(0)
