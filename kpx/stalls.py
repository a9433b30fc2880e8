"""Where kpx's one event loop stalls, as metrics: garbage-collector pauses and loop lag.

Every proxied byte waits for the loop, so anything that holds it (a collection walking the heap,
a table recompute, a blocking call) lands in the small-request p99 (issue 12). Two views:
- `kpx_gc_pause_seconds{generation}`: each cyclic-GC run, timed by `gc.callbacks`. The data path
  makes no cyclic garbage (tests/kpx/test_proxy_gc.py), so these are the control path's. kpx
  freezes its heap after the first sync (`gc.freeze`: a full collection at 10,000 Services then
  walks about 65 objects instead of 386,000, bench/gc_heap.py); the stores' objects replaced by
  later watch events are not frozen, so a full collection that still takes `REFREEZE_AFTER` or
  more calls `on_slow_full`, which freezes what it left alive (none of it garbage: the
  collection just ran), and the next full collection walks only what changed since.
- `kpx_event_loop_lag_seconds`: a timer asks to run every `LAG_INTERVAL` s; how late it runs is
  how long the loop was held then. A sampler: a stall shorter than the interval is seen only
  when a tick falls due during it (in proportion to its length), a longer one always.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Histogram

# Seconds between two lag samples: ten wake-ups a second, nothing next to the data path's.
LAG_INTERVAL = 0.1
# A full collection this long or longer freezes its survivors (see above).
REFREEZE_AFTER = 0.005
STALL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

GC_PAUSE = Histogram(
    "kpx_gc_pause_seconds",
    "Cyclic garbage collector runs and how long each held the loop",
    ["generation"],
    buckets=STALL_BUCKETS,
)
LOOP_LAG = Histogram(
    "kpx_event_loop_lag_seconds",
    "How late a timer due every 0.1 s ran: how long the event loop was held",
    buckets=STALL_BUCKETS,
)


class GcPauses:
    """Times every collection while installed (a `gc.callbacks` entry); calls `on_slow_full`
    (from whichever thread collected) after a full collection of `refreeze_after` s or more."""

    def __init__(
        self,
        on_slow_full: Callable[[], object] | None = None,
        refreeze_after: float = REFREEZE_AFTER,
    ) -> None:
        self._started = 0.0
        self._children = [GC_PAUSE.labels(str(g)) for g in range(3)]
        self._on_slow_full = on_slow_full
        self._refreeze_after = refreeze_after

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self._children[generation].observe(pause)
        if generation == 2 and pause >= self._refreeze_after and self._on_slow_full is not None:
            self._on_slow_full()

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class LoopLag:
    """Samples the loop's lag every `interval` seconds into `kpx_event_loop_lag_seconds`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = LAG_INTERVAL) -> None:
        self._loop = loop
        self._interval = interval
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._timer is None:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        # The clock is read directly: uvloop's `loop.time()` is cached per loop iteration in
        # whole milliseconds (so is its timer resolution: lags under ~1 ms read as noise).
        self._due = time.monotonic() + self._interval
        self._timer = self._loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        LOOP_LAG.observe(max(0.0, time.monotonic() - self._due))
        self._schedule()
