"""``fincluster``: the command line of a private LLM swarm.

Commands: ``model`` (import, verify), ``certs`` (the swarm CA), ``attest`` (the attestation
authority), ``registry`` and ``serve`` (the services), ``status`` (the swarm at a glance),
``generate`` (an operator's smoke test), ``audit`` (verify, report, export, reconcile, usage,
prune), ``adapters`` (signed LoRA adapters: keygen, push, pull, list) and ``demo`` (a whole swarm
on this machine).
Settings come from arguments, then ``FINCLUSTER_*`` environment variables, then a TOML file
(``--config`` or ``FINCLUSTER_CONFIG``); each flag's help names its other forms.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from fincluster.adapters.commands import register as register_adapters
from fincluster.audit.commands import register as register_audit
from fincluster.audit.node import open_node_audit_log
from fincluster.errors import FinclusterError
from fincluster.settings import ClientSettings, RegistrySettings, ServerSettings
from fincluster.trust.cert_commands import register as register_certs
from fincluster.trust.commands import register as register_attest
from fincluster.values import Quantization, StepStrategy, TensorDType

if TYPE_CHECKING:
    from fincluster.registry.backend import Registry
    from fincluster.settings import Settings
    from fincluster.spans import BlockSpan
    from fincluster.store import ModelStore
    from fincluster.trust.enforcement import TrustContext
    from fincluster.trust.pki import Credential


def _progress(stage: str, done: int, total: int) -> None:
    print(f"\r{stage}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def _tls_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {k: getattr(args, k) for k in ("ca_cert", "cert", "key") if getattr(args, k, None) is not None}
    if given and len(given) != 3:
        raise FinclusterError("--ca-cert, --cert and --key go together")
    return {"tls": given} if given else {}


def _trust_overrides(args: argparse.Namespace) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for name in ("policy_dir", "attestation", "crl", "clearances_file"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    if getattr(args, "authority_key", None):
        given["authority_keys"] = args.authority_key
    return {"trust": given} if given else {}


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    from fincluster.logs import configure_logging
    from fincluster.settings import load_settings

    overrides.update(_tls_overrides(args))
    overrides.update(_trust_overrides(args))
    settings = load_settings(args.config, **overrides)
    configure_logging(settings.logging)
    return settings


def _credential(settings: Settings) -> Credential:
    if settings.tls is None:
        raise FinclusterError("TLS material is required: give --ca-cert/--cert/--key or FINCLUSTER_TLS__*")
    return settings.tls.credential()


SIGNAL_POLL_SECONDS = 0.2
"""How often the main thread wakes while it waits for SIGTERM/SIGINT (see :func:`_wait_for_signal`)."""


def _wait_for_signal(stop: Callable[[], None]) -> None:
    """Block until SIGTERM or SIGINT, then ``stop()``.

    Python runs signal handlers in the main thread only, between bytecodes. When the process has other
    threads (CUDA's driver threads, gRPC's, OpenMP's), the kernel may deliver the signal to one of them;
    the C-level handler then only sets a flag, and a main thread blocked in an untimed ``Event.wait()``
    never gets to run the Python handler (seen with CUDA: SIGTERM ignored). Waiting in short slices
    lets the main thread notice the flag within :data:`SIGNAL_POLL_SECONDS`.
    """
    done = threading.Event()

    def handle(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not done.wait(SIGNAL_POLL_SECONDS):
        pass
    stop()


# model -----------------------------------------------------------------------------------------
def cmd_model_import(args: argparse.Namespace) -> int:
    from fincluster.store import import_model

    store = import_model(
        args.source, args.out, model_id=args.model_id, progress=_progress, overwrite=args.overwrite
    )
    print(f"imported {store.model_id}: {store.num_blocks} blocks into {store.path}")
    print(f"manifest sha256 {store.manifest_digest}")
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    from fincluster.store import ModelStore

    store = ModelStore.open(args.store)
    store.verify()
    print(f"{store.path}: all {len(store.manifest.files)} files match the manifest ({store.manifest_digest})")
    return 0


# services --------------------------------------------------------------------------------------
def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among ``names`` that were given (the rest comes from the environment, TOML, defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_registry(args: argparse.Namespace) -> int:
    from fincluster.bootstrap import trust_from_settings
    from fincluster.net import check_advertised
    from fincluster.registry.factory import registry_backend
    from fincluster.registry.server import RegistryServer
    from fincluster.trust.pki import load_certificate

    overrides: dict[str, Any] = {"registry": _given(args, "host", "port", "public_address")}
    if args.audit_dir:
        overrides["audit"] = {"directory": args.audit_dir}
    settings = _settings(args, **overrides)
    credential = _credential(settings)
    registry = settings.registry
    check_advertised(
        registry.public_address,
        registry.host,
        load_certificate(credential.read()[1]),
        flag="--public-address (registry.public_address)",
    )
    trust = trust_from_settings(settings.trust, credential)
    backend = registry_backend(registry)
    audit_log = open_node_audit_log(settings.audit, credential)  # announcements accepted and refused
    server = RegistryServer(
        credential, host=registry.host, port=registry.port, trust=trust, backend=backend, audit=audit_log
    )
    address = server.start()
    reached = f" (servers and clients dial {registry.public_address})" if registry.public_address else ""
    print(f"registry listening on {address}{reached}", flush=True)
    try:
        _wait_for_signal(server.stop)
    finally:
        audit_log.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fincluster.adapters.manifest import AdapterKeys
    from fincluster.bootstrap import trust_from_settings
    from fincluster.registry.service import RegistryClient
    from fincluster.serving.server import BlockServer, ServedModel, load_span_model
    from fincluster.store import ModelStore
    from fincluster.trust.tls import RenewingChannel

    overrides: dict[str, Any] = {
        "server": _given(
            args,
            "store",
            "blocks",
            "num_blocks",
            "memory_budget_bytes",
            "host",
            "port",
            "public_address",
            "dtype",
            "device",
            "metrics_port",
            "metrics_host",
            "step_strategy",
            "max_batch_size",
            "quant",
        )
    }
    if args.registry:
        overrides["registry"] = {"address": args.registry}
    if args.audit_dir:
        overrides["audit"] = {"directory": args.audit_dir}
    settings = _settings(args, **overrides)
    if settings.server.store is None or settings.server.blocks is None:
        raise FinclusterError("serve needs --store and --blocks (or FINCLUSTER_SERVER__STORE/BLOCKS)")
    credential = _credential(settings)
    store = ModelStore.open(settings.server.store)
    trust = trust_from_settings(settings.trust, credential)
    registry_address = settings.registry.address
    registry = None
    if registry_address:
        registry = RegistryClient(RenewingChannel(registry_address, credential), address=registry_address)
    if settings.server.blocks == "auto":
        if registry is None:
            raise FinclusterError(
                "--blocks auto needs --registry: the span is chosen from the swarm's records"
            )
        span = _first_placement(store, settings, credential, registry, trust)
    else:
        span = settings.server.blocks
    model = load_span_model(
        store,
        span,
        dtype=settings.server.dtype,
        device=settings.server.device,
        quantization=settings.server.quant,
        progress=lambda done, total: _progress(f"loading blocks {span} of {store.model_id}", done, total),
    )
    with open_node_audit_log(settings.audit, credential) as audit_log:
        server = BlockServer(
            model,
            ServedModel.of(store),
            settings.server,
            credential,
            registry=registry,
            registry_address=registry_address,
            trust=trust,
            attestation=settings.trust.attestation,  # the file: a replaced token is picked up while serving
            audit=audit_log,
            store=store,
            adapter_keys=AdapterKeys.from_files(settings.trust.adapter_keys),
        )
        address = server.start()
        print(f"serving blocks {span} of {store.model_id} on {address} as {credential.spiffe_id}", flush=True)
        if registry_address is None:
            print("no registry configured: clients must be given this address", flush=True)
        _wait_for_signal(server.stop)
    return 0


def _first_placement(
    store: ModelStore, settings: Settings, credential: Credential, registry: Registry, trust: TrustContext
) -> BlockSpan:
    """The span a ``--blocks auto`` server starts with (the arithmetic goes to the log)."""
    from fincluster.serving.rebalancer import first_placement
    from fincluster.trust.own_attestation import OwnAttestation

    claims = None
    if settings.trust.attestation is not None:
        claims = OwnAttestation(credential, trust, path=settings.trust.attestation).claims
    return first_placement(
        store, settings.server, registry=registry, trust=trust, node_id=credential.spiffe_id, claims=claims
    )


def cmd_status(args: argparse.Namespace) -> int:
    from fincluster.status import gather_status, render_json, render_table

    overrides: dict[str, Any] = {}
    if args.registry:
        overrides["registry"] = {"address": args.registry}
    settings = _settings(args, **overrides)
    if settings.registry.address is None:
        raise FinclusterError("status needs --registry HOST:PORT (or registry.address)")
    status = gather_status(
        settings.registry.address,
        args.model,
        credential=_credential(settings),
        trust_settings=settings.trust,
        timeout_seconds=args.timeout,
    )
    print(render_json(status) if args.json else render_table(status))
    return 0 if not status.gaps else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from fincluster.smoke import run_generate

    overrides: dict[str, Any] = {}
    if args.registry:
        overrides["registry"] = {"address": args.registry}
    if args.store:
        overrides["client"] = {"store": args.store}
    if args.audit_dir:
        overrides["audit"] = {"directory": args.audit_dir}
    settings = _settings(args, **overrides)
    return run_generate(
        settings,
        _credential(settings),
        prompt=args.prompt,
        classification=args.classification,
        max_new_tokens=args.max_new_tokens,
        raw=args.raw,
        out=sys.stdout,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from fincluster.demo import run_demo
    from fincluster.logs import configure_logging
    from fincluster.settings import LoggingSettings

    configure_logging(LoggingSettings(level="warning"))  # the demo's own output is on stdout

    return run_demo(
        workdir=args.workdir,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        keep_running=args.keep_running,
        registry_port=args.registry_port,
    )


# parser ----------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default when it has one of its own (settings-backed flags say theirs)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if hidden or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _setting(model: type[BaseModel], section: str, field: str, what: str | None = None) -> str:
    """Help for a flag that overrides setting ``section.field``: its default and its other forms."""
    info = model.model_fields[field]
    default = info.get_default(call_default_factory=True)
    shown = "none" if default is None else str(getattr(default, "value", default))
    text = what or info.description or field
    env = f"FINCLUSTER_{section.upper()}__{field.upper()}"
    return f"{text} (default: {shown}; env {env}, TOML [{section}] {field})"


def _command(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help_text, description=help_text, formatter_class=_HelpFormatter
    )
    return parser


def _add_node_options(parser: argparse.ArgumentParser, *, attestation: bool = False) -> None:
    """This node's TLS material and trust settings (each also a setting: env or TOML)."""
    tls = parser.add_argument_group("identity and trust (each also FINCLUSTER_TLS__* / FINCLUSTER_TRUST__*)")
    tls.add_argument("--config", type=Path, help="TOML settings file (or FINCLUSTER_CONFIG)")
    tls.add_argument("--ca-cert", type=Path, help="swarm CA certificate, PEM (tls.ca_cert)")
    tls.add_argument("--cert", type=Path, help="this node's certificate, PEM (tls.cert)")
    tls.add_argument("--key", type=Path, help="this node's private key, PEM (tls.key)")
    tls.add_argument(
        "--policy-dir", type=Path, help="Rego policies; without it only public data (trust.policy_dir)"
    )
    tls.add_argument(
        "--authority-key",
        type=Path,
        action="append",
        help="attestation authority public key, repeatable (trust.authority_keys)",
    )
    if attestation:
        tls.add_argument(
            "--attestation", type=Path, help="this server's attestation token (trust.attestation)"
        )
    tls.add_argument("--crl", type=Path, help="the swarm CA's revocation list, crl.pem (trust.crl)")
    tls.add_argument(
        "--clearances-file",
        type=Path,
        help="shared JSON/TOML file: client SPIFFE id -> classification (trust.clearances_file)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fincluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_attest(commands)
    register_adapters(commands)
    register_audit(commands)
    register_certs(commands)

    model = _command(commands, "model", "model stores: import, verify").add_subparsers(
        dest="model_command", required=True
    )
    imp = _command(model, "import", "import a transformers directory, a GGUF file or a known alias")
    imp.add_argument("source", help="directory, .gguf file, or alias such as smollm2-135m-instruct")
    imp.add_argument("--out", required=True, type=Path, help="store directory to create")
    imp.add_argument("--model-id", help="model id recorded in the manifest (default: the source's name)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing store")
    imp.set_defaults(handler=cmd_model_import)
    ver = _command(model, "verify", "check every store file against the manifest")
    ver.add_argument("store", type=Path, help="store directory")
    ver.set_defaults(handler=cmd_model_verify)

    registry = _command(commands, "registry", "run the embedded registry service")
    registry.add_argument("--host", help=_setting(RegistrySettings, "registry", "host"))
    registry.add_argument("--port", type=int, help=_setting(RegistrySettings, "registry", "port"))
    registry.add_argument("--public-address", help=_setting(RegistrySettings, "registry", "public_address"))
    _add_node_options(registry)
    registry.add_argument(
        "--audit-dir",
        type=Path,
        help="directory of the registry's audit log (default: fincluster-audit; env "
        "FINCLUSTER_AUDIT__DIRECTORY, TOML [audit] directory)",
    )
    registry.set_defaults(handler=cmd_registry)

    serve = _command(commands, "serve", "serve a span of blocks")
    serve.add_argument("--store", type=Path, help=_setting(ServerSettings, "server", "store"))
    serve.add_argument("--blocks", help=_setting(ServerSettings, "server", "blocks"))
    serve.add_argument("--num-blocks", type=int, help=_setting(ServerSettings, "server", "num_blocks"))
    serve.add_argument(
        "--memory-budget-bytes", type=int, help=_setting(ServerSettings, "server", "memory_budget_bytes")
    )
    serve.add_argument("--metrics-port", type=int, help=_setting(ServerSettings, "server", "metrics_port"))
    serve.add_argument("--metrics-host", help=_setting(ServerSettings, "server", "metrics_host"))
    serve.add_argument("--host", help=_setting(ServerSettings, "server", "host"))
    serve.add_argument("--port", type=int, help=_setting(ServerSettings, "server", "port"))
    serve.add_argument("--public-address", help=_setting(ServerSettings, "server", "public_address"))
    serve.add_argument(
        "--registry",
        help=_setting(RegistrySettings, "registry", "address", "HOST:PORT of the registry to announce to"),
    )
    serve.add_argument(
        "--dtype",
        choices=[dtype.value for dtype in TensorDType],
        help=_setting(ServerSettings, "server", "dtype", "dtype of the weights and activations"),
    )
    serve.add_argument(
        "--device", help=_setting(ServerSettings, "server", "device", "torch device, e.g. cpu or cuda:0")
    )
    serve.add_argument(
        "--step-strategy",
        choices=[strategy.value for strategy in StepStrategy],
        help=_setting(ServerSettings, "server", "step_strategy", "how inference steps run"),
    )
    serve.add_argument(
        "--max-batch-size", type=int, help=_setting(ServerSettings, "server", "max_batch_size")
    )
    serve.add_argument(
        "--quant",
        choices=[mode.value for mode in Quantization],
        help=_setting(ServerSettings, "server", "quant", "weight quantization (bitsandbytes)"),
    )
    serve.add_argument(
        "--audit-dir",
        type=Path,
        help="directory of this server's audit log (default: fincluster-audit; env "
        "FINCLUSTER_AUDIT__DIRECTORY, TOML [audit] directory)",
    )
    _add_node_options(serve, attestation=True)
    serve.set_defaults(handler=cmd_serve)

    generate = _command(
        commands, "generate", "smoke test: send a prompt through the swarm, print the text and the placement"
    )
    generate.add_argument("prompt", help="the prompt (a chat template is applied when the model has one)")
    generate.add_argument(
        "--registry", help=_setting(RegistrySettings, "registry", "address", "HOST:PORT of the registry")
    )
    generate.add_argument("--store", type=Path, help=_setting(ClientSettings, "client", "store"))
    generate.add_argument(
        "--classification",
        default="internal",
        choices=["public", "internal", "confidential", "restricted"],
        help="data classification of the prompt",
    )
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    generate.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat template"
    )
    generate.add_argument(
        "--audit-dir",
        type=Path,
        help="directory of this client's audit log (default: fincluster-audit; env "
        "FINCLUSTER_AUDIT__DIRECTORY, TOML [audit] directory)",
    )
    _add_node_options(generate)
    generate.set_defaults(handler=cmd_generate)

    status = _command(
        commands,
        "status",
        "the swarm: nodes, spans, tiers, load, health, and how many nodes cover each block",
    )
    status.add_argument("--model", required=True, help="model id (as the servers announce it)")
    status.add_argument(
        "--registry", help=_setting(RegistrySettings, "registry", "address", "HOST:PORT of the registry")
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each node")
    _add_node_options(status)
    status.set_defaults(handler=cmd_status)

    demo = _command(
        commands, "demo", "import the demo model, start a registry and 4 block servers, answer a question"
    )
    demo.add_argument("--workdir", type=Path, default=Path("var/demo"), help="store, certificates, logs")
    demo.add_argument("--prompt", default=None, help="the question (default: one about bonds)")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    demo.add_argument("--keep-running", action="store_true", help="keep the swarm up after the answer")
    demo.add_argument("--registry-port", type=int, default=0, help="registry port (0: any free port)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def settings_error(error: ValidationError) -> str:
    """One line for invalid settings, naming each setting as flag users and TOML users know it."""
    problems = []
    for issue in error.errors(include_url=False):
        location = ".".join(str(part) for part in issue["loc"])
        env = "FINCLUSTER_" + "__".join(str(part).upper() for part in issue["loc"])
        value = issue.get("input")
        shown = "" if isinstance(value, dict) or issue["type"] == "missing" else f"={value!r}"
        problems.append(f"{location}{shown}: {issue['msg']} ({env})")
    return "invalid setting " + "; ".join(problems)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except FinclusterError as error:
        print(f"fincluster: error: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        print(f"fincluster: error: {settings_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
