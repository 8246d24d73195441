"""Policy: the Rego unit tests, the shipped decisions, fail-closed loading, and backend parity."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fincluster.errors import ClosedError, ConfigurationError, PolicyDenied, PolicyError
from fincluster.spans import BlockSpan
from fincluster.trust.attestation import TrustTier, VerifiedClaims
from fincluster.trust.opa_backend import OpaEngine
from fincluster.trust.policy import (
    Classification,
    ClientIdentity,
    Decision,
    DecisionKind,
    ModelRef,
    NodeRef,
    PolicyBundle,
    PolicyInput,
)
from fincluster.trust.policy_engine import open_policy_engine
from fincluster.trust.regopy_backend import RegopyEngine, new_interpreter

POLICIES = Path(__file__).resolve().parents[2] / "policies"
TEST_SUFFIX = "_test.rego"
POLICY_FILES = sorted(p for p in POLICIES.glob("*.rego") if not p.name.endswith(TEST_SUFFIX))
TEST_FILES = sorted(POLICIES.glob(f"*{TEST_SUFFIX}"))


def _package(source: str) -> str:
    match = re.search(r"^package (\S+)", source, re.MULTILINE)
    assert match is not None
    return match[1]


def _add_modules(interpreter: Any, paths: list[Path]) -> None:
    for path in paths:
        interpreter.add_module(str(path), path.read_text())


# --- the Rego unit tests, run by regopy --------------------------------------------------------

REGO_TESTS = [
    (path.name, _package(path.read_text()), name)
    for path in TEST_FILES
    for name in re.findall(r"^(test_\w+)", path.read_text(), re.MULTILINE)
]


def _entrypoint(package: str, name: str) -> str:
    return f"{package.replace('.', '/')}/{name}"


@pytest.fixture(scope="module")
def rego_tests_compiled() -> tuple[Any, Any]:
    """Policies, tests and data compiled once, with every test rule as an entrypoint."""
    interpreter = new_interpreter()
    interpreter.add_data_json((POLICIES / "data.json").read_text())
    _add_modules(interpreter, POLICY_FILES + TEST_FILES)
    return interpreter, interpreter.build(
        None, [_entrypoint(package, name) for _, package, name in REGO_TESTS]
    )


@pytest.mark.parametrize(("file", "package", "name"), REGO_TESTS, ids=[f"{f}::{n}" for f, _, n in REGO_TESTS])
def test_rego_unit_test_passes(
    rego_tests_compiled: tuple[Any, Any], file: str, package: str, name: str
) -> None:
    interpreter, compiled = rego_tests_compiled
    output = interpreter.query_bundle_entrypoint(compiled, _entrypoint(package, name))
    assert output.ok(), f"{file}::{name} failed to evaluate"
    assert [result.expressions for result in output.results] == [[True]], f"{file}::{name} is not true"


def test_rego_unit_tests_were_found() -> None:
    assert len(REGO_TESTS) > 50


def test_every_policy_rule_is_named_in_a_rego_test() -> None:
    tests = "\n".join(path.read_text() for path in TEST_FILES)
    missing = []
    for path in POLICY_FILES:
        source = path.read_text()
        alias = _package(source).rsplit(".", 1)[-1]
        names = set(
            re.findall(r"^(?:default\s+)?([a-z_]\w*)\b(?=\s*(?:\(|:=|\bif\b|\bcontains\b))", source, re.M)
        )
        missing += [
            f"{alias}.{name}" for name in sorted(names) if not re.search(rf"\b{alias}\.{name}\b", tests)
        ]
    assert missing == []


def test_no_function_name_has_two_arities() -> None:
    """rego-cpp crashes when packages define one function name with different arities."""
    arities: dict[str, set[int]] = {}
    for path in POLICY_FILES + TEST_FILES:
        for name, params in re.findall(r"^([a-z_]\w*)\(([^)]*)\)\s*(?::=|\bif\b)", path.read_text(), re.M):
            arities.setdefault(name, set()).add(params.count(",") + 1)
    assert {name: sizes for name, sizes in arities.items() if len(sizes) > 1} == {}


def test_every_policy_has_a_test_file_beside_it() -> None:
    assert [p.name for p in POLICY_FILES if not (POLICIES / f"{p.stem}{TEST_SUFFIX}").exists()] == []


def test_each_decision_kind_has_a_package_that_denies_by_default() -> None:
    deciding = {
        p.stem: p.read_text() for p in POLICY_FILES if re.search(r"^decision :=", p.read_text(), re.M)
    }
    assert set(deciding) == {kind.value for kind in DecisionKind}
    assert all(re.search(r"^default allow := false$", source, re.M) for source in deciding.values())


def test_policy_comments_are_metadata_annotations() -> None:
    loose = []
    for path in POLICY_FILES + TEST_FILES:
        previous = ""
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.startswith("#") and not previous.startswith("#") and line != "# METADATA":
                loose.append(f"{path.name}:{number}")
            previous = line
    assert loose == []


# --- the policy bundle ----------------------------------------------------------------------------


def _copy_policies(target: Path) -> Path:
    target.mkdir(exist_ok=True)
    for path in [*POLICY_FILES, POLICIES / "data.json"]:
        shutil.copy(path, target / path.name)
    return target


def test_bundle_holds_the_policies_but_not_their_tests() -> None:
    assert [module.name for module in PolicyBundle.load(POLICIES).modules] == [p.name for p in POLICY_FILES]


def test_bundle_digest_covers_sorted_files_with_names_and_lengths() -> None:
    expected = hashlib.sha256()
    for path in sorted([*POLICY_FILES, POLICIES / "data.json"], key=lambda p: p.name):
        content = path.read_bytes()
        expected.update(path.name.encode() + b"\x00" + len(content).to_bytes(8, "big") + content)
    assert PolicyBundle.load(POLICIES).digest == expected.hexdigest()


def test_bundle_digest_does_not_depend_on_where_the_files_are(tmp_path: Path) -> None:
    assert PolicyBundle.load(_copy_policies(tmp_path / "copy")).digest == PolicyBundle.load(POLICIES).digest


def test_bundle_digest_changes_with_the_data(tmp_path: Path) -> None:
    copy = _copy_policies(tmp_path / "copy")
    data = json.loads((copy / "data.json").read_text())
    data["fincluster"]["allowed_zones"].append("us-nyc")
    (copy / "data.json").write_text(json.dumps(data))
    assert PolicyBundle.load(copy).digest != PolicyBundle.load(POLICIES).digest


def test_data_file_may_live_elsewhere(tmp_path: Path) -> None:
    shutil.copy(POLICIES / "data.json", tmp_path / "swarm-policy-data.json")
    bundle = PolicyBundle.load(POLICIES, data_file=tmp_path / "swarm-policy-data.json")
    assert bundle.digest == PolicyBundle.load(POLICIES).digest


def test_invalid_data_json_names_file_and_line(tmp_path: Path) -> None:
    copy = _copy_policies(tmp_path / "copy")
    (copy / "data.json").write_text('{\n  "fincluster": {\n    "allowed_zones": [,]\n  }\n}\n')
    with pytest.raises(PolicyError, match=r"data\.json:3:"):
        PolicyBundle.load(copy)


def test_directory_without_policies_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no policy modules"):
        PolicyBundle.load(tmp_path)


# --- decisions of the shipped policy ---------------------------------------------------------------

WEIGHTS = hashlib.sha256(b"smollm2-135m-instruct manifest").hexdigest()
NODE = "spiffe://bank.example/server/gpu-a"
ANALYST = "spiffe://bank.example/client/analyst"
SMOLLM2 = ModelRef(id="smollm2-135m-instruct", num_blocks=30, manifest_sha256=WEIGHTS)
OTHER_MODEL = ModelRef(id="other-model", num_blocks=32, manifest_sha256=WEIGHTS)


def _claims(tier: TrustTier, zone: str = "eu-fra") -> VerifiedClaims:
    return VerifiedClaims(
        node_id=NODE,
        tls_key_sha256="0" * 64,
        tier=tier,
        zone=zone,
        hardware="h100-cc",
        software_version="0.1.0",
        model_manifest_sha256=WEIGHTS,
        attestation_id="att-1",
        issued_at=datetime(2026, 1, 15, tzinfo=UTC),
        expires_at=datetime(2026, 1, 16, tzinfo=UTC),
        authority_key_id="kid",
        evidence_kind="signed-software",
    )


TRUSTED, STANDARD = _claims(TrustTier.TRUSTED), _claims(TrustTier.STANDARD)


def _request(
    classification: Classification,
    span: tuple[int, int],
    claims: VerifiedClaims | None,
    *,
    model: ModelRef = SMOLLM2,
    caller: str = ANALYST,
    clearance: Classification = Classification.RESTRICTED,
) -> PolicyInput:
    return PolicyInput(
        client=ClientIdentity(id=caller, clearance=clearance),
        classification=classification,
        model=model,
        span=BlockSpan(start=span[0], end=span[1]),
        node=NodeRef(id=NODE, claims=claims),
    )


def _announcement(span: tuple[int, int], claims: VerifiedClaims | None) -> PolicyInput:
    return PolicyInput(
        model=SMOLLM2, span=BlockSpan(start=span[0], end=span[1]), node=NodeRef(id=NODE, claims=claims)
    )


NOT_TRUSTED = "node is not attested as trusted"
WRONG_WEIGHTS = "node's attested weights are not the requested model"
PUBLIC, INTERNAL = Classification.PUBLIC, Classification.INTERNAL
CONFIDENTIAL, RESTRICTED = Classification.CONFIDENTIAL, Classification.RESTRICTED
ROUTE, SERVE, ANNOUNCE = DecisionKind.ROUTE, DecisionKind.SERVE, DecisionKind.ANNOUNCE

# (name, decision kind, input, expected deny reasons; none means allowed). smollm2's prefix is 8 blocks.
CASES: list[tuple[str, DecisionKind, PolicyInput, tuple[str, ...]]] = [
    ("public prefix on an unattested node", ROUTE, _request(PUBLIC, (0, 8), None), ()),
    (
        "internal prefix on an unattested node",
        ROUTE,
        _request(INTERNAL, (0, 8), None),
        (NOT_TRUSTED, WRONG_WEIGHTS),
    ),
    ("internal prefix on a standard node", ROUTE, _request(INTERNAL, (7, 30), STANDARD), (NOT_TRUSTED,)),
    ("internal after the prefix on an unattested node", ROUTE, _request(INTERNAL, (8, 30), None), ()),
    (
        "internal default prefix is a quarter, rounded up",
        ROUTE,
        _request(INTERNAL, (7, 32), None, model=OTHER_MODEL),
        (NOT_TRUSTED, WRONG_WEIGHTS),
    ),
    (
        "confidential on a trusted node in an allowed zone",
        ROUTE,
        _request(CONFIDENTIAL, (0, 30), TRUSTED),
        (),
    ),
    (
        "confidential on a trusted node elsewhere",
        ROUTE,
        _request(CONFIDENTIAL, (8, 30), _claims(TrustTier.TRUSTED, "us-nyc")),
        ("node is not attested in an allowed zone",),
    ),
    (
        "restricted prefix never leaves the client",
        ROUTE,
        _request(RESTRICTED, (0, 30), TRUSTED),
        ("restricted data keeps the sensitive prefix on the client",),
    ),
    (
        "restricted after the prefix on a trusted node",
        ROUTE,
        _request(RESTRICTED, (8, 30), _claims(TrustTier.TRUSTED, "eu-ams")),
        (),
    ),
    (
        "client not cleared",
        ROUTE,
        _request(CONFIDENTIAL, (8, 30), TRUSTED, clearance=INTERNAL),
        ("client clearance does not cover the data classification",),
    ),
    ("span past the model", ROUTE, _request(PUBLIC, (28, 31), None), ("block span is not inside the model",)),
    ("server serves a cleared client", SERVE, _request(CONFIDENTIAL, (0, 8), TRUSTED), ()),
    (
        "server refuses a server workload",
        SERVE,
        _request(PUBLIC, (0, 8), None, caller="spiffe://bank.example/server/b"),
        ("caller is not a client workload",),
    ),
    ("unattested node announces after the prefix", ANNOUNCE, _announcement((8, 30), None), ()),
    ("unattested node announces the prefix", ANNOUNCE, _announcement((0, 8), None), (NOT_TRUSTED,)),
    ("trusted node announces the prefix", ANNOUNCE, _announcement((0, 30), TRUSTED), ()),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.fixture(scope="module")
def engine() -> Iterator[RegopyEngine]:
    engine = RegopyEngine(PolicyBundle.load(POLICIES))
    yield engine
    engine.close()


@pytest.mark.parametrize(("name", "kind", "policy_input", "reasons"), CASES, ids=CASE_IDS)
def test_shipped_policy_decision(
    engine: RegopyEngine, name: str, kind: DecisionKind, policy_input: PolicyInput, reasons: tuple[str, ...]
) -> None:
    decision = engine.decide(kind, policy_input)
    assert (decision.allow, decision.reasons) == (not reasons, tuple(sorted(reasons)))


def test_decision_carries_a_fresh_id_and_the_bundle_digest(engine: RegopyEngine) -> None:
    first, second = (engine.decide(ROUTE, _request(PUBLIC, (0, 8), None)) for _ in range(2))
    assert uuid.UUID(first.decision_id).version == 4
    assert first.decision_id != second.decision_id
    assert first.bundle_digest == PolicyBundle.load(POLICIES).digest == engine.bundle_digest


def test_enforcing_a_denial_raises_with_its_reasons(engine: RegopyEngine) -> None:
    decision = engine.decide(ANNOUNCE, _announcement((0, 8), None))
    with pytest.raises(PolicyDenied) as denied:
        decision.enforce()
    assert denied.value.reasons == (NOT_TRUSTED,)


def test_enforcing_an_allowed_decision_passes(engine: RegopyEngine) -> None:
    engine.decide(ANNOUNCE, _announcement((8, 30), None)).enforce()


def test_input_document_holds_the_verified_claims() -> None:
    document = _request(INTERNAL, (0, 8), TRUSTED).document()
    assert document["node"]["claims"]["tier"] == "trusted"
    assert document["span"] == {"start": 0, "end": 8}


def test_input_rejects_fields_the_policy_does_not_know() -> None:
    with pytest.raises(ValidationError):
        PolicyInput.model_validate({**_announcement((0, 8), None).document(), "override": True})


def test_input_rejects_an_empty_span() -> None:
    with pytest.raises(ValidationError):
        BlockSpan(start=4, end=4)


# --- fail closed ------------------------------------------------------------------------------------


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    copy = _copy_policies(tmp_path / "copy")
    route = copy / "route.rego"
    lines_before = len(route.read_text().splitlines())
    route.write_text(route.read_text() + "\nbroken if {\n\tinput.x ==\n}\n")
    with pytest.raises(PolicyError, match=rf"route\.rego:{lines_before + 3}:\d+: "):
        RegopyEngine(PolicyBundle.load(copy))


def test_evaluation_error_stops_startup(tmp_path: Path) -> None:
    copy = _copy_policies(tmp_path / "copy")
    route = copy / "route.rego"
    route.write_text(
        route.read_text().replace("allow if count(reasons) == 0", "allow if no_such_function(reasons)")
    )
    with pytest.raises(PolicyError, match="route evaluation failed"):
        RegopyEngine(PolicyBundle.load(copy))


def test_policy_that_allows_an_empty_input_stops_startup(tmp_path: Path) -> None:
    copy = _copy_policies(tmp_path / "copy")
    announce = copy / "announce.rego"
    announce.write_text(announce.read_text().replace("allow if count(reasons) == 0", "allow := true"))
    with pytest.raises(PolicyError, match="announce does not deny an empty input"):
        RegopyEngine(PolicyBundle.load(copy))


def test_missing_policy_data_leaves_decisions_undefined_and_stops_startup(tmp_path: Path) -> None:
    copy = _copy_policies(tmp_path / "copy")
    (copy / "data.json").write_text(
        json.dumps({"fincluster": {"sensitive_prefix": {"default_fraction": 0.25}}})
    )
    with pytest.raises(PolicyError, match="undefined"):
        RegopyEngine(PolicyBundle.load(copy))


def test_closed_engine_refuses_to_decide() -> None:
    closed = RegopyEngine(PolicyBundle.load(POLICIES))
    closed.close()
    with pytest.raises(ClosedError):
        closed.decide(ROUTE, _request(PUBLIC, (0, 8), None))


# --- the OPA backend, over HTTP against a stand-in -----------------------------------------------


class OpaStandIn:
    """A minimal stand-in for OPA's REST API, NOT OPA: it answers the data and policy endpoints the
    OPA backend uses by evaluating the same modules with regopy, so tests exercise opa_client's HTTP
    path without an ``opa`` binary."""

    def __init__(self, modules: list[Path], data_json: str, *, sources: dict[str, str] | None = None) -> None:
        self.sources = sources or {path.name: path.read_text() for path in modules}
        self.decision_ids: list[str] = []
        self.undefined = False
        self._lock = threading.Lock()
        self._interpreter = new_interpreter()
        self._interpreter.add_data_json(data_json)
        _add_modules(self._interpreter, modules)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def evaluate(self, path: str, document: object) -> dict[str, Any]:
        with self._lock:
            self._interpreter.set_input(document)
            output = self._interpreter.query("data." + path.strip("/").replace("/", "."))
        expressions = output[0].expressions if output.ok() and len(output) == 1 else []
        return {"result": expressions[0]} if expressions and not self.undefined else {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                decision_id = str(uuid.uuid4())
                stand_in.decision_ids.append(decision_id)
                path = self.path.removeprefix("/v1/data/")
                self._reply({**stand_in.evaluate(path, body.get("input", {})), "decision_id": decision_id})

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/policies":
                    self._reply(
                        {"result": [{"id": name, "raw": raw} for name, raw in stand_in.sources.items()]}
                    )
                elif self.path.startswith("/v1/policies/"):
                    name = self.path.removeprefix("/v1/policies/")
                    self._reply({"result": {"id": name, "raw": stand_in.sources[name]}})
                else:
                    self._reply(stand_in.evaluate(self.path.removeprefix("/v1/data/"), {}))

            def _reply(self, body: dict[str, Any]) -> None:
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture(scope="module")
def stand_in() -> Iterator[OpaStandIn]:
    server = OpaStandIn(POLICY_FILES, (POLICIES / "data.json").read_text())
    yield server
    server.close()


@pytest.fixture(scope="module")
def opa_engine(stand_in: OpaStandIn) -> Iterator[OpaEngine]:
    engine = OpaEngine(PolicyBundle.load(POLICIES), url=stand_in.url)
    yield engine
    engine.close()


@pytest.mark.parametrize(("name", "kind", "policy_input", "reasons"), CASES, ids=CASE_IDS)
def test_opa_backend_decides_like_regopy(
    engine: RegopyEngine,
    opa_engine: OpaEngine,
    name: str,
    kind: DecisionKind,
    policy_input: PolicyInput,
    reasons: tuple[str, ...],
) -> None:
    def comparable(decision: Decision) -> tuple[bool, tuple[str, ...], str]:
        return decision.allow, decision.reasons, decision.bundle_digest

    assert comparable(opa_engine.decide(kind, policy_input)) == comparable(engine.decide(kind, policy_input))


def test_opa_backend_keeps_the_servers_decision_id(stand_in: OpaStandIn, opa_engine: OpaEngine) -> None:
    decision = opa_engine.decide(ROUTE, _request(PUBLIC, (0, 8), None))
    assert decision.decision_id == stand_in.decision_ids[-1]


def test_opa_undefined_decision_fails_closed(stand_in: OpaStandIn, opa_engine: OpaEngine) -> None:
    stand_in.undefined = True
    try:
        with pytest.raises(PolicyError, match="undefined"):
            opa_engine.decide(ROUTE, _request(PUBLIC, (0, 8), None))
    finally:
        stand_in.undefined = False


def test_unreachable_opa_fails_closed() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PolicyError, match="OPA server failed"):
        OpaEngine(PolicyBundle.load(POLICIES), url=f"http://127.0.0.1:{port}", timeout_s=0.5)


def test_opa_serving_other_modules_is_refused() -> None:
    sources = {path.name: path.read_text() for path in POLICY_FILES} | {
        "extra.rego": "package fincluster.extra\n"
    }
    server = OpaStandIn(POLICY_FILES, (POLICIES / "data.json").read_text(), sources=sources)
    try:
        with pytest.raises(PolicyError, match="policy modules differ"):
            OpaEngine(PolicyBundle.load(POLICIES), url=server.url)
    finally:
        server.close()


def test_opa_serving_other_data_is_refused() -> None:
    data = json.loads((POLICIES / "data.json").read_text())
    data["fincluster"]["allowed_zones"] = ["us-nyc"]
    server = OpaStandIn(POLICY_FILES, json.dumps(data))
    try:
        with pytest.raises(PolicyError, match="data under 'fincluster' differs"):
            OpaEngine(PolicyBundle.load(POLICIES), url=server.url)
    finally:
        server.close()


@pytest.mark.parametrize("url", ["opa.internal:8181", "http://opa.internal:8181/v1", "ftp://opa.internal"])
def test_opa_url_must_be_scheme_host_port(url: str) -> None:
    with pytest.raises(ConfigurationError):
        OpaEngine(PolicyBundle.load(POLICIES), url=url)


def test_factory_runs_in_process_without_an_opa_url() -> None:
    engine = open_policy_engine(POLICIES)
    assert isinstance(engine, RegopyEngine)
    engine.close()


def test_factory_uses_opa_when_a_url_is_configured(stand_in: OpaStandIn) -> None:
    engine = open_policy_engine(POLICIES, opa_url=stand_in.url)
    assert isinstance(engine, OpaEngine)
    engine.close()


# --- a real OPA, where one is installed -----------------------------------------------------------

needs_opa = pytest.mark.skipif(shutil.which("opa") is None, reason="no opa binary on PATH")


@needs_opa
def test_opa_passes_the_rego_unit_tests() -> None:
    result = subprocess.run(["opa", "test", str(POLICIES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_opa
def test_real_opa_server_decides_like_regopy(engine: RegopyEngine, tmp_path: Path) -> None:
    copy = _copy_policies(tmp_path / "bundle")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    files = [p.name for p in sorted(copy.iterdir())]
    server = subprocess.Popen(
        ["opa", "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error", *files], cwd=copy
    )
    try:
        opa = _wait_for_opa(PolicyBundle.load(copy), f"http://127.0.0.1:{port}")
        for _, kind, policy_input, _ in CASES:
            remote, local = opa.decide(kind, policy_input), engine.decide(kind, policy_input)
            assert (remote.allow, remote.reasons) == (local.allow, local.reasons)
        opa.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wait_for_opa(bundle: PolicyBundle, url: str) -> OpaEngine:
    deadline = time.monotonic() + 15
    while True:
        try:
            return OpaEngine(bundle, url=url)
        except PolicyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
