"""What one pass over a span carries, and its wire form in both directions (client and server).

``SpanInputs`` is the one noun for a hop's inputs; :func:`inputs_to_wire` / :func:`inputs_from_wire`
are the two halves of its codec, and :func:`span_to_wire` / :func:`span_from_wire` those of a
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
from fincluster.wire.tensors import decode, encode


@dataclass(frozen=True)
class SpanInputs:
    """One pass over a span.

    hidden_states: [batch, seq, hidden]; attention_mask: int64 [batch, past + seq] (1 = attend,
    0 = padding); position_ids: int64 [batch, seq] of the new tokens.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Tokens of this pass (batch times new positions): what audit records count."""
        return int(self.hidden_states.shape[0] * self.hidden_states.shape[1])

    def to(self, device: torch.device | str) -> SpanInputs:
        return SpanInputs(
            self.hidden_states.to(device), self.attention_mask.to(device), self.position_ids.to(device)
        )


def span_to_wire(span: BlockSpan) -> pb.BlockSpan:
    return pb.BlockSpan(start=span.start, end=span.end)


def span_from_wire(message: pb.BlockSpan) -> BlockSpan:
    try:
        return BlockSpan(message.start, message.end)
    except ValidationError:
        raise OutOfRangeError(f"invalid block span {message.start}:{message.end}") from None


def inputs_to_wire(inputs: SpanInputs, compression: WireCompression = WireCompression.NONE) -> pb.SpanInputs:
    """``compression`` applies to the hidden states (mask and positions travel raw)."""
    return pb.SpanInputs(
        hidden_states=encode(inputs.hidden_states, compression),
        attention_mask=encode(inputs.attention_mask),
        position_ids=encode(inputs.position_ids),
    )


def inputs_from_wire(message: pb.SpanInputs) -> SpanInputs:
    return SpanInputs(
        hidden_states=decode(message.hidden_states, name="hidden_states"),
        attention_mask=decode(message.attention_mask, name="attention_mask"),
        position_ids=decode(message.position_ids, name="position_ids"),
    )


def wire_tokens(message: pb.SpanInputs) -> int:
    """Tokens of a pass from its wire form's shape (without decoding the tensors)."""
    shape = list(message.hidden_states.shape)
    return int(shape[0] * shape[1]) if len(shape) == 3 else 0
