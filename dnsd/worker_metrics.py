"""The counters of every `--workers` process on worker 0's /metrics.

Only worker 0 serves /metrics; each other worker answers its share of the queries (the
kernel spreads clients over the SO_REUSEPORT group), so until now its counters were nowhere.
Before the workers fork, dnsd makes one socket pair per extra worker (`WorkerLinks`). Every
second each extra worker sends worker 0 a snapshot of its `dnsd_*` counters and histograms
(its --forward-process child's included), in the format the child uses
(dnsd/forward_channel.py); worker 0 adds them to its own when /metrics is read
(`WorkerCounters`). Gauges stay worker 0's own: the zone's size and serial are every worker's
alike, and summing them would count the zone once per worker. A worker that ends keeps
counting with its last snapshot, so no counter goes backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from functools import partial

import structlog
from prometheus_client.registry import Collector

from dnsd import forward_channel as channel

log = structlog.get_logger("dnsd.worker_metrics")

INTERVAL = 1.0  # seconds between two snapshots of a worker
MESSAGE_MAX = 1 << 22


class WorkerLinks:
    """One socket pair per extra worker, made before the workers fork."""

    def __init__(self, workers: int) -> None:
        self.pairs = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers - 1)
        ]

    def first(self) -> list[socket.socket]:
        """Worker 0's ends (the others closed in this process)."""
        for _, theirs in self.pairs:
            theirs.close()
        return [ours for ours, _ in self.pairs]

    def of_worker(self, worker: int) -> socket.socket:
        """Worker `worker`'s end (every other end closed in this process)."""
        keep = self.pairs[worker - 1][1]
        for ours, theirs in self.pairs:
            ours.close()
            if theirs is not keep:
                theirs.close()
        return keep


class WorkerCounters:
    """Worker 0's side: the last snapshot of every extra worker."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.families: dict[int, list[channel.Family]] = {}

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for number, sock in enumerate(self.sockets, 1):
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._readable, loop, number, sock)

    def metric_families(self) -> list[list[channel.Family]]:
        return list(self.families.values())

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()

    def _readable(self, loop: asyncio.AbstractEventLoop, number: int, sock: socket.socket) -> None:
        # A worker that ended keeps counting with its last snapshot.
        if not channel.read_packets(
            sock, partial(self._snapshot, number), size=MESSAGE_MAX, burst=16
        ):
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())

    def _snapshot(self, number: int, message: bytes) -> None:
        try:
            self.families[number] = channel.cumulative(channel.read_metrics(message))
        except (ValueError, TypeError):
            log.warning("worker_bad_metrics", worker=number, size=len(message))


async def report(link: socket.socket, registry: Collector) -> None:
    """An extra worker's side: its counters to worker 0, every INTERVAL seconds."""
    link.setblocking(False)
    while True:
        await asyncio.sleep(INTERVAL)
        message = channel.metrics_message(channel.cumulative(channel.snapshot(registry)))
        with contextlib.suppress(OSError):  # worker 0 gone or slow: the next one, then
            link.send(message, socket.MSG_DONTWAIT)
