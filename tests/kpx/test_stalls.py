"""kpx/stalls.py: collector pauses and event-loop lag land in their histograms."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client import REGISTRY

from kpx.stalls import GcPauses, LoopLag
from tests.kpx.conftest import Runner


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_every_collection_is_timed_by_generation() -> None:
    pauses = GcPauses()
    before = sample("kpx_gc_pause_seconds_count", {"generation": "2"})
    pauses.install()
    try:
        gc.collect()
        gc.collect()
    finally:
        pauses.uninstall()
    assert sample("kpx_gc_pause_seconds_count", {"generation": "2"}) == before + 2
    gc.collect()  # uninstalled: no longer counted
    assert sample("kpx_gc_pause_seconds_count", {"generation": "2"}) == before + 2


def test_a_blocked_loop_shows_as_lag(run: Runner[None]) -> None:
    async def scenario() -> None:
        total = sample("kpx_event_loop_lag_seconds_count")
        over_100ms = total - sample("kpx_event_loop_lag_seconds_bucket", {"le": "0.1"})
        lag = LoopLag(asyncio.get_running_loop(), interval=0.02)
        lag.start()
        try:
            await asyncio.sleep(0.1)  # a few ticks of a free loop
            time.sleep(0.3)  # noqa: ASYNC251  (the stall under test: the loop held 300 ms)
            await asyncio.sleep(0.1)
        finally:
            lag.stop()
        count = sample("kpx_event_loop_lag_seconds_count")
        late = count - sample("kpx_event_loop_lag_seconds_bucket", {"le": "0.1"})
        assert count - total >= 4
        assert late - over_100ms >= 1  # the tick due during the 300 ms hold

    run(scenario())


def test_a_slow_full_collection_asks_for_its_survivors_to_be_frozen() -> None:
    calls: list[int] = []
    pauses = GcPauses(on_slow_full=lambda: calls.append(1), refreeze_after=0.0)
    pauses.install()
    try:
        gc.collect(0)
        assert calls == []  # a young collection is no reason
        gc.collect()
        assert calls == [1]
    finally:
        pauses.uninstall()


def test_a_quick_full_collection_leaves_the_heap_alone() -> None:
    calls: list[int] = []
    pauses = GcPauses(on_slow_full=lambda: calls.append(1), refreeze_after=60.0)
    pauses.install()
    try:
        gc.collect()
    finally:
        pauses.uninstall()
    assert calls == []
