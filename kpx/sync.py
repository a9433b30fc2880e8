"""One sync of a protocol's table: store changes -> table recompute -> kernel (or ports) update.

kube-proxy separates change tracking from applying and runs one sync at a time behind a
rate limiter (BoundedFrequencyRunner, minSyncPeriod). Here store events only mark Services
dirty in the table's tracker (kwatch/changes.py) and wake its `SyncLoop`; a sync runs at most
once per `min_sync_period`, so a burst of EndpointSlice writes costs one recompute of the
Services involved and at most one `nft` transaction. Nothing is programmed before every store
holds its first complete list (kpx/main.py runs the first sync once they do).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import structlog

from kpx import metrics
from kpx.backends import Backend
from kpx.health import ProxierHealth, ServiceHealthServers
from kpx.rules import Steer, SteerKey
from kpx.table import ServiceTable, SyncResult
from kwatch.changes import SyncLoop

log = structlog.get_logger("kpx.sync")

RETRY_AFTER_FAILURE = 1.0  # seconds before a failed kernel update is retried (as a full one)
# Services recomputed between two yields to the event loop: a zone-label change recomputes
# every Service, which must not stall the proxied connections for the whole table.
CHUNK = 500


class SteeringWriter(Protocol):
    """Turns the table's steering state into something clients reach (nftables or ports).
    `needs_full` set: the next `sync` rewrites everything (startup, after a failure)."""

    needs_full: bool

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool: ...

    async def remove(self) -> None: ...


class RuleSyncer:
    def __init__(
        self,
        table: ServiceTable,
        writer: SteeringWriter,
        health: ProxierHealth,
        service_health: ServiceHealthServers | None = None,
        on_backend_removed: Callable[[Backend], object] | None = None,
        min_sync_period: float = 0.05,
        on_backend_added: Callable[[Backend], object] | None = None,
        on_synced: Callable[[], object] | None = None,
        observe_programming: bool = True,
    ) -> None:
        self.table = table
        self.writer = writer
        self.health = health
        self.service_health = service_health
        self.on_backend_removed = on_backend_removed
        self.on_backend_added = on_backend_added
        self.min_sync_period = min_sync_period
        self.on_synced = on_synced  # a sync succeeded (the supervisor's crash count resets)
        # One syncer per protocol table sees every EndpointSlice change: only the TCP one
        # observes the programming latency, so a change is counted once.
        self.observe_programming = observe_programming
        self.syncs = 0
        # EndpointSlice trigger times (epoch seconds) applied to the table, not yet observed.
        self._trigger_times: list[float] = []
        table.changes.listen(self.notify)
        self._loop = SyncLoop(
            table.changes,
            self._sync_from_loop,
            name=f"kpx-sync-{table.protocol.lower()}",
            min_period=min_sync_period,
            retry_after=RETRY_AFTER_FAILURE,
        )

    def notify(self) -> None:
        """A store changed (called synchronously from the table's change tracker)."""
        if not self.table.changes.woken:
            self.health.queued()
            metrics.LAST_QUEUED.set(time.time())

    async def run(self) -> None:
        """Sync now, then whenever woken, at most once per `min_sync_period`; a failed sync
        is retried after RETRY_AFTER_FAILURE (as a full one)."""
        await self._loop.run()

    async def _sync_from_loop(self) -> bool:
        await self.sync_once()
        return False  # chunked inside: the kernel is updated once per sync

    async def sync_once(self) -> None:
        """One sync; on any failure the next one rewrites the kernel state in full (what
        was applied is unknown) and the table keeps what it did not apply."""
        try:
            await self._sync()
        except Exception:
            metrics.SYNC_FAILURES.inc()
            self.writer.needs_full = True
            self.table.changes.failed()
            raise
        except BaseException:  # cancelled half-way: what reached the kernel is unknown
            self.writer.needs_full = True
            self.table.changes.failed()
            raise

    async def _recompute(self) -> SyncResult:
        """The table's pending changes, CHUNK Services at a time, yielding in between. When
        a chunk raises, the backends already removed or added are still reported."""
        total = SyncResult()
        try:
            while True:
                chunk = SyncResult()
                try:
                    self.table.sync(max_services=CHUNK, result=chunk)
                finally:
                    total.merge(chunk)
                if not self.table.pending:
                    return total
                await asyncio.sleep(0)
        except BaseException:
            self._backends_changed(total)
            if self.observe_programming:
                self._trigger_times.extend(total.trigger_times)  # observed once applied
            raise

    def _backends_changed(self, result: SyncResult) -> None:
        # The pickers stopped offering these backends just now, whatever the kernel update
        # does: drain them now (a failed update must not make them be forgotten).
        if self.on_backend_removed is not None:
            for backend in result.removed_backends:
                self.on_backend_removed(backend)
        if self.on_backend_added is not None:
            for backend in result.added_backends:
                self.on_backend_added(backend)

    async def _sync(self) -> None:
        started = time.monotonic()
        result = await self._recompute()
        self._backends_changed(result)
        # Kept until a kernel update succeeds: the latency counts until the change is in.
        if self.observe_programming:
            self._trigger_times.extend(result.trigger_times)
        # A writer that must rewrite everything (startup, after a failure) makes a full sync.
        full = result.full or bool(getattr(self.writer, "needs_full", False))
        touched = await self.writer.sync(self.table.steering, result.steering.keys())
        duration = time.monotonic() - started
        metrics.SYNC_DURATION.observe(duration)
        (metrics.SYNC_FULL_DURATION if full else metrics.SYNC_PARTIAL_DURATION).observe(duration)
        now = time.time()
        metrics.LAST_SYNC.set(now)
        for trigger in self._trigger_times:
            metrics.NETWORK_PROGRAMMING.observe(max(0.0, now - trigger))
        self._trigger_times.clear()
        self.health.updated()
        if self.table.pending:  # changes that arrived while the kernel was being updated
            self.health.queued()
        for policy, count in self.table.no_local_endpoints.items():
            metrics.NO_LOCAL.set(self.table.protocol, policy, count)
        if result.steering or full:  # O(frontends): only when steering changed
            counts = Counter(self.table.steering.values())
            for state in ("serve", "local", "drop", "reject"):
                metrics.FRONTENDS.labels(self.table.protocol, state).set(counts.get(state, 0))
        if self.service_health is not None:
            await self.service_health.sync(self.table.health_checks())
        self.syncs += 1
        if self.on_synced is not None:
            self.on_synced()
        if result.services:
            log.debug(
                "synced",
                services=result.services,
                steering_changes=len(result.steering),
                kernel=touched,
                seconds=round(duration, 4),
            )
