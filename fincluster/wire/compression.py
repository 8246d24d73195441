"""Compressed hidden states on the wire: fp16, bf16, or 8-bit blockwise absmax codes.

A session negotiates one mode at open; both directions of its steps use it for hidden states (masks
and positions stay raw). The message keeps the tensor's logical dtype (``Tensor.dtype``); the
``compression`` field says how ``data`` encodes it, so the receiver restores that dtype and its
checks (shape, dtype, finiteness) apply as for raw tensors. Digests and receipts cover the message
as sent, i.e. the compressed bytes.

``BLOCKWISE8`` is linear absmax quantization per block of 64 consecutive values: int8 codes
``round(x / scale * 127)`` and one float32 ``scale`` (the block's largest magnitude) per block, so
8.5 bits per value, 0.53 of the bytes of fp16. It is this module's own definition, in plain torch
(runs the same on CPU and GPU), not bitsandbytes' dynamic (non-linear) 8-bit map; its accuracy is
measured in ``benchmarks/quality.py``.
"""

from __future__ import annotations

import enum
import math

import torch

from fincluster.errors import WireError
from fincluster.wire import fincluster_pb2 as pb

BLOCK_SIZE = 64


class WireCompression(enum.StrEnum):
    NONE = "none"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    BLOCKWISE8 = "blockwise8"

    @property
    def wire(self) -> pb.Compression.ValueType:
        return _TO_WIRE[self]

    @classmethod
    def of_wire(cls, value: pb.Compression.ValueType) -> WireCompression:
        for mode, wire in _TO_WIRE.items():
            if wire == value:
                return mode
        raise WireError(f"unsupported compression {value}")


_TO_WIRE = {
    WireCompression.NONE: pb.COMPRESSION_NONE,
    WireCompression.FLOAT16: pb.COMPRESSION_FLOAT16,
    WireCompression.BFLOAT16: pb.COMPRESSION_BFLOAT16,
    WireCompression.BLOCKWISE8: pb.COMPRESSION_BLOCKWISE8,
}
_CAST = {WireCompression.FLOAT16: torch.float16, WireCompression.BFLOAT16: torch.bfloat16}


def _raw(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().to("cpu").contiguous()
    view = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return bytes(view.numpy().tobytes())


def _from_raw(data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    flat = torch.frombuffer(bytearray(data), dtype=storage) if count else torch.empty(0, dtype=storage)
    return flat.view(dtype)


def compress(tensor: torch.Tensor, mode: WireCompression, message: pb.Tensor) -> None:
    """Fill ``message.data`` (and scales) with ``tensor`` in ``mode``; shape and dtype are the caller's."""
    message.compression = mode.wire
    if mode in _CAST:
        message.data = _raw(tensor.to(_CAST[mode]))
        return
    # BLOCKWISE8 — flat: [blocks, BLOCK_SIZE], zero-padded at the end
    flat = tensor.detach().reshape(-1).float()
    blocks = math.ceil(flat.numel() / BLOCK_SIZE)
    padded = torch.nn.functional.pad(flat, (0, blocks * BLOCK_SIZE - flat.numel())).view(blocks, BLOCK_SIZE)
    scales = padded.abs().amax(dim=1, keepdim=True)
    codes = torch.round(padded / scales.clamp(min=torch.finfo(torch.float32).tiny) * 127).to(torch.int8)
    message.data = _raw(codes.reshape(-1)[: flat.numel()])
    message.scales = _raw(scales.reshape(-1))
    message.block_size = BLOCK_SIZE


def decompress(message: pb.Tensor, dtype: torch.dtype, shape: tuple[int, ...], *, name: str) -> torch.Tensor:
    """The tensor ``message`` encodes (``dtype`` and ``shape`` already validated from it)."""
    count = math.prod(shape)
    mode = WireCompression.of_wire(message.compression)
    if mode in _CAST:
        itemsize = 2
        if len(message.data) != count * itemsize:
            raise WireError(f"{name}: {len(message.data)} bytes do not match shape {shape} in {mode.value}")
        return _from_raw(message.data, _CAST[mode], count).to(dtype).reshape(shape)
    if mode is not WireCompression.BLOCKWISE8 or message.block_size != BLOCK_SIZE:
        raise WireError(f"{name}: blockwise codes need block_size {BLOCK_SIZE}, not {message.block_size}")
    blocks = math.ceil(count / BLOCK_SIZE)
    if len(message.data) != count or len(message.scales) != 4 * blocks:
        raise WireError(
            f"{name}: {len(message.data)} codes / {len(message.scales)} scale bytes do not match {shape}"
        )
    codes = _from_raw(message.data, torch.int8, count).float()
    codes = torch.nn.functional.pad(codes, (0, blocks * BLOCK_SIZE - count)).view(blocks, BLOCK_SIZE)
    scales = _from_raw(message.scales, torch.float32, blocks).view(blocks, 1)
    values = (codes * (scales / 127)).reshape(-1)[:count]
    return values.to(dtype).reshape(shape)
