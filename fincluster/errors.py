"""The one exception hierarchy of fincluster.

::

    FinclusterError
    ├── ConfigurationError          bad settings or arguments given by the operator or user (a ValueError)
    ├── UsageError                  an SDK object used the wrong way (bad arguments, state; a ValueError)
    ├── StoreError                  model store problems
    │   └── StoreIntegrityError     a file's SHA-256 does not match the manifest (tampered or corrupt)
    ├── WireError                   a tensor or message that does not decode or validate (a ValueError)
    ├── CertificateError            certificate / key material missing, invalid or not from the swarm CA
    ├── RoutingError                no chain of allowed servers covers the requested blocks
    ├── RemoteError                 a server refused or failed a call (carries node, span, session, status)
    │   ├── InvalidRequestError     the server found the request malformed            INVALID_ARGUMENT
    │   ├── OutOfRangeError         blocks not served here, or past a session's length OUT_OF_RANGE
    │   ├── SessionError            unknown, closed or expired session                  NOT_FOUND
    │   │   ├── SessionExistsError  a session of that id is already open               ALREADY_EXISTS
    │   │   └── SessionLengthError  max_length outside the server's limit, or exceeded OUT_OF_RANGE
    │   ├── CapacityError           KV-cache budget or other limits exhausted          RESOURCE_EXHAUSTED
    │   ├── RefusedError            refused by policy or trust checks (opaque)        PERMISSION_DENIED
    │   ├── UnavailableError        unreachable, stopping, too slow, or cannot audit   UNAVAILABLE
    │   ├── MovedError              the server moved to other blocks (placement)       ABORTED
    │   ├── IdleError               a stream that sent nothing for too long is ended   DEADLINE_EXCEEDED
    │   ├── AdapterRefusedError     the server will not apply the named LoRA adapter  FAILED_PRECONDITION
    │   └── InvalidResponseError    a server's answer failed the client's checks (shape, dtype, values)
    ├── RegistryError               the registry could not be reached or refused an announcement
    │   └── RegistryUnavailableError  the registry's store (etcd) answered from none of its endpoints
    ├── TrustError                  attestation / revocation / proof-of-possession failures (``reason``)
    ├── PolicyError                 policy could not be loaded or evaluated (fail closed)
    │   └── PolicyDenied            policy denied a placement; carries the reasons and the decision id
    ├── AuditError                  the audit log could not be written or read
    │   └── AuditIntegrityError     the audit log failed verification
    ├── DatasetError                a data set shipped with the package is missing or malformed
    ├── AdapterError                an adapter is missing, malformed, unsigned, signed by an untrusted key,
    │                               tampered with or made for another model (FAILED_PRECONDITION on a server)
    └── ClosedError                 an object was used after ``close()``

``fincluster.wire.status`` maps the ``RemoteError`` branch to gRPC status codes and back, in one table:
servers raise these classes and abort with the mapped status; clients turn a status back into the
class. Policy and trust refusals reach the peer only as an opaque ``PERMISSION_DENIED`` with the
decision id; the reasons stay in local logs and the audit trail.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

    from fincluster.spans import BlockSpan


class FinclusterError(Exception):
    """Base class of every error raised by fincluster."""


class ConfigurationError(FinclusterError, ValueError):
    """Settings or arguments are invalid."""


class UsageError(FinclusterError, ValueError):
    """An SDK object was called with arguments or in a state it cannot work with."""


class StoreError(FinclusterError):
    """A model store is missing, malformed or incompatible."""


class StoreIntegrityError(StoreError):
    """A store file does not match the SHA-256 recorded in the manifest."""


class WireError(FinclusterError, ValueError):
    """A wire message or tensor failed to decode or validate."""


class CertificateError(FinclusterError):
    """Certificate or key material is missing or invalid."""


class RoutingError(FinclusterError):
    """No chain of allowed servers covers the requested blocks."""

    def __init__(self, message: str, *, missing_blocks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing_blocks = missing_blocks


class RemoteError(FinclusterError):
    """A server refused or failed a call; ``reason`` is what the server said, the rest is context."""

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        span: BlockSpan | None = None,
        session_id: str | None = None,
        status: grpc.StatusCode | None = None,
    ) -> None:
        context = ", ".join(
            f"{name}={value}"
            for name, value in (
                ("node", node_id),
                ("blocks", span),
                ("session", session_id),
                ("status", status.name if status is not None else None),
            )
            if value is not None
        )
        super().__init__(f"{message} ({context})" if context else message)
        self.reason = message
        self.node_id = node_id
        self.span = span
        self.session_id = session_id
        self.status = status


class InvalidRequestError(RemoteError, ValueError):
    """The server found the request malformed (shape, dtype, ids, values)."""


class OutOfRangeError(RemoteError):
    """The request names blocks the server does not serve, or goes past a limit of the session."""


class SessionError(RemoteError):
    """An inference session is unknown, closed or expired, or its id is already taken."""


class SessionExistsError(SessionError):
    """A session with the requested id is already open on the server."""


class SessionLengthError(SessionError, OutOfRangeError):
    """A session's max_length is outside what the server allows, or a step would exceed it."""


