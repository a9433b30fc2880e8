"""kwatch/mmsg.py: batched UDP receive and send on real loopback sockets."""

from __future__ import annotations

import ctypes
import socket

import pytest

from kwatch import mmsg

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg/sendmmsg here")


def test_sockaddr_round_trips_for_both_families() -> None:
    for address in (("127.0.0.1", 5353), ("::1", 53, 0, 0)):
        raw = mmsg.python_to_sockaddr(address)
        assert mmsg.sockaddr_to_python(raw) == address


def test_a_batch_is_received_whole_and_answered_to_each_sender() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for client in clients:
        client.bind(("127.0.0.1", 0))
    try:
        rx, tx = mmsg.RecvBatch(8, 70000), mmsg.SendBatch(8, 70000)
        assert rx.recv(server.fileno()) == 0  # nothing waiting: never blocks
        big = b"x" * 65507  # the largest IPv4 UDP payload passes whole
        for i, client in enumerate(clients):
            client.sendto(big if i == 2 else f"q{i}".encode(), server.getsockname())
        n = rx.recv(server.fileno())
        assert n == 3
        assert [bytes(rx.data(i)) for i in range(2)] == [b"q0", b"q1"]
        assert rx.length(2) == 65507 and not rx.truncated(2)
        for i in range(n):
            assert mmsg.sockaddr_to_python(rx.name(i)) == clients[i].getsockname()
            assert tx.add(b"a" + bytes(rx.data(i))[:10], rx.name(i))
        assert tx.flush(server.fileno()) == (3, 0)
        for i, client in enumerate(clients):
            client.settimeout(2)
            assert client.recv(100) == b"a" + (big[:10] if i == 2 else f"q{i}".encode())
    finally:
        server.close()
        for client in clients:
            client.close()


def test_a_full_send_batch_refuses_more() -> None:
    tx = mmsg.SendBatch(1, 16)
    name = mmsg.python_to_sockaddr(("127.0.0.1", 9))
    assert tx.add(b"one", name)
    assert not tx.add(b"two", name)


def test_every_batch_gets_each_sender_and_original_destination_again() -> None:
    # The kernel overwrites msg_namelen and msg_controllen of the entries it fills (16 after
    # an IPv4 sender, 0 without ancillary data): one batch shared by an IPv4 and an IPv6
    # socket (as kpx's relay shares it) must still see every sender and its ancillary data.
    origdst = {socket.AF_INET: (socket.IPPROTO_IP, getattr(socket, "IP_RECVORIGDSTADDR", 20))}
    origdst[socket.AF_INET6] = (socket.IPPROTO_IPV6, 74)
    pairs = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        server = socket.socket(family, socket.SOCK_DGRAM)
        server.bind((host, 0))
        server.setblocking(False)
        client = socket.socket(family, socket.SOCK_DGRAM)
        client.bind((host, 0))
        pairs.append((server, client))
    try:
        rx = mmsg.RecvBatch(4, 256, 64)
        for count, (server, client), ancillary in (
            (3, pairs[0], False),
            (3, pairs[1], True),
            (1, pairs[0], False),
            (4, pairs[1], True),
            (2, pairs[0], True),
        ):
            server.setsockopt(*origdst[server.family], int(ancillary))
            for i in range(count):
                client.sendto(b"d%d" % i, server.getsockname())
            assert rx.recv(server.fileno()) == count
            for i in range(count):
                assert bytes(rx.data(i)) == b"d%d" % i
                assert mmsg.sockaddr_to_python(rx.name(i)) == client.getsockname()
                control = rx.control_data(i)
                if ancillary:
                    dst = mmsg.sockaddr_to_python(control[16:])
                    assert dst[:2] == server.getsockname()[:2]
                else:
                    assert control == b""
            assert rx.recv(server.fileno()) == 0
    finally:
        for server, client in pairs:
            server.close()
            client.close()


def test_data_sits_at_the_buffer_address() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx = mmsg.RecvBatch(2, 100)
        client.sendto(b"first", server.getsockname())
        client.sendto(b"second", server.getsockname())
        assert rx.recv(server.fileno()) == 2
        assert ctypes.string_at(rx.buffer_address + 100, 6) == b"second"
    finally:
        server.close()
        client.close()
