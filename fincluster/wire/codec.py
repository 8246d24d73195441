"""What one pass over a span carries, and its wire form in both directions (client and server).

``SpanInputs`` is the one noun for a hop's inputs (with its deep prompts, :class:`BlockPrefixes`, when
a pass carries them); :func:`inputs_to_wire` / :func:`inputs_from_wire` are the two halves of its codec,
and :func:`span_to_wire` / :func:`span_from_wire` those of a
:class:`~fincluster.spans.BlockSpan`. Decoding only checks what the bytes say (dtype, shape, length);
the server checks sizes and values against its span before running it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import ValidationError

from fincluster.errors import OutOfRangeError
from fincluster.spans import BlockSpan
from fincluster.wire import fincluster_pb2 as pb
from fincluster.wire.compression import WireCompression
from fincluster.wire.tensors import decode, digest, encode


@dataclass(frozen=True)
class BlockPrefixes:
    """Deep prompts of a run of blocks: keys and values every attention layer attends to ahead of the
    tokens (peft's prefix tuning). keys, values: [blocks, batch, kv_heads, prefix, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        """Prefix positions every block's cache holds ahead of the tokens."""
        return int(self.keys.shape[3])

    def blocks(self, start: int, end: int) -> BlockPrefixes:
        """The prefixes of blocks ``start:end`` (indices into this run, not model block numbers)."""
        return BlockPrefixes(self.keys[start:end], self.values[start:end])

    def to(self, device: torch.device | str) -> BlockPrefixes:
        return BlockPrefixes(self.keys.to(device), self.values.to(device))


@dataclass(frozen=True)
class SpanInputs:
    """One pass over a span.

    hidden_states: [batch, seq, hidden]; attention_mask: int64 [batch, past + seq] (1 = attend,
    0 = padding) over the tokens only; position_ids: int64 [batch, seq] of the new tokens; prefixes:
    the span's deep prompts, when the pass has them (a session's first step only).
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prefixes: BlockPrefixes | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens of this pass (batch times new positions): what audit records count."""
        return int(self.hidden_states.shape[0] * self.hidden_states.shape[1])

    def to(self, device: torch.device | str) -> SpanInputs:
        return SpanInputs(
            self.hidden_states.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.prefixes.to(device) if self.prefixes is not None else None,
        )


@dataclass(frozen=True)
class SpanGradients:
    """What a backward returns: the gradient w.r.t. the input hidden states and, for a pass with deep
    prompts, w.r.t. its prefixes (same shapes as sent)."""

    inputs: torch.Tensor
    prefixes: BlockPrefixes | None = None


def span_to_wire(span: BlockSpan) -> pb.BlockSpan:
    return pb.BlockSpan(start=span.start, end=span.end)


def span_from_wire(message: pb.BlockSpan) -> BlockSpan:
    try:
        return BlockSpan(message.start, message.end)
    except ValidationError:
        raise OutOfRangeError(f"invalid block span {message.start}:{message.end}") from None


def prefixes_to_wire(prefixes: BlockPrefixes, *, into: pb.BlockPrefixes | None = None) -> pb.BlockPrefixes:
    message = into if into is not None else pb.BlockPrefixes()
    encode(prefixes.keys, into=message.keys)
    encode(prefixes.values, into=message.values)
    return message


def prefixes_from_wire(
    message: pb.BlockPrefixes, *, name: str = "prefixes", device: torch.device | str | None = None
) -> BlockPrefixes:
    return BlockPrefixes(
        keys=decode(message.keys, name=f"{name}.keys", device=device),
        values=decode(message.values, name=f"{name}.values", device=device),
    )


def inputs_to_wire(
    inputs: SpanInputs,
    compression: WireCompression = WireCompression.NONE,
    *,
    into: pb.SpanInputs | None = None,
) -> pb.SpanInputs:
    """``compression`` applies to the hidden states (mask, positions and deep prompts travel raw).
    ``into``: the request's own field to fill in place (no copy of the activations afterwards)."""
    message = into if into is not None else pb.SpanInputs()
    encode(inputs.hidden_states, compression, into=message.hidden_states)
    encode(inputs.attention_mask, into=message.attention_mask)
    encode(inputs.position_ids, into=message.position_ids)
    if inputs.prefixes is not None:
        prefixes_to_wire(inputs.prefixes, into=message.prefixes)
    return message


def inputs_from_wire(message: pb.SpanInputs, *, device: torch.device | str | None = None) -> SpanInputs:
    """``device``: where the tensors are wanted (default: host memory), copied there from the bytes."""
    return SpanInputs(
        hidden_states=decode(message.hidden_states, name="hidden_states", device=device),
        attention_mask=decode(message.attention_mask, name="attention_mask", device=device),
        position_ids=decode(message.position_ids, name="position_ids", device=device),
        prefixes=prefixes_from_wire(message.prefixes, device=device)
        if message.HasField("prefixes")
        else None,
    )


def backward_input_digest(inputs: pb.SpanInputs, grad_outputs: pb.Tensor) -> str:
    """What a backward's receipt and audit records name as its input: the activations (and deep
    prompts) and the incoming gradient, i.e. the BackwardRequest holding only those two fields."""
    request = pb.BackwardRequest()  # filled by CopyFrom: a keyword argument copies far slower (upb)
    request.inputs.CopyFrom(inputs)
    request.grad_outputs.CopyFrom(grad_outputs)
    return digest(request)


def backward_output_digest(grad_inputs: pb.Tensor, grad_prefixes: pb.BlockPrefixes | None) -> str:
    """What a backward's receipt names as its output: the BackwardResponse without its receipt."""
    response = pb.BackwardResponse()
    response.grad_inputs.CopyFrom(grad_inputs)
    if grad_prefixes is not None:
        response.grad_prefixes.CopyFrom(grad_prefixes)
    return digest(response)


def wire_tokens(message: pb.SpanInputs) -> int:
    """Tokens of a pass from its wire form's shape (without decoding the tensors)."""
    shape = list(message.hidden_states.shape)
    return int(shape[0] * shape[1]) if len(shape) == 3 else 0