class CapacityError(RemoteError):
    """A server has no room (KV-cache budget, session count) for the request."""


class RefusedError(RemoteError):
    """Policy or trust checks refused the call; the peer is told nothing more (see the decision id)."""


class UnavailableError(RemoteError):
    """The server could not be reached, is stopping, did not answer in time, or cannot audit."""


class MovedError(RemoteError):
    """The server no longer serves these blocks: it moved to others (``--blocks auto``). The client
    takes them elsewhere without holding it against the node, which may be what it needs next."""


class IdleError(RemoteError):
    """A stream sent no message for too long (its first, or the next step of an idle session)."""


class AdapterRefusedError(RemoteError):
    """A server refused to apply the LoRA adapter a request named (unknown, unsigned, signed by a key it
    does not trust, tampered with, or made for another model); the message says which."""


class InvalidResponseError(RemoteError):
    """What a server returned does not decode, or has the wrong shape, dtype or non-finite values; the
    error names that server (never the next, honest one)."""


class RegistryError(FinclusterError):
    """The registry could not be reached or refused a request."""


class RegistryUnavailableError(RegistryError):
    """No endpoint of the registry's store answered in time; retrying later may succeed."""


class TrustReason(enum.StrEnum):
    """Why a trust check failed: stable codes for logs, audit records and tests."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    KEY_MISMATCH = "key_mismatch"
    WRONG_NODE = "wrong_node"
    BAD_PROOF = "bad_proof"
    BAD_RECEIPT = "bad_receipt"
    UNKNOWN_EVIDENCE = "unknown_evidence"
    NOT_FROM_CA = "not_from_ca"
    REVOKED = "revoked"
    OUTSIDE_VALIDITY = "outside_validity"
    CRL_UNUSABLE = "crl_unusable"


class TrustError(FinclusterError):
    """Attestation, revocation or proof-of-possession checks failed; ``reason`` says which."""

    def __init__(self, reason: TrustReason, detail: str, *, node_id: str | None = None) -> None:
        where = f" (node {node_id})" if node_id is not None else ""
        super().__init__(f"{reason.value}: {detail}{where}")
        self.reason = reason
        self.detail = detail
        self.node_id = node_id


class PolicyError(FinclusterError):
    """Policy could not be loaded or evaluated; callers must fail closed."""


class PolicyDenied(PolicyError):
    """Policy denied the request; ``decision_id`` finds the decision in the audit log."""

    def __init__(
        self, message: str, *, reasons: tuple[str, ...] = (), decision_id: str | None = None
    ) -> None:
        super().__init__(message if not reasons else f"{message}: {'; '.join(reasons)}")
        self.reasons = reasons
        self.decision_id = decision_id


class AuditError(FinclusterError):
    """The audit log could not be written or read."""


class AuditIntegrityError(AuditError):
    """The audit log failed verification."""


class DatasetError(FinclusterError):
    """A data set shipped with the package is missing or malformed."""


class ClosedError(FinclusterError):
    """An object was used after it was closed."""


class AdapterError(FinclusterError):
    """An adapter in an adapter store is missing, malformed, unsigned, signed by a key that is not
    trusted, does not match its manifest, or was made for another base model."""
