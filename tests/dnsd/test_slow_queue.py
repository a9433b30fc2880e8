"""The bounded hand-off from a UDP thread to the event loop (dnsd.server.SlowQueue)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest

from dnsd.metrics import DnsCollector, DnsStats
from dnsd.server import SlowQueue


class RecordingLoop:
    """Just the two calls SlowQueue makes, recorded instead of run."""

    def __init__(self) -> None:
        self.threadsafe: list[Callable[[], None]] = []
        self.soon: list[Callable[[], None]] = []

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self.threadsafe.append(callback)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)


def _queue(bound: int) -> tuple[SlowQueue, RecordingLoop, list[bytes], DnsStats]:
    stats = DnsStats()
    taken: list[bytes] = []
    queue = SlowQueue(bound, stats.thread_drops(), lambda data, addr: taken.append(data))
    loop = RecordingLoop()
    queue.start(cast(asyncio.AbstractEventLoop, loop))
    return queue, loop, taken, stats


def test_queries_beyond_the_bound_are_shed_and_counted() -> None:
    queue, loop, taken, stats = _queue(3)
    for i in range(10):
        queue.put(b"q%d" % i, ("127.0.0.1", 5000))
    assert len(queue) == 3
    assert stats.thread_dropped[0] == {"udp_queue_full": 7}
    loop.threadsafe[0]()
    assert taken == [b"q0", b"q1", b"q2"]  # the first ones, in order; the rest never queued
    queue.put(b"again", ("127.0.0.1", 5000))  # room again after the drain
    assert len(queue) == 1 and stats.thread_dropped[0]["udp_queue_full"] == 7


def test_one_wake_up_per_burst_not_per_query() -> None:
    queue, loop, taken, _ = _queue(100)
    for i in range(50):
        queue.put(b"q%d" % i, None)
    assert len(loop.threadsafe) == 1
    loop.threadsafe[0]()
    assert len(taken) == 50
    queue.put(b"next", None)  # the loop drained: the next query wakes it again
    assert len(loop.threadsafe) == 2


def test_a_drain_takes_at_most_the_bound_and_leaves_the_rest_for_the_next_turn() -> None:
    queue, loop, taken, _ = _queue(4)
    for i in range(4):
        queue.put(b"a%d" % i, None)
    drain = loop.threadsafe[0]
    # More arrive after the wake-up and before the loop gets to it (room is made as it takes).
    queue._queue.extend((b"b%d" % i, None) for i in range(3))
    drain()
    assert len(taken) == 4 and len(queue) == 3
    assert len(loop.soon) == 1  # rescheduled, not run to exhaustion
    loop.soon[0]()
    assert len(taken) == 7 and len(queue) == 0


def test_the_shed_count_is_exposed_as_dnsd_dns_dropped_total() -> None:
    queue, _, _, stats = _queue(1)
    for _ in range(5):
        queue.put(b"q", None)
    registry = CollectorRegistry()
    registry.register(DnsCollector(stats))
    text = generate_latest(registry).decode()
    assert 'dnsd_dns_dropped_total{reason="udp_queue_full"} 4.0' in text


async def test_queries_put_from_a_thread_all_reach_the_loop() -> None:
    """No wake-up is ever missed: a thread putting as fast as it can while the loop drains
    gets every query under the bound through."""
    loop = asyncio.get_running_loop()
    taken: list[Any] = []
    done = asyncio.Event()
    total = 20_000

    def take(data: bytes, addr: Any) -> None:
        taken.append(data)
        if len(taken) == total:
            done.set()

    stats = DnsStats()
    queue = SlowQueue(total, stats.thread_drops(), take)
    queue.start(loop)

    def producer() -> None:
        for i in range(total):
            queue.put(i.to_bytes(4, "big"), None)

    thread = threading.Thread(target=producer)
    thread.start()
    await asyncio.wait_for(done.wait(), 10)
    thread.join()
    assert len(taken) == total and not stats.thread_dropped[0]
