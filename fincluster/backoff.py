"""Retry delays that grow exponentially, with jitter, up to a cap: for anything that retries a peer.

Many nodes retrying a recovering peer in lockstep would hit it together; each delay is drawn from the
upper half of the current step (``step/2 .. step``), so retries spread out but never come quicker than
half the step. Randomness is injectable so tests are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fincluster.errors import ConfigurationError


class Backoff:
    """``next_delay()`` gives ``initial``, ``2·initial``, ``4·initial`` … (each jittered), capped at
    ``maximum``; ``reset()`` after a success starts again from ``initial``."""

    def __init__(
        self,
        *,
        initial: float = 0.5,
        maximum: float = 30.0,
        factor: float = 2.0,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if not 0 < initial <= maximum or factor < 1:
            raise ConfigurationError("backoff needs 0 < initial <= maximum and factor >= 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._uniform = uniform
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt, after one more failure."""
        step = min(self.maximum, self.initial * self.factor**self.failures)
        self.failures = min(self.failures + 1, 64)  # the step is long capped by then; no overflow
        return self._uniform(step / 2, step)

    def reset(self) -> None:
        self.failures = 0
