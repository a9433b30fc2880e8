"""The connect phase of client connections: try each one's candidate backends in order, each
with the next timeout of the ladder (kube-proxy's userspace mode: 250 ms, 500 ms, 1 s, 2 s), as
readiness callbacks on the event loop.

A `Dialer` owns the connects under way; it is given what it needs (the fd watcher, the loop's
timers, the ladder, the counters and a `DialDone` callback) and knows nothing of the proxy that
uses it. `Dialer.dial` starts a `Dial`, which ends by calling `on_done` with either a connected
backend socket or None (every candidate failed, or no socket could be made): the proxy then
relays or resets the client.

In transparent mode a `Dial` may carry `source`, the client's address: each attempt's socket is
bound to it (IP_TRANSPARENT) so the backend sees the client, except when the backend is the
client itself (hairpin: kube-proxy masquerades that, and a socket cannot connect to its own
address anyway), shares the client's link (its reply would bypass the node: kpx/links.py) or
is of the other family.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from kpx.backends import Backend, Picker
from kpx.transparent import bind_transparent

log = structlog.get_logger("kpx.dial")

BackendKey = tuple[str, int]


class DialCounters(Protocol):
    """The counters a `Dialer` keeps up to date (kpx/proxy.py's ProxyStats has them)."""

    # Connect attempts to a backend that were refused, failed or timed out.
    backend_failures: int
    # Connect attempts after the first for one client connection.
    backend_retries: int
    # Client connections whose every candidate failed.
    backends_exhausted: int


class ConnectWatcher(Protocol):
    """Readiness callbacks per fd (kpx/poller.py's Poller)."""

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None: ...

    def forget(self, fd: int) -> None:
        """Drop `fd`'s callbacks: it is closed next."""


# The end of one connect phase: (the dial, its connected backend socket or None, whether the
# watcher still watches that socket for writability: the caller takes the registration over).
DialDone = Callable[["Dial", _socket.socket | None, bool], None]
# asyncio's `loop.call_later`.
CallLater = Callable[..., asyncio.TimerHandle]


def _never(_a: str, _b: str) -> bool:
    return False


class Dialer:
    """The connects under way, and how to make one: `dial` starts one per client connection."""

    __slots__ = ("call_later", "counters", "dials", "ladder", "on_done", "same_link", "watcher")

    def __init__(
        self,
        watcher: ConnectWatcher,
        call_later: CallLater,
        ladder: Sequence[float],
        counters: DialCounters,
        on_done: DialDone,
        same_link: Callable[[str, str], bool] | None = None,
    ) -> None:
        if not ladder:
            raise ValueError("the connect ladder needs at least one timeout")
        self.watcher = watcher
        self.call_later = call_later
        # Connect timeout per attempt; its length is also the number of attempts.
        self.ladder = tuple(ladder)
        self.counters = counters
        self.on_done = on_done
        # Whether two addresses share a link (kpx/links.py): such a backend would answer the
        # client directly, so a dial connects to it from the node's address.
        self.same_link: Callable[[str, str], bool] = same_link or _never
        # The connects under way (waiting for the handshake: most backends on this node
        # complete it within connect() and never show up here).
        self.dials: set[Dial] = set()

    def dial(
        self,
        client: _socket.socket,
        client_ip: str,
        picker: Picker,
        candidates: list[Backend],
        source: str | None = None,
    ) -> None:
        """Connect `client` to the first of `candidates` that answers; `on_done` says how."""
        Dial(self, client, client_ip, picker, candidates, source).next_attempt()

    def finish(self, dial: Dial, sock: _socket.socket | None, watched: bool = False) -> None:
        self.dials.discard(dial)
        self.on_done(dial, sock, watched)

    def close_backend(self, key: BackendKey, drain: bool) -> int:
        """Backend `key` left every Service: no dial tries it any more, and with `drain` the
        connects to it under way are marked `draining`. Returns how many were under way."""
        connecting = [d for d in self.dials if d.sock is not None and d.backend_key() == key]
        for dial in self.dials:
            dial.forget_candidate(key)
        if drain:
            for dial in connecting:
                dial.draining = True
        return len(connecting)

    def restore_backend(self, key: BackendKey) -> None:
        """Backend `key` is offered again: its connects under way are no longer draining."""
        for dial in self.dials:
            if dial.backend_key() == key:
                dial.draining = False

    def cancel_all(self) -> int:
        """Give every connect up now (stop): each ends with None. Returns how many."""
        dials = list(self.dials)
        for dial in dials:
            dial.cancel()
            self.finish(dial, None)
        return len(dials)


class Dial:
    """The connect phase of one client connection: walk the candidates with the timeout ladder."""

    __slots__ = (
        "attempt",
        "backend",
        "candidates",
        "client",
        "client_ip",
        "dialer",
        "draining",
        "picker",
        "sock",
        "source",
        "timer",
    )

    def __init__(
        self,
        dialer: Dialer,
        client: _socket.socket,
        client_ip: str,
        picker: Picker,
        candidates: list[Backend],
        source: str | None = None,
    ) -> None:
        self.dialer = dialer
        self.client = client
        self.client_ip = client_ip
        self.picker = picker
        self.candidates = candidates
        # Connect from this address (the client's) instead of the node's; None: the node's.
        self.source = source
        self.attempt = 0
        self.backend: Backend | None = None
        self.sock: _socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        # The backend was closed (`Dialer.close_backend`) while this connect was under way.
        self.draining = False

    def backend_key(self) -> BackendKey | None:
        backend = self.backend
        return None if backend is None else (backend.ip, backend.port)

    def next_attempt(self) -> None:
        dialer = self.dialer
        ladder = dialer.ladder
        while self.attempt < len(self.candidates) and self.attempt < len(ladder):
            backend = self.candidates[self.attempt]
            timeout = ladder[self.attempt]
            if self.attempt:
                dialer.counters.backend_retries += 1
            self.attempt += 1
            self.backend = backend
            family = socket.AF_INET6 if ":" in backend.ip else socket.AF_INET
            try:
                sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # EMFILE: nothing else will work either
                log.error("backend_socket_failed", error=exc.strerror)
                dialer.finish(self, None)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            source = self.source
            if (
                source is not None
                and source != backend.ip
                and (":" in source) == (family == socket.AF_INET6)
                and not dialer.same_link(source, backend.ip)
            ):
                try:
                    bind_transparent(sock, source)
                except OSError as exc:  # lost the capability? connect from the node then
                    log.warning("source_bind_failed", source=source, error=exc.strerror)
                    sock.close()
                    sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((backend.ip, backend.port))
            if err == errno.EINPROGRESS:
                try:
                    # A backend on this node (a veth, loopback) has often answered the SYN by
                    # the time connect() returns (the kernel runs the whole handshake in its
                    # softirq on this CPU): then one syscall saves a registration for
                    # writability and a wake-up.
                    sock.getpeername()
                except OSError:
                    self.sock = sock
                    dialer.dials.add(self)
                    dialer.watcher.add_writer(sock.fileno(), self.on_connect_ready)
                    self.timer = dialer.call_later(timeout, self.on_connect_timeout)
                    return
                dialer.finish(self, sock)
                return
            if err == 0:  # loopback may connect at once
                dialer.finish(self, sock)
                return
            sock.close()
            self.failed(errno.errorcode.get(err, str(err)))
        self.all_failed()

    def on_connect_ready(self) -> None:
        sock = self.sock
        assert sock is not None and self.timer is not None
        # A peer address means connected: one syscall in the common case. The socket is
        # asked rather than the event trusted: the event may be a closed socket's that had
        # this fd number (its file kept alive for a moment by a forked child, see
        # kpx/poller.py `forget`).
        try:
            sock.getpeername()
            err = 0
        except OSError:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                return  # not connected, no error: that stale event; the handshake goes on
        self.timer.cancel()
        self.timer = None
        self.sock = None
        if err == 0:
            # Still watched for writing: the relay takes the registration over.
            self.dialer.finish(self, sock, True)
            return
        self.dialer.watcher.forget(sock.fileno())
        sock.close()
        self.failed(errno.errorcode.get(err, str(err)))
        self.next_attempt()

    def on_connect_timeout(self) -> None:
        sock = self.sock
        assert sock is not None
        self.dialer.watcher.forget(sock.fileno())
        self.timer = None
        self.sock = None
        sock.close()
        self.failed("timeout")
        self.next_attempt()

    def failed(self, reason: str) -> None:
        backend = self.backend
        assert backend is not None
        self.dialer.counters.backend_failures += 1
        log.info(
            "backend_connect_failed",
            backend_ip=backend.ip,
            backend_port=backend.port,
            reason=reason,
            attempt=self.attempt,
            client=self.client_ip,
        )
        try:
            self.picker.report_failure(backend)
        except Exception:
            log.exception("picker_report_failure_crashed")

    def all_failed(self) -> None:
        self.dialer.counters.backends_exhausted += 1
        log.warning("backend_connect_exhausted", client=self.client_ip, attempts=self.attempt)
        self.dialer.finish(self, None)

    def forget_candidate(self, key: BackendKey) -> None:
        """Drop backend `key` from the attempts still to come (it left every Service)."""
        done, rest = self.candidates[: self.attempt], self.candidates[self.attempt :]
        if any((b.ip, b.port) == key for b in rest):
            self.candidates = done + [b for b in rest if (b.ip, b.port) != key]

    def cancel(self) -> None:
        """Give up now (proxy stop deadline): close the half-made backend socket."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sock = self.sock
        if sock is not None:
            self.dialer.watcher.forget(sock.fileno())
            sock.close()
            self.sock = None
