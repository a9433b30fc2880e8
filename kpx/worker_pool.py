"""The `--workers N` data-plane processes, seen from the control process: spawn them, feed
them, restart the ones that die, stop them.

Each worker is `sys.executable -m kpx.worker` (the same interpreter and code as the control
process) with one end of a socketpair (kpx/worker_channel.py). A worker that dies is started
again after a backoff (doubling from RESTART_MIN to RESTART_MAX, back to the minimum once one
ran RESTART_RESET seconds), and gets every Service's rules before it listens; meanwhile the
kernel spreads new connections over the workers still listening (SO_REUSEPORT), and only the
connections the dead one carried are lost.

`publish` sends one rules message to every worker and returns once each has applied it (or
was given up on after ACK_TIMEOUT: killed, it restarts from a full snapshot), so the caller
(kpx/worker_feed.py) programs nftables only once every worker serves what it steers to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from kpx.rules import ServiceRules
from kpx.worker_channel import Channel, WorkerConfig

log = structlog.get_logger("kpx.worker_pool")

RESTART_MIN = 0.2  # seconds before a dead worker is started again, doubling ...
RESTART_MAX = 10.0  # ... up to this
RESTART_RESET = 30.0  # a worker that ran this long restarts after RESTART_MIN again
ACK_TIMEOUT = 10.0  # seconds a worker may take to apply one rules message (start-up included)
# A worker's stats that say what it holds now, not how often something happened: a dead
# worker's are gone with it, never carried over to its successor's.
GAUGES = frozenset({"connections_active", "affinity_entries"})
STOP_GRACE = 5.0  # seconds past the drain before a stopping worker is killed

Rules = Mapping[str, ServiceRules | None]
# Runs a named long-running task: the daemon's `Supervisor.spawn`.
Spawn = Callable[[str, Callable[[], Coroutine[Any, Any, None]]], None]


@dataclass(eq=False)
class WorkerSlot:
    """One worker position (index) and the process currently filling it."""

    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    # A full snapshot was sent to this process: deltas follow.
    fed: bool = False
    # It applied a rules message (so it listens).
    listening: bool = False
    # Rules messages sent, not yet acknowledged: seq -> the publisher's future.
    waiting: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    # The latest counters of the current process, and the sums of the dead ones' counters.
    stats: dict[str, int] = field(default_factory=dict)
    carried: dict[str, int] = field(default_factory=dict)
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def counter(self, name: str) -> int:
        """A counter across this slot's processes (for GAUGES: its current process's)."""
        return self.stats.get(name, 0) + self.carried.get(name, 0)


class WorkerPool:
    def __init__(
        self,
        count: int,
        config: Callable[[int], WorkerConfig],
        snapshot: Callable[[], dict[str, ServiceRules | None]],
    ) -> None:
        self.slots = [WorkerSlot(index) for index in range(count)]
        self._config = config
        # Every Service's applied rules now (a new worker's first message).
        self._snapshot = snapshot
        self._seq = 0
        # Rules were published once: a (re)started worker gets a snapshot at once.
        self._published = False
        self._stopping = False

    @property
    def listening(self) -> int:
        """Workers that applied their rules and accept."""
        return sum(slot.listening for slot in self.slots)

    def start(self, spawn: Spawn) -> None:
        """Start every worker (each listens once it has the rules: `publish`), each kept by a
        task that `spawn` runs: the daemon's supervisor, which logs, counts and restarts a
        keeper that fails unexpectedly (kwatch/supervisor.py)."""
        for slot in self.slots:
            spawn(f"kpx-worker-{slot.index}", functools.partial(self._keep, slot))

    async def publish(self, changes: Rules) -> None:
        """Send `changes` to every worker (a full snapshot to one that has none yet) and wait
        until each applied it or was given up on."""
        self._published = True
        waits = [self._send(slot, changes) for slot in self.slots if slot.channel is not None]
        futures = [future for future in waits if future is not None]
        if not futures:
            return
        _done, late = await asyncio.wait(futures, timeout=ACK_TIMEOUT)
        for slot in self.slots:
            if any(future in late for future in slot.waiting.values()):
                log.error("worker_not_acking", worker=slot.index, pid=slot.pid, seconds=ACK_TIMEOUT)
                self._kill(slot)

    def _send(self, slot: WorkerSlot, changes: Rules) -> asyncio.Future[None] | None:
        assert slot.channel is not None
        self._seq += 1
        full = not slot.fed
        message = ("rules", self._seq, self._snapshot() if full else dict(changes), full)
        slot.fed = True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slot.waiting[self._seq] = future
        slot.channel.send(message)
        return future

    async def _keep(self, slot: WorkerSlot) -> None:
        """Run a worker in `slot`, again and again, until the pool stops. An unexpected
        exception ends the process too (nobody would read its channel any more): the
        restarted keeper starts a fresh one."""
        try:
            await self._keep_running(slot)
        except Exception:
            await self._discard(slot)
            raise

    async def _keep_running(self, slot: WorkerSlot) -> None:
        backoff = RESTART_MIN
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._spawn(slot)
            except OSError as err:
                log.error("worker_spawn_failed", worker=slot.index, problem=str(err))
            else:
                if self._published:
                    self._send(slot, {})
                await self._serve(slot)
            if self._stopping:
                return
            slot.restarts += 1
            if time.monotonic() - started > RESTART_RESET:
                backoff = RESTART_MIN
            log.warning(
                "worker_restarting",
                worker=slot.index,
                returncode=slot.process.returncode if slot.process else None,
                after_seconds=backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX)

    async def _spawn(self, slot: WorkerSlot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kpx.worker",
                "--channel-fd",
                str(theirs.fileno()),
                "--parent-pid",
                str(os.getpid()),
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        slot.channel = await Channel.open(ours)
        slot.fed = slot.listening = False
        slot.channel.send(self._config(slot.index))
        log.info("worker_started", worker=slot.index, pid=slot.pid)

    async def _serve(self, slot: WorkerSlot) -> None:
        """Read the worker's acks and stats until it goes; then forget the process."""
        assert slot.channel is not None and slot.process is not None
        while True:
            message: Any = await slot.channel.receive()
            if message is None:
                break
            if message[0] == "ack":
                slot.listening = True
                for seq in [seq for seq in slot.waiting if seq <= message[1]]:
                    future = slot.waiting.pop(seq)
                    if not future.done():
                        future.set_result(None)
            elif message[0] == "stats":
                slot.stats = message[1]
        with contextlib.suppress(ProcessLookupError):
            slot.process.kill()  # the channel is gone: the process is of no use any more
        await slot.process.wait()
        self._lost(slot)

    async def _discard(self, slot: WorkerSlot) -> None:
        """End the process in `slot`, whatever state its keeper left it in."""
        self._kill(slot)
        if slot.process is not None:
            await slot.process.wait()
        self._lost(slot)

    def _lost(self, slot: WorkerSlot) -> None:
        """The process in `slot` is gone: release its publishers, keep its counters."""
        for future in slot.waiting.values():
            if not future.done():
                future.set_result(None)  # it restarts from a full snapshot
        slot.waiting.clear()
        for name, value in slot.stats.items():
            if name not in GAUGES:
                slot.carried[name] = slot.carried.get(name, 0) + value
        slot.stats = {}
        slot.listening = slot.fed = False
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None

    def _kill(self, slot: WorkerSlot) -> None:
        if slot.process is not None and slot.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.process.kill()

    async def stop(self, drain_seconds: float) -> None:
        """Tell every worker to stop accepting and drain for up to `drain_seconds`; wait for
        them (killing the ones still there STOP_GRACE seconds later). The keepers are the
        supervisor's, stopped with it (before this, in kpx/main.py); one still running returns
        once its worker is gone."""
        self._stopping = True
        running = [slot for slot in self.slots if slot.process and slot.process.returncode is None]
        for slot in running:
            if slot.channel is not None:
                slot.channel.send(("stop", drain_seconds))
        for slot in running:
            assert slot.process is not None
            try:
                await asyncio.wait_for(slot.process.wait(), drain_seconds + STOP_GRACE)
            except TimeoutError:
                self._kill(slot)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                self._kill(slot)
                await slot.process.wait()
            if slot.channel is not None:
                slot.channel.close()
                slot.channel = None
