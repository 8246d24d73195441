"""Policy evaluation by an OPA server over its REST data API (``opa-python-client``).

The server must run exactly the local bundle's modules and data (``opa run --server`` with the
non-test ``.rego`` files and ``data.json``): the bundle digest that goes into the audit log is
computed from the local files, so at startup the engine checks that the server's modules and data
match them and refuses to start otherwise. Any failure talking to the server is a PolicyError.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from opa_client import OpaClient

from fincluster.errors import ClosedError, ConfigurationError, PolicyError
from fincluster.logs import get_logger
from fincluster.trust.policy import (
    Decision,
    DecisionKind,
    PolicyBundle,
    PolicyInput,
    check_fails_closed,
    decision_from_result,
)

__all__ = ["OpaEngine"]

_log = get_logger(__name__)
_T = TypeVar("_T")


class OpaEngine:
    """Evaluates decisions on an OPA server at ``url`` (``http(s)://host:port``, no path)."""

    def __init__(
        self,
        bundle: PolicyBundle,
        *,
        url: str,
        timeout_s: float = 1.5,
        ca_file: Path | None = None,
    ) -> None:
        self._bundle = bundle
        self._closed = False
        self._client = _client_for(url, timeout_s=timeout_s, ca_file=ca_file)
        try:
            self._check_server_bundle()
            check_fails_closed(lambda kind, document: self._query(kind, document)[0])
        except BaseException:
            self._client.close_connection()
            raise
        _log.info("policy_engine_ready", backend="opa", url=url, bundle_digest=bundle.digest)

    @property
    def bundle(self) -> PolicyBundle:
        return self._bundle

    @property
    def bundle_digest(self) -> str:
        return self._bundle.digest

    def decide(self, query: DecisionKind, input: PolicyInput) -> Decision:
        result, decision_id = self._query(query, input.document())
        return decision_from_result(query, result, decision_id=decision_id, bundle_digest=self._bundle.digest)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close_connection()

    def _query(self, kind: DecisionKind, document: dict[str, Any]) -> tuple[object, str]:
        if self._closed:
            raise ClosedError("policy engine is closed")
        package, rule = ".".join(kind.rule_path[:-1]), kind.rule_path[-1]
        response = _call(f"{kind.value} query", lambda: self._client.query_rule(document, package, rule))
        if not isinstance(response, dict) or "result" not in response:
            raise PolicyError(f"{kind.value} decision is undefined on the OPA server")
        decision_id = response.get("decision_id")
        return response["result"], decision_id if isinstance(decision_id, str) else str(uuid.uuid4())

    def _check_server_bundle(self) -> None:
        policy_ids = _call("listing policies", self._client.get_policies_list)
        served_sources = sorted(self._served_policy_source(policy_id) for policy_id in policy_ids)
        if served_sources != sorted(module.source for module in self._bundle.modules):
            raise PolicyError("the OPA server's policy modules differ from the local bundle")
        for key, value in self._bundle.data.items():
            if not _contains(self._served_data(key), value):
                raise PolicyError(f"the OPA server's data under {key!r} differs from the local bundle")

    def _served_policy_source(self, policy_id: str) -> str:
        policy = _call(f"reading policy {policy_id}", lambda: self._client.get_policy(policy_id))
        return str(policy.get("result", {}).get("raw", ""))

    def _served_data(self, key: str) -> object:
        return _call(f"reading data {key}", lambda: self._client.get_data(key)).get("result")


def _client_for(url: str, *, timeout_s: float, ca_file: Path | None) -> OpaClient:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigurationError(f"OPA URL must be http(s)://host[:port], got {url!r}")
    if ca_file is not None and parts.scheme != "https":
        raise ConfigurationError("an OPA CA file needs an https URL")
    tls: bool | str = str(ca_file) if ca_file is not None else parts.scheme == "https"
    port = parts.port or (443 if parts.scheme == "https" else 8181)
    return OpaClient(host=parts.hostname, port=port, ssl=tls, timeout=timeout_s, retries=1)


def _call(what: str, request: Callable[[], _T]) -> _T:
    """Run one OPA request; any failure (network, HTTP status, body) fails closed as PolicyError."""
    try:
        return request()
    except Exception as error:  # the client raises requests, JSON and its own error types
        raise PolicyError(f"OPA server failed while {what}: {error}") from error


def _contains(served: object, expected: object) -> bool:
    """Whether ``served`` holds ``expected``; objects may hold more keys (the packages' rules)."""
    if isinstance(expected, Mapping):
        return isinstance(served, Mapping) and all(
            key in served and _contains(served[key], value) for key, value in expected.items()
        )
    return served == expected
