"""Addresses are configuration: ``host:port`` parsing, the rules an advertised address must meet, and
what a failed connection means in words.

A node binds one address (``--host``/``--port``) and advertises another (``--public-address``, the
one peers dial). The advertised host must be a DNS or IP SAN of the node's own certificate, or every
peer's TLS handshake fails; a wildcard bind address cannot be advertised; and a loopback address is
useless to a registry on another host. :func:`check_advertised_address` and
:func:`check_reachable_from` refuse those at start, with the fix in the message.

gRPC reports a failed connection as ``UNAVAILABLE`` with core library text (``Connection refused``,
``CERTIFICATE_VERIFY_FAILED`` …); :func:`explain_connection_failure` turns it into a sentence that
names the peer and the address.
"""

from __future__ import annotations

import ipaddress

from cryptography import x509

from fincluster.errors import CertificateError, ConfigurationError

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104 - names, not a bind


def split_host_port(address: str) -> tuple[str, int]:
    """``("host", port)`` of ``host:port`` or ``[v6]:port``; ConfigurationError otherwise."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"not a host:port address: {address!r}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1). Other names are not resolved."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def certificate_hosts(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS and IP SANs of ``certificate`` (what a TLS client may dial it by)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError("the certificate has no subject alternative names") from None
    return (
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    )


def _host_matches(host: str, names: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".") in {name.lower() for name in names}
    return any(name == str(ip) for name in names)


def advertised_host(public_address: str | None, bind_host: str) -> str:
    """The host peers will dial: that of ``public_address``, else the bind host."""
    return split_host_port(public_address)[0] if public_address else bind_host


def check_advertised(
    public_address: str | None,
    bind_host: str,
    certificate: x509.Certificate,
    *,
    flag: str,
    registry_address: str | None = None,
) -> None:
    """Refuse to advertise an address peers could not verify against ``certificate`` (the host of
    ``public_address``, or the bind host when none is given, must be one of its DNS/IP SANs), or could
    not reach (loopback, announced to a registry at ``registry_address`` that is not on loopback)."""
    host = advertised_host(public_address, bind_host)
    if host in WILDCARD_HOSTS:
        raise ConfigurationError(
            f"binding {bind_host or 'every interface'} needs {flag} HOST:PORT: the address peers dial "
            "(a host name or IP of this machine that its certificate names)"
        )
    names = certificate_hosts(certificate)
    if not _host_matches(host, names):
        where = public_address or f"{host} (the bind address; no {flag} given)"
        raise ConfigurationError(
            f"the advertised address {where} is not covered by this node's certificate "
            f"(its DNS/IP names: {', '.join(names)}): peers would fail the TLS handshake. "
            f"Re-issue the certificate with `fincluster certs issue ... --host {host}`, or set {flag} "
            "to one of those names"
        )
    if registry_address is not None:
        check_reachable_from(host, registry_address, flag=flag)


def check_reachable_from(host: str, registry_address: str, *, flag: str) -> None:
    """Refuse to announce a loopback ``host`` to a registry that is not on loopback."""
    registry_host, _ = split_host_port(registry_address)
    if is_loopback(host) and not is_loopback(registry_host):
        raise ConfigurationError(
            f"refusing to announce the loopback address {host} to the registry at {registry_address}: "
            f"clients on other hosts could not reach it; set {flag} to this host's name or IP"
        )


def explain_connection_failure(details: str, *, peer: str, address: str) -> str | None:
    """A sentence for gRPC's ``UNAVAILABLE`` text ``details`` of a call to ``peer`` at ``address``, or
    None when the text is not a connection failure this knows."""
    text = details.lower()
    if "connection refused" in text:
        return f"no {peer} at {address} (connection refused)"
    if "errors resolving" in text or "domain name not found" in text:
        return f"no {peer} at {address} (the host name does not resolve)"
    if "certificate_verify_failed" in text:
        return (
            f"the {peer}'s certificate at {address} is not from the swarm CA this node trusts "
            "(check the CA certificate: --ca-cert / tls.ca_cert)"
        )
    if "hostname verification" in text:
        return (
            f"the {peer} at {address} presented a certificate that does not name that host or the "
            "expected node identity (re-issue its certificate with --host, or dial a name it carries)"
        )
    if "wrong_version_number" in text:
        return f"{address} does not speak TLS: it is not a fincluster {peer} (a plaintext port?)"
    if "socket closed" in text:
        return (
            f"the {peer} at {address} closed the TLS handshake: it does not accept this node's "
            "certificate (issued by another CA, expired or revoked)"
        )
    return None
