"""UDP and TCP listeners: a thin shell that moves bytes between sockets and the Handler.

TCP follows RFC 7766: 2-byte length prefix, several (pipelined) queries per connection, answers
written as they are ready (possibly out of order), idle connections closed, a bounded number of
connections, and a reader that stops reading while the client does not read its answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

import structlog

from dnsd import sched, udpbatch, wire
from dnsd.handler import Handler
from dnsd.names import from_wire
from dnsd.transfer import ZoneTransfer

log = structlog.get_logger("dnsd.server")
query_log = structlog.get_logger("dnsd.query")

# A DNS query has one question and at most a few small records (the accept rules in wire.py);
# a length prefix above this is not a query we would answer, so the connection is closed at once
# instead of buffering up to 64 KiB per client.
MAX_TCP_QUERY = 4096
UDP_RCVBUF = 4 * 1024 * 1024


def _log_query(data: bytes, peer: Any, proto: str, response: bytes | None) -> None:
    try:
        query = wire.parse_query(data)
    except wire.Reject:
        return
    query_log.info(
        "query",
        client=str(peer[0]) if isinstance(peer, tuple) else str(peer),
        proto=proto,
        name=from_wire(query.name_key),
        type=query.qtype,
        rcode=(response[3] & 0x0F) if response else None,
        size=len(response) if response else 0,
    )


_UDP_MAX = 65535
UDP_BACKLOG = 4096


class ForwardSink(Protocol):
    """Where a UDP thread hands the forwarded names it receives (dnsd.forward_process):
    called from the thread, so it must never block."""

    def offer(self, listener: int, queries: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
        """Take `queries`, each (client sockaddr as the kernel wrote it, query), that arrived
        on listener number `listener`, together. Returns (how many of them were shed because
        the taker is full, whether it is gone): a taker that is gone took none of them."""
        ...


class SlowQueue:
    """The bounded hand-off from a UDP thread to the event loop.

    `put` (the thread) appends a query and wakes the loop with one `call_soon_threadsafe`
    for every query that arrives until the loop drains: one wake-up (a Handle, a write to
    the loop's wake-up fd) per burst instead of one per query. A query that finds `bound`
    waiting is dropped at once and counted in `shed` (`udp_queue_full`): a flood of
    slow-path queries then costs the loop a bounded amount of work per turn, and the fast
    path, which shares the GIL with it, keeps answering cluster names without delay.

    `drain` (the loop) takes at most `bound` queries per turn, so timers and sockets get
    their turn between two slices of a flood. deque.append/popleft are atomic under the
    GIL; `_wake` may cause a redundant wake-up, never a missed one (the loop clears it
    before it looks at the queue).
    """

    def __init__(
        self, bound: int, shed: dict[str, int], take: Callable[[bytes, Any], None]
    ) -> None:
        self.bound = bound
        self.shed = shed  # reason -> count, written by the thread only
        self._take = take
        self._queue: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._wake = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, data: bytes, addr: Any) -> None:
        """From the UDP thread: queue a query for the loop, or shed it."""
        queue = self._queue
        if len(queue) >= self.bound:
            self.shed["udp_queue_full"] = self.shed.get("udp_queue_full", 0) + 1
            return
        queue.append((data, addr))
        if not self._wake and self._loop is not None:
            self._wake = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                self._loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """On the loop: hand up to `bound` queued queries to `take`, oldest first."""
        self._wake = False
        queue = self._queue
        take = self._take
        for _ in range(self.bound):
            if not queue:
                return
            data, addr = queue.popleft()
            take(data, addr)
        if queue and not self._wake and self._loop is not None:
            self._wake = True
            self._loop.call_soon(self.drain)  # the rest on the next turn


class UdpListener:
    """One UDP socket served by its own thread; the event loop only sees the rare query the
    fast path cannot answer.

    The thread blocks in recvmmsg, answers precomputed cluster names with `Handler.fast`
    (which only reads the zone) and sends the batch's answers with one sendmmsg (see
    dnsd.udpbatch; one recvfrom/sendto per query where those calls are missing). Measured
    here with dnsperf against an echo of each query: 7.1 us of CPU per query for a thread
    with recvfrom/sendto, 8.5 us for a loop reader that drains the socket in batches, 7.6 us
    for a uvloop DatagramProtocol, 5.4 to 5.8 us batched.

    Anything else (forwarding, ExternalName chases, pod names, malformed messages, a zone not
    ready yet) goes to the event loop through a bounded queue (`SlowQueue`): the thread
    appends and wakes the loop once for as many queries as arrive before the loop gets to
    them, and drops what finds the queue full. The loop runs `Handler.full` and sends with
    MSG_DONTWAIT, queueing when the buffer is full, so only one thread ever touches the
    forwarder, the cache and the per-query accounting.
    With --forward-process, a name outside every zone (`Handler.forwards`) goes instead to a
    child process (`forwarding`, dnsd.forward_process), which answers it from this very
    socket: its forwarding never holds this process's GIL.
    The zone index is updated by the event loop while the thread reads it: every answer is
    one immutable bytes object swapped in whole, so a query sees a service before or after
    a change, never a half-written answer.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        sample: float,
        batch: int = udpbatch.BATCH,
        slow_queue: int = 256,
        thread_slice: float = 0.0,
    ) -> None:
        self.sock = sock
        self.thread_slice = thread_slice  # scheduler slice the thread asks for (dnsd.sched)
        self.handler = handler
        self.sample = sample
        self.batch = batch  # datagrams per recvmmsg; 0: one recvfrom per datagram
        self._pending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # Answers from the event loop waiting for room in the socket's send buffer.
        self._backlog: collections.deque[tuple[bytes, Any]] = collections.deque()
        self.slow = SlowQueue(slow_queue, handler.stats.thread_drops(), self._full)
        # --forward-process: forwarded names go there instead of to the event loop (set and
        # cleared by the loop, read by the thread; one reference, swapped whole).
        self.forwarding: ForwardSink | None = None
        self.number = 0  # this listener's position in its DnsServer (for the ForwardSink)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer through `answer_slow` on `loop` without a thread of our own receiving:
        the --forward-process child, which sends from a listener socket the parent reads."""
        self._loop = loop
        self.slow.start(loop)

    def answer_slow(self, data: bytes, addr: Any) -> None:
        """On the event loop: answer a query the fast path left, as the thread's own are."""
        self._full(data, addr)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.slow.start(loop)
        self.sock.setblocking(True)
        port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"dnsd-udp-{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sched.request_slice(self.thread_slice)
        while not self._closed:
            try:
                if self.batch and udpbatch.available():
                    self._serve_batched()
                else:
                    self._serve_single()
            except Exception:
                # Never leave the port unserved: log, count, and serve on.
                log.exception("udp_thread_failed")
                self.handler.stats.drop("internal_error")
                time.sleep(0.1)

    def _serve_batched(self) -> None:
        assert self._loop is not None
        io = udpbatch.BatchIO(self.sock, self.handler.max_udp_size, self.batch)
        fast = self.handler.fast
        counts = self.handler.stats.fast_counts(False)
        hand_over = self.slow.put
        sample = self.sample

        def answer(data: bytes, i: int) -> bytes | None:
            try:
                result = fast(data, False, counts)
            except Exception:
                # A bug for one packet must not cost anyone else their answer.
                log.exception("query_failed", proto="udp")
                self.handler.stats.drop("internal_error")
                return None
            if sample and result is not None and random.random() < sample:
                _log_query(data, io.address(i), "udp", result)
            return result

        if self.handler.isolation is not None:
            # --namespace-isolation: a pod's question for a name it may not see goes to the
            # full path (a separate closure, so the path without the option is unchanged).
            allows = self.handler.fast_allows_packed
            plain = answer

            def answer(data: bytes, i: int) -> bytes | None:
                try:
                    if not allows(data, io.client_packed(i)):
                        return None
                except Exception:
                    log.exception("query_failed", proto="udp")
                    self.handler.stats.drop("internal_error")
                    return None
                return plain(data, i)

        forwards = self.handler.forwards
        shed = self.slow.shed
        # --forward-process: the batch's forwarded names, passed on together after the
        # batch's answers went out (one message and one wake-up of the child per batch).
        forwarded: list[tuple[bytes, bytes]] = []

        def leftover(data: bytes, i: int) -> None:
            if self.forwarding is not None and forwards(data):
                forwarded.append((io.sockaddr(i), data))
                return
            address = io.address(i)
            if address is not None:  # None: woken by close()
                hand_over(data, address)

        def flush() -> None:
            if not forwarded:
                return
            sink = self.forwarding
            lost, gone = (0, True) if sink is None else sink.offer(self.number, forwarded)
            if lost:
                shed["forward_queue_full"] = shed.get("forward_queue_full", 0) + lost
            if gone:  # the child ended: the event loop forwards, as without one
                for sockaddr, data in forwarded:
                    hand_over(data, udpbatch.sockaddr_to_python(sockaddr))
            forwarded.clear()

        io.serve(answer, leftover, self.handler.stats.drop, lambda: not self._closed, flush)

    def _serve_single(self) -> None:
        """One datagram per system call: where recvmmsg is missing (not Linux)."""
        assert self._loop is not None
        recv = self.sock.recvfrom
        sendto = self.sock.sendto
        fast = self.handler.fast
        stats = self.handler.stats
        hand_over = self.slow.put
        counts = stats.fast_counts(False)
        isolation = self.handler.isolation
        while not self._closed:
            try:
                data, addr = recv(_UDP_MAX)
            except OSError as err:
                if self._closed:
                    return
                if err.errno not in udpbatch.PEER_ERRORS:
                    log.warning("udp_receive_failed", problem=str(err))
                    stats.drop("udp_receive_failed")
                    time.sleep(0.01)  # never spin on an error that repeats
                continue
            if addr is None:  # woken by close()
                continue
            try:
                result = (
                    fast(data, False, counts)
                    if isolation is None or self.handler.fast_allows(data, addr[0])
                    else None
                )
            except Exception:
                log.exception("query_failed", proto="udp")
                stats.drop("internal_error")
                continue
            if result is None:
                hand_over(data, addr)
                continue
            try:
                sendto(result, addr)
            except OSError:
                stats.drop("udp_send_failed")
            if self.sample and random.random() < self.sample:
                _log_query(data, addr, "udp", result)

    def _full(self, data: bytes, addr: Any) -> None:
        """On the event loop: a query the fast path left."""
        if self._closed:
            return
        try:
            result = self.handler.full(data, False, addr[0])
        except Exception:
            log.exception("query_failed", proto="udp")
            self.handler.stats.drop("internal_error")
            return
        if result is None:
            return
        if result.__class__ is bytes:
            self._send(result, addr)
            if self.sample and random.random() < self.sample:
                _log_query(data, addr, "udp", result)
            return
        if isinstance(result, asyncio.Future):
            # A forwarded name: a callback when the answer is there, no task per query.
            result.add_done_callback(_Answered(self, data, addr))
            return
        assert self._loop is not None
        task = self._loop.create_task(
            self._send_later(data, cast(Coroutine[Any, Any, bytes | None], result), addr)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _answered(self, data: bytes, addr: Any, answer: asyncio.Future[bytes]) -> None:
        if answer.cancelled():
            return
        error = answer.exception()
        if error is not None:
            log.error("query_failed", proto="udp", exc_info=error)
            return
        response = answer.result()
        if not self._closed:
            self._send(response, addr)
        if self.sample and random.random() < self.sample:
            _log_query(data, addr, "udp", response)

    async def _send_later(
        self, data: bytes, pending: Coroutine[Any, Any, bytes | None], addr: Any
    ) -> None:
        try:
            response = await pending
        except Exception:
            log.exception("query_failed", proto="udp")
            return
        if response is not None and not self._closed:
            self._send(response, addr)
        if self.sample and random.random() < self.sample:
            _log_query(data, addr, "udp", response)

    def _send(self, response: bytes, addr: Any) -> None:
        """Send from the event loop without blocking it (the socket itself blocks)."""
        if self._backlog:
            self._queue(response, addr)
            return
        try:
            self.sock.sendto(response, socket.MSG_DONTWAIT, addr)
        except (BlockingIOError, InterruptedError):
            # The send buffer is full: queue the answer and send it when the socket is
            # writable again (as a transport would), up to a bound.
            self._queue(response, addr)
        except OSError:
            self.handler.stats.drop("udp_send_failed")

    def _queue(self, response: bytes, addr: Any) -> None:
        if len(self._backlog) >= UDP_BACKLOG:
            self.handler.stats.drop("udp_send_backlog")
            return
        if not self._backlog and self._loop is not None:
            self._loop.add_writer(self.sock.fileno(), self._writable)
        self._backlog.append((response, addr))

    def _writable(self) -> None:
        backlog = self._backlog
        sendto = self.sock.sendto
        while backlog:
            response, addr = backlog[0]
            try:
                sendto(response, socket.MSG_DONTWAIT, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.handler.stats.drop("udp_send_failed")
            backlog.popleft()
        if self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        for task in self._pending:
            task.cancel()
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            # Wakes the thread's blocking recvfrom (Linux returns an empty datagram with no
            # address, though the call itself reports ENOTCONN for an unconnected socket).
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)
            self._thread.join(timeout=2.0)
            if self._thread.is_alive():
                log.warning("udp_thread_still_running")
        if self._loop is not None and self._backlog:
            self._loop.remove_writer(self.sock.fileno())
        self._backlog.clear()
        self.sock.close()


class _Answered:
    """Sends a forwarded query's answer once its future is done (a small object with slots,
    held per query in flight: about 70 bytes where a functools.partial takes 216)."""

    __slots__ = ("addr", "data", "listener")

    def __init__(self, listener: UdpListener, data: bytes, addr: Any) -> None:
        self.listener, self.data, self.addr = listener, data, addr

    def __call__(self, answer: asyncio.Future[bytes]) -> None:
        self.listener._answered(self.data, self.addr, answer)


class TcpConnection(asyncio.Protocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.peer: Any = None
        self._idle: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._writable = asyncio.Event()  # clear while the transport's buffer is full
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        if len(self.server.connections) >= self.server.tcp_max_connections:
            self.server.handler.stats.drop("tcp_connection_limit")
            self.transport.abort()
            return
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._writable.set()
        if self._idle is not None:
            self._idle.cancel()
        for task in self._pending:
            task.cancel()

    def _arm_idle(self) -> None:
        # Re-armed only when a whole query arrived: a client trickling bytes still times out.
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.server.tcp_idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        if self.transport is not None and not self._pending:
            self.transport.close()
        elif self._pending:
            self._arm_idle()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 2:
            length = (buffer[0] << 8) | buffer[1]
            if length < 12 or length > MAX_TCP_QUERY:
                self.server.handler.stats.drop("tcp_bad_length")
                assert self.transport is not None
                self.transport.abort()
                return
            if len(buffer) < 2 + length:
                return
            message = bytes(buffer[2 : 2 + length])
            del buffer[: 2 + length]
            self._arm_idle()
            self._answer(message)

    def _answer(self, message: bytes) -> None:
        if self.server.transfer is not None and self._transfer(message):
            return
        try:
            client = str(self.peer[0]) if self.peer else None
            result = self.server.handler.handle(message, True, client)
        except Exception:
            log.exception("query_failed", proto="tcp")
            self.server.handler.stats.drop("internal_error")
            return
        if result is None:
            return
        if isinstance(result, bytes):
            self._write(result)
            if self.server.sample and random.random() < self.server.sample:
                _log_query(message, self.peer, "tcp", result)
            return
        task = asyncio.get_running_loop().create_task(self._write_later(result))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _transfer(self, message: bytes) -> bool:
        """An allowed AXFR/IXFR of a cluster zone: stream it; False leaves the message to
        the handler (which refuses transfers, CoreDNS's answer to a client not allowed)."""
        transfer = self.server.transfer
        assert transfer is not None
        try:
            query = wire.parse_query(message)
        except wire.Reject:
            return False
        request = transfer.request(query)
        if request is None:
            return False
        client = str(self.peer[0]) if self.peer else ""
        if not transfer.permits(client):
            transfer.refused(client, request)
            return False
        task = asyncio.get_running_loop().create_task(
            self._stream(transfer.messages(query, request))
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _stream(self, messages: AsyncIterator[bytes]) -> None:
        """Write a transfer's messages, waiting while the client has not read the last ones."""
        try:
            async for response in messages:
                self._write(response)
                self._arm_idle()
                await self._writable.wait()  # the transport's high-water mark paused us
                if self.transport is None or self.transport.is_closing():
                    return
                await asyncio.sleep(0)  # let queries in between two chunks
        except Exception:
            log.exception("zone_transfer_failed")
            self.server.handler.stats.drop("internal_error")

    async def _write_later(self, pending: Awaitable[bytes | None]) -> None:
        try:
            response = await pending
        except Exception:
            log.exception("query_failed", proto="tcp")
            return
        if response is not None:
            self._write(response)

    def _write(self, response: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(response).to_bytes(2, "big") + response)

    # Backpressure: a client that does not read its answers stops being read.
    def pause_writing(self) -> None:
        self._writable.clear()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


# setsockopt SO_ATTACH_REUSEPORT_CBPF (asm-generic/socket.h) and a one-instruction classic
# BPF program, `ret #1`: the group's socket at index 1 gets every packet, or the kernel's
# own hash picks one when the group has fewer sockets (linux/net/core/sock_reuseport.c).
SO_ATTACH_REUSEPORT_CBPF = 51
_BPF_RET_K = 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def steer_to_newest(sock: socket.socket) -> None:
    """Send the SO_REUSEPORT group of `sock` (its address and port) to the group's socket at
    index 1 from now on: in a rolling update with a surge, that is the successor's.

    A group lists its sockets in the order they joined, and a leaving socket's slot takes
    the last one: with one process per pod, the leaving dnsd is at index 0 and its successor,
    which joins once its zone is built, at index 1. So no query waits in the queue of a socket
    about to close. The program belongs to the group and outlives this process: while the
    group holds one socket, index 1 does not exist and the kernel's hash picks as before;
    the next successor gets every query from the moment it joins, ready as it then is.
    Linux only; raises OSError where classic BPF cannot be attached."""
    program = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, 1))
    fprog = _SockFprog(1, program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def port_in_use(family: int, host: str, port: int) -> bool:
    """True if another socket holds UDP `host`:`port` (a dnsd being replaced, or anything
    else): a bind with neither SO_REUSEADDR nor SO_REUSEPORT fails then."""
    if port == 0:
        return False
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _bind(family: int, kind: int, host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            except OSError:
                pass
        sock.bind((host, port))
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        raise


class DnsServer:
    """Every listen address, on UDP and TCP, answering through one Handler."""

    def __init__(
        self,
        handler: Handler,
        addresses: list[tuple[str, int]],
        *,
        reuse_port: bool = False,
        tcp_idle_timeout: float = 10.0,
        tcp_max_connections: int = 1000,
        query_log_sample: float = 0.0,
        transfer: ZoneTransfer | None = None,
        slow_queue: int = 256,
        udp_thread_slice: float = 0.0,
    ) -> None:
        self.handler = handler
        self.transfer = transfer  # None: no client may transfer the zone (the default)
        self.slow_queue = slow_queue
        self.udp_thread_slice = udp_thread_slice
        self.addresses = addresses
        self.reuse_port = reuse_port
        self.tcp_idle_timeout = tcp_idle_timeout
        self.tcp_max_connections = tcp_max_connections
        self.sample = query_log_sample
        self.connections: set[TcpConnection] = set()
        self.bound: list[tuple[str, int]] = []
        self._udp: list[UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self.listening = False

    async def start(self) -> list[tuple[str, int]]:
        """Bind every address (port 0: one ephemeral port shared by UDP and TCP)."""
        loop = asyncio.get_running_loop()
        for host, port in self.addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            udp_sock, tcp_sock = self._bind_pair(family, host, port)
            listener = UdpListener(
                udp_sock,
                self.handler,
                self.sample,
                slow_queue=self.slow_queue,
                thread_slice=self.udp_thread_slice,
            )
            listener.number = len(self._udp)
            listener.start(loop)
            self._udp.append(listener)
            tcp_sock.listen(1024)
            server = await loop.create_server(lambda: TcpConnection(self), sock=tcp_sock)
            self._tcp.append(server)
            self.bound.append((host, udp_sock.getsockname()[1]))
            log.info("dns_listening", address=host, port=udp_sock.getsockname()[1])
        self.listening = True
        return self.bound

    def _bind_pair(self, family: int, host: str, port: int) -> tuple[socket.socket, socket.socket]:
        for _ in range(20 if port == 0 else 1):
            udp = _bind(family, socket.SOCK_DGRAM, host, port, self.reuse_port)
            try:
                tcp = _bind(family, socket.SOCK_STREAM, host, udp.getsockname()[1], self.reuse_port)
            except OSError:
                udp.close()
                if port == 0:
                    continue  # the ephemeral UDP port is taken on TCP: try another
                raise
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {host}")

    def port_in_use(self) -> bool:
        """Another process already serves one of the listen addresses (see `port_in_use`)."""
        return any(
            port_in_use(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port)
            for host, port in self.addresses
        )

    def steer_to_successor(self) -> int:
        """`steer_to_newest` on every UDP and TCP listening socket; how many took it."""
        steered = 0
        socks = [listener.sock for listener in self._udp]
        for server in self._tcp:
            socks.extend(server.sockets)
        for sock in socks:
            try:
                steer_to_newest(sock)
                steered += 1
            except OSError as err:
                log.warning("steer_failed", problem=str(err))
        return steered

    def udp_sockets(self) -> list[socket.socket]:
        """The bound UDP sockets, in listener-number order."""
        return [listener.sock for listener in self._udp]

    def forward_through(self, sink: ForwardSink | None) -> None:
        """Hand the UDP threads' forwarded names to `sink` (None: to the event loop again)."""
        for listener in self._udp:
            listener.forwarding = sink

    async def stop(self) -> None:
        self.listening = False
        for protocol in self._udp:
            protocol.close()
        for server in self._tcp:
            server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        for server in self._tcp:
            await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()
