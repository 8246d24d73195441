"""Tensors on the wire: raw little-endian bytes + shape + dtype, validated before use.

Decoding never trusts the sender: the dtype must be known, the shape non-negative, and the byte
length must equal ``prod(shape) * itemsize``. Callers then check rank and sizes against what they expect.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from google.protobuf.message import Message

from fincluster.errors import WireError
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire.compression import WireCompression, compress, decompress

_TO_WIRE: dict[torch.dtype, pb.DType.ValueType] = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64,
}
_FROM_WIRE: dict[pb.DType.ValueType, torch.dtype] = {wire: dtype for dtype, wire in _TO_WIRE.items()}
# bfloat16 has no numpy counterpart; it travels as its 16-bit pattern.
_STORAGE_VIEW: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}


def wire_dtype(dtype: torch.dtype) -> pb.DType.ValueType:
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot be sent") from None


def dtype_name(wire: pb.DType.ValueType) -> str:
    return pb.DType.Name(wire)


def encode(
    tensor: torch.Tensor,
    compression: WireCompression = WireCompression.NONE,
    *,
    into: pb.Tensor | None = None,
) -> pb.Tensor:
    """Serialise a CPU or GPU tensor (moved to CPU, made contiguous), compressed as asked
    (floating-point tensors only; ``fincluster.wire.compression``). ``into``: the message field to
    fill in place (a request's or response's own field), which saves copying a large payload into it
    afterwards; returned."""
    dtype = wire_dtype(tensor.dtype)
    message = into if into is not None else pb.Tensor()
    del message.shape[:]
    message.shape.extend(tensor.shape)
    message.dtype = dtype
    if compression is not WireCompression.NONE and tensor.is_floating_point():
        compress(tensor, compression, message)
        return message
    tensor = tensor.detach().to("cpu").contiguous()
    message.data = tensor.view(_STORAGE_VIEW.get(tensor.dtype, tensor.dtype)).numpy().tobytes()
    message.compression = pb.COMPRESSION_NONE
    return message


def decode(message: pb.Tensor, *, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Deserialise ``message`` (raw or compressed); ``name`` labels the field in error messages.
    ``device``: where the tensor is wanted (default: host memory); a raw payload is then copied there
    straight from the message's bytes."""
    dtype = _FROM_WIRE.get(message.dtype)
    if dtype is None:
        raise WireError(f"{name}: unknown or missing dtype {message.dtype}")
    shape = tuple(int(dim) for dim in message.shape)
    if any(dim < 0 for dim in shape):
        raise WireError(f"{name}: negative dimension in shape {shape}")
    if message.compression != pb.COMPRESSION_NONE:
        if not dtype.is_floating_point:
            raise WireError(f"{name}: {dtype_name(message.dtype)} cannot be compressed")
        tensor = decompress(message, dtype, shape, name=name)
        return tensor if device is None else tensor.to(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    data = message.data  # each read of a bytes field copies it: read once
    if len(data) != expected:
        raise WireError(
            f"{name}: {len(data)} bytes do not match shape {shape} of {dtype_name(message.dtype)} "
            f"({expected} bytes expected)"
        )
    storage = _STORAGE_VIEW.get(dtype, dtype)
    if not expected:
        flat = torch.empty(0, dtype=storage)
    elif device is not None and torch.device(device).type != "cpu":
        with warnings.catch_warnings():  # read-only view of ``data``, only read by the copy to ``device``
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=storage).to(device)
    else:
        flat = torch.frombuffer(bytearray(data), dtype=storage)
    return flat.view(dtype).reshape(shape)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor``; on host memory a test of the exponent bits, several times
    faster than ``torch.isfinite`` for half precision there."""
    bits = _EXPONENT_BITS.get(tensor.dtype)
    if bits is None or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    view, mask = bits
    return not bool(((tensor.view(view) & mask) == mask).any())


_EXPONENT_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
}


def expect(
    tensor: torch.Tensor, *, name: str, dtype: torch.dtype, rank: int, sizes: Sequence[int | None] = ()
) -> torch.Tensor:
    """Check dtype, rank and the given sizes (``None`` = any); raise WireError naming the field."""
    if tensor.dtype != dtype:
        raise WireError(f"{name}: dtype {tensor.dtype} received, {dtype} expected")
    if tensor.dim() != rank:
        raise WireError(
            f"{name}: rank {tensor.dim()} (shape {tuple(tensor.shape)}) received, rank {rank} expected"
        )
    for axis, size in enumerate(sizes):
        if size is not None and tensor.shape[axis] != size:
            raise WireError(f"{name}: size {tensor.shape[axis]} on axis {axis} received, {size} expected")
    return tensor


def digest(message: Message) -> str:
    """SHA-256 of a wire message's deterministic bytes: what both sides record, sign and compare."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


OVERLAP_BYTES = 256 * 1024
"""Messages at least this large are digested on a helper thread (hashlib releases the GIL), so the
hash overlaps the network wait or the computation instead of adding to them."""
_DIGESTER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="digest")


def digest_soon(message: Message, *, payload_bytes: int) -> Callable[[], str]:
    """:func:`digest` of ``message``, started now; call the result for the hex digest. Small messages
    are digested at once (a thread hand-off would cost more than the hash). ``payload_bytes``: the
    size of the tensors it carries (:func:`payload_size`; asking protobuf for the message's size
    would serialise it once more)."""
    if payload_bytes < OVERLAP_BYTES:
        value = digest(message)
        return lambda: value
    future = _DIGESTER.submit(digest, message)
    return future.result


def payload_size(*tensors: pb.Tensor) -> int:
    """Bytes the tensors' payloads take at most, from their shapes and dtypes alone (reading ``data``
    would copy it)."""
    return sum(math.prod(message.shape) * _ITEM_SIZE.get(message.dtype, 8) for message in tensors)


_ITEM_SIZE: dict[pb.DType.ValueType, int] = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.INT64: 8}
