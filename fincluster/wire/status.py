"""The one table between fincluster's remote errors and gRPC status codes, used in both directions.

Servers raise the error that fits and :func:`status_of` picks the status to abort with; clients turn
a failed call's status back into the error class with :func:`remote_error`. Policy and trust
refusals are opaque: the peer learns only :data:`REFUSED` and the decision id.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from fincluster.errors import (
    AdapterError,
    AdapterRefusedError,
    CapacityError,
    FinclusterError,
    IdleError,
    InvalidRequestError,
    MovedError,
    OutOfRangeError,
    PolicyDenied,
    PolicyError,
    RefusedError,
    RemoteError,
    SessionError,
    SessionExistsError,
    SessionLengthError,
    TrustError,
    UnavailableError,
    WireError,
)
from fincluster.logs import get_logger
from fincluster.spans import BlockSpan

log = get_logger(__name__)

REFUSED = "request refused by policy"
"""All a refused peer is told (plus the decision id, which an operator can look up)."""

#: (error class, status). An error maps to the status of the first class of its MRO listed here; a
#: status maps back to the first RemoteError class listed with it.
STATUS_TABLE: tuple[tuple[type[FinclusterError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionLengthError, grpc.StatusCode.OUT_OF_RANGE),
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (SessionExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (SessionError, grpc.StatusCode.NOT_FOUND),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RefusedError, grpc.StatusCode.PERMISSION_DENIED),
    (RefusedError, grpc.StatusCode.UNAUTHENTICATED),
    (PolicyError, grpc.StatusCode.PERMISSION_DENIED),
    (TrustError, grpc.StatusCode.PERMISSION_DENIED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (UnavailableError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (IdleError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (MovedError, grpc.StatusCode.ABORTED),
    (AdapterRefusedError, grpc.StatusCode.FAILED_PRECONDITION),
    (AdapterError, grpc.StatusCode.FAILED_PRECONDITION),
)

_STATUS_OF: dict[type[FinclusterError], grpc.StatusCode] = {}
for _error, _code in STATUS_TABLE:
    _STATUS_OF.setdefault(_error, _code)
_ERROR_OF: dict[grpc.StatusCode, type[RemoteError]] = {}
for _error, _code in STATUS_TABLE:
    if issubclass(_error, RemoteError):
        _ERROR_OF.setdefault(_code, _error)


def status_of(error: BaseException) -> grpc.StatusCode | None:
    """The status a server answers ``error`` with; None for errors that are not in the table."""
    if isinstance(error, RemoteError) and error.status is not None:
        return error.status
    for cls in type(error).__mro__:
        if cls in _STATUS_OF:
            return _STATUS_OF[cls]
    return None


def remote_error(
    code: grpc.StatusCode,
    message: str,
    *,
    node_id: str | None = None,
    span: BlockSpan | None = None,
    session_id: str | None = None,
) -> RemoteError:
    """The error a client raises for a call that failed with ``code`` and ``message``."""
    cls = _ERROR_OF.get(code, RemoteError)
    return cls(message, node_id=node_id, span=span, session_id=session_id, status=code)


def answer_for(error: BaseException, *, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a server answers ``error`` with: opaque (only the decision id) for
    policy and trust refusals, an opaque INTERNAL (and a logged traceback) for errors outside the
    table, the error's own message otherwise."""
    code = status_of(error)
    if code is None:
        log.error("request_failed", method=method, exc_info=error)
        return grpc.StatusCode.INTERNAL, "internal error"
    if isinstance(error, PolicyError | TrustError):
        decision = error.decision_id if isinstance(error, PolicyDenied) else None
        if not isinstance(error, PolicyDenied):  # denials were logged with their context already
            log.warning("request_refused", method=method, reason=str(error))
        return code, f"{REFUSED} (decision {decision})" if decision else REFUSED
    return code, error.reason if isinstance(error, RemoteError) else str(error)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with ``code``; ``context.abort`` raises, the line after it only makes that explicit."""
    context.abort(code, message)
    raise AssertionError("grpc context.abort returned")  # pragma: no cover - grpc always raises here


def abort_for(context: grpc.ServicerContext, error: Exception, *, method: str) -> NoReturn:
    """End a synchronous server's RPC with the answer for ``error`` (see :func:`answer_for`)."""
    abort(context, *answer_for(error, method=method))
