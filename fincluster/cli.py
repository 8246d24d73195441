"""``fincluster`` command line: model import, certificates, attestations, registry, serve, audit, demo.

Entry point only: it reads settings (arguments > environment > TOML) and hands typed objects down.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fincluster.audit.commands import register as register_audit
from fincluster.audit.node import open_node_audit_log
from fincluster.errors import FinclusterError
from fincluster.trust.cert_commands import register as register_certs
from fincluster.trust.commands import register as register_attest
from fincluster.values import TensorDType

if TYPE_CHECKING:
    from fincluster.settings import Settings
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
    for name in ("policy_dir", "attestation", "crl"):
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


def _wait_for_signal(stop: Callable[[], None]) -> None:
    done = threading.Event()

    def handle(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    done.wait()
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
def cmd_registry(args: argparse.Namespace) -> int:
    from fincluster.bootstrap import trust_from_settings
    from fincluster.registry.server import RegistryServer

    overrides: dict[str, Any] = {"registry": {"port": args.port}} if args.port is not None else {}
    if args.audit_dir:
        overrides["audit"] = {"directory": args.audit_dir}
    settings = _settings(args, **overrides)
    credential = _credential(settings)
    trust = trust_from_settings(settings.trust, credential)
    audit_log = open_node_audit_log(settings.audit, credential)  # announcements accepted and refused
    server = RegistryServer(
        credential, host=settings.registry.host, port=settings.registry.port, trust=trust, audit=audit_log
    )
    address = server.start()
    print(f"registry listening on {address}", flush=True)
    try:
        _wait_for_signal(server.stop)
    finally:
        audit_log.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fincluster.bootstrap import trust_from_settings
    from fincluster.registry.service import RegistryClient
    from fincluster.serving.server import BlockServer, ServedModel, load_span_model
    from fincluster.store import ModelStore
    from fincluster.trust.tls import RenewingChannel

    server_overrides = {
        key: value
        for key, value in (
            ("store", args.store),
            ("blocks", args.blocks),
            ("port", args.port),
            ("dtype", args.dtype),
        )
        if value is not None
    }
    overrides: dict[str, Any] = {"server": server_overrides}
    if args.registry:
        overrides["registry"] = {"address": args.registry}
    if args.audit_dir:
        overrides["audit"] = {"directory": args.audit_dir}
    settings = _settings(args, **overrides)
    if settings.server.store is None or settings.server.blocks is None:
        raise FinclusterError("serve needs --store and --blocks (or FINCLUSTER_SERVER__STORE/BLOCKS)")
    credential = _credential(settings)
    store = ModelStore.open(settings.server.store)
    span = settings.server.blocks
    model = load_span_model(store, span, dtype=settings.server.dtype, device=settings.server.device)
    trust = trust_from_settings(settings.trust, credential)
    registry = None
    if settings.registry.address:
        registry = RegistryClient(RenewingChannel(settings.registry.address, credential))
    audit_log = open_node_audit_log(settings.audit, credential)
    server = BlockServer(
        model,
        ServedModel.of(store),
        settings.server,
        credential,
        registry=registry,
        trust=trust,
        attestation=settings.trust.attestation,  # the file: a replaced token is picked up while serving
        audit=audit_log,
    )
    address = server.start()
    print(f"serving blocks {span} of {store.model_id} on {address} as {credential.spiffe_id}", flush=True)
    try:
        _wait_for_signal(server.stop)
    finally:
        audit_log.close()
    return 0


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
def _add_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-cert", type=Path, help="swarm CA certificate (PEM)")
    parser.add_argument("--cert", type=Path, help="this node's certificate (PEM)")
    parser.add_argument("--key", type=Path, help="this node's private key (PEM)")
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--policy-dir", type=Path, help="Rego policies (enables policy enforcement)")
    parser.add_argument(
        "--authority-key", type=Path, action="append", help="attestation authority public key"
    )
    parser.add_argument("--attestation", type=Path, help="this node's attestation token file")
    parser.add_argument("--crl", type=Path, help="the swarm CA's revocation list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fincluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    register_attest(commands)
    register_audit(commands)
    register_certs(commands)

    model = commands.add_parser("model", help="model stores").add_subparsers(
        dest="model_command", required=True
    )
    imp = model.add_parser("import", help="import a transformers directory, a GGUF file or a known alias")
    imp.add_argument("source", help="directory, .gguf file, or alias such as smollm2-135m-instruct")
    imp.add_argument("--out", required=True, type=Path, help="store directory to create")
    imp.add_argument("--model-id", help="model id recorded in the manifest")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing store")
    imp.set_defaults(handler=cmd_model_import)
    ver = model.add_parser("verify", help="check every store file against the manifest")
    ver.add_argument("store", type=Path)
    ver.set_defaults(handler=cmd_model_verify)

    registry = commands.add_parser("registry", help="run the embedded registry service")
    _add_tls(registry)
    registry.add_argument("--port", type=int)
    registry.add_argument("--audit-dir", type=Path, help="directory of the registry's audit log")
    registry.set_defaults(handler=cmd_registry)

    serve = commands.add_parser("serve", help="serve a span of blocks")
    _add_tls(serve)
    serve.add_argument("--store", type=Path)
    serve.add_argument("--blocks", help="START:END")
    serve.add_argument("--port", type=int)
    serve.add_argument("--dtype", choices=[dtype.value for dtype in TensorDType])
    serve.add_argument("--registry", help="registry host:port")
    serve.add_argument("--audit-dir", type=Path, help="directory of this server's audit log")
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser(
        "demo", help="import the demo model, start a registry and 4 block servers, answer a question"
    )
    demo.add_argument("--workdir", type=Path, default=Path("var/demo"))
    demo.add_argument("--prompt", default=None)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--keep-running", action="store_true", help="keep the swarm up after the answer")
    demo.add_argument("--registry-port", type=int, default=0, help="registry port (default: any free port)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except FinclusterError as error:
        print(f"fincluster: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
