"""kpx's UDP data path: client datagrams -> session -> endpoint, and the answers back.

Two ways in, as for TCP:
- `serve_port(listen_host, listen_port, frontend_ip, frontend_port)`: `--mode ports`, one socket
  per frontend; answers leave from that same socket, the address the client sent to.
- `serve_transparent(host, port)`: nftables `tproxy` hands every steered datagram to one
  IP_TRANSPARENT socket per family; IP_RECVORIGDSTADDR gives each datagram's original
  destination (the frontend). Answers leave from a transparent socket bound to exactly that
  address and port (VIP:port, nodeIP:nodePort), one per frontend, never from a wildcard; that
  socket is read too, for datagrams that reach the frontend address without tproxy (bridged
  pods under br_netfilter: kpx/udp_nft.py).

In transparent mode `source_address` (kpx/source.py's decision, shared with TCP) says whether a
new session sends from the client's address; hairpin and endpoints on the client's own link
get the node's.

Per session (kpx/udp_sessions.py) one socket connected to the endpoint: its source port names
the session, the kernel filters out strangers, and an ICMP error from the endpoint shows up as
ECONNREFUSED on it (the endpoint is then put in cool-down and the client's next datagram picks
another one). Session sockets sit in one epoll of the relay's, which the event loop watches as
one reader: an event-loop handle per session would cost memory (uvloop: a poll handle each) and
a callback per ready session.

The hot path: sockets are watched with `add_reader` (not asyncio's datagram transport, which
reads one datagram per wake-up and, on uvloop, cannot pass IP_RECVORIGDSTADDR); a readable socket
is drained with recvmmsg until it would block (bounded rounds, then back to the loop). A batch's
datagrams are grouped by session and each group leaves as one run (kpx/udp_forward.py: one UDP
GSO send when the sizes allow, else one sendmmsg), straight from the receive buffers; an
endpoint's answers leave the same way, one run per batch read from its socket. Sessions are
keyed on the raw sockaddr bytes (plus the frontend's), so a datagram on an established session
builds no address tuple. Datagrams up to 65,507 bytes pass whole (the kernel reassembles
fragments before we see them).

Never stale: `invalidate()` (called after each sync) bumps an epoch; a session stamped with an
older epoch is re-checked on its next datagram: its frontend must still exist and its picker
still offer its endpoint, else it moves to a fresh pick. A frontend without endpoints creates no
session, so a client that kept sending is served by its first datagram after one appears.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from kpx.backends import Backend
from kpx.udp_forward import RunSender
from kpx.udp_sessions import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_SESSIONS, Session, SessionTable
from kwatch.mmsg import (
    CONTROLLEN_I,
    FLAGS_I,
    MSG_TRUNC,
    NAME_SIZE,
    NAMELEN_I,
    PEER_ERRORS,
    RecvBatch,
    sockaddr_to_python,
)

log = structlog.get_logger("kpx.udp")

BATCH = 32  # datagrams per recvmmsg/sendmmsg
MAX_DATAGRAM = 65536  # buffer per datagram: the largest UDP payload (65,527 over IPv6) fits
DRAIN_ROUNDS = 8  # batches per readiness callback before other sockets get their turn
MAX_READY_SESSIONS = 256  # sessions drained per wake-up of their epoll before the loop's turn
CONTROL_SIZE = 64  # cmsghdr (16) + sockaddr_in6 (28), aligned
SOCKET_BUFFER = 4 << 20  # SO_RCVBUF asked for on client-facing sockets (bursts)

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IPV6_RECVORIGDSTADDR = 74

DROP_REASONS = (
    "no_endpoints",  # the frontend has no endpoint for this client (reject/drop/local)
    "unknown_frontend",  # the destination is no UDP frontend of kpx
    "no_original_destination",  # a transparent datagram without IP_ORIGDSTADDR
    "truncated",  # larger than the buffer (cannot happen for UDP; counted if it does)
    "backend_send_failed",  # the endpoint's socket refused the datagram (full, unreachable)
    "client_send_failed",  # the answer could not be sent to the client
    "backend_unreachable",  # ICMP error from the endpoint: its session ended
    "socket_error",  # no socket for a new session (EMFILE, ...)
)


class SessionPicker(Protocol):
    """The balancer's picker (kpx/balancer.py), as the relay uses it."""

    def candidates(self, client_ip: str) -> list[Backend]: ...

    def offers(self, backend: Backend, client_ip: str) -> bool: ...

    def report_failure(self, backend: Backend) -> None: ...


