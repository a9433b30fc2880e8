"""One question over UDP as a future (dnsd.forward_udp): its deadline, its socket, its memory."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from dnsd.forward_udp import Deadlines, UpstreamFailed, ask_udp

QUESTION = b"\x03www\x07example\x03com\x00" + struct.pack("!HH", 1, 1)


class Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


def message(qid: int) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + QUESTION


@pytest.fixture
def silent() -> Iterator[tuple[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()
    sock.close()


async def test_each_question_times_out_at_its_own_deadline_whatever_the_order_asked(silent):
    deadlines = Deadlines(asyncio.get_running_loop())
    started = time.monotonic()
    slow = ask_udp(deadlines, socket.AF_INET, silent, message(1), QUESTION, 0.4, Count())
    quick = ask_udp(deadlines, socket.AF_INET, silent, message(2), QUESTION, 0.1, Count())
    with pytest.raises(UpstreamFailed, match="timeout"):
        await quick
    assert time.monotonic() - started < 0.3 and not slow.done()
    with pytest.raises(UpstreamFailed, match="timeout"):
        await slow
    assert time.monotonic() - started >= 0.39
    assert len(deadlines) == 0


async def test_answered_questions_do_not_pile_up_behind_a_long_deadline():
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)
    loop = asyncio.get_running_loop()

    def answer() -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                data, peer = echo.recvfrom(512)
                echo.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], peer)

    loop.add_reader(echo.fileno(), answer)
    deadlines = Deadlines(loop)
    try:
        for qid in range(600):
            reply = ask_udp(
                deadlines, socket.AF_INET, echo.getsockname(), message(qid), QUESTION, 30, Count()
            )
            assert (await reply)[:2] == struct.pack("!H", qid)
        # Each answered question left an entry until the heap was compacted.
        assert len(deadlines) <= 2 * 65
    finally:
        loop.remove_reader(echo.fileno())
        echo.close()


async def test_a_reply_that_does_not_answer_our_question_is_counted_and_ignored(silent):
    liar = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    liar.bind(("127.0.0.1", 0))
    mismatched = Count()
    deadlines = Deadlines(asyncio.get_running_loop())
    reply = ask_udp(
        deadlines, socket.AF_INET, liar.getsockname(), message(7), QUESTION, 1.0, mismatched
    )
    data, peer = liar.recvfrom(512)
    wrong_id = struct.pack("!H", 8) + bytes([data[2] | 0x80]) + data[3:]
    liar.sendto(wrong_id, peer)
    liar.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], peer)
    assert (await reply)[:2] == struct.pack("!H", 7)
    assert mismatched.value == 1
    liar.close()
