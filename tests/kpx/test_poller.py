"""kpx/poller.py: the data path's epoll set behaves as the loop's add_reader/add_writer."""

from __future__ import annotations

import asyncio
import socket

from kpx.poller import Poller
from tests.kpx.conftest import Runner


def test_readers_and_writers_are_called_level_triggered_and_removed(run: Runner[None]) -> None:
    async def scenario() -> None:
        poller = Poller(asyncio.get_running_loop())
        a, b = socket.socketpair()
        a.setblocking(False)
        reads: list[bytes] = []
        writable = asyncio.Event()
        try:
            poller.add_writer(a.fileno(), writable.set)
            await asyncio.wait_for(writable.wait(), 1)
            assert poller.remove_writer(a.fileno())
            assert not poller.remove_writer(a.fileno())  # removed already
            poller.add_reader(a.fileno(), lambda: reads.append(a.recv(1)))
            b.send(b"xyz")
            for _ in range(100):  # level-triggered: called until everything is read
                if len(reads) == 3:
                    break
                await asyncio.sleep(0.01)
            assert reads == [b"x", b"y", b"z"]
            assert poller.remove_reader(a.fileno())
            b.send(b"more")
            await asyncio.sleep(0.05)
            assert reads == [b"x", b"y", b"z"]  # no reader, no call
        finally:
            poller.close()
            a.close()
            b.close()

    run(scenario())


def test_an_fd_closed_before_its_removal_does_not_break_its_successor(run: Runner[None]) -> None:
    async def scenario() -> None:
        poller = Poller(asyncio.get_running_loop())
        a, b = socket.socketpair()
        called = asyncio.Event()
        try:
            poller.add_reader(a.fileno(), lambda: None)
            number = a.fileno()
            a.close()  # not removed first: the kernel left the set, the poller did not
            c, d = socket.socketpair()
            assert number in (c.fileno(), d.fileno())  # the number is reused at once
            reused = c if c.fileno() == number else d
            peer = d if reused is c else c
            poller.add_writer(number, called.set)  # modify would fail with ENOENT
            await asyncio.wait_for(called.wait(), 1)
            poller.remove_writer(number)
            poller.remove_reader(number)
            peer.close()
            reused.close()
        finally:
            poller.close()
            b.close()

    run(scenario())
