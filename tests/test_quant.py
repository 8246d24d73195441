"""Quantized span weights (bitsandbytes on CPU): outputs near the full-precision span, fewer bytes,
and the quantization and memory per block reported in the server's info and record."""

from __future__ import annotations

import pytest
import torch

from fincluster.serving.server import BlockServer, ServedModel, load_span_model
from fincluster.settings import ServerSettings
from fincluster.spans import BlockSpan
from fincluster.trust.pki import Role
from fincluster.values import Quantization, TensorDType


def span_output(model, hidden: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(hidden.shape[:2], dtype=torch.int64)
    positions = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    with torch.no_grad():
        return model(hidden, mask, positions)


@pytest.mark.parametrize(
    ("mode", "max_error", "max_bytes"), [(Quantization.INT8, 0.05, 0.30), (Quantization.NF4, 0.25, 0.16)]
)
def test_quantized_span_is_close_to_full_precision_in_far_fewer_bytes(
    tiny_llama_store, mode: Quantization, max_error: float, max_bytes: float
) -> None:
    span = BlockSpan(0, 3)
    full = load_span_model(tiny_llama_store, span, dtype=TensorDType.FLOAT32, device="cpu")
    quantized = load_span_model(
        tiny_llama_store, span, dtype=TensorDType.FLOAT32, device="cpu", quantization=mode
    )
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    expected, produced = span_output(full, hidden), span_output(quantized, hidden)
    assert ((produced - expected).norm() / expected.norm()).item() < max_error
    from fincluster.serving.quant import weight_bytes_per_block

    full_bytes, quantized_bytes = weight_bytes_per_block(full), weight_bytes_per_block(quantized)
    assert len(quantized_bytes) == 3 and full_bytes[0] == (36864 + 128) * 4  # linears + two norms, fp32
    assert all(q / f < max_bytes for q, f in zip(quantized_bytes, full_bytes, strict=True))


def test_server_info_and_record_carry_quantization_and_weight_bytes(pki, tiny_llama_store) -> None:
    model = load_span_model(
        tiny_llama_store,
        BlockSpan(2, 4),
        dtype=TensorDType.FLOAT32,
        device="cpu",
        quantization=Quantization.INT8,
    )
    server = BlockServer(
        model, ServedModel.of(tiny_llama_store), ServerSettings(), pki.credential(Role.SERVER, "quant")
    )
    info = server.info()
    assert info.quantization == "int8" and len(info.weight_bytes_per_block) == 2
    assert info.step_strategy == "eager" and info.max_batch_size == 1
    server.address = "127.0.0.1:1"  # record() needs an address; nothing is started
    record = server.record()
    assert record.quantization == "int8" and record.weight_bytes == sum(info.weight_bytes_per_block)
