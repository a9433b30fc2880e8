"""read_packets: the one loop reading the forward child's and the workers' packets."""

from __future__ import annotations

import socket

from dnsd.forward_channel import read_packets


def pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


def test_each_packet_whole_and_at_most_a_burst_per_call():
    ours, theirs = pair()
    for n in range(5):
        theirs.send(b"M" + bytes([n]) * 100)
    got: list[bytes] = []
    assert read_packets(ours, got.append, size=4096, burst=3) is True
    assert got == [b"M" + bytes([n]) * 100 for n in range(3)]
    assert read_packets(ours, got.append, size=4096, burst=3) is True  # two left, then EAGAIN
    assert len(got) == 5
    ours.close()
    theirs.close()


def test_the_peers_end_is_reported_after_what_it_sent():
    ours, theirs = pair()
    theirs.send(b"R")
    theirs.close()
    got: list[bytes] = []
    assert read_packets(ours, got.append, size=64, burst=8) is False
    assert got == [b"R"]
    ours.close()


def test_a_closed_socket_counts_as_ended():
    ours, theirs = pair()
    ours.close()
    assert read_packets(ours, lambda _m: None, size=64, burst=8) is False
    theirs.close()
