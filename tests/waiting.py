"""Bounded waiting for conditions in tests, async and sync (no unbounded sleeps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


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


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `check()` from sync code until it returns something truthy or `timeout` passes;
    returns its last value, for the caller to assert on."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
