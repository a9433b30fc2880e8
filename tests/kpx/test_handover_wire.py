"""kpx/handover_wire.py: the handover's messages, bytes in and out (no sockets)."""

from __future__ import annotations

import json

import pytest

from kpx import handover_wire as wire


def test_every_message_survives_encoding_with_its_fd_count():
    connection = wire.Connection(("10.244.0.11", 8080), (4096, False, False), (0, True, True))
    messages: list[wire.Message] = [
        wire.Hello(wire.VERSION, 4242),
        wire.Listeners((("0.0.0.0", 10262), ("::", 10262)), (("0.0.0.0", 10262),)),
        wire.Ready(),
        wire.Connections(
            (connection, wire.Connection(("fd00::b", 80), (0, False, False), (0, False, False)))
        ),
        wire.Sessions(
            (
                wire.UdpSession(
                    b"\x02\x00\x30\x39",
                    b"\x02\x00",
                    "10.244.0.2",
                    ("10.96.0.20", 53),
                    ("10.244.0.11", 5353, "node-b", None),
                ),
            )
        ),
        wire.Done(2, 1),
        wire.Ack(2, 1),
    ]
    for message in messages:
        assert wire.decode(wire.encode(message), wire.fd_count(message)) == message
    assert wire.fd_count(messages[1]) == 3
    # The first connection: 2 sockets + the upstream pipe (it holds 4096 bytes); the second: 2.
    assert wire.fd_count(messages[3]) == 4 + 2
    assert wire.fd_count(messages[4]) == 1  # a session's socket


def test_a_message_whose_fds_do_not_match_is_refused():
    listeners = wire.encode(wire.Listeners((("0.0.0.0", 10262),), ()))
    with pytest.raises(wire.WireError, match="needs 1 fds"):
        wire.decode(listeners, 0)  # the fds were lost on the way
    with pytest.raises(wire.WireError, match="needs 0 fds"):
        wire.decode(wire.encode(wire.Ready()), 2)
    lying = json.dumps({"kind": "ready", "fds": 3}).encode()
    with pytest.raises(wire.WireError):
        wire.decode(lying, 3)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"kind": "shutdown", "fds": 0}',
        b'{"fds": 0}',
        b'{"kind": "hello", "version": "1", "pid": 3, "fds": 0}',
        b'{"kind": "done", "count": -1, "sessions": 0, "fds": 0}',
        b'{"kind": "ack", "adopted": 1, "fds": 0}',
        b'{"kind": "sessions", "items": [{"key": "zz", "name": "", "client": "10.0.0.1",'
        b' "frontend": ["10.96.0.20", 53], "backend": ["10.0.0.2", 53, null, null]}], "fds": 1}',
        b'{"kind": "sessions", "items": [{"key": "", "name": "", "client": "10.0.0.1",'
        b' "frontend": ["10.96.0.20", 53], "backend": ["10.0.0.2", 53, 7, null]}], "fds": 1}',
        b'{"kind": "listeners", "tcp": [["0.0.0.0", 70000]], "udp": [], "fds": 1}',
        # A direction cannot have passed an EOF on that it never saw.
        b'{"kind": "connections", "items": [{"backend": ["10.0.0.1", 80],'
        b' "up": [0, false, true], "down": [0, false, false]}], "fds": 2}',
        b'{"kind": "connections", "items": [{"backend": ["10.0.0.1", 80],'
        b' "up": [-5, false, false], "down": [0, false, false]}], "fds": 2}',
    ],
)
def test_malformed_messages_are_wire_errors(body: bytes):
    with pytest.raises(wire.WireError):
        wire.decode(body, json.loads(body).get("fds", 0) if body.startswith(b"{") else 0)


def test_connections_are_cut_into_batches_within_the_kernels_fd_limit():
    busy = wire.Connection(("10.0.0.1", 80), (1, False, False), (1, False, False))  # 6 fds
    idle = wire.Connection(("10.0.0.1", 80), (0, False, False), (0, False, False))  # 2 fds
    items = [busy, idle] * 250
    batches = wire.batches(items)
    assert [item for batch in batches for item in batch.items] == items  # order kept
    assert all(wire.fd_count(batch) <= wire.MAX_FDS for batch in batches)
    assert len(batches) == -(-sum(i.fds for i in items) // wire.MAX_FDS)  # as few as fit
    for batch in batches:
        assert len(wire.encode(batch)) <= wire.MAX_MESSAGE
    assert wire.batches([]) == []
    session = wire.UdpSession(
        b"k", b"n", "10.0.0.1", ("10.96.0.20", 53), ("10.0.0.2", 53, None, "zone-a")
    )
    cut = wire.session_batches([session] * (2 * wire.MAX_FDS + 1))
    assert [len(b.items) for b in cut] == [wire.MAX_FDS, wire.MAX_FDS, 1]