class UdpFrontends(Protocol):
    def lookup(self, ip: str, port: int) -> Any:
        """The frontend's picker (a SessionPicker) or None."""
        ...


# (frontend ip, frontend port, client ip) -> the address to send to the endpoint from, or None
# for the node's own (kpx/source.py's SourceAddresses in transparent mode).
SourceAddress = Callable[[str, int, str], "str | None"]


class UdpStats:
    """Counters for /metrics, plain integers on the hot path."""

    __slots__ = (
        "bytes_to_backend",
        "bytes_to_client",
        "datagrams_to_backend",
        "datagrams_to_client",
        "drops",
        "sessions_created",
        "sessions_evicted",
        "sessions_expired",
        "sessions_retargeted",
    )

    def __init__(self) -> None:
        self.sessions_created = 0
        self.sessions_expired = 0
        self.sessions_evicted = 0
        # Sessions moved to another endpoint because theirs left (or failed).
        self.sessions_retargeted = 0
        self.datagrams_to_backend = 0
        self.datagrams_to_client = 0
        self.bytes_to_backend = 0
        self.bytes_to_client = 0
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)


class UdpListener:
    """A client-facing socket: one frontend's (ports mode) or every frontend's (transparent)."""

    __slots__ = ("_relay", "fd", "frontend", "sock", "tag")

    def __init__(
        self, relay: UdpRelay, sock: socket.socket, frontend: tuple[str, int] | None
    ) -> None:
        self._relay = relay
        self.sock = sock
        self.fd = sock.fileno()
        self.frontend = frontend  # None: from each datagram's original destination
        # Appended to the client's sockaddr to key its session on this frontend.
        self.tag = b"" if frontend is None else f"|{frontend[0]}|{frontend[1]}".encode()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self._relay._close_listener(self)


