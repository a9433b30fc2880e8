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


def test_writer_to_reader_swaps_the_interest_in_one_change(run: Runner[None]) -> None:
    async def scenario() -> None:
        poller = Poller(asyncio.get_running_loop())
        a, b = socket.socketpair()
        seen: list[int] = []
        writable, readable = asyncio.Event(), asyncio.Event()

        def on_writable() -> None:
            seen.append(1)
            writable.set()

        try:
            poller.add_writer(a.fileno(), on_writable)
            await asyncio.wait_for(writable.wait(), 1)
            poller.writer_to_reader(a.fileno(), readable.set)
            calls = len(seen)
            await asyncio.sleep(0.05)
            assert len(seen) == calls  # no longer watched for writing
            b.send(b"x")
            await asyncio.wait_for(readable.wait(), 1)
            assert poller.remove_reader(a.fileno())
            assert not poller.remove_writer(a.fileno())
        finally:
            poller.close()
            a.close()
            b.close()

    run(scenario())


def test_events_of_an_fd_forgotten_earlier_in_the_batch_never_reach_its_successor(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        poller = Poller(asyncio.get_running_loop())
        pairs = [socket.socketpair() for _ in range(2)]
        successors: list[socket.socket] = []
        stale_calls: list[int] = []
        first_done = asyncio.Event()

        def on_readable(mine: int, other: socket.socket) -> None:
            if first_done.is_set():
                return
            first_done.set()
            # Close the other readable socket in the same batch; a new one takes its number
            # (nothing to read there: any call to its reader is a stale event).
            number = other.fileno()
            poller.forget(number)
            other.close()
            c, d = socket.socketpair()
            successors.extend((c, d))
            reused = c if c.fileno() == number else d
            assert reused.fileno() == number
            poller.add_reader(number, lambda: stale_calls.append(number))

        try:
            (a, a_peer), (b, b_peer) = pairs
            poller.add_reader(a.fileno(), lambda: on_readable(a.fileno(), b))
            poller.add_reader(b.fileno(), lambda: on_readable(b.fileno(), a))
            a_peer.send(b"x")
            b_peer.send(b"x")
            await asyncio.sleep(0.05)  # both readable before the loop polls the set
            await asyncio.wait_for(first_done.wait(), 1)
            await asyncio.sleep(0.05)
            assert stale_calls == []
        finally:
            poller.close()
            for s in [*(s for pair in pairs for s in pair), *successors]:
                s.close()

    run(scenario())
