"""Zero-copy relay of one proxied TCP connection: socket -> pipe -> socket with `os.splice`.

Each direction moves bytes in two splices (source socket into a pipe, pipe into the destination
socket), driven by the event loop's readiness callbacks on the raw fds, so payload never becomes
a Python object. A direction reads only when its pipe is empty: when the destination cannot take
everything, it stops reading the source and waits for the destination to become writable
(backpressure is the kernel's socket buffers plus at most one pipe of data in flight).

Pipes are borrowed from a `PipePool` only while data is in flight: an idle connection holds its
two sockets and nothing else, which keeps a 5,000-idle-connection node far below the open-file
limit (two sockets per connection instead of six fds) and its memory small.

Small messages are copied instead (recv into the pool's scratch buffer, send), as haproxy does
before it starts splicing: for a request of a few hundred bytes two splices, a pipe taken from
the pool and given back cost more, in the kernel and in Python calls, than two copies
(bench/conncost.py). A direction copies until one read fills the scratch buffer (COPY_MAX):
from then on it splices. What a copy could not send goes into a pipe (it fits: an empty pipe
holds at least PIPE_BUF bytes), so bytes in flight are always in a pipe, as the handover
(kpx/handover.py) expects, and the splice path's backpressure takes over.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol

import structlog

log = structlog.get_logger("kpx.splice")

# One splice asks for up to this much; the pipe's capacity bounds what actually moves.
SPLICE_CHUNK = 1 << 20
# Reads up to this size are copied (recv, send) rather than spliced; a read that fills it turns
# its direction to splicing. PIPE_BUF, so the unsent rest of a copy always fits an empty pipe.
COPY_MAX = select.PIPE_BUF
DEFAULT_PIPE_SIZE = 1 << 20
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RESET = struct.pack("ii", 1, 0)

Pipe = tuple[int, int]


def reset_socket(sock: _socket.socket) -> None:
    """Close `sock` with a TCP RST instead of a FIN (SO_LINGER on with a zero timeout)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already dead (e.g. reset by the peer): a plain close is all that is left
    sock.close()


class PipePool:
    """Empty, non-blocking pipes kept for reuse, so a busy relay does not pay pipe2 + fcntl
    per burst and an idle relay holds none."""

    __slots__ = ("_free", "_max_free", "_pipe_size", "_resize_refused", "created", "scratch")

    def __init__(self, pipe_size: int = DEFAULT_PIPE_SIZE, max_free: int = 64) -> None:
        self._free: list[Pipe] = []
        # The buffer small messages are copied through (one per pool, that is per proxy and
        # event loop: a copy is over before the callback returns).
        self.scratch = memoryview(bytearray(COPY_MAX))
        self._max_free = max_free
        # Desired capacity (0: keep the kernel's default, 64 KiB).
        self._pipe_size = pipe_size
        # The kernel refused the size once (pipe-max-size, per-user pipe page limit): logged.
        self._resize_refused = False
        # Pipes ever created (for tests and debugging).
        self.created = 0

    def acquire(self) -> Pipe:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.created += 1
        if self._pipe_size:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self._pipe_size)
            except OSError as exc:
                # A smaller pipe still works, only with more splices per megabyte. Keep trying
                # for later pipes: the per-user limit frees up as other pipes close.
                if not self._resize_refused:
                    log.warning("pipe_resize_refused", size=self._pipe_size, error=exc.strerror)
                    self._resize_refused = True
        return r, w

    def release(self, pipe: Pipe) -> None:
        """Return an EMPTY pipe; a pipe that may still hold data must go to `discard`."""
        if len(self._free) < self._max_free:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: Pipe) -> None:
        os.close(pipe[0])
        os.close(pipe[1])

    @property
    def free(self) -> int:
        return len(self._free)

    def close(self) -> None:
        while self._free:
            self.discard(self._free.pop())


