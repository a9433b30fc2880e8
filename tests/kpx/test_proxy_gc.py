"""The data path leaves no work for Python's cyclic garbage collector (issue 12, tail latency).

A proxied connection's objects (its Dial, Relay, directions, sockets) must be freed by reference
counting the moment it ends: garbage in reference cycles waits for a collection, and every
collection the data path triggers counts towards the full ones that walk the whole heap (the
10,000-Service stores included), which is where kpx's small-request p99 spikes came from.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

from kpx.dial import Dial
from kpx.splice import Relay, _Direction
from tests.kpx.conftest import Runner
from tests.kpx.test_proxy import dial, proxy_for, wait_until, whoami_backends

DATA_PATH_TYPES = (Dial, Relay, _Direction)


def test_closed_connections_leave_no_cyclic_garbage(run: Runner[None]) -> None:
    async def scenario() -> None:
        async with (
            whoami_backends("a") as backends,
            proxy_for(backends) as (proxy, _picker, port),
        ):
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(20):
                    reader, writer = await dial(port)
                    assert await reader.readline() == b"a\n"
                    writer.write(b"ping")
                    assert await reader.readexactly(4) == b"ping"
                    writer.write_eof()
                    assert await reader.read() == b""
                    writer.close()
                    await writer.wait_closed()
                await wait_until(lambda: proxy.stats.connections_active == 0)
                gc.collect()
                leaked = Counter(
                    type(o).__name__ for o in gc.garbage if isinstance(o, DATA_PATH_TYPES)
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert proxy.stats.connections_total == 20
            assert leaked == Counter()

    run(scenario())


def test_a_reset_connection_leaves_no_cyclic_garbage(run: Runner[None]) -> None:
    async def scenario() -> None:
        async with (
            whoami_backends("a") as backends,
            proxy_for(backends, drain_timeout=0.01) as (proxy, _picker, port),
        ):
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                opened = [await dial(port) for _ in range(5)]
                for reader, _writer in opened:
                    assert await reader.readline() == b"a\n"
                proxy.close_backend(backends[0])  # the drain timeout resets all five
                await wait_until(lambda: proxy.stats.drain_resets == 5)
                for _reader, writer in opened:
                    writer.close()
                await asyncio.sleep(0.05)
                gc.collect()
                leaked = [o for o in gc.garbage if isinstance(o, DATA_PATH_TYPES)]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert leaked == []

    run(scenario())
