import subprocess
import sys

import fincluster
import fincluster.client


def test_package_exports_are_pinned() -> None:
    assert fincluster.__all__ == [
        "CapacityError",
        "Credential",
        "DistributedModelForCausalLM",
        "FinclusterError",
        "InferenceSession",
        "LocalSwarm",
        "ModelStore",
        "RemoteError",
        "RoutingError",
        "SessionError",
        "StoreIntegrityError",
        "Swarm",
        "__version__",
        "import_model",
    ]
    assert fincluster.client.__all__ == [
        "DistributedModelForCausalLM",
        "InferenceSession",
        "LocalSwarm",
        "Swarm",
    ]


def test_import_changes_no_global_logging_or_threads() -> None:
    code = (
        "import threading, logging, structlog; before = threading.active_count(); "
        "import fincluster; assert threading.active_count() == before; "
        "assert not structlog.is_configured(); assert not logging.getLogger().handlers"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