class FdWatcher(Protocol):
    """What a relay needs of an event loop: level-triggered readiness callbacks per fd, as
    the proxy's kpx.poller.Poller gives them."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...

    def remove_reader(self, fd: int) -> bool: ...

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None: ...

    def remove_writer(self, fd: int) -> bool: ...

    def writer_to_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Watch `fd` for reading instead of writing, in one change."""

    def forget(self, fd: int) -> None:
        """Drop `fd`'s callbacks: it is closed next, which takes it out of the set."""


class DirectionState(NamedTuple):
    """One direction of a relay as a handover carries it (kpx/handover.py): the bytes in its
    pipe (the pipe itself travels as two fds when there are any), whether its source said EOF
    and whether that EOF was passed on."""

    pending: int
    eof: bool
    done: bool


class RelayCounters:
    """Byte counters shared by every relay of one proxy (read by the metrics endpoint)."""

    __slots__ = ("bytes_to_backend", "bytes_to_client")

    def __init__(self) -> None:
        self.bytes_to_backend = 0
        self.bytes_to_client = 0


class _Direction:
    """One direction of a relay: src socket -> pipe -> dst socket."""

    __slots__ = (
        "copying",
        "done",
        "dst",
        "dst_fd",
        "eof",
        "pending",
        "pipe",
        "reading",
        "relay",
        "src",
        "src_fd",
        "upstream",
        "writing",
    )

    def __init__(
        self,
        relay: Relay,
        src: _socket.socket,
        dst: _socket.socket,
        upstream: bool,
        src_fd: int,
        dst_fd: int,
    ) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        # True for client -> backend (decides which byte counter grows).
        self.upstream = upstream
        self.pipe: Pipe | None = None
        # Bytes spliced into the pipe and not yet out of it.
        self.pending = 0
        # Registered as a reader of src / a writer of dst with the loop.
        self.reading = False
        self.writing = False
        # src reached EOF; `done` once that EOF was passed on (shutdown of dst's write side).
        self.eof = False
        self.done = False
        # Small reads are copied, not spliced, until one fills COPY_MAX (the module's doc).
        self.copying = True

    def start_reading(self) -> None:
        self.relay.loop.add_reader(self.src_fd, self.on_readable)
        self.reading = True

    def on_readable(self) -> None:
        relay = self.relay
        pipe = self.pipe
        if pipe is None and self.copying:
            scratch = relay.pool.scratch
            try:
                n = self.src.recv_into(scratch, COPY_MAX)
            except BlockingIOError:
                return
            except OSError:
                relay.abort()
                return
            if n:
                relay.idle_sweeps = 0
                if n == COPY_MAX:
                    self.copying = False  # bulk: splice from the next read on
                try:
                    sent = self.dst.send(scratch[:n])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    relay.abort()
                    return
                if sent:
                    if self.upstream:
                        relay.counters.bytes_to_backend += sent
                    else:
                        relay.counters.bytes_to_client += sent
                if sent == n:
                    return
                # The destination is full: the rest waits in a pipe, sent by `flush` as
                # the destination drains (and handed over as any pipe's bytes are).
                try:
                    pipe = self.pipe = relay.pool.acquire()
                    written = os.write(pipe[1], scratch[sent:n])
                except OSError as exc:
                    log.error("pipe_create_failed", error=exc.strerror)
                    relay.abort()
                    return
                if written != n - sent:  # cannot happen with an empty pipe (PIPE_BUF)
                    log.error("pipe_write_short", wanted=n - sent, written=written)
                    relay.abort()
                    return
                self.pending = n - sent
                self.flush()
                return
            # EOF: as the splice path's below, with nothing in flight.
            self.eof = True
            self.reading = False
            if not (relay._down if self.upstream else relay._up).done:
                relay.loop.remove_reader(self.src_fd)
            self.flush()
            return
        if pipe is None:
            try:
                pipe = self.pipe = relay.pool.acquire()
            except OSError as exc:  # EMFILE/ENFILE: cannot relay this connection any more
                log.error("pipe_create_failed", error=exc.strerror)
                relay.abort()
                return
        try:
            n = os.splice(self.src_fd, pipe[1], SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            # Spurious wake-up (the pipe is empty, so the socket has nothing): an idle
            # connection must not sit on a pipe.
            self.pipe = None
            relay.pool.release(pipe)
            return
        except OSError:
            relay.abort()  # ECONNRESET, ETIMEDOUT, ...: pass the reset on to the other side
            return
        relay.idle_sweeps = 0
        if n == 0:
            self.eof = True
            self.reading = False
            # When the other direction ended already, the relay closes both sockets right
            # away (`pass_eof`) and forgets their fds then: no change of interest before.
            if not (relay._down if self.upstream else relay._up).done:
                relay.loop.remove_reader(self.src_fd)
        self.pending = n
        self.flush()

    def on_writable(self) -> None:
        self.relay.idle_sweeps = 0
        self.flush()

    def flush(self) -> None:
        relay = self.relay
        pending = self.pending
        if pending:
            pipe_r = self.pipe[0]  # type: ignore[index]  # pending > 0 implies a pipe
            while pending:
                try:
                    n = os.splice(pipe_r, self.dst_fd, pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    break
                except OSError:
                    relay.abort()  # EPIPE/ECONNRESET: the destination was reset
                    return
                if n == 0:
                    break
                pending -= n
                if self.upstream:
                    relay.counters.bytes_to_backend += n
                else:
                    relay.counters.bytes_to_client += n
            self.pending = pending
            if pending:
                # Backpressure: the destination is full; read no more until it drains.
                if self.reading:
                    relay.loop.remove_reader(self.src_fd)
                    self.reading = False
                if not self.writing:
                    relay.loop.add_writer(self.dst_fd, self.on_writable)
                    self.writing = True
                return
        if self.writing:
            relay.loop.remove_writer(self.dst_fd)
            self.writing = False
        if self.pipe is not None:
            relay.pool.release(self.pipe)
            self.pipe = None
        if self.eof:
            self.pass_eof()
        elif not self.reading:
            self.start_reading()

    def pass_eof(self) -> None:
        """Half-close: src said it will send no more, so tell dst the same, and keep the
        other direction running."""
        relay = self.relay
        # The other direction ended already: the relay now closes both sockets, and the close
        # sends this FIN (dst's receive queue is empty, it gave EOF), so no shutdown call.
        if not (relay._up.done or relay._down.done):
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                relay.abort()  # ENOTCONN: dst was reset meanwhile
                return
        self.done = True
        self.relay.direction_done()

    def state(self) -> DirectionState:
        return DirectionState(self.pending, self.eof, self.done)

    def resume(self, state: DirectionState, pipe: Pipe | None) -> None:
        """Continue from a handed-over `state`: deliver what its pipe holds, pass its EOF on,
        or read again."""
        self.pending, self.eof, self.done = state
        self.pipe = pipe
        if self.done:
            return
        if self.pending or self.eof:
            self.flush()
        else:
            self.start_reading()

    def unregister(self) -> None:
        if self.reading:
            self.relay.loop.remove_reader(self.src_fd)
            self.reading = False
        if self.writing:
            self.relay.loop.remove_writer(self.dst_fd)
            self.writing = False

    def drop_pipe(self) -> None:
        pipe = self.pipe
        if pipe is None:
            return
        self.pipe = None
        if self.pending:
            PipePool.discard(pipe)  # holds bytes nobody will read
        else:
            self.relay.pool.release(pipe)


class Relay:
    """Moves bytes both ways between an accepted client socket and a connected backend socket
    until both directions ended (graceful close) or either side was reset (reset both)."""

    __slots__ = (
        "_down",
        "_on_closed",
        "_up",
        "backend",
        "client",
        "closed",
        "counters",
        "idle_sweeps",
        "loop",
        "pool",
        "tag",
    )

    def __init__(
        self,
        loop: FdWatcher,
        client: _socket.socket,
        backend: _socket.socket,
        pool: PipePool,
        counters: RelayCounters,
        on_closed: Callable[[Relay], None],
        tag: object = None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        self.pool = pool
        self.counters = counters
        self._on_closed = on_closed
        # Opaque to the relay: the proxy files connections under their backend with it.
        self.tag = tag
        self.closed = False
        # Idle-timeout sweeps since bytes last moved (reset by every splice; see Proxy).
        self.idle_sweeps = 0
        client_fd, backend_fd = client.fileno(), backend.fileno()
        self._up = _Direction(self, client, backend, True, client_fd, backend_fd)
        self._down = _Direction(self, backend, client, False, backend_fd, client_fd)

    def start(self, backend_watched: bool = False) -> None:
        """Watch both sockets for data; `backend_watched`: the backend socket is watched for
        writing still (its connect), which becomes a watch for reading in one change."""
        self._up.start_reading()
        down = self._down
        if backend_watched:
            self.loop.writer_to_reader(down.src_fd, down.on_readable)
            down.reading = True
        else:
            down.start_reading()

    def read_client(self) -> None:
        """Relay what the client sent already, without waiting for the loop to report it:
        most clients send their first bytes (an HTTP request, a TLS ClientHello) while the
        backend connect runs, so this saves a loop wake-up per connection. When the client
        sent nothing (a server-speaks-first protocol) it costs one splice (EAGAIN)."""
        if not self.closed and self._up.reading:
            self._up.on_readable()

    # -- handover (kpx/handover.py) --------------------------------------------------------

    def freeze(self) -> tuple[DirectionState, DirectionState, list[Pipe]]:
        """Stop watching the sockets and return both directions' states and the pipes that
        hold bytes (upstream's first): the relay is still whole, ready to be sent to another
        process or `resume`d here."""
        up, down = self._up, self._down
        up.unregister()
        down.unregister()
        pipes = [d.pipe for d in (up, down) if d.pending and d.pipe is not None]
        return up.state(), down.state(), pipes

    def resume(
        self, up: DirectionState, down: DirectionState, pipes: list[Pipe] | None = None
    ) -> None:
        """Run from frozen (or handed-over) states; `pipes` as `freeze` returned them."""
        queue = list(pipes or ())
        self._up.resume(up, queue.pop(0) if up.pending else None)
        self._down.resume(down, queue.pop(0) if down.pending else None)

    def release(self) -> None:
        """After a handover: close this process's copies of the sockets and pipes, sending
        nothing (no FIN, no reset): the process that took them over holds the connection."""
        if self.closed:
            return
        self.closed = True
        for direction in (self._up, self._down):
            direction.unregister()
            if direction.pipe is not None:
                PipePool.discard(direction.pipe)
                direction.pipe = None
            del direction.relay
        self.client.close()
        self.backend.close()

    def direction_done(self) -> None:
        if self._up.done and self._down.done:
            self._teardown(reset=False)

    def close(self) -> None:
        """End the connection now from kpx's side (idle timeout): FIN to both sides when no byte
        is in flight, else RST so neither side mistakes a cut stream for a complete one."""
        self._teardown(reset=bool(self._up.pending or self._down.pending))

    def abort(self) -> None:
        """Reset both sides (a reset on one side, a drain timeout, shutdown)."""
        self._teardown(reset=True)

    def _teardown(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        # Both sockets are closed below, which takes them out of the epoll set.
        self.loop.forget(self._up.src_fd)
        self.loop.forget(self._down.src_fd)
        for direction in (self._up, self._down):
            direction.reading = direction.writing = False
            if direction.pipe is not None:
                direction.drop_pipe()
            # Break the relay <-> direction reference cycle: reference counting frees the
            # connection's objects now, so the data path gives the cyclic garbage collector
            # nothing to do and never triggers its full collections (latency spikes).
            del direction.relay
        if reset:
            reset_socket(self.client)
            reset_socket(self.backend)
        else:
            self.client.close()
            self.backend.close()
        self._on_closed(self)
