"""Bounded waiting for asynchronous conditions in tests (no unbounded sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(predicate: Callable[[], object], within: float = 5.0) -> None:
    """Return once predicate() is truthy; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    for _ in range(int(within / 0.01) + 1):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    raise AssertionError(f"condition not met within {within}s: {predicate}")
