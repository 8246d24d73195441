"""Every swarm link requires mutual TLS with the swarm's CA; there is no plaintext port."""

from __future__ import annotations

import grpc
import pytest

from fincluster.client import Swarm
from fincluster.errors import RegistryError
from fincluster.trust.pki import Role
from fincluster.trust.tls import channel_credentials
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire import fincluster_pb2_grpc as pb_grpc
from tests.helpers import Cluster, Pki

pytestmark = pytest.mark.e2e


def info_status(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        pb_grpc.BlockServiceStub(channel).Info(pb.InfoRequest(), timeout=5)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_client_with_swarm_certificate_is_served(tiny_cluster: Cluster, pki: Pki) -> None:
    credential = pki.credential(Role.CLIENT, "analyst")
    channel = grpc.secure_channel(tiny_cluster.servers[0].address, channel_credentials(credential))
    assert info_status(channel) == grpc.StatusCode.OK


def test_client_without_certificate_is_refused(tiny_cluster: Cluster, pki: Pki) -> None:
    ca_pem = pki.ca.cert_path.read_bytes()
    channel = grpc.secure_channel(tiny_cluster.servers[0].address, grpc.ssl_channel_credentials(ca_pem))
    assert info_status(channel) == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(
    tiny_cluster: Cluster, pki: Pki, foreign_pki: Pki
) -> None:
    foreign = foreign_pki.credential(Role.CLIENT, "intruder")
    _, cert_pem, key_pem = foreign.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_path.read_bytes(), private_key=key_pem, certificate_chain=cert_pem
    )
    channel = grpc.secure_channel(tiny_cluster.servers[0].address, credentials)
    assert info_status(channel) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("target", ["server", "registry"])
def test_there_is_no_plaintext_port(tiny_cluster: Cluster, target: str) -> None:
    address = tiny_cluster.servers[0].address if target == "server" else tiny_cluster.registry_address
    assert info_status(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE


def test_registry_refuses_a_client_of_another_ca(tiny_cluster: Cluster, foreign_pki: Pki) -> None:
    with pytest.raises(RegistryError, match=r"not from the swarm CA .*\[UNAVAILABLE\]"):
        Swarm(
            registry=tiny_cluster.registry_address,
            credential=foreign_pki.credential(Role.CLIENT, "intruder"),
            audit=None,
        )


def test_client_pins_the_server_identity_from_the_record(tiny_cluster: Cluster) -> None:
    """A record naming server s1 at s0's address fails the handshake: s0 cannot prove it is s1."""
    s0, s1 = tiny_cluster.servers[0], tiny_cluster.servers[1]
    forged = pb.ServerRecord(
        node_id=s1.node_id, address=s0.address, model_id="m", span=pb.BlockSpan(start=0, end=2)
    )
    with tiny_cluster.swarm() as swarm:
        client = swarm.span_client(forged)
        with pytest.raises(Exception, match="UNAVAILABLE"):
            client.info()
        assert swarm.span_client(s0.record()).info().node_id == s0.node_id
