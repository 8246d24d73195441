"""Policy decisions: typed input, typed decision, the engine protocol and the policy bundle.

Rego in ``policies/`` decides; this module only shapes what goes in and checks what comes out.
Three decisions exist (:class:`DecisionKind`), each read from ``data.fincluster.<kind>.decision``:
``route`` (may the client router place this span on this node), ``serve`` (may this server serve
this client and classification) and ``announce`` (may this node announce this span in the
registry). Backends: :mod:`fincluster.trust.regopy_backend` (in-process, the default) and
:mod:`fincluster.trust.opa_backend` (an OPA server); both fail closed: an evaluation error, an
undefined or ill-shaped result or an unreachable server raises :class:`PolicyError`, never allows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, PositiveInt, StringConstraints, ValidationError

from fincluster.errors import PolicyDenied, PolicyError
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import VerifiedClaims
from fincluster.values import FrozenModel, Sha256Hex, SpiffeId

__all__ = [
    "Classification",
    "ClientIdentity",
    "Decision",
    "DecisionKind",
    "ModelRef",
    "NodeRef",
    "PolicyBundle",
    "PolicyEngine",
    "PolicyInput",
    "PolicyModule",
    "check_fails_closed",
    "decision_from_result",
]

DATA_FILE_NAME = "data.json"
_TEST_SUFFIX = "_test.rego"


class DecisionKind(StrEnum):
    ROUTE = "route"
    SERVE = "serve"
    ANNOUNCE = "announce"

    @property
    def rule_path(self) -> tuple[str, ...]:
        """Path of the decision document under ``data``."""
        return ("fincluster", self.value, "decision")


class Classification(StrEnum):
    """Data classification of a request, least to most sensitive."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    RESTRICTED = "restricted"


class ClientIdentity(FrozenModel):
    id: SpiffeId
    clearance: Classification


class ModelRef(FrozenModel):
    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    num_blocks: PositiveInt
    #: Digest of the manifest the client will run; trusted placements need the node's attested
    #: weights to match it.
    manifest_sha256: Sha256Hex | None = None


class NodeRef(FrozenModel):
    id: SpiffeId
    #: Claims that passed verification and key binding, or None for an unattested node.
    claims: VerifiedClaims | None


class PolicyInput(FrozenModel):
    """The one input document of every decision; announcements carry no client or classification."""

    client: ClientIdentity | None = None
    classification: Classification | None = None
    model: ModelRef
    span: BlockSpan
    node: NodeRef

    def document(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Decision(FrozenModel):
    kind: DecisionKind
    allow: bool
    #: Why the decision denies (empty when it allows).
    reasons: tuple[str, ...]
    decision_id: str
    #: SHA-256 of the policy bundle that decided (see :attr:`PolicyBundle.digest`); None for a
    #: decision made without a policy engine (public data only).
    bundle_digest: str | None

    def enforce(self) -> None:
        """Raise :class:`PolicyDenied` with the reasons and decision id unless the decision allows."""
        if not self.allow:
            raise PolicyDenied(
                f"policy denied {self.kind.value}", reasons=self.reasons, decision_id=self.decision_id
            )


class PolicyEngine(Protocol):
    @property
    def bundle(self) -> PolicyBundle:
        """The policy modules and data this engine decides with (data also configures, e.g., which
        share of standard nodes' work is re-executed)."""
        ...

    @property
    def bundle_digest(self) -> str: ...

    def decide(self, query: DecisionKind, input: PolicyInput) -> Decision: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PolicyModule:
    #: Path relative to the policy directory (what the digest and OPA module ids use).
    name: str
    path: Path
    source: str


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    """The Rego modules (tests excluded) and the data document that decisions are made with."""

    modules: tuple[PolicyModule, ...]
    data: Mapping[str, Any]
    data_json: str
    #: Hex SHA-256 over every file, sorted by name: name, NUL, 8-byte big-endian length, bytes.
    #: The data document counts as ``data.json`` wherever it was loaded from.
    digest: str

    @classmethod
    def load(cls, policy_dir: Path, *, data_file: Path | None = None) -> PolicyBundle:
        paths = sorted(p for p in policy_dir.glob("*.rego") if not p.name.endswith(_TEST_SUFFIX))
        if not paths:
            raise PolicyError(f"no policy modules in {policy_dir}")
        data_path = data_file if data_file is not None else policy_dir / DATA_FILE_NAME
        try:
            modules = tuple(PolicyModule(p.name, p, p.read_bytes().decode("utf-8")) for p in paths)
            data_bytes = data_path.read_bytes()
            data_json = data_bytes.decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(f"cannot read policy bundle: {error}") from error
        try:
            data = json.loads(data_json)
        except ValueError as error:
            line = getattr(error, "lineno", "?")
            raise PolicyError(f"{data_path}:{line}: policy data is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise PolicyError(f"{data_path}: policy data must be a JSON object")
        files = [(m.name, m.source.encode()) for m in modules] + [(DATA_FILE_NAME, data_bytes)]
        return cls(modules, data, data_json, _digest(files))


def decision_from_result(
    kind: DecisionKind, result: object, *, decision_id: str, bundle_digest: str
) -> Decision:
    """Turn a backend's raw decision document into a :class:`Decision`, or raise PolicyError."""
    try:
        raw = _RawDecision.model_validate(result)
    except ValidationError as error:
        raise PolicyError(f"policy returned an ill-formed {kind.value} decision: {result!r}") from error
    return Decision(
        kind=kind,
        allow=raw.allow,
        reasons=tuple(sorted(raw.reasons)),
        decision_id=decision_id,
        bundle_digest=bundle_digest,
    )


def check_fails_closed(evaluate: Callable[[DecisionKind, dict[str, Any]], object]) -> None:
    """Startup self-check: every decision evaluates, and an empty input is denied with reasons."""
    for kind in DecisionKind:
        decision = decision_from_result(
            kind, evaluate(kind, {}), decision_id="startup-check", bundle_digest=""
        )
        if decision.allow or not decision.reasons:
            raise PolicyError(f"policy {kind.value} does not deny an empty input with reasons")


class _RawDecision(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    allow: bool
    reasons: list[str]


def _digest(files: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, content in sorted(files):
        digest.update(name.encode() + b"\x00" + len(content).to_bytes(8, "big") + content)
    return digest.hexdigest()
