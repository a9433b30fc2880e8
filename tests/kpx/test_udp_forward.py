"""kpx/udp_forward.py: runs of received datagrams sent on from the receive buffers, whole and in
order, as one GSO send when their sizes allow it, datagram by datagram otherwise."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from kpx.udp_forward import RunSender
from kwatch import mmsg

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg/sendmmsg here")


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """(source: a client sends to it, relay: what the run leaves from, sink: where it goes)."""
    made = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for s in made:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        yield made[0], made[1], made[2]
    finally:
        for s in made:
            s.close()


def received(sock: socket.socket, count: int) -> list[bytes]:
    sock.settimeout(2)
    try:
        return [sock.recv(70000) for _ in range(count)]
    finally:
        sock.setblocking(False)


def batch_of(source: socket.socket, datagrams: list[bytes]) -> mmsg.RecvBatch:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for data in datagrams:
            sender.sendto(data, source.getsockname())
    finally:
        sender.close()
    rx = mmsg.RecvBatch(8, 65536)
    assert rx.recv(source.fileno()) == len(datagrams)
    return rx


def test_equal_sized_datagrams_leave_as_one_gso_run_and_arrive_whole(sockets) -> None:
    source, relay, sink = sockets
    datagrams = [bytes([65 + i]) * 1200 for i in range(5)] + [b"z" * 700]  # last shorter
    rx = batch_of(source, datagrams)
    relay.connect(sink.getsockname())
    sender = RunSender(rx)
    assert sender.send(relay.fileno(), range(6)) == 6
    assert sender.error == 0 and sender.sent_bytes == 6700
    assert sender.gso_runs == 1
    assert received(sink, 6) == datagrams  # the same boundaries, in order


def test_mixed_sizes_to_an_address_go_datagram_by_datagram(sockets) -> None:
    source, relay, sink = sockets
    datagrams = [b"a" * 10, b"b" * 300, b"c" * 10, b"d" * 40000]
    rx = batch_of(source, datagrams)
    sender = RunSender(rx)
    name = mmsg.python_to_sockaddr(sink.getsockname())
    assert sender.send(relay.fileno(), [0, 1, 3], name) == 3
    assert sender.gso_runs == 0 and sender.sent_bytes == 40310
    assert received(sink, 3) == [datagrams[0], datagrams[1], datagrams[3]]


def test_a_shorter_datagram_before_the_last_and_a_run_over_64k_are_not_gso(sockets) -> None:
    source, relay, sink = sockets
    name = mmsg.python_to_sockaddr(sink.getsockname())
    for datagrams in ([b"x" * 100, b"y" * 50, b"x" * 100], [b"q" * 40000, b"r" * 40000]):
        rx = batch_of(source, datagrams)
        sender = RunSender(rx)
        assert sender.send(relay.fileno(), range(len(datagrams)), name) == len(datagrams)
        assert sender.gso_runs == 0
        assert received(sink, len(datagrams)) == datagrams


def test_without_gso_the_same_run_arrives_the_same(sockets) -> None:
    source, relay, sink = sockets
    datagrams = [b"s" * 64] * 4
    rx = batch_of(source, datagrams)
    sender = RunSender(rx, gso=False)
    assert sender.send(relay.fileno(), range(4), mmsg.python_to_sockaddr(sink.getsockname())) == 4
    assert sender.gso_runs == 0
    assert received(sink, 4) == datagrams


def test_an_endpoint_that_went_away_is_reported_as_the_error(sockets) -> None:
    source, relay, sink = sockets
    rx = batch_of(source, [b"one" * 10, b"two" * 10])
    gone = sink.getsockname()
    sink.close()  # its port now answers ICMP port unreachable
    relay.connect(gone)
    sender = RunSender(rx)
    assert sender.send(relay.fileno(), [0]) == 1  # the ICMP error comes back after this one
    for _ in range(100):
        if sender.send(relay.fileno(), [0, 1]) == 0:
            break
    assert sender.error == errno.ECONNREFUSED


def test_a_closed_socket_sends_nothing_and_says_so(sockets) -> None:
    source, relay, sink = sockets
    rx = batch_of(source, [b"k" * 64, b"k" * 64])
    sender = RunSender(rx)
    name = mmsg.python_to_sockaddr(sink.getsockname())
    assert sender.send(relay.fileno(), [0, 1], name) == 2 and sender.sent_bytes == 128
    for indices in ([0, 1], [0]):  # the GSO path and datagram by datagram
        assert sender.send(-1, indices, name) == 0
        assert sender.error == errno.EBADF and sender.sent_bytes == 0
