"""A relay copies small reads (recv, send) and splices bulk ones (kpx/splice.py): the bytes
arrive whole and in order whichever way each read went, including a copy the destination
could take only part of, whose rest waits in a pipe."""

from __future__ import annotations

import _socket
import asyncio
import socket

from kpx.poller import Poller
from kpx.splice import COPY_MAX, PipePool, Relay, RelayCounters
from tests.kpx.conftest import Runner


def tcp_pair(buffer: int = 0) -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection, non-blocking; `buffer`: the near end's send
    and the far end's receive buffer, fixed (no autotuning that would make room later)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if buffer:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        near = socket.socket()
        if buffer:
            near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        near.connect(listener.getsockname())
        far, _ = listener.accept()
    for sock in (near, far):
        sock.setblocking(False)
    return near, far


def raw(sock: socket.socket) -> _socket.socket:
    """The relay takes C-level sockets, as kpx's accept makes them."""
    return _socket.socket(sock.family, sock.type, 0, sock.detach())


def fill(sock: socket.socket) -> bytes:
    """Send until the kernel takes no more (the peer does not read); what was sent."""
    sent = bytearray()
    block = b"f" * 65536
    while True:
        try:
            sent += block[: sock.send(block)]
        except BlockingIOError:
            return bytes(sent)


async def receive(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < size:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


def test_a_small_message_the_destination_cannot_take_waits_in_a_pipe(run: Runner[None]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        client, client_side = tcp_pair()
        backend_side, backend = tcp_pair(buffer=16384)
        # The backend reads nothing yet: its receive buffer and kpx's send buffer fill up.
        filler = fill(backend_side)
        pool, counters = PipePool(), RelayCounters()
        closed: list[Relay] = []
        relay = Relay(
            Poller(loop), raw(client_side), raw(backend_side), pool, counters, closed.append
        )
        relay.start()
        messages = [f"message {i:04d};".encode() for i in range(200)]
        for message in messages[:100]:
            await loop.sock_sendall(client, message)
            await asyncio.sleep(0)
        # Nothing could be sent: the first copy's bytes went into a pipe, reading stopped.
        assert pool.created == 1 and counters.bytes_to_backend == 0
        assert await receive(backend, len(filler)) == filler
        expected = b"".join(messages[:100])
        assert await receive(backend, len(expected)) == expected
        # Drained: the pipe is back in the pool, and small messages are copied again.
        for message in messages[100:]:
            await loop.sock_sendall(client, message)
            assert await receive(backend, len(message)) == message
        assert pool.created == 1 and pool.free == 1
        assert counters.bytes_to_backend == sum(map(len, messages))
        # A read that fills the copy buffer turns the direction to splicing; order is kept.
        bulk = bytes(range(256)) * (4 * COPY_MAX // 256) + b"tail"
        await loop.sock_sendall(client, bulk)
        assert await receive(backend, len(bulk)) == bulk
        assert not relay._up.copying and relay._down.copying
        # The other way, and the closes.
        await loop.sock_sendall(backend, b"reply")
        assert await receive(client, 5) == b"reply"
        client.shutdown(socket.SHUT_WR)
        backend.shutdown(socket.SHUT_WR)
        for end in (client, backend):
            assert await asyncio.wait_for(loop.sock_recv(end, 10), 5) == b""
            end.close()
        await asyncio.sleep(0.05)
        assert closed == [relay]

    run(scenario())
