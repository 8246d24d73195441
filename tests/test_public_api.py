import subprocess
import sys

import fincluster
import fincluster.client


def test_package_exports_are_pinned() -> None:
    assert fincluster.__all__ == [
        "CapacityError",
        "Credential",
        "DistributedModelForCausalLM",
        "DistributedModelForSequenceClassification",
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
        "DistributedModelForSequenceClassification",
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


def test_importing_the_package_loads_no_torch_until_a_model_name_is_used() -> None:
    code = (
        "import sys, fincluster; assert 'torch' not in sys.modules, 'torch imported'; "
        "fincluster.Credential; assert 'torch' not in sys.modules; "
        "fincluster.DistributedModelForCausalLM; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_package_attribute_is_an_attribute_error() -> None:
    try:
        fincluster.NoSuchThing  # noqa: B018
    except AttributeError as error:
        assert "has no attribute 'NoSuchThing'" in str(error)
    else:
        raise AssertionError("no AttributeError")


def test_library_logs_nothing_below_warning_until_logging_is_configured(tmp_path) -> None:
    """An SDK script sees no INFO lines from fincluster (stdout stays clean), only warnings on stderr;
    once the application configures logging, INFO lines appear."""
    script = (
        "from datetime import timedelta\n"
        "from pathlib import Path\n"
        "import sys\n"
        "from fincluster.trust.pki import CertificateAuthority, Role\n"
        "ca = CertificateAuthority.init(Path(sys.argv[1]), trust_domain='t.example', "
        "ttl=timedelta(days=1))\n"  # logs ca_created (INFO)
        "ca.issue(Role.CLIENT, 'x', ttl=timedelta(days=9))\n"  # certificate_lifetime_capped (WARNING)
        "if sys.argv[2:] == ['configure']:\n"
        "    from fincluster.logs import configure_logging\n"
        "    from fincluster.settings import LoggingSettings\n"
        "    configure_logging(LoggingSettings(level='info'))\n"
        "    ca.issue(Role.CLIENT, 'y')\n"  # certificate_issued (INFO)
    )
    quiet = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "a")], capture_output=True, text=True, check=True
    )
    assert quiet.stdout == ""
    assert "certificate_lifetime_capped" in quiet.stderr
    assert "ca_created" not in quiet.stderr and "certificate_issued" not in quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b"), "configure"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "certificate_issued" in loud.stderr and "spiffe://t.example/client/y" in loud.stderr
