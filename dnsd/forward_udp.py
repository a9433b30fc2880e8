"""One question to one upstream over UDP, as a future: no task and no coroutine of its own.

A new socket per question (the kernel picks a random ephemeral source port, and connect()
makes it drop datagrams from any other address), sent at once; a reader callback takes the
first datagram that answers our query (same ID, QR set, our question: RFC 5452 section 9.1,
`check_response`) and ignores, counting them, the others; a timer ends the wait. The future's
result is the reply; its exception `UpstreamFailed` with the reason the forwarder counts.

With a flood of forwarded names to a silent upstream, `--max-concurrent` of these wait for
`--forward-timeout` each, so they are kept small: one object with slots holding the socket,
the timer and the future (measured with tracemalloc: about 2 KB per question in flight less
than a coroutine under asyncio.timeout awaiting sock_recv).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

from dnsd.forward_wire import check_response

MAX_MESSAGE = 65535


class UpstreamFailed(Exception):
    """One attempt at one upstream failed; `reason` is the metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Counter(Protocol):
    def inc(self) -> None: ...


def ask_udp(
    loop: asyncio.AbstractEventLoop,
    family: int,
    address: tuple[str, int],
    message: bytes,
    question: bytes,
    budget: float,
    mismatched: Counter,
) -> asyncio.Future[bytes]:
    """Send `message` (ID in its first two bytes, `question` after the header) to `address`;
    the reply within `budget` seconds, as a future. Raises UpstreamFailed when it cannot even
    be sent."""
    return _UdpQuestion(loop, message, question, mismatched).send(family, address, budget)


class _UdpQuestion:
    __slots__ = ("answer", "loop", "message", "mismatched", "question", "sock", "timer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, message: bytes, question: bytes, mismatched: Counter
    ) -> None:
        self.loop = loop
        self.message = message
        self.question = question
        self.mismatched = mismatched
        self.answer: asyncio.Future[bytes] = loop.create_future()
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None

    def send(self, family: int, address: tuple[str, int], budget: float) -> asyncio.Future[bytes]:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(address)
            sock.send(self.message)
        except ConnectionRefusedError:  # ICMP port unreachable from an earlier datagram
            sock.close()
            raise UpstreamFailed("refused") from None
        except OSError:  # BlockingIOError too: a full send buffer
            sock.close()
            raise UpstreamFailed("network") from None
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._readable)
        self.timer = self.loop.call_later(budget, self._time_out)
        # Whatever ends the wait (a reply, the timer, a cancelled exchange) closes the socket.
        self.answer.add_done_callback(self._finish)
        return self.answer

    def _readable(self) -> None:
        sock = self.sock
        qid = (self.message[0] << 8) | self.message[1]
        while sock is not None and not self.answer.done():
            try:
                response = sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._settle(None, UpstreamFailed("refused"))
                return
            except OSError:
                self._settle(None, UpstreamFailed("network"))
                return
            if check_response(response, qid, self.question):
                self._settle(response, None)
                return
            self.mismatched.inc()

    def _time_out(self) -> None:
        self.timer = None
        self._settle(None, UpstreamFailed("timeout"))

    def _settle(self, response: bytes | None, error: UpstreamFailed | None) -> None:
        if not self.answer.done():
            if error is not None:
                self.answer.set_exception(error)
            else:
                assert response is not None
                self.answer.set_result(response)
        self._finish(None)  # at once: the reader must not fire again for this socket

    def _finish(self, _: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sock = self.sock
        if sock is not None:
            self.sock = None
            self.loop.remove_reader(sock.fileno())
            sock.close()
