"""Tensors on the wire, and generated protobuf code kept in step with the .proto."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fincluster.errors import WireError
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire.codec import SpanInputs, inputs_from_wire, inputs_to_wire
from fincluster.wire.tensors import all_finite, decode, digest, encode, expect

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    tensor = (torch.randn(2, 3, 5) * 100).to(dtype)
    decoded = decode(encode(tensor), name="t")
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_non_contiguous_and_empty_tensors() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(decode(encode(tensor), name="t"), tensor)
    assert decode(encode(torch.empty(0, 4)), name="t").shape == (0, 4)


def test_unknown_dtype_and_bad_lengths_are_refused() -> None:
    message = encode(torch.ones(2, 2))
    message.dtype = pb.DTYPE_UNSPECIFIED
    with pytest.raises(WireError, match="unknown or missing dtype"):
        decode(message, name="x")
    message = encode(torch.ones(2, 2))
    message.shape[:] = [2, 3]
    with pytest.raises(
        WireError, match=r"x: 16 bytes do not match shape \(2, 3\) of FLOAT32 \(24 bytes expected\)"
    ):
        decode(message, name="x")
    message.shape[:] = [-1, 4]
    with pytest.raises(WireError, match="negative dimension"):
        decode(message, name="x")


def test_expect_names_the_field_and_axis() -> None:
    with pytest.raises(WireError, match="h: size 3 on axis 1 received, 4 expected"):
        expect(torch.ones(2, 3), name="h", dtype=torch.float32, rank=2, sizes=(None, 4))


def test_digest_matches_the_known_answer_vector() -> None:
    vector = json.loads((ROOT / "tests" / "vectors" / "wire" / "tensor_digest.json").read_text())
    message = encode(torch.arange(4, dtype=torch.int64))
    assert message.SerializeToString(deterministic=True).hex() == vector["message_hex"]
    assert digest(message) == vector["sha256"]
    assert digest(message) != digest(encode(torch.arange(5, dtype=torch.int64)))


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen_proto"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    for name in ("fincluster_pb2.py", "fincluster_pb2_grpc.py", "fincluster_pb2.pyi"):
        generated = tmp_path / "fincluster" / "wire" / name
        assert filecmp.cmp(generated, ROOT / "fincluster" / "wire" / name, shallow=False), f"{name} is stale"


def test_digest_soon_gives_the_digest_of_small_and_large_messages() -> None:
    from fincluster.wire.tensors import OVERLAP_BYTES, digest, digest_soon, encode, payload_size

    small = encode(torch.ones(4))
    large = encode(torch.arange(OVERLAP_BYTES // 4 + 1, dtype=torch.float32))
    assert payload_size(small) == 16 and payload_size(large) == OVERLAP_BYTES + 4 < large.ByteSize()
    assert payload_size(small, large, encode(torch.ones(2, 3).bfloat16())) == 16 + OVERLAP_BYTES + 4 + 12
    assert digest_soon(small, payload_bytes=payload_size(small))() == digest(small)
    assert (
        digest_soon(large, payload_bytes=payload_size(large))()
        == digest(large)
        == hashlib.sha256(large.SerializeToString(deterministic=True)).hexdigest()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_finiteness_check_agrees_with_torch_isfinite_on_every_special_value(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    ordinary = torch.tensor([0.0, -0.0, 1.5, -2.25, info.max, -info.max, info.tiny, info.tiny / 4])
    assert all_finite(ordinary.to(dtype))  # largest finite, subnormals and signed zeros pass
    for special in (float("nan"), float("inf"), float("-inf"), -float("nan")):
        tensor = torch.cat([ordinary, torch.tensor([special])]).to(dtype).reshape(3, 3)
        assert not all_finite(tensor), special
        assert all_finite(tensor) == bool(torch.isfinite(tensor).all())


def test_a_payload_encoded_in_place_is_byte_identical_to_one_encoded_apart() -> None:
    hidden = torch.randn(2, 5, 8).to(torch.bfloat16)
    inputs = SpanInputs(hidden, torch.ones(2, 5, dtype=torch.int64), torch.arange(5).repeat(2, 1))
    request = pb.ForwardRequest(session_id="s")
    inputs_to_wire(inputs, into=request.inputs)
    assert request.inputs.SerializeToString(deterministic=True) == inputs_to_wire(inputs).SerializeToString(
        deterministic=True
    )
    assert digest(request.inputs) == digest(inputs_to_wire(inputs))  # what receipts name is unchanged
    again = inputs_from_wire(request.inputs)
    assert torch.equal(again.hidden_states, hidden) and again.hidden_states.dtype == torch.bfloat16
    reused = encode(torch.zeros(3), into=encode(torch.ones(4, 4)))  # a filled field is overwritten whole
    assert list(reused.shape) == [3] and torch.equal(decode(reused, name="x"), torch.zeros(3))
