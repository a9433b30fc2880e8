"""kpx/dial.py on its own: a `Dialer` needs a watcher, timers, a ladder, counters and a
callback, and no proxy (issue 14 item 9)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from kpx.dial import Dial, Dialer
from kpx.poller import Poller
from tests.kpx.conftest import Runner, StaticPicker
from tests.kpx.test_proxy import (
    blackholed_backend,
    make_room,
    refusing_backend,
    whoami_backends,
)


@dataclass
class Counters:
    backend_failures: int = 0
    backend_retries: int = 0
    backends_exhausted: int = 0


def test_a_dialer_skips_a_refusing_backend_and_hands_over_the_connected_socket(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        refusing_sock, refusing = refusing_backend()
        async with whoami_backends("a") as [good]:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[tuple[Dial, socket.socket | None, bool]] = loop.create_future()
            counters = Counters()
            poller = Poller(loop)
            dialer = Dialer(
                poller,
                loop.call_later,
                (1.0, 1.0),
                counters,
                lambda dial, sock, watched: done.set_result((dial, sock, watched)),
            )
            picker = StaticPicker([refusing, good], rotate=False)
            client_side, client = socket.socketpair()
            dialer.dial(client, "10.0.0.1", picker, picker.candidates("10.0.0.1"))
            assert len(dialer.dials) == 1
            dial, sock, watched = await asyncio.wait_for(done, 2)
            try:
                assert sock is not None and dial.backend == good
                assert sock.getpeername()[1] == good.port
                # Still watched for writing when the handshake outlived connect(): that
                # registration is the caller's to take over.
                assert poller.remove_writer(sock.fileno()) == watched
                assert picker.failures == [refusing]
                assert counters == Counters(backend_failures=1, backend_retries=1)
                assert dialer.dials == set()
            finally:
                poller.close()
                for s in (sock, client, client_side, refusing_sock):
                    if s is not None:
                        s.close()

    run(scenario())


def test_a_dialer_gives_up_when_the_ladder_is_exhausted_and_cancels_on_demand(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        held, blackholed = blackholed_backend()
        loop = asyncio.get_running_loop()
        ended: list[socket.socket | None] = []
        counters = Counters()
        poller = Poller(loop)
        dialer = Dialer(
            poller, loop.call_later, (0.1,), counters, lambda _d, sock, _w: ended.append(sock)
        )
        picker = StaticPicker([blackholed, blackholed], rotate=False)
        client_side, client = socket.socketpair()
        try:
            dialer.dial(client, "10.0.0.1", picker, picker.candidates("10.0.0.1"))
            await asyncio.sleep(0.3)
            # One attempt per ladder step, however many candidates.
            assert ended == [None]
            assert counters == Counters(backend_failures=1, backends_exhausted=1)
            dialer.dial(client, "10.0.0.1", picker, picker.candidates("10.0.0.1"))
            assert dialer.cancel_all() == 1
            assert ended == [None, None] and dialer.dials == set()
        finally:
            poller.close()
            for s in (*held, client, client_side):
                s.close()

    run(scenario())


def test_a_handshake_that_outlives_connect_is_seen_through_the_writability_events(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        # A full accept queue drops the SYN; once there is room again, the client's first
        # retransmission (1 s later) completes the handshake: long after connect() returned.
        held, slow = blackholed_backend()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[socket.socket | None, bool]] = loop.create_future()
        poller = Poller(loop)
        dialer = Dialer(
            poller,
            loop.call_later,
            (5.0,),
            Counters(),
            lambda _d, sock, watched: done.set_result((sock, watched)),
        )
        picker = StaticPicker([slow])
        client_side, client = socket.socketpair()
        accepted: list[socket.socket] = []
        sock = None
        try:
            dialer.dial(client, "10.0.0.1", picker, picker.candidates("10.0.0.1"))
            await asyncio.sleep(0.1)
            assert not done.done() and len(dialer.dials) == 1
            accepted = make_room(held)
            sock, watched = await asyncio.wait_for(done, 4)
            assert sock is not None and watched
            assert sock.getpeername()[1] == slow.port
            assert poller.remove_writer(sock.fileno())
            assert picker.successes == [] and picker.failures == []  # reported by the caller
        finally:
            poller.close()
            for s in (*held, *accepted, client, client_side, sock):
                if s is not None:
                    s.close()

    run(scenario())
