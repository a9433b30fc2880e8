"""Which Services changed since they were last applied, and the loop that applies them.

Both daemons turn the same two stores into something they serve (dnsd: the zone's answers;
kpx: a service table per protocol), one Service at a time, and both follow kube-proxy's
pkg/proxy split: change trackers (servicechangetracker.go, endpointschangetracker.go) only
record *what* changed; one sync, run by a rate-limited runner (BoundedFrequencyRunner), turns
it into the served state. Here:

- `ChangeTracker` subscribes to the Service and EndpointSlice stores and keeps the dirty set
  of Service keys (an EndpointSlice names its Service in the `kubernetes.io/service-name`
  label; a slice moving between Services dirties both), and each key's
  `endpoints.kubernetes.io/last-change-trigger-time` annotations, the start of the network
  programming latency (kube-proxy's NetworkProgrammingLatency; deletions carry the time of the
  last update, not of the deletion, so they are ignored, as kube-proxy does).
- A key is forgotten only once the caller says it was applied (`applied`): an exception
  half-way through a batch leaves that key and the rest for the next one, and `failed()` makes
  the next batch `full` (what reached the served state is unknown: rewrite it all).
- `SyncLoop` is the batched sync loop: woken by the tracker, at most once per `min_period`,
  coming straight back (after a yield to the event loop) while a chunked sync says more is left.

Store callbacks only note keys and wake the loop (kwatch.store asks subscribers to stay cheap).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from kwatch.models import EndpointSlice
from kwatch.store import EventType, Store, StoreEvent

log = structlog.get_logger("kwatch.changes")

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def parse_trigger_time(value: str | None) -> float | None:
    """`endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339) as epoch seconds."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def trigger_time(eps: EndpointSlice) -> float | None:
    """The EndpointSlice controller's last-change-trigger-time of `eps`, None without one."""
    return parse_trigger_time(eps.metadata.annotations.get(TRIGGER_TIME_ANNOTATION))


def service_keys(event: StoreEvent[EndpointSlice]) -> set[str]:
    """The Services ("namespace/name") an EndpointSlice event touches: the new and the old
    object's owner (a slice relabelled to another Service changes both)."""
    keys = set()
    for eps in (event.obj, event.old):
        if eps is not None and eps.service_name:
            keys.add(f"{eps.metadata.namespace}/{eps.service_name}")
    return keys


@dataclass(frozen=True, slots=True)
class Batch:
    """Keys to apply now. `full`: everything was marked (the first batch, a topology change)
    or the previous batch failed: whatever is downstream is rewritten in full."""

    keys: list[str]
    full: bool


class ChangeTracker:
    """The dirty Service keys and their trigger times, kept from the stores."""

    def __init__(
        self,
        services: Store[Any],
        slices: Store[Any],
        *,
        everything: Callable[[], Iterable[str]] | None = None,
        since: float | None = None,
    ) -> None:
        # The keys a full batch takes: the Services' by default; a caller also holding state
        # for Services no longer in the store (their deletion not yet applied) adds those.
        self._everything = everything or services.keys
        # Trigger times at or before `since` are history (changes from before this process
        # started, replayed by the initial list): not measured.
        self._since = since
        self._dirty: set[str] = set()
        self._all = True  # the first batch takes everything
        self._full = True
        self._triggers: dict[str, list[float]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        services.subscribe(self._on_service)
        slices.subscribe(self._on_slice)

    # --- recording (store callbacks: cheap) -------------------------------------------------

    def listen(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a key is marked (before the loop is woken)."""
        self._listeners.append(callback)

    def mark(self, key: str) -> None:
        self._dirty.add(key)
        self._changed()

    def mark_all(self) -> None:
        """Every key is applied again in the next batch (e.g. this node's zone changed)."""
        self._all = True
        self._full = True
        self._changed()

    def failed(self) -> None:
        """Applying went wrong somewhere downstream: the next batch is `full`. Its keys were
        never forgotten (only `applied` forgets)."""
        self._full = True
        self.wake()

    def _changed(self) -> None:
        for callback in self._listeners:
            callback()
        self._wake.set()

    def _on_service(self, event: StoreEvent[Any]) -> None:
        self.mark(event.key)

    def _on_slice(self, event: StoreEvent[Any]) -> None:
        keys = service_keys(event)
        if event.type is not EventType.DELETED and keys:
            when = trigger_time(event.obj)
            if when is not None and (self._since is None or when > self._since):
                for key in keys:
                    self._triggers.setdefault(key, []).append(when)
        for key in keys:
            self._dirty.add(key)
        self._changed()

    # --- applying -----------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return self._all or bool(self._dirty)

    def take(self, limit: int | None = None) -> Batch:
        """The next keys to apply (sorted; at most `limit`). They stay dirty until `applied`."""
        full, self._full = self._full, False
        if self._all:
            self._dirty.update(self._everything())
            self._all = False
        if limit is None or len(self._dirty) <= limit:
            keys = sorted(self._dirty)
        else:
            keys = heapq.nsmallest(limit, self._dirty)
        return Batch(keys, full)

    def applied(self, key: str) -> list[float]:
        """`key` is applied as the stores are now: forget it; returns its trigger times."""
        self._dirty.discard(key)
        return self._triggers.pop(key, [])

    # --- waking the loop ----------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    @property
    def woken(self) -> bool:
        return self._wake.is_set()

    async def wait(self) -> None:
        """Until woken (the wake-up stays set until `clear_wake`)."""
        await self._wake.wait()

    def clear_wake(self) -> None:
        self._wake.clear()


class SyncLoop:
    """Runs `sync` whenever the tracker wakes it, at most once per `min_period` seconds (a
    burst of events costs one sync). `sync` returns True when it left work for the next call
    (a chunked batch): it is called again right after a yield to the event loop.

    `ready`: no sync before it is true (every store listed). `retry_after`: an exception is
    logged and the sync retried after that many seconds; None: it propagates (the supervisor
    restarts the task). `on_idle`: called after a sync that left nothing to do."""

    def __init__(
        self,
        changes: ChangeTracker,
        sync: Callable[[], Awaitable[bool]],
        *,
        name: str,
        min_period: float = 0.0,
        ready: Callable[[], bool] | None = None,
        retry_after: float | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.changes = changes
        self.sync = sync
        self.name = name
        self.min_period = min_period
        self.ready = ready
        self.retry_after = retry_after
        self.on_idle = on_idle
        self.last_started = float("-inf")  # time.monotonic() of the last sync's start

    async def run(self) -> None:
        # Started (or restarted by the supervisor after a failure): apply whatever is noted.
        self.changes.wake()
        while True:
            await self.changes.wait()
            delay = self.last_started + self.min_period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # more changes may pile up meanwhile: coalesced
            self.changes.clear_wake()
            if self.ready is not None and not self.ready():
                continue  # woken again when a store finishes its list
            self.last_started = time.monotonic()
            try:
                more = await self.sync()
            except Exception as err:
                if self.retry_after is None:
                    raise
                log.error("sync_failed", task=self.name, problem=f"{type(err).__name__}: {err}")
                await asyncio.sleep(self.retry_after)
                self.changes.wake()
                continue
            if more:
                self.changes.wake()  # come straight back for the rest
                await asyncio.sleep(0)
            elif self.on_idle is not None:
                self.on_idle()
