"""``fincluster adapters``: the adapter-signing key and the adapter store (push, pull, list).

Whoever approves adapters for production holds the signing key (``keygen`` once); ``push`` signs a
peft LoRA adapter directory (``save_pretrained``'s output) for one base model and puts it in the store
(a directory or any fsspec URL); servers whose ``trust.adapter_keys`` hold the public key apply it.
``pull`` fetches and checks one (for local peft, or review), ``list`` shows what a store holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fincluster.errors import ConfigurationError, FinclusterError

__all__ = ["register"]


def cmd_adapters_keygen(args: argparse.Namespace) -> int:
    from fincluster.trust.attestation import generate_authority_key_files

    key_id = generate_authority_key_files(args.private, args.public)  # an Ed25519 pair, private 0600
    print(f"adapter-signing key {key_id}")
    print(f"  private {args.private} (keep it with whoever approves adapters)\n  public  {args.public}")
    return 0


def _base_model(manifest_path: Path) -> tuple[str, str]:
    """(model id, SHA-256 of manifest.json's exact bytes) of the base model's store."""
    from fincluster.store.manifest import Manifest
    from fincluster.values import sha256_hex

    try:
        data = manifest_path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read store manifest {manifest_path}: {error.strerror}") from error
    try:
        manifest = Manifest.from_json_bytes(data, source=str(manifest_path))
    except FinclusterError as error:
        raise ConfigurationError(str(error)) from None
    return manifest.model_id, sha256_hex(data)


def cmd_adapters_push(args: argparse.Namespace) -> int:
    from fincluster.adapters.manifest import load_adapter_private_key
    from fincluster.adapters.store import AdapterStore

    model_id, digest = _base_model(args.base_manifest)
    manifest = AdapterStore(args.store).push(
        args.source,
        adapter_id=args.id,
        base_model_id=model_id,
        base_manifest_sha256=digest,
        signing_key=load_adapter_private_key(args.signing_key),
    )
    print(
        f"pushed adapter {manifest.adapter_id} for {model_id} ({', '.join(manifest.target_modules)}; "
        f"blocks {manifest.blocks[0]}..{manifest.blocks[-1]}) to {args.store}"
    )
    return 0


def cmd_adapters_pull(args: argparse.Namespace) -> int:
    from fincluster.adapters.manifest import AdapterKeys
    from fincluster.adapters.store import AdapterStore

    adapter = AdapterStore(args.store).pull(args.id, args.out, keys=AdapterKeys.from_files(args.key))
    print(
        f"pulled adapter {adapter.adapter_id} (sha256 {adapter.digest}, signed by {adapter.key_id}) "
        f"to {args.out}"
    )
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from fincluster.adapters.store import AdapterStore

    listed = AdapterStore(args.store).list()
    if not listed:
        print(f"no adapters in {args.store}")
    for adapter in listed:
        signer = adapter.signed_by or "UNSIGNED"
        print(
            f"{adapter.adapter_id}  {adapter.base_model_id}  sha256:{adapter.digest}  signed by {signer}  "
            f"{','.join(adapter.target_modules)}"
        )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``adapters`` command group to the ``fincluster`` parser's subcommands."""
    adapters = commands.add_parser("adapters", help="signed LoRA adapters: signing key, push, pull, list")
    group = adapters.add_subparsers(dest="adapters_command", required=True)

    keygen = group.add_parser("keygen", help="create an adapter-signing Ed25519 key pair")
    keygen.add_argument("--private", required=True, type=Path, help="private key file to create (0600)")
    keygen.add_argument("--public", required=True, type=Path, help="public key file to create")
    keygen.set_defaults(handler=cmd_adapters_keygen)

    store_help = "adapter store: a directory or an fsspec URL"
    push = group.add_parser("push", help="sign a peft LoRA adapter directory and add it to a store")
    push.add_argument("source", type=Path, help="the adapter directory (adapter_config.json + weights)")
    push.add_argument("--store", required=True, help=store_help)
    push.add_argument("--id", required=True, help="adapter id (a-z, 0-9, '.', '_', '-')")
    push.add_argument(
        "--base-manifest", required=True, type=Path, help="manifest.json of the base model's store"
    )
    push.add_argument("--signing-key", required=True, type=Path, help="adapter-signing private key (PEM)")
    push.set_defaults(handler=cmd_adapters_push)

    pull = group.add_parser("pull", help="fetch an adapter, check its signature and files, write them")
    pull.add_argument("id", help="adapter id")
    pull.add_argument("--store", required=True, help=store_help)
    pull.add_argument(
        "--key", required=True, action="append", type=Path, help="trusted adapter-signing public key (repeat)"
    )
    pull.add_argument("--out", required=True, type=Path, help="directory to write the adapter files to")
    pull.set_defaults(handler=cmd_adapters_pull)

    listing = group.add_parser("list", help="the adapters a store holds (signatures not checked)")
    listing.add_argument("--store", required=True, help=store_help)
    listing.set_defaults(handler=cmd_adapters_list)