def _transparent(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def _original_destination(control: bytes) -> tuple[str, int] | None:
    """The IP_ORIGDSTADDR / IPV6_ORIGDSTADDR cmsg's address, from a raw control buffer."""
    if len(control) < 16 + 8:
        return None
    addr: tuple[str, int] = sockaddr_to_python(control[16:])[:2]
    return addr


class UdpRelay:
    """Create it, open sockets with `serve_port` / `serve_transparent`, `invalidate()` after
    every sync, `stop()` at the end."""

    def __init__(
        self,
        frontends: UdpFrontends,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
        source_address: SourceAddress | None = None,
        same_link: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.frontends = frontends
        # Transparent mode: the address a new session's socket sends from (the client's, where
        # kube-proxy would keep it), None for the node's own; None: always the node's.
        self.source_address = source_address
        # Whether two addresses share a link (kpx/links.py): such an endpoint would answer the
        # client directly, so its session sends from the node's address.
        self.same_link = same_link
        self.sessions = SessionTable(idle_timeout, max_sessions)
        self.stats = UdpStats()
        self.epoch = 0
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: set[UdpListener] = set()
        self._rx = RecvBatch(BATCH, MAX_DATAGRAM, CONTROL_SIZE)
        self._backend_rx = RecvBatch(BATCH, MAX_DATAGRAM)
        # Both send from the receive buffers (kpx/udp_forward.py): no copy of a datagram.
        self._to_endpoints = RunSender(self._rx)
        self._to_clients = RunSender(self._backend_rx)
        # Transparent mode: one socket per frontend address that answers leave from.
        # Each is also read: what reaches the frontend address without tproxy (a bridged pod's
        # datagram, marked and routed locally: kpx/udp_nft.py) arrives on it.
        self._reply_socks: dict[tuple[str, int], UdpListener] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # Every session's socket, in one epoll the loop watches as a single reader: no event
        # loop handle per session (memory), and one callback drains every ready session.
        self._session_poll: select.epoll | None = None
        self._by_fd: dict[int, Session] = {}
        # Client-facing sockets are not read (`hold`, for a handover), new ones included.
        self._held = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- sockets -----------------------------------------------------------------------------

    def serve_port(
        self, listen_host: str, listen_port: int, frontend_ip: str, frontend_port: int
    ) -> UdpListener:
        """Receive frontend_ip:frontend_port's datagrams on listen_host:listen_port."""
        sock = self._socket(listen_host)
        try:
            sock.bind((listen_host, listen_port))
        except OSError:
            sock.close()
            raise
        return self._start(sock, (frontend_ip, frontend_port))

    def serve_transparent(self, host: str, port: int) -> UdpListener:
        """Receive the datagrams nftables `tproxy`s to host:port (needs CAP_NET_ADMIN)."""
        sock = self._socket(host)
        try:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return self._start(sock, None)

    def adopt_transparent(self, sock: socket.socket) -> UdpListener:
        """A `serve_transparent` socket handed over by the kpx this one replaces."""
        sock.setblocking(False)
        return self._start(sock, None)

    def transparent_sockets(self) -> list[socket.socket]:
        """The `serve_transparent` sockets, for a handover."""
        return [listener.sock for listener in self._listeners if listener.frontend is None]

    def hold(self, held: bool) -> None:
        """Stop (True) or resume (False) reading the client-facing sockets, for a handover:
        the successor reads the same sockets meanwhile, and a session made here now would
        not move with the others."""
        if held == self._held:
            return
        self._held = held
        for listener in self._listeners:
            if held:
                self.loop.remove_reader(listener.fd)
            else:
                self.loop.add_reader(listener.fd, self._on_client_readable, listener)

    def detach_sessions(self) -> list[Session]:
        """Every session, no longer read nor kept here (its socket stays open), for a
        handover: the caller closes their sockets once handed over, or gives them back with
        `adopt_session`."""
        sessions = list(self.sessions)
        for session in sessions:
            self.sessions.remove(session)
            self._unwatch(session)
        return sessions

    def adopt_session(
        self,
        key: bytes,
        name: bytes,
        client_ip: str,
        frontend: tuple[str, int],
        backend: Backend,
        sock: socket.socket,
    ) -> bool:
        """A transparent-mode session handed over (or given back) with its endpoint socket:
        answers leave from this relay's socket for `frontend`, and its next datagram checks
        it against the table. False (the socket closed) when the client has a session here
        already or no socket for its frontend could be had."""
        reply = self.frontend_socket(frontend) if self.sessions.get(key) is None else None
        if reply is None:
            sock.close()
            return False
        session = Session(key, name, client_ip, frontend, backend, None, self.epoch - 1, 0.0)
        session.last = self._clock()
        sock.setblocking(False)
        session.sock = sock
        session.fd = sock.fileno()
        session.reply = reply
        self._watch(session)
        self.sessions.add(session)
        return True

    def _socket(self, host: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        except OSError:
            sock.close()
            raise
        return sock

    def _start(
        self, sock: socket.socket, frontend: tuple[str, int] | None, quiet: bool = False
    ) -> UdpListener:
        listener = UdpListener(self, sock, frontend)
        self._listeners.add(listener)
        if not self._held:
            self.loop.add_reader(listener.fd, self._on_client_readable, listener)
        if self._sweeper is None:
            self._schedule_sweep()
        (log.debug if quiet else log.info)(
            "udp_listening",
            address=sock.getsockname()[0],
            port=listener.port,
            mode="transparent" if frontend is None else "port",
            frontend=None if frontend is None else f"{frontend[0]}:{frontend[1]}",
        )
        return listener

    def _close_listener(self, listener: UdpListener) -> None:
        if listener not in self._listeners:
            return
        self._listeners.discard(listener)
        self.loop.remove_reader(listener.fd)
        if listener.frontend is not None:
            # Its sessions answer through this socket: they end with it.
            for session in self.sessions.of_frontend(listener.frontend):
                self._end(session)
        listener.sock.close()

    # -- control path --------------------------------------------------------------------------

    def invalidate(self) -> None:
        """The table changed: every session is re-checked on its next datagram."""
        self.epoch += 1

    def prune_frontends(self) -> None:
        """Some frontends are gone: their sessions end now (so their endpoints' answers stop
        too) and so do the sockets answers to them left from. O(sessions): call it only
        after a sync that removed a frontend."""
        lookup = self.frontends.lookup
        for session in self.sessions:
            if lookup(*session.frontend) is None:
                self._end(session)
        for frontend in [f for f in self._reply_socks if lookup(*f) is None]:
            self._reply_socks.pop(frontend).close()

    # -- client -> endpoint (hot path) ---------------------------------------------------------

    def _on_client_readable(self, listener: UdpListener) -> None:
        rx = self._rx
        for _ in range(DRAIN_ROUNDS):
            n = rx.recv(listener.fd)
            if n <= 0:
                if n < 0 and -n not in PEER_ERRORS:
                    log.warning("udp_receive_failed", error=errno.errorcode.get(-n, str(-n)))
                return
            try:
                self._from_clients(listener, n)
            except Exception:  # a crashing picker must not kill the listener
                log.exception("udp_relay_crashed")
            if n < rx.batch:
                return

    def _from_clients(self, listener: UdpListener, n: int) -> None:
        # The batch's buffers are read in place (RecvBatch's accessors, inlined: this loop runs
        # once per datagram); each session's datagrams are then sent on as one run.
        rx = self._rx
        ints, names, controls = rx.ints, rx.names_view, rx.controls_view
        control_size = rx.control
        table = self.sessions.sessions
        epoch = self.epoch
        tag = listener.tag
        transparent = listener.frontend is None
        now = self._clock()
        control = b""
        runs: dict[Session, list[int]] = {}
        for i in range(n):
            base = 16 * i
            if ints[base + FLAGS_I] & MSG_TRUNC:
                self.stats.drops["truncated"] += 1
                continue
            start = i * NAME_SIZE
            name = names[start : start + ints[base + NAMELEN_I]].tobytes()
            if transparent:
                start = i * control_size
                control = controls[start : start + ints[base + CONTROLLEN_I]].tobytes()
                key = name + control
            else:
                key = name + tag
            session = table.get(key)
            if session is None or session.epoch != epoch:
                session = self._check(session, key, name, listener, control, now)
                if session is None:
                    continue
            session.last = now
            run = runs.get(session)
            if run is None:
                runs[session] = [i]
            else:
                run.append(i)
        for session, run in runs.items():
            self._to_backend(session, run, listener, now)

    def _to_backend(
        self, session: Session, run: list[int], listener: UdpListener, now: float
    ) -> None:
        """One session's datagrams of this batch, to its endpoint."""
        stats, forward = self.stats, self._to_endpoints
        sent = forward.send(session.fd, run)  # fd -1 (evicted meanwhile): EBADF, none sent
        sent_bytes = forward.sent_bytes
        if sent < len(run) and forward.error in PEER_ERRORS:
            # An ICMP error from the endpoint, reported on this send: try a fresh pick once.
            self._backend_failed(session, OSError(forward.error, "send failed"))
            control = session.key[len(session.name) :] if listener.frontend is None else b""
            fresh = self._check(None, session.key, session.name, listener, control, now)
            if fresh is not None:
                run = run[sent:]
                sent = forward.send(fresh.fd, run)
                sent_bytes = forward.sent_bytes
        stats.datagrams_to_backend += sent
        stats.bytes_to_backend += sent_bytes
        if sent < len(run):
            stats.drops["backend_send_failed"] += len(run) - sent

    def _check(
        self,
        session: Session | None,
        key: bytes,
        name: bytes,
        listener: UdpListener,
        control: bytes,
        now: float,
    ) -> Session | None:
        """The slow path: a new client, or a session stamped before the last sync."""
        drops = self.stats.drops
        frontend = listener.frontend
        if frontend is None:
            frontend = _original_destination(control)
            if frontend is None:
                drops["no_original_destination"] += 1
                return None
        picker: SessionPicker | None = self.frontends.lookup(*frontend)
        if picker is None:
            if session is not None:
                self._end(session)
            drops["unknown_frontend"] += 1
            return None
        if session is not None:
            if picker.offers(session.backend, session.client_ip):
                session.epoch = self.epoch
                session.picker = picker
                return session
            client_ip = session.client_ip
            self._end(session)
            self.stats.sessions_retargeted += 1
        else:
            client_ip = str(sockaddr_to_python(name)[0])
        candidates = picker.candidates(client_ip)
        if not candidates:
            drops["no_endpoints"] += 1
            return None
        for evicted in self.sessions.make_room():
            self.stats.sessions_evicted += 1
            self._close(evicted)
        backend = candidates[0]
        reply = listener if listener.frontend is not None else self.frontend_socket(frontend)
        if reply is None:
            drops["socket_error"] += 1
            return None
        new = Session(key, name, client_ip, frontend, backend, picker, self.epoch, now)
        try:
            sock = socket.socket(
                socket.AF_INET6 if ":" in backend.ip else socket.AF_INET, socket.SOCK_DGRAM
            )
        except OSError as exc:
            drops["socket_error"] += 1
            log.warning("udp_session_socket_failed", error=exc.strerror)
            return None
        try:
            sock.setblocking(False)
            source = None
            if self.source_address is not None:
                source = self.source_address(frontend[0], frontend[1], client_ip)
            if (
                source is not None
                and source != backend.ip  # hairpin: the node's address
                and (self.same_link is None or not self.same_link(source, backend.ip))
            ):
                _transparent(sock)
                sock.bind((source, 0))
            sock.connect((backend.ip, backend.port))
        except OSError as exc:
            sock.close()
            drops["socket_error"] += 1
            log.warning("udp_session_socket_failed", error=exc.strerror)
            return None
        new.sock = sock
        new.fd = sock.fileno()
        new.reply = reply
        self._watch(new)
        self.sessions.add(new)
        self.stats.sessions_created += 1
        return new

    def frontend_socket(self, frontend: tuple[str, int]) -> UdpListener | None:
        """The transparent socket bound to exactly `frontend` (VIP:port, LB IP:port): answers
        leave from it, and datagrams delivered to that address without tproxy arrive on it.
        The UDP writer opens them as frontends appear; a session opens a missing one."""
        listener = self._reply_socks.get(frontend)
        if listener is not None:
            return listener
        ip, port = frontend
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _transparent(sock)
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            log.warning("udp_reply_socket_failed", frontend=f"{ip}:{port}", error=exc.strerror)
            return None
        listener = self._start(sock, frontend, quiet=True)
        self._reply_socks[frontend] = listener
        return listener

    # -- endpoint -> client (hot path) ---------------------------------------------------------

    def _on_sessions_readable(self) -> None:
        assert self._session_poll is not None
        by_fd = self._by_fd
        for fd, _ in self._session_poll.poll(0, MAX_READY_SESSIONS):
            session = by_fd.get(fd)
            if session is not None:
                self._on_backend_readable(session)

    def _on_backend_readable(self, session: Session) -> None:
        """The endpoint's answers, sent on to the client as they were read: one run per
        batch, from the socket the client sent to."""
        rx, forward, stats = self._backend_rx, self._to_clients, self.stats
        reply, name = session.reply, session.name
        for _ in range(DRAIN_ROUNDS):
            n = rx.recv(session.fd)
            if n <= 0:
                if n < 0:
                    self._backend_failed(session, OSError(-n, "receive failed"))
                return
            session.last = self._clock()
            # fileno() -1: the frontend's socket closed meanwhile (EBADF, none sent).
            sent = forward.send(reply.sock.fileno(), range(n), name)
            stats.datagrams_to_client += sent
            stats.bytes_to_client += forward.sent_bytes
            if sent < n:
                stats.drops["client_send_failed"] += n - sent
            if n < rx.batch:
                return

    def _backend_failed(self, session: Session, exc: OSError) -> None:
        """An error on the session's endpoint socket: ICMP unreachable (the endpoint is put in
        cool-down) or worse; the session ends and the next datagram picks again."""
        if exc.errno in PEER_ERRORS:
            self.stats.drops["backend_unreachable"] += 1
            if session.picker is not None:
                session.picker.report_failure(session.backend)
        else:
            log.warning("udp_backend_error", backend=session.backend.ip, error=exc.strerror)
        self._end(session)
        self.stats.sessions_retargeted += 1

    # -- session ends --------------------------------------------------------------------------

    def _end(self, session: Session) -> None:
        if self.sessions.remove(session):
            self._close(session)

    def _watch(self, session: Session) -> None:
        poll = self._session_poll
        if poll is None:
            poll = self._session_poll = select.epoll()
            self.loop.add_reader(poll.fileno(), self._on_sessions_readable)
        poll.register(session.fd, select.EPOLLIN)
        self._by_fd[session.fd] = session

    def _unwatch(self, session: Session) -> None:
        if self._by_fd.pop(session.fd, None) is session and self._session_poll is not None:
            self._session_poll.unregister(session.fd)

    def _close(self, session: Session) -> None:
        if session.fd >= 0:
            self._unwatch(session)
            session.sock.close()
            session.fd = -1

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(self.sessions.idle_timeout / 4, self._sweep)

    def _sweep(self) -> None:
        self._schedule_sweep()
        expired = self.sessions.expire(self._clock())
        for session in expired:
            self._close(session)
        self.stats.sessions_expired += len(expired)

    def close_backend(self, backend: Backend) -> None:
        """`backend` left every frontend: its sessions move on their next datagram (the epoch
        does that already; this just makes it explicit for callers that pass removals)."""
        self.invalidate()

    async def stop(self) -> None:
        for listener in list(self._listeners):
            self._close_listener(listener)
        for session in self.sessions:
            self._end(session)
        self._reply_socks.clear()  # closed with the listeners
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._session_poll is not None:
            self.loop.remove_reader(self._session_poll.fileno())
            self._session_poll.close()
            self._session_poll = None
        log.info("udp_relay_stopped")
