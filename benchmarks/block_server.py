"""A block server process for benchmarks, with its audit log switchable (the CLI always keeps one).

python benchmarks/block_server.py STORE SPAN CERTS NAME REGISTRY AUDIT_DIR|-
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import signal
import sys
import threading
from pathlib import Path

import grpc

from fincluster.audit import AuditSettings
from fincluster.audit.node import open_node_audit_log
from fincluster.logs import configure_logging
from fincluster.registry.service import RegistryClient
from fincluster.serving.server import BlockServer, ServedModel, load_span_model
from fincluster.settings import LoggingSettings, ServerSettings
from fincluster.spans import BlockSpan
from fincluster.store import ModelStore
from fincluster.trust.pki import Credential
from fincluster.trust.tls import channel_credentials
from fincluster.values import TensorDType


def main() -> int:
    configure_logging(LoggingSettings(level="warning"))  # logs to stderr; stdout says "serving"
    store_dir, span, certs, name, registry, audit_dir = sys.argv[1:7]
    nodes = Path(certs) / "nodes"
    credential = Credential.from_files(
        cert_path=nodes / f"server-{name}.pem",
        key_path=nodes / f"server-{name}.key",
        ca_cert_path=Path(certs) / "ca.pem",
    )
    store = ModelStore.open(store_dir)
    log = (
        open_node_audit_log(AuditSettings(directory=Path(audit_dir)), credential)
        if audit_dir != "-"
        else None
    )
    server = BlockServer(
        load_span_model(store, BlockSpan.parse(span), dtype=TensorDType.FLOAT32, device="cpu"),
        ServedModel.of(store),
        ServerSettings(),
        credential,
        registry=RegistryClient(grpc.secure_channel(registry, channel_credentials(credential))),
        audit=log,
    )
    server.start()
    print("serving", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    if log is not None:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
