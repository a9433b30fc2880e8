"""kpx/handover.py between two proxies in one process (127.0.0.1, a real unix socket and real
SCM_RIGHTS): bytes held in a relay's pipe move with it, and a successor that vanishes leaves
the old proxy serving."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from prometheus_client import REGISTRY

from kpx import handover_wire as wire
from kpx.backends import Backend
from kpx.handover import HandoverServer, HandoverSession, HandoverSource, unix_address
from kpx.proxy import Proxy
from kpx.splice import DirectionState, Relay
from tests.kpx.conftest import Runner, StaticFrontends, StaticPicker

FRONTEND = ("10.96.0.1", 80)


def refuse_session(*_args: object) -> bool:
    raise AssertionError("no UDP session was expected")


def handover_path() -> str:
    return f"@kpx-test/{os.getpid()}/{os.urandom(4).hex()}"


def source_of(proxy: Proxy, observed: list[DirectionState] | None = None) -> HandoverSource:
    """What kpx/main.py's Daemon hands over, for `proxy`; `observed` collects the upstream
    state of every relay as it is frozen."""

    def detach() -> list[Relay]:
        relays = proxy.detach_relays()
        if observed is not None:
            observed.extend(relay.freeze()[0] for relay in relays)
        return relays

    def hold(held: bool) -> None:
        for listener in list(proxy._listeners):
            (listener.hold if held else listener.resume)()

    return HandoverSource(
        tcp_listeners=lambda: [listener.sock for listener in proxy.redirect_listeners()],
        udp_sockets=lambda: [],
        hold=hold,
        connecting=lambda: proxy.connecting,
        detach_relays=detach,
        give_back=proxy.make_relay,
    )


@asynccontextmanager
async def old_proxy(backend_port: int) -> AsyncIterator[tuple[Proxy, int]]:
    picker = StaticPicker([Backend("127.0.0.1", backend_port)])
    proxy = Proxy(StaticFrontends({FRONTEND: picker}))
    listener = await proxy.serve_port("127.0.0.1", 0, *FRONTEND)
    try:
        yield proxy, listener.port
    finally:
        await proxy.stop()


async def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionResetError:
        pass  # a connection the old proxy reset
    finally:
        writer.close()


async def round_trip(sock: socket.socket, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    async with asyncio.timeout(5):
        return await loop.sock_recv(sock, 1024)


def test_bytes_held_in_a_relays_pipe_move_with_it_none_lost_none_twice(run: Runner[None]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        backend_listener = socket.socket()
        # A small receive window: the backend's stalled side fills at once, so the proxy's
        # pipe holds what the client sent beyond it.
        backend_listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        backend_listener.bind(("127.0.0.1", 0))
        backend_listener.listen()
        backend_listener.setblocking(False)
        path = handover_path()
        payload = hashlib.sha256(b"seed").digest() * (32 * 1024 * 1024 // 32)  # 32 MiB
        async with old_proxy(backend_listener.getsockname()[1]) as (old, port):
            client = await connect(port)
            backend, _ = await loop.sock_accept(backend_listener)
            backend.setblocking(False)
            sending = asyncio.create_task(loop.sock_sendall(client, payload))
            await asyncio.sleep(0.3)  # the backend reads nothing: everything in between fills
            assert not sending.done()

            observed: list[DirectionState] = []
            server = HandoverServer(path, source_of(old, observed), timeout=5)
            serving = asyncio.create_task(server.run())
            await asyncio.sleep(0.05)
            new = Proxy(StaticFrontends())
            session = await HandoverSession.connect(path, 5)
            assert session is not None and session.tcp == [] and session.udp == []
            assert await session.take_connections(new.make_relay, refuse_session, 5) == 1
            async with asyncio.timeout(5):
                await serving  # the old side is done
            assert observed[0].pending > 0  # the upstream pipe held bytes when it moved
            assert old.stats.connections_active == 0
            assert new.stats.connections_active == 1

            received = bytearray()
            async with asyncio.timeout(20):
                while len(received) < len(payload):
                    chunk = await loop.sock_recv(backend, 1 << 20)
                    assert chunk, "the backend saw EOF early"
                    received += chunk
                await sending
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            await loop.sock_sendall(backend, b"answer")
            async with asyncio.timeout(5):
                assert await loop.sock_recv(client, 64) == b"answer"
            client.close()
            async with asyncio.timeout(5):
                assert await loop.sock_recv(backend, 64) == b""  # the FIN went through `new`
            backend.close()
            await new.stop()
        backend_listener.close()

    run(scenario())


async def fake_successor(path: str, *, take_all: bool) -> None:
    """A successor that says ready and vanishes: at once, or after taking every connection
    (without acknowledging them)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    await loop.sock_connect(sock, unix_address(path))
    await loop.sock_sendall(sock, wire.encode(wire.Hello(wire.VERSION, os.getpid())))
    await asyncio.sleep(0.05)
    _, fds, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, wire.MAX_FDS)  # the listeners
    for fd in fds:
        os.close(fd)
    sock.send(wire.encode(wire.Ready()))
    while take_all:
        await asyncio.sleep(0.01)
        try:
            data, fds, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, wire.MAX_FDS)
        except BlockingIOError:
            continue
        for fd in fds:
            os.close(fd)
        if isinstance(wire.decode(data, len(fds)), wire.Done):
            break
    sock.close()


@pytest.mark.parametrize("take_all", [False, True])
def test_a_successor_that_vanishes_leaves_the_old_proxy_accepting_and_replaceable(
    run: Runner[None], take_all: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vanished before taking anything: the old proxy resumes every connection. Vanished
    after taking them all without an acknowledgement: it resets them (the successor may have
    moved their bytes), never relays them twice. Either way it accepts again, and the next
    successor takes over."""
    monkeypatch.setattr(wire, "MAX_FDS", 4)  # two connections per batch

    async def scenario() -> None:
        backend_server = await asyncio.start_server(echo, "127.0.0.1", 0)
        path = handover_path()
        async with old_proxy(backend_server.sockets[0].getsockname()[1]) as (old, port):
            clients = [await connect(port) for _ in range(5)]
            for client in clients:
                assert await round_trip(client, b"before") == b"before"
            server = HandoverServer(path, source_of(old), timeout=2)
            serving = asyncio.create_task(server.run())
            await asyncio.sleep(0.05)
            failed = {"role": "old", "result": "failed"}
            before = REGISTRY.get_sample_value("kpx_handover_total", failed)
            await fake_successor(path, take_all=take_all)
            async with asyncio.timeout(5):
                while REGISTRY.get_sample_value("kpx_handover_total", failed) == before:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert not serving.done() and not server.busy
            assert old.stats.connections_active == (0 if take_all else 5)
            for client in clients:
                if take_all:
                    with pytest.raises(ConnectionResetError):
                        await round_trip(client, b"after")
                else:
                    assert await round_trip(client, b"after") == b"after"
                client.close()
            fresh = await connect(port)  # accepting again
            assert await round_trip(fresh, b"fresh") == b"fresh"

            new = Proxy(StaticFrontends())
            await asyncio.sleep(0.6)  # the server listens again (it retries every 0.5 s)
            session = await HandoverSession.connect(path, 2)
            assert session is not None
            assert await session.take_connections(new.make_relay, refuse_session, 2) == 1
            async with asyncio.timeout(5):
                await serving
            assert await round_trip(fresh, b"moved") == b"moved"  # through `new`
            fresh.close()
            await new.stop()
        backend_server.close()
        await backend_server.wait_closed()

    run(scenario())
