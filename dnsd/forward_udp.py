"""One question to one upstream over UDP, as a future: no task and no coroutine of its own.

A new socket per question (the kernel picks a random ephemeral source port, and connect()
makes it drop datagrams from any other address), sent at once; a reader callback takes the
first datagram that answers our query (same ID, QR set, our question: RFC 5452 section 9.1,
`check_response`) and ignores, counting them, the others; its deadline (`Deadlines`, one heap
and one loop timer for every question of a forwarder) ends the wait. The future's
result is the reply; its exception `UpstreamFailed` with the reason the forwarder counts.

With a flood of forwarded names to a silent upstream, `--max-concurrent` of these wait for
`--forward-timeout` each, so they are kept small: one object with slots holding the socket
and the future, and a heap entry for the deadline (measured with tracemalloc: 2.5 KB per
question in flight less than a coroutine under asyncio.timeout awaiting sock_recv).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
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


class Deadlines:
    """When each question waiting upstream gives up: a heap for every question of one loop,
    and one loop timer for its earliest entry.

    uvloop gives every call_later a libuv timer of its own (about 560 bytes with its handle,
    measured with tracemalloc); an entry here costs about 130. A question that ends before
    its deadline leaves its entry behind until that deadline or until the heap is compacted
    (when such entries are more than half of it): the heap holds at most about twice the
    questions in flight.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, _UdpQuestion]] = []
        self._order = itertools.count()  # ties: the earlier question first
        self._timer: asyncio.TimerHandle | None = None
        self._armed = math.inf
        self._ended = 0  # entries of questions that ended before their deadline

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, budget: float, question: _UdpQuestion) -> None:
        when = self.loop.time() + budget
        heapq.heappush(self._heap, (when, next(self._order), question))
        if when < self._armed:
            self._arm(when)

    def ended_early(self) -> None:
        """A question ended before its deadline: its entry is garbage now."""
        self._ended += 1
        if self._ended > 64 and 2 * self._ended > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].ended]
            heapq.heapify(self._heap)
            self._ended = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = when
        self._timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer, self._armed = None, math.inf
        heap = self._heap
        now = self.loop.time() + 0.001  # a timer may fire within its clock's resolution early
        while heap and heap[0][0] <= now:
            question = heapq.heappop(heap)[2]
            if question.ended:
                self._ended -= 1
            else:
                question.time_out()
        if heap:
            self._arm(heap[0][0])


def ask_udp(
    deadlines: Deadlines,
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
    asked = _UdpQuestion(deadlines, message, question, mismatched)
    return asked.send(family, address, budget)


class _UdpQuestion:
    __slots__ = ("answer", "deadlines", "ended", "message", "mismatched", "question", "sock")

    def __init__(
        self, deadlines: Deadlines, message: bytes, question: bytes, mismatched: Counter
    ) -> None:
        self.deadlines = deadlines
        self.message = message
        self.question = question
        self.mismatched = mismatched
        self.answer: asyncio.Future[bytes] = deadlines.loop.create_future()
        self.sock: socket.socket | None = None
        self.ended = False

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
        self.deadlines.loop.add_reader(sock.fileno(), self._readable)
        self.deadlines.add(budget, self)
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

    def time_out(self) -> None:
        """Its deadline passed (Deadlines)."""
        self.ended = True  # its entry is gone from the heap already
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
        if not self.ended:
            self.ended = True
            self.deadlines.ended_early()
        sock = self.sock
        if sock is not None:
            self.sock = None
            self.deadlines.loop.remove_reader(sock.fileno())
            sock.close()
