"""Compressed hidden states: the codec's error bounds and sizes, and sessions that use it end to end."""

from __future__ import annotations

import pytest
import torch

from fincluster.errors import ConfigurationError, WireError
from fincluster.wire.codec import SpanInputs, inputs_to_wire
from fincluster.wire.compression import BLOCK_SIZE, WireCompression
from fincluster.wire.tensors import decode, encode


def hidden(seed: int = 0) -> torch.Tensor:
    values = torch.randn(2, 16, 576, generator=torch.Generator().manual_seed(seed))
    values[0, 3, 7] = 40.0  # an outlier, as real hidden states have
    return values


@pytest.mark.parametrize(
    ("mode", "dtype", "bound"),
    [(WireCompression.FLOAT16, torch.float16, 2**-11), (WireCompression.BFLOAT16, torch.bfloat16, 2**-8)],
)
def test_half_precision_modes_round_to_that_type(
    mode: WireCompression, dtype: torch.dtype, bound: float
) -> None:
    values = hidden()
    message = encode(values, mode)
    restored = decode(message, name="hidden_states")
    assert restored.dtype == torch.float32 and restored.shape == values.shape
    assert torch.equal(restored, values.to(dtype).float())
    assert ((restored - values).abs() <= values.abs() * bound).all()
    assert len(message.data) == values.numel() * 2


def test_blockwise8_error_is_within_half_a_code_of_each_blocks_scale() -> None:
    values = hidden(1)
    message = encode(values, WireCompression.BLOCKWISE8)
    restored = decode(message, name="hidden_states")
    blocks = values.reshape(-1, BLOCK_SIZE)
    scales = blocks.abs().amax(dim=1, keepdim=True)
    error = (restored.reshape(-1, BLOCK_SIZE) - blocks).abs()
    assert (error <= scales / 254 * 1.0001).all()
    assert restored.reshape(-1)[3 * 576 + 7] == pytest.approx(40.0)  # a block's absmax is exact
    fp16_bytes = len(encode(values, WireCompression.FLOAT16).data)
    assert (len(message.data) + len(message.scales)) / fp16_bytes == pytest.approx((64 + 4) / 128)


def test_blockwise8_with_a_partial_last_block_and_zeros() -> None:
    values = torch.zeros(1, 1, 100)
    values[0, 0, 99] = -3.0
    restored = decode(encode(values, WireCompression.BLOCKWISE8), name="x")
    assert torch.equal(restored, values)


def test_malformed_compressed_tensors_are_refused() -> None:
    message = encode(hidden(), WireCompression.BLOCKWISE8)
    message.scales = message.scales[:-4]
    with pytest.raises(WireError, match="scale bytes"):
        decode(message, name="hidden_states")
    half = encode(hidden(), WireCompression.FLOAT16)
    half.data = half.data[:-2]
    with pytest.raises(WireError, match="bytes do not match"):
        decode(half, name="hidden_states")
    mask = encode(torch.ones(1, 3, dtype=torch.int64))
    mask.compression = WireCompression.FLOAT16.wire
    with pytest.raises(WireError, match="cannot be compressed"):
        decode(mask, name="attention_mask")


def test_only_hidden_states_are_compressed() -> None:
    inputs = SpanInputs(hidden(), torch.ones(2, 16, dtype=torch.int64), torch.zeros(2, 16, dtype=torch.int64))
    wire = inputs_to_wire(inputs, WireCompression.BLOCKWISE8)
    assert wire.hidden_states.compression == WireCompression.BLOCKWISE8.wire
    assert wire.attention_mask.compression == wire.position_ids.compression == 0


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["float16", "blockwise8"])
def test_a_compressed_session_over_grpc_has_matching_receipts_and_close_logits(
    tiny_cluster, tiny_llama_store, mode: str
) -> None:
    """Receipts are checked against the digests of the bytes the client sent and received, so a
    session that completes shows both sides digested the compressed messages."""
    from fincluster.client import DistributedModelForCausalLM
    from tests.helpers import tiny_model

    reference = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    with tiny_cluster.swarm() as swarm:
        model = DistributedModelForCausalLM.from_pretrained(
            tiny_llama_store, swarm=swarm, classification="public", compression=mode
        )
        with torch.no_grad(), model.inference_session(max_length=10):
            stepped = torch.cat(
                [model(ids[:, :6]).logits, *(model(ids[:, t : t + 1]).logits for t in range(6, 10))], 1
            )
        records = [event for event in swarm.audit.events if type(event).__name__ == "TransferEvent"]
    expected = reference(ids).logits
    assert 0 < (stepped - expected).abs().max().item() < 0.05  # compressed: close, but not exact
    assert len(records) == 5 * 3  # 5 steps over 3 servers, each receipt checked


def test_an_unknown_compression_is_a_configuration_error(tiny_llama_store) -> None:
    from fincluster.client import DistributedModelForCausalLM, LocalSwarm

    with pytest.raises(ConfigurationError, match="unknown compression 'zip'"):
        DistributedModelForCausalLM.from_pretrained(tiny_llama_store, swarm=LocalSwarm([]), compression="zip")


def test_in_process_spans_apply_the_sessions_compression_both_ways(tiny_llama_store) -> None:
    from fincluster.client import DistributedModelForCausalLM, LocalSwarm
    from fincluster.serving.local import LocalSpanClient
    from fincluster.spans import BlockSpan

    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(4))
    logits = {}
    for mode in ("none", "bfloat16"):
        clients = [
            LocalSpanClient.from_store(tiny_llama_store, BlockSpan.parse(s), dtype=torch.float32, node_id=s)
            for s in ("0:3", "3:6")
        ]
        model = DistributedModelForCausalLM.from_pretrained(
            tiny_llama_store, swarm=LocalSwarm(clients), classification="public", compression=mode
        )
        assert model.compression == mode
        with torch.no_grad(), model.inference_session(max_length=8):
            logits[mode] = torch.cat(
                [model(ids[:, :4]).logits, *(model(ids[:, t : t + 1]).logits for t in range(4, 8))], 1
            )
        assert [client.compression for client in clients] == [mode, mode]
    difference = (logits["bfloat16"] - logits["none"]).abs().max().item()
    assert 0 < difference < 0.05
