"""The connect phase of one client connection: try its candidate backends in order, each
with the next timeout of the proxy's ladder (kube-proxy's userspace mode: 250 ms, 500 ms, 1 s,
2 s), as readiness callbacks on the event loop.

In transparent mode a `Dial` may carry `source`, the client's address: each attempt's socket is
bound to it (IP_TRANSPARENT) so the backend sees the client, except when the backend is the
client itself (hairpin: kube-proxy masquerades that, and a socket cannot connect to its own
address anyway), shares the client's link (its reply would bypass the node: kpx/links.py) or
is of the other family.

A `Dial` ends by handing the proxy either a connected backend socket or None (every candidate
failed, or no socket could be made): `Proxy._end_dial` then relays or resets the client.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import TYPE_CHECKING

import structlog

from kpx.backends import Backend, Picker
from kpx.transparent import bind_transparent

if TYPE_CHECKING:
    from kpx.proxy import BackendKey, Proxy

log = structlog.get_logger("kpx.dial")


class Dial:
    """The connect phase of one client connection: walk the candidates with the timeout ladder."""

    __slots__ = (
        "attempt",
        "backend",
        "candidates",
        "client",
        "client_ip",
        "draining",
        "picker",
        "proxy",
        "sock",
        "source",
        "timer",
    )

    def __init__(
        self,
        proxy: Proxy,
        client: socket.socket,
        client_ip: str,
        picker: Picker,
        candidates: list[Backend],
        source: str | None = None,
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.client_ip = client_ip
        self.picker = picker
        self.candidates = candidates
        # Connect from this address (the client's) instead of the node's; None: the node's.
        self.source = source
        self.attempt = 0
        self.backend: Backend | None = None
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        # The backend was closed (`close_backend`) while this connect was under way.
        self.draining = False

    def next_attempt(self) -> None:
        proxy = self.proxy
        ladder = proxy.connect_ladder
        while self.attempt < len(self.candidates) and self.attempt < len(ladder):
            backend = self.candidates[self.attempt]
            timeout = ladder[self.attempt]
            if self.attempt:
                proxy.stats.backend_retries += 1
            self.attempt += 1
            self.backend = backend
            family = socket.AF_INET6 if ":" in backend.ip else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # EMFILE: nothing else will work either
                log.error("backend_socket_failed", error=exc.strerror)
                proxy._end_dial(self, None)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            source = self.source
            if (
                source is not None
                and source != backend.ip
                and (":" in source) == (family == socket.AF_INET6)
                and not proxy.same_link(source, backend.ip)
            ):
                try:
                    bind_transparent(sock, source)
                except OSError as exc:  # lost the capability? connect from the node then
                    log.warning("source_bind_failed", source=source, error=exc.strerror)
                    sock.close()
                    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((backend.ip, backend.port))
            if err == errno.EINPROGRESS:
                self.sock = sock
                proxy.poller.add_writer(sock.fileno(), self.on_connect_ready)
                self.timer = proxy.loop.call_later(timeout, self.on_connect_timeout)
                return
            if err == 0:  # loopback may connect at once
                proxy._end_dial(self, sock)
                return
            sock.close()
            self.failed(errno.errorcode.get(err, str(err)))
        self.all_failed()

    def on_connect_ready(self) -> None:
        sock = self.sock
        assert sock is not None and self.timer is not None
        # A peer address means connected: one syscall in the common case.
        try:
            sock.getpeername()
            err = 0
        except OSError:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                # Not connected and no error: a stale readiness event for an earlier socket
                # that had this fd number (closed in the same loop iteration); the handshake
                # is still running.
                return
        self.timer.cancel()
        self.timer = None
        self.sock = None
        if err == 0:
            # Still watched for writing: the relay takes the registration over.
            self.proxy._end_dial(self, sock, watched=True)
            return
        self.proxy.poller.remove_writer(sock.fileno())
        sock.close()
        self.failed(errno.errorcode.get(err, str(err)))
        self.next_attempt()

    def on_connect_timeout(self) -> None:
        sock = self.sock
        assert sock is not None
        self.proxy.poller.remove_writer(sock.fileno())
        self.timer = None
        self.sock = None
        sock.close()
        self.failed("timeout")
        self.next_attempt()

    def failed(self, reason: str) -> None:
        backend = self.backend
        assert backend is not None
        stats = self.proxy.stats
        stats.backend_failures += 1
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
        self.proxy.stats.backends_exhausted += 1
        log.warning("backend_connect_exhausted", client=self.client_ip, attempts=self.attempt)
        self.proxy._end_dial(self, None)

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
            self.proxy.poller.remove_writer(sock.fileno())
            sock.close()
            self.sock = None
