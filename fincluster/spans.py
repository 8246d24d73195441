"""The one block span: a half-open, non-empty range of transformer blocks ``[start, end)``.

The same value travels through routing, serving, policy input documents and audit records (its JSON
form is ``{"start": s, "end": e}``); ``fincluster.wire.codec`` converts it to and from the wire.
"""

from __future__ import annotations

from pydantic import BaseModel, NonNegativeInt, PositiveInt, model_validator

from fincluster.errors import ConfigurationError
from fincluster.values import FrozenModel


class BlockSpan(FrozenModel):
    """Blocks ``start <= block < end``; ``BlockSpan(0, 10)`` or ``BlockSpan.parse("0:10")``."""

    start: NonNegativeInt
    end: PositiveInt

    def __init__(self, start: int, end: int) -> None:
        BaseModel.__init__(self, start=start, end=end)

    @model_validator(mode="after")
    def _not_empty(self) -> BlockSpan:
        if self.end <= self.start:
            raise ValueError(f"block span {self.start}:{self.end} is empty")
        return self

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @property
    def blocks(self) -> range:
        """The block indexes, ``start .. end - 1``."""
        return range(self.start, self.end)

    def contains(self, other: BlockSpan) -> bool:
        return self.start <= other.start and other.end <= self.end

    def overlaps(self, other: BlockSpan) -> bool:
        return self.start < other.end and other.start < self.end

    @classmethod
    def parse(cls, text: str) -> BlockSpan:
        """``"START:END"`` as given by an operator; :class:`ConfigurationError` if it is not one."""
        start, sep, end = text.strip().partition(":")
        try:
            if not sep:
                raise ValueError("missing ':'")
            return cls(int(start), int(end))
        except ValueError:
            raise ConfigurationError(
                f"block span {text!r} is not START:END with 0 <= START < END (e.g. 0:10)"
            ) from None
