"""Bulk and scale properties of the relay: a gigabyte checksum-exact both ways at once, and the
Python memory an idle proxied connection costs.

Clients and backends here are plain blocking sockets on threads, so the only event-loop work is
kpx's own and tracemalloc can tell kpx's allocations from the test's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable

import kpx
from kpx.backends import Backend
from kpx.proxy import Proxy
from tests.kpx.conftest import Runner, StaticFrontends, StaticPicker

FRONTEND = ("10.96.0.10", 80)
CHUNK = 1 << 20
UPLOAD = 1 << 30
DOWNLOAD = 256 << 20


def send_generated(sock: socket.socket, total: int) -> str:
    """Send `total` bytes of chunk-numbered random data, then half-close; return their sha256.
    Numbering the chunks makes a reordered or repeated chunk change the digest."""
    block = bytearray(os.urandom(CHUNK))
    digest = hashlib.sha256()
    for index in range(total // CHUNK):
        block[:8] = index.to_bytes(8, "big")
        digest.update(block)
        sock.sendall(block)
    sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def receive_all(sock: socket.socket) -> tuple[int, str]:
    """Read until EOF; return (byte count, sha256)."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    count = 0
    while n := sock.recv_into(buffer):
        digest.update(view[:n])
        count += n
    return count, digest.hexdigest()


def both_ways(sock: socket.socket, send_total: int) -> tuple[str, tuple[int, str]]:
    """Send and receive concurrently on one socket (so backpressure works in both directions)."""
    sent: list[str] = []
    sender = threading.Thread(target=lambda: sent.append(send_generated(sock, send_total)))
    sender.start()
    received = receive_all(sock)
    sender.join()
    return sent[0], received


def test_a_gigabyte_up_and_256_mib_down_at_once_arrive_checksum_exact(
    run_uvloop: Runner[None],
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    backend = Backend("127.0.0.1", listener.getsockname()[1])
    backend_result: list[tuple[str, tuple[int, str]]] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            backend_result.append(both_ways(conn, DOWNLOAD))

    async def scenario() -> None:
        proxy = Proxy(StaticFrontends({FRONTEND: StaticPicker([backend])}))
        port = (await proxy.serve_port("127.0.0.1", 0, *FRONTEND)).port
        server = threading.Thread(target=serve_one)
        server.start()

        def client() -> tuple[str, tuple[int, str]]:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                return both_ways(sock, UPLOAD)

        started = time.monotonic()
        loop_cpu = time.thread_time()  # this thread runs the event loop, i.e. all of kpx
        client_sent, (client_count, client_got) = await asyncio.to_thread(client)
        loop_cpu = time.thread_time() - loop_cpu
        elapsed = time.monotonic() - started
        await asyncio.to_thread(server.join)
        backend_sent, (backend_count, backend_got) = backend_result[0]
        assert backend_count == UPLOAD
        assert backend_got == client_sent
        assert client_count == DOWNLOAD
        assert client_got == backend_sent
        assert proxy.stats.bytes_to_backend == UPLOAD
        assert proxy.stats.bytes_to_client == DOWNLOAD
        gigabytes = (UPLOAD + DOWNLOAD) / 1e9
        print(  # informal: the test's own hashing threads share the two cores
            f"relayed {gigabytes * 8 / elapsed:.1f} Gbit/s in {elapsed:.2f} s, "
            f"kpx {loop_cpu / gigabytes:.2f} CPU-s/GB"
        )
        await proxy.stop(0)

    try:
        run_uvloop(scenario())
    finally:
        listener.close()


def kpx_allocated_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still allocated whose allocation had a kpx frame on the stack."""
    pattern = os.path.join(os.path.dirname(os.path.abspath(kpx.__file__)), "*")
    filtered = snapshot.filter_traces([tracemalloc.Filter(True, pattern, all_frames=True)])
    return sum(stat.size for stat in filtered.statistics("filename"))


def open_idle_connections(
    port: int, backend_listener: socket.socket, count: int
) -> Callable[[], None]:
    """`count` connections through the proxy, each accepted by the backend, used for one
    request and answer, then left idle.
    Returns a function closing them all."""
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    accepted = [backend_listener.accept()[0] for _ in range(count)]
    for client, server in zip(clients, accepted, strict=True):  # one exchange, then silence
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        server.sendall(b"pong")
        assert client.recv(4) == b"pong"

    def close() -> None:
        for sock in clients + accepted:
            sock.close()

    return close


def test_an_idle_proxied_connection_costs_under_3_kib_of_python_memory(
    run_uvloop: Runner[None],
) -> None:
    connections = 400
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    backend = Backend("127.0.0.1", listener.getsockname()[1])

    async def scenario() -> None:
        proxy = Proxy(StaticFrontends({FRONTEND: StaticPicker([backend])}))
        port = (await proxy.serve_port("127.0.0.1", 0, *FRONTEND)).port
        # Warm up (first-use allocations: pipe pool, caches) before measuring.
        close_warmup = await asyncio.to_thread(open_idle_connections, port, listener, 20)
        tracemalloc.start(10)
        try:
            before = kpx_allocated_bytes(tracemalloc.take_snapshot())
            close_all = await asyncio.to_thread(open_idle_connections, port, listener, connections)
            async with asyncio.timeout(10):
                while proxy.stats.connections_active < connections + 20:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            after = kpx_allocated_bytes(tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
        per_connection = (after - before) / connections
        print(f"kpx Python memory per idle proxied connection: {per_connection:.0f} bytes")
        assert per_connection <= 3 * 1024
        # Idle connections hold no pipe: the few pipes the exchanges used are back in the pool.
        assert proxy.pool.created <= 4
        assert proxy.pool.free == proxy.pool.created
        close_all()
        close_warmup()
        await proxy.stop(0)

    try:
        run_uvloop(scenario())
    finally:
        listener.close()
