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
from fincluster.wire.tensors import decode, digest, encode, expect

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
    from fincluster.wire.tensors import OVERLAP_BYTES, digest, digest_soon, encode

    small = encode(torch.ones(4))
    large = encode(torch.arange(OVERLAP_BYTES // 4 + 1, dtype=torch.float32))
    assert digest_soon(small)() == digest(small)
    assert (
        digest_soon(large)()
        == digest(large)
        == hashlib.sha256(large.SerializeToString(deterministic=True)).hexdigest()
    )
