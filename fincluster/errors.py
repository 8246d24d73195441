"""The one exception hierarchy of fincluster.

::

    FinclusterError
    ├── ConfigurationError          bad settings or arguments given by the operator or user
    ├── StoreError                  model store problems
    │   └── StoreIntegrityError     a file's SHA-256 does not match the manifest (tampered or corrupt)
    ├── WireError                   a tensor or message that does not decode or validate
    ├── CertificateError            certificate / key material missing, invalid or not from the swarm CA
    ├── RoutingError                no chain of servers covers the requested blocks
    ├── RemoteError                 a server refused or failed a call (carries node id, span, session)
    │   ├── SessionError            unknown / closed / expired inference session, or max length exceeded
    │   └── CapacityError           the server's KV-cache budget or its limits are exhausted
    ├── RegistryError               the registry could not be reached or refused an announcement
    │   └── RegistryUnavailableError  the registry's store (etcd) answered from none of its endpoints
    ├── TrustError                  attestation / revocation / proof-of-possession failures
    ├── PolicyError                 policy could not be loaded or evaluated (fail closed)
    │   └── PolicyDenied            policy denied a placement; carries the reasons
    ├── AuditError                  the audit log could not be written or read
    │   └── AuditIntegrityError     the audit log failed verification
    └── ClosedError                 an object was used after ``close()``

Errors raised toward remote peers are mapped to opaque gRPC statuses at the transport boundary;
the detailed reason stays in local logs (and, for trust decisions, the audit log).
"""

from __future__ import annotations


class FinclusterError(Exception):
    """Base class of every error raised by fincluster."""


class ConfigurationError(FinclusterError):
    """Settings or arguments are invalid."""


class StoreError(FinclusterError):
    """A model store is missing, malformed or incompatible."""


class StoreIntegrityError(StoreError):
    """A store file does not match the SHA-256 recorded in the manifest."""


class WireError(FinclusterError):
    """A wire message or tensor failed to decode or validate."""


class CertificateError(FinclusterError):
    """Certificate or key material is missing or invalid."""


class RoutingError(FinclusterError):
    """No chain of servers covers the requested blocks."""

    def __init__(self, message: str, *, missing_blocks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing_blocks = missing_blocks


class RemoteError(FinclusterError):
    """A server refused or failed a call."""

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        span: tuple[int, int] | None = None,
        session_id: str | None = None,
        code: str | None = None,
    ) -> None:
        context = ", ".join(
            f"{name}={value}"
            for name, value in (("node", node_id), ("span", span), ("session", session_id), ("code", code))
            if value is not None
        )
        super().__init__(f"{message} ({context})" if context else message)
        self.reason = message
        self.node_id = node_id
        self.span = span
        self.session_id = session_id
        self.code = code


class SessionError(RemoteError):
    """An inference session is unknown, closed, expired, or past its max length."""


class CapacityError(RemoteError):
    """A server has no room (KV-cache budget, session count) for the request."""


class RegistryError(FinclusterError):
    """The registry could not be reached or refused a request."""


class RegistryUnavailableError(RegistryError):
    """No endpoint of the registry's store answered in time; retrying later may succeed."""


class TrustError(FinclusterError):
    """Attestation, revocation or proof-of-possession checks failed."""


class PolicyError(FinclusterError):
    """Policy could not be loaded or evaluated; callers must fail closed."""


class PolicyDenied(PolicyError):
    """Policy denied the request."""

    def __init__(self, message: str, *, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(message if not reasons else f"{message}: {'; '.join(reasons)}")
        self.reasons = reasons


class AuditError(FinclusterError):
    """The audit log could not be written or read."""


class AuditIntegrityError(AuditError):
    """The audit log failed verification."""


class ClosedError(FinclusterError):
    """An object was used after it was closed."""
