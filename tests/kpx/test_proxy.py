"""kpx data path in `ports` mode on 127.0.0.1: connect ladder, refusals, relay semantics, drain.

The balancer is stood in for by `StaticPicker` (conftest); backends are small asyncio servers on
loopback that say who they are, then echo.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from kpx.backends import Backend
from kpx.origdst import parse_sockaddr_in, parse_sockaddr_in6, unmap_ipv4
from kpx.ports import PortsWriter
from kpx.proxy import Proxy
from tests.kpx.conftest import Runner, StaticFrontends, StaticPicker

FRONTEND = ("10.96.0.10", 80)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def whoami(name: str) -> Handler:
    """Say `name\\n`, echo until EOF, then close the write side."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(name.encode() + b"\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handle


@contextlib.asynccontextmanager
async def backend_server(handler: Handler, name: str = "") -> AsyncIterator[Backend]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Backend("127.0.0.1", port, node_name=name or None)
    finally:
        server.close()
        # Handlers still running hold their writers; closing the server does not wait on them.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1)


@contextlib.asynccontextmanager
async def whoami_backends(*names: str) -> AsyncIterator[list[Backend]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(backend_server(whoami(n), n)) for n in names]


def refusing_backend() -> tuple[socket.socket, Backend]:
    """A bound port nobody listens on: connects to it are refused (RST)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, Backend("127.0.0.1", sock.getsockname()[1])


def blackholed_backend() -> tuple[list[socket.socket], Backend]:
    """A listener whose accept queue is full: the kernel drops further SYNs silently, so a
    connect neither succeeds nor is refused; it times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    held = [listener]
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        held.append(filler)
    return held, Backend("127.0.0.1", listener.getsockname()[1])


def make_room(held: list[socket.socket]) -> list[socket.socket]:
    """Unblock a `blackholed_backend` for good: the next SYN retransmission of a connect still
    waiting on it completes. The fillers are closed first: one of them is itself retransmitting
    its SYN (every 1, 3, 7 s from when it was made), and it would otherwise take the freed slot
    before a connect made later does, leaving that connect blocked until its next
    retransmission. Returns the accepted sockets (to close)."""
    listener, fillers = held[0], held[1:]
    for filler in fillers:
        filler.close()
    listener.setblocking(False)
    accepted = []
    with contextlib.suppress(BlockingIOError):
        while True:
            accepted.append(listener.accept()[0])
    return accepted


@contextlib.asynccontextmanager
async def proxy_for(
    backends: list[Backend], **options: Any
) -> AsyncIterator[tuple[Proxy, StaticPicker, int]]:
    picker = StaticPicker(backends)
    proxy = Proxy(StaticFrontends({FRONTEND: picker}), **options)
    listener = await proxy.serve_port("127.0.0.1", 0, *FRONTEND)
    try:
        yield proxy, picker, listener.port
    finally:
        await proxy.stop(0)


async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def hello(port: int) -> str:
    """Connect through the proxy and return the backend's name."""
    reader, writer = await dial(port)
    try:
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def expect_reset(reader: asyncio.StreamReader, within: float = 1.0) -> None:
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), within)


