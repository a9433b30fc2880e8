"""Exponential backoff with jitter, as client-go's reflector uses between failed attempts."""

from __future__ import annotations

import random


class Backoff:
    def __init__(
        self, initial: float = 0.8, maximum: float = 30.0, factor: float = 2.0, jitter: float = 1.0
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._current = 0.0

    def next(self) -> float:
        """The delay before the next attempt; grows on each call until reset()."""
        base = (
            self.initial if self._current == 0 else min(self._current * self.factor, self.maximum)
        )
        self._current = base
        # Jitter spreads the reconnects of thousands of nodes after an API server restart.
        return min(base * (1 + random.random() * self.jitter), self.maximum * (1 + self.jitter))

    def reset(self) -> None:
        self._current = 0.0

    @property
    def failing(self) -> bool:
        return self._current != 0.0
