"""In-process policy evaluation with regopy (rego-cpp), the default engine.

The modules are compiled once into a bundle with one entrypoint per decision; each decision then
costs well under a millisecond. regopy reports a syntax error as an s-expression naming the module,
a byte offset and a message (``(error 17:policies/x.rego|87|2 (errormsg 24:Invalid ...)``); it is
turned into ``path:line:column: message`` here.
"""

from __future__ import annotations

import re
import threading
import uuid
from typing import Any

import regopy

from fincluster.errors import ClosedError, PolicyError
from fincluster.logs import get_logger
from fincluster.trust.policy import (
    Decision,
    DecisionKind,
    PolicyBundle,
    PolicyInput,
    PolicyModule,
    check_fails_closed,
    decision_from_result,
)

__all__ = ["RegopyEngine", "new_interpreter"]

_log = get_logger(__name__)

_ERROR_LOCATION = re.compile(
    r"\(error \d+:[^|\n]*\|(?P<offset>\d+)\|\d+\s*\(errormsg \d+:(?P<message>[^\n]*)\)"
)
_ERROR_MESSAGE = re.compile(r"\(errormsg \d+:(?P<message>[^\n]*)\)")


class RegopyEngine:
    """Evaluates decisions in-process; thread-safe (one evaluation at a time)."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self._bundle = bundle
        self._lock = threading.Lock()
        self._closed = False
        self._interpreter = new_interpreter()
        try:
            self._interpreter.add_data_json(bundle.data_json)
        except regopy.RegoError as error:
            raise PolicyError(f"policy data rejected by regopy: {_error_messages(str(error))}") from error
        for module in bundle.modules:
            _add_module(self._interpreter, module)
        try:
            self._compiled = self._interpreter.build(None, [_entrypoint(kind) for kind in DecisionKind])
        except regopy.RegoError as error:
            raise PolicyError(f"policy bundle does not compile: {_error_messages(str(error))}") from error
        check_fails_closed(self._evaluate)
        _log.info("policy_engine_ready", backend="regopy", bundle_digest=bundle.digest)

    @property
    def bundle(self) -> PolicyBundle:
        return self._bundle

    @property
    def bundle_digest(self) -> str:
        return self._bundle.digest

    def decide(self, query: DecisionKind, input: PolicyInput) -> Decision:
        result = self._evaluate(query, input.document())
        return decision_from_result(
            query, result, decision_id=str(uuid.uuid4()), bundle_digest=self._bundle.digest
        )

    def close(self) -> None:
        self._closed = True

    def _evaluate(self, kind: DecisionKind, document: dict[str, Any]) -> object:
        with self._lock:
            if self._closed:
                raise ClosedError("policy engine is closed")
            try:
                self._interpreter.set_input(document)
                output = self._interpreter.query_bundle_entrypoint(self._compiled, _entrypoint(kind))
            except regopy.RegoError as error:
                raise PolicyError(f"{kind.value} evaluation failed: {_error_messages(str(error))}") from error
            except ValueError as error:
                # regopy cannot parse its own error output as JSON; the error text is in ``doc``.
                text = getattr(error, "doc", str(error))
                raise PolicyError(f"{kind.value} evaluation failed: {_error_messages(text)}") from error
            # Never str() a failed output: regopy can crash rendering some errors.
            if not output.ok():
                raise PolicyError(f"{kind.value} evaluation failed in regopy")
            if len(output) != 1 or len(output[0].expressions) != 1:
                raise PolicyError(f"{kind.value} decision is undefined")
            return output[0].expressions[0]


def new_interpreter() -> regopy.Interpreter:
    """A regopy interpreter set up as fincluster evaluates: silent, built-in errors raised (not undefined).

    Import ``torch`` before ``regopy`` in any process that uses both: the other order aborts the
    process (``double free or corruption``) when torch loads. Importing ``fincluster`` does it right.
    """
    interpreter = regopy.Interpreter()
    interpreter.log_level = regopy.LogLevel.NONE
    interpreter.strict_built_in_errors = True
    return interpreter


def _entrypoint(kind: DecisionKind) -> str:
    return "/".join(kind.rule_path)


def _add_module(interpreter: regopy.Interpreter, module: PolicyModule) -> None:
    try:
        interpreter.add_module(str(module.path), module.source)
    except regopy.RegoError as error:
        raise PolicyError(_describe_syntax_error(module, str(error))) from error


def _describe_syntax_error(module: PolicyModule, text: str) -> str:
    """``path:line:column: message`` for each error regopy reports (offsets are UTF-8 bytes)."""
    source = module.source.encode()
    located = []
    for match in _ERROR_LOCATION.finditer(text):
        offset = int(match["offset"])
        line = source.count(b"\n", 0, offset) + 1
        column = offset - (source.rfind(b"\n", 0, offset) + 1) + 1
        located.append(f"{module.path}:{line}:{column}: {match['message']}")
    if not located:
        return f"{module.path}: policy does not parse: {_error_messages(text)}"
    return f"policy does not parse: {'; '.join(located)}"


def _error_messages(text: str) -> str:
    messages = [match["message"] for match in _ERROR_MESSAGE.finditer(text)]
    return "; ".join(messages) if messages else text.strip()