async def wait_until(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Poll a proxy counter (the proxy offers no event for these; the test only needs it)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def dial_expect_reset(port: int, within: float = 1.0) -> None:
    """Connect and expect a reset: the RST may even beat the client's view of the handshake."""
    with pytest.raises(ConnectionResetError):
        reader, writer = await dial(port)
        try:
            await asyncio.wait_for(reader.read(100), within)
        finally:
            writer.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def warm_up_loop() -> None:
    """One connection through the loop's own machinery, so the fds an event loop opens once on
    first use (uvloop: resolver thread pool, a /dev/null) are in the baseline, not the diff."""
    async with whoami_backends("warm-up") as [backend]:
        assert await hello(backend.port) == "warm-up"
    await asyncio.sleep(0.05)  # let the server side of that connection close too


# -- connect ---------------------------------------------------------------------------------


def test_connections_go_to_candidates_in_the_pickers_order(run: Runner[None]) -> None:
    async def scenario() -> None:
        async with (
            whoami_backends("a", "b", "c") as backends,
            proxy_for(backends) as (
                proxy,
                picker,
                port,
            ),
        ):
            names = [await hello(port) for _ in range(30)]
            assert names == ["a", "b", "c"] * 10
            assert [b.node_name for b, _ in picker.successes] == names
            assert {ip for _, ip in picker.successes} == {"127.0.0.1"}
            assert picker.failures == []
            assert proxy.stats.connections_total == 30
            assert proxy.stats.backend_retries == 0

    run(scenario())


def test_a_refusing_backend_is_skipped_before_the_client_notices(run: Runner[None]) -> None:
    async def scenario() -> None:
        refusing_sock, refusing = refusing_backend()
        with refusing_sock:
            async with (
                whoami_backends("good") as [good],
                proxy_for([refusing, good]) as (
                    proxy,
                    picker,
                    port,
                ),
            ):
                picker.rotate = False
                reader, writer = await dial(port)
                assert await reader.readline() == b"good\n"
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                assert picker.failures == [refusing]
                assert picker.successes == [(good, "127.0.0.1")]
                assert proxy.stats.backend_failures == 1
                assert proxy.stats.backend_retries == 1

    run(scenario())


def test_a_blackholed_backend_is_abandoned_after_the_first_ladder_step(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        held, blackholed = blackholed_backend()
        try:
            async with (
                whoami_backends("good") as [good],
                proxy_for([blackholed, good], connect_ladder=(0.2, 0.5)) as (proxy, picker, port),
            ):
                picker.rotate = False
                started = time.monotonic()
                assert await hello(port) == "good"
                elapsed = time.monotonic() - started
                assert 0.19 <= elapsed < 1.0, elapsed  # not the kernel SYN retry (1 s+)
                assert picker.failures == [blackholed]
                assert proxy.stats.backend_failures == 1
        finally:
            for sock in held:
                sock.close()

    run(scenario())


def test_attempts_stop_when_the_ladder_is_exhausted(run_uvloop: Runner[None]) -> None:
    async def scenario() -> None:
        refusing = [refusing_backend() for _ in range(3)]
        try:
            async with (
                whoami_backends("good") as [good],
                proxy_for([b for _, b in refusing] + [good], connect_ladder=(0.1, 0.1, 0.1)) as (
                    proxy,
                    picker,
                    port,
                ),
            ):
                picker.rotate = False
                await dial_expect_reset(port)
                assert len(picker.failures) == 3
                assert picker.successes == []
                assert proxy.stats.backends_exhausted == 1
        finally:
            for sock, _ in refusing:
                sock.close()

    run_uvloop(scenario())


def test_no_candidates_resets_the_client_at_once(run: Runner[None]) -> None:
    async def scenario() -> None:
        async with proxy_for([]) as (proxy, _picker, port):
            started = time.monotonic()
            await dial_expect_reset(port, within=0.5)
            assert time.monotonic() - started < 0.5
            assert proxy.stats.refused_no_endpoints == 1
            assert proxy.stats.connections_active == 0

    run(scenario())


def test_an_unknown_frontend_is_reset(run_uvloop: Runner[None]) -> None:
    async def scenario() -> None:
        proxy = Proxy(StaticFrontends())
        listener = await proxy.serve_port("127.0.0.1", 0, "10.96.0.99", 443)
        await dial_expect_reset(listener.port)
        assert proxy.stats.unknown_frontend == 1
        assert proxy.frontends.lookups == [("10.96.0.99", 443)]  # type: ignore[attr-defined]
        await proxy.stop(0)

    run_uvloop(scenario())


def test_every_candidate_failing_resets_the_client(run: Runner[None]) -> None:
    async def scenario() -> None:
        (sock1, dead1), (sock2, dead2) = refusing_backend(), refusing_backend()
        with sock1, sock2:
            async with proxy_for([dead1, dead2]) as (proxy, picker, port):
                await dial_expect_reset(port)
                assert picker.failures == [dead1, dead2]
                assert proxy.stats.backends_exhausted == 1
                assert proxy.stats.connections_active == 0

    run(scenario())


def test_ports_mode_holds_a_dropped_frontend_and_serves_its_waiting_clients_later(
    run: Runner[None],
) -> None:
    """--mode ports has no kernel drop: a "drop" frontend's listener stops accepting, so a
    client hears nothing (no reset, as with a dropped SYN) until endpoints return."""

    async def scenario() -> None:
        async with whoami_backends("a") as backends:
            picker = StaticPicker([])
            proxy = Proxy(StaticFrontends({FRONTEND: picker}))
            writer = PortsWriter(proxy, "127.0.0.1")
            key = (4, *FRONTEND)
            try:
                await writer.sync({key: "drop"})
                port = writer.assignments()[0]["port"]
                reader, client = await dial(port)  # completes in the kernel's accept queue
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(reader.read(100), 0.3)  # no reset, no answer
                assert proxy.stats.connections_total == 0
                picker.backends = backends
                await writer.sync({key: "serve"}, [key])
                assert await asyncio.wait_for(reader.readline(), 2) == b"a\n"
                client.close()
                picker.backends = []
                await writer.sync({key: "reject"}, [key])
                await dial_expect_reset(port)  # no endpoint anywhere: reset at once
            finally:
                await writer.remove()
                await proxy.stop(0)

    run(scenario())


# -- relay -----------------------------------------------------------------------------------


def test_client_half_close_reaches_the_backend_and_replies_still_flow(run: Runner[None]) -> None:
    async def scenario() -> None:
        async with whoami_backends("a") as backends, proxy_for(backends) as (_proxy, _p, port):
            reader, writer = await dial(port)
            writer.write(b"request")
            writer.write_eof()
            # The backend only closes after it saw our EOF, and it answers after our EOF.
            assert await asyncio.wait_for(reader.read(), 2) == b"a\nrequest"
            writer.close()

    run(scenario())


def test_backend_half_close_reaches_the_client_and_requests_still_flow(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def says_bye_then_listens(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.write(b"bye")
            writer.write_eof()
            received.set_result(await reader.read())
            writer.close()

        async with (
            backend_server(says_bye_then_listens) as backend,
            proxy_for([backend]) as (
                _proxy,
                _picker,
                port,
            ),
        ):
            reader, writer = await dial(port)
            assert await asyncio.wait_for(reader.read(), 2) == b"bye"
            writer.write(b"still talking")
            writer.write_eof()
            assert await asyncio.wait_for(received, 2) == b"still talking"
            writer.close()

    run(scenario())


def test_a_client_reset_resets_the_backend(run: Runner[None]) -> None:
    async def scenario() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def waits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hi\n")
            try:
                await reader.read()
                outcome.set_result("eof")
            except ConnectionResetError:
                outcome.set_result("reset")
            writer.close()

        async with backend_server(waits) as backend, proxy_for([backend]) as (proxy, _p, port):
            reader, writer = await dial(port)
            assert await reader.readline() == b"hi\n"
            abort_with_reset(writer)
            assert await asyncio.wait_for(outcome, 2) == "reset"
            await wait_until(lambda: proxy.stats.connections_active == 0)

    run(scenario())


def test_a_backend_reset_resets_the_client(run: Runner[None]) -> None:
    async def scenario() -> None:
        async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hi\n")
            await writer.drain()
            await reader.readexactly(2)
            abort_with_reset(writer)

        async with backend_server(resets) as backend, proxy_for([backend]) as (proxy, _p, port):
            reader, writer = await dial(port)
            assert await reader.readline() == b"hi\n"
            writer.write(b"go")
            await expect_reset(reader, within=2)
            writer.close()
            await wait_until(lambda: proxy.stats.connections_active == 0)

    run(scenario())


def test_bytes_are_counted_each_way(run: Runner[None]) -> None:
    async def scenario() -> None:
        async with whoami_backends("abc") as backends, proxy_for(backends) as (proxy, _p, port):
            reader, writer = await dial(port)
            writer.write(b"x" * 10_000)
            writer.write_eof()
            assert len(await reader.read()) == 4 + 10_000
            writer.close()
            await wait_until(lambda: proxy.stats.connections_active == 0)
            assert proxy.stats.bytes_to_backend == 10_000
            assert proxy.stats.bytes_to_client == 10_004

    run(scenario())


def test_a_backend_that_does_not_read_stalls_the_client_instead_of_buffering(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        accepted: asyncio.Queue[socket.socket] = asyncio.Queue()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(listener.fileno(), lambda: accepted.put_nowait(listener.accept()[0]))
        backend = Backend("127.0.0.1", listener.getsockname()[1])
        async with proxy_for([backend]) as (proxy, _picker, port):
            client = socket.create_connection(("127.0.0.1", port))
            client.setblocking(False)
            stalled_sock = await asyncio.wait_for(accepted.get(), 2)
            block = b"z" * 65536
            written = 0
            quiet_since = time.monotonic()
            # Write until the whole chain (socket buffers + one pipe) is full and stays full.
            while time.monotonic() - quiet_since < 0.3:
                try:
                    written += client.send(block)
                    quiet_since = time.monotonic()
                except BlockingIOError:
                    await asyncio.sleep(0.02)
            assert written < 64 << 20  # bounded by kernel buffers, nothing piles up in kpx
            in_flight = written - proxy.stats.bytes_to_backend
            assert in_flight > 0
            client.shutdown(socket.SHUT_WR)
            stalled_sock.setblocking(False)
            received = 0
            while True:  # the backend finally reads: everything arrives, then the EOF
                chunk = await loop.sock_recv(stalled_sock, 1 << 20)
                if not chunk:
                    break
                received += len(chunk)
            assert received == written == proxy.stats.bytes_to_backend
            stalled_sock.close()
            client.close()
        loop.remove_reader(listener.fileno())
        listener.close()

    run(scenario())


def test_an_idle_timeout_closes_silent_connections_and_spares_busy_ones(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        async with (
            whoami_backends("a") as backends,
            proxy_for(backends, idle_timeout=0.2) as (proxy, _picker, port),
        ):
            silent_reader, silent_writer = await dial(port)
            busy_reader, busy_writer = await dial(port)
            assert await silent_reader.readline() == b"a\n"
            assert await busy_reader.readline() == b"a\n"

            async def keep_busy() -> None:
                while True:
                    busy_writer.write(b".")
                    assert await busy_reader.readexactly(1) == b"."
                    await asyncio.sleep(0.05)

            busy = asyncio.create_task(keep_busy())
            started = time.monotonic()
            assert await asyncio.wait_for(silent_reader.read(), 1) == b""  # a FIN, not a reset
            silent_closed_after = time.monotonic() - started
            assert 0.15 <= silent_closed_after <= 0.45, silent_closed_after
            await asyncio.sleep(0.4)  # the busy one outlives two more timeouts
            assert not busy.done()  # it would have died on an EOF or a reset
            busy.cancel()
            assert proxy.stats.idle_closes == 1
            silent_writer.close()
            busy_writer.close()

    run(scenario())


# -- limits and leaks ------------------------------------------------------------------------


def test_the_connection_limit_resets_extra_clients_with_one_log_line(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        async with (
            whoami_backends("a") as backends,
            proxy_for(backends, max_connections=2) as (proxy, _picker, port),
        ):
            held = [await dial(port) for _ in range(2)]
            for reader, _ in held:
                assert await reader.readline() == b"a\n"
            with capture_logs() as logs:
                for _ in range(3):
                    await dial_expect_reset(port)
            limit_lines = [e for e in logs if e["event"] == "connection_limit_reached"]
            assert len(limit_lines) == 1
            assert limit_lines[0]["limit"] == 2
            assert limit_lines[0]["log_level"] == "warning"
            assert proxy.stats.limit_hits == 3
            held[0][1].close()
            await wait_until(lambda: proxy.stats.connections_active == 1)
            assert await hello(port) == "a"
            held[1][1].close()

    run(scenario())


def test_no_fd_is_leaked_whatever_way_connections_end(run: Runner[None]) -> None:
    async def scenario() -> None:
        refusing_sock, refusing = refusing_backend()
        await warm_up_loop()
        async with whoami_backends("a", "b") as backends:
            baseline = open_fds()
            proxy = Proxy(
                StaticFrontends(
                    {
                        FRONTEND: StaticPicker([refusing, *backends]),
                        ("10.96.0.11", 80): StaticPicker([]),
                    }
                )
            )
            port = (await proxy.serve_port("127.0.0.1", 0, *FRONTEND)).port
            empty_port = (await proxy.serve_port("127.0.0.1", 0, "10.96.0.11", 80)).port
            for _ in range(10):
                assert await hello(port) in ("a", "b")  # client closes first
                reader, writer = await dial(port)  # half-close, then backend closes
                writer.write(b"x" * 100_000)
                writer.write_eof()
                assert len(await reader.read()) == 2 + 100_000
                writer.close()
                reader, writer = await dial(port)  # client resets
                await reader.readline()
                abort_with_reset(writer)
                await dial_expect_reset(empty_port)  # refused
            idle = [await dial(port) for _ in range(5)]  # open at stop: reset by stop()
            for reader, _ in idle:
                await reader.readline()
            await wait_until(lambda: proxy.stats.connections_active == 5)
            assert await proxy.stop(0) == 5
            for _, writer in idle:
                writer.close()
            await asyncio.sleep(0.05)
            assert open_fds() == baseline
        refusing_sock.close()

    run(scenario())


def test_running_out_of_fds_pauses_accepting_without_spinning_then_recovers(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        await warm_up_loop()
        async with whoami_backends("a") as backends, proxy_for(backends) as (proxy, _p, port):
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            client = socket.socket()
            client.setblocking(False)
            lowest_free_fd = os.dup(0)
            os.close(lowest_free_fd)
            # New fds must be numbered below the soft limit: from here on, none can be made.
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd, hard))
            try:
                with capture_logs() as logs:
                    client.connect_ex(("127.0.0.1", port))  # completes in the kernel backlog
                    await asyncio.sleep(0.35)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert 1 <= proxy.stats.accept_errors <= 6  # paused ~0.1 s per failure, no spin
            assert logs[0]["event"] == "accept_failed"
            reader, writer = await asyncio.open_connection(sock=client)
            assert await asyncio.wait_for(reader.readline(), 2) == b"a\n"  # resumed
            writer.close()

    run(scenario())


# -- drain -----------------------------------------------------------------------------------


def test_a_removed_backend_keeps_its_connections_until_they_end(run: Runner[None]) -> None:
    async def scenario() -> None:
        async with (
            whoami_backends("old", "new") as [old, new],
            proxy_for([old]) as (
                proxy,
                picker,
                port,
            ),
        ):
            reader, writer = await dial(port)
            assert await reader.readline() == b"old\n"
            picker.backends = [new]  # the control path stops offering it ...
            assert proxy.close_backend(old) == 1  # ... and tells the proxy
            await asyncio.sleep(0.3)
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            assert [await hello(port) for _ in range(3)] == ["new"] * 3
            assert proxy.connections_to(old) == 1
            writer.close()
            await wait_until(lambda: proxy.connections_to(old) == 0)
            assert proxy.stats.drain_resets == 0

    run(scenario())


def test_a_removed_backends_connections_are_reset_at_the_drain_timeout(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        async with (
            whoami_backends("old", "new") as [old, new],
            proxy_for([old], drain_timeout=0.3) as (proxy, picker, port),
        ):
            old_conns = [await dial(port) for _ in range(2)]
            picker.backends = [new]
            new_reader, new_writer = await dial(port)
            assert await new_reader.readline() == b"new\n"
            for reader, _ in old_conns:
                assert await reader.readline() == b"old\n"
            started = time.monotonic()
            assert proxy.close_backend(old) == 2
            for reader, _ in old_conns:
                await expect_reset(reader, within=1)
            assert 0.25 < time.monotonic() - started < 1.5
            assert proxy.stats.drain_resets == 2
            new_writer.write(b"unaffected")
            assert await new_reader.readexactly(10) == b"unaffected"
            for _, writer in [*old_conns, (new_reader, new_writer)]:
                writer.close()

    run(scenario())


def test_a_backend_offered_again_before_its_drain_deadline_keeps_its_connections(
    run: Runner[None],
) -> None:
    # A readiness blip: the endpoint leaves the slice and comes back within the drain timeout.
    async def scenario() -> None:
        async with (
            whoami_backends("flaky") as [flaky],
            proxy_for([flaky], drain_timeout=0.3) as (proxy, _picker, port),
        ):
            reader, writer = await dial(port)
            assert await reader.readline() == b"flaky\n"
            assert proxy.close_backend(flaky) == 1
            await asyncio.sleep(0.1)
            proxy.restore_backend(flaky)
            await asyncio.sleep(0.4)  # past the deadline it no longer has
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            assert proxy.stats.drain_resets == 0
            assert proxy.close_backend(flaky) == 1  # removed for good later: a fresh deadline
            await expect_reset(reader, within=1)
            writer.close()

    run(scenario())


def test_a_removed_backend_is_not_tried_as_a_fallback_by_a_connect_already_under_way(
    run_uvloop: Runner[None],
) -> None:
    # "An endpoint removed from the slice receives no new connections": not even from a
    # client whose candidate list was drawn up before the removal.
    async def scenario() -> None:
        held, slow = blackholed_backend()
        try:
            async with (
                whoami_backends("removed", "kept") as [removed, kept],
                proxy_for([slow, removed, kept], connect_ladder=(0.3, 1.0, 1.0)) as (
                    proxy,
                    picker,
                    port,
                ),
            ):
                picker.rotate = False  # every client: slow, then removed, then kept
                reader, writer = await dial(port)
                await wait_until(lambda: proxy.stats.connections_active == 1)
                picker.backends = [slow, kept]
                proxy.close_backend(removed)  # while the first attempt waits on `slow`
                assert await asyncio.wait_for(reader.readline(), 3) == b"kept\n"
                assert proxy.connections_to(removed) == 0
                writer.close()
        finally:
            for sock in held:
                sock.close()

    run_uvloop(scenario())


def test_a_connect_under_way_when_its_backend_is_removed_obeys_the_drain_deadline(
    run_uvloop: Runner[None],
) -> None:
    async def scenario() -> None:
        held, slow = blackholed_backend()
        try:
            async with proxy_for([slow], drain_timeout=0.2, connect_ladder=(3.0,)) as (
                proxy,
                _picker,
                port,
            ):
                reader, writer = await dial(port)
                await wait_until(lambda: proxy.stats.connections_active == 1)
                assert proxy.close_backend(slow) == 0  # nothing relayed yet: one connecting
                await asyncio.sleep(0.3)  # the deadline passes while the SYN waits
                held.extend(make_room(held))  # the SYN's retransmission now gets through
                await expect_reset(reader, within=3)
                writer.close()
                assert proxy.stats.drain_resets == 1
                assert proxy.connections_to(slow) == 0
        finally:
            for sock in held:
                sock.close()

    run_uvloop(scenario())


def test_stop_stops_accepting_waits_for_connections_then_resets_them(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        async with whoami_backends("a") as backends:
            proxy = Proxy(StaticFrontends({FRONTEND: StaticPicker(backends)}))
            port = (await proxy.serve_port("127.0.0.1", 0, *FRONTEND)).port
            quick_reader, quick_writer = await dial(port)
            slow_reader, slow_writer = await dial(port)
            stopping = asyncio.create_task(proxy.stop(drain_seconds=0.5))
            await asyncio.sleep(0.05)
            with pytest.raises(ConnectionRefusedError):
                await dial(port)
            quick_writer.write_eof()  # this one finishes during the drain
            assert await quick_reader.read() == b"a\n"
            assert await stopping == 1  # the other one was reset at the deadline
            assert await slow_reader.readline() == b"a\n"
            await expect_reset(slow_reader)
            quick_writer.close()
            slow_writer.close()

    run(scenario())


def test_stop_during_a_connect_resets_the_client_and_leaks_nothing(run: Runner[None]) -> None:
    async def scenario() -> None:
        held, blackholed = blackholed_backend()
        await warm_up_loop()
        baseline = open_fds()
        proxy = Proxy(
            StaticFrontends({FRONTEND: StaticPicker([blackholed])}), connect_ladder=(5.0,)
        )
        port = (await proxy.serve_port("127.0.0.1", 0, *FRONTEND)).port
        reader, writer = await dial(port)
        await wait_until(lambda: proxy.stats.connections_active == 1)
        assert await proxy.stop(0) == 1
        await expect_reset(reader)
        writer.close()
        await asyncio.sleep(0.05)
        assert open_fds() == baseline
        for sock in held:
            sock.close()

    run(scenario())


def test_a_claimed_redirect_port_refuses_until_accepting_and_cannot_be_claimed_twice(
    run: Runner[None],
) -> None:
    async def scenario() -> None:
        await warm_up_loop()
        baseline = open_fds()
        proxy = Proxy(StaticFrontends())
        bound = proxy.bind_redirect("127.0.0.1", 0)
        with pytest.raises(ConnectionRefusedError):
            await dial(bound.port)  # claimed, not listening: the kernel refuses
        await proxy.accept_on(bound)
        with pytest.raises(OSError):
            Proxy(StaticFrontends()).bind_redirect("127.0.0.1", bound.port)  # a second kpx
        await dial_expect_reset(bound.port)  # no SO_ORIGINAL_DST on a direct dial: reset
        never_started = proxy.bind_redirect("127.0.0.1", 0)
        assert never_started.port != bound.port
        await proxy.stop(0)
        await asyncio.sleep(0.05)
        assert open_fds() == baseline  # the never-started listener was closed too

    run(scenario())


class CrashingPicker(StaticPicker):
    crash = True

    def candidates(self, client_ip: str) -> list[Backend]:
        if self.crash:
            raise RuntimeError("balancer bug")
        return super().candidates(client_ip)


def test_a_crashing_picker_resets_that_client_and_the_listener_lives_on(
    run_uvloop: Runner[None],
) -> None:
    async def scenario() -> None:
        async with whoami_backends("a") as [a]:
            picker = CrashingPicker([a])
            proxy = Proxy(StaticFrontends({FRONTEND: picker}))
            port = (await proxy.serve_port("127.0.0.1", 0, *FRONTEND)).port
            with capture_logs() as logs:
                await dial_expect_reset(port)
            assert [e["event"] for e in logs] == ["connection_routing_crashed"]
            picker.crash = False
            assert await hello(port) == "a"
            await proxy.stop(0)

    run_uvloop(scenario())


def test_original_destination_structs_are_decoded() -> None:
    sockaddr_in = struct.pack("!HH4s8x", socket.AF_INET, 80, socket.inet_aton("10.96.0.10"))
    assert parse_sockaddr_in(sockaddr_in) == ("10.96.0.10", 80)
    sockaddr_in6 = struct.pack(
        "!HHI16sI", socket.AF_INET6, 8443, 0, socket.inet_pton(socket.AF_INET6, "fd00:96::a"), 0
    )
    assert parse_sockaddr_in6(sockaddr_in6) == ("fd00:96::a", 8443)
    assert unmap_ipv4("::ffff:10.244.0.2") == "10.244.0.2"
    assert unmap_ipv4("fd00:244::2") == "fd00:244::2"
