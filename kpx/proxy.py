"""kpx's data path: accept, find the frontend, hand the connect to the `Dialer` (kpx/dial.py),
relay with splice, drain removed backends.

Two ways in:
- `serve_redirect(host, port)`: the nftables mode. One listener; nftables `redirect`s every
  frontend's traffic to it and each connection's original destination (SO_ORIGINAL_DST) names the
  frontend.
- `serve_port(listen_host, listen_port, frontend_ip, frontend_port)`: the no-root `ports` mode, one
  listener per frontend.

Per connection everything runs as readiness callbacks on the event loop (no task, no coroutine):
accept -> `FrontendMap.lookup` -> `Picker.candidates` -> `Dialer.dial` (non-blocking connect with
a timeout ladder over the candidates, kpx/dial.py) -> `Relay` (kpx/splice.py). The dialer is
handed the watcher, the ladder, the timers and `_end_dial` as its callback: kpx/dial.py never
sees the proxy. A client whose frontend has no backend, or whose every candidate failed, is
reset at once (SO_LINGER 0), never left hanging.

Transparent mode (`transparent=True`): the redirect listeners are IP_TRANSPARENT, so they also
accept the connections nftables `tproxy`s to them, whose local address is the frontend (host
processes' connections are still redirected, read through SO_ORIGINAL_DST); `source_address`
says, per connection, whether the backend connection is made from the client's address
(kpx/source.py) and the dial binds it so.

Drain: when the control path removes an endpoint it stops offering it; `close_backend` then
takes it out of the connects under way and (optionally, with `drain_timeout`) resets the
connections still open to it after the timeout; `restore_backend` calls that off when the
endpoint is offered again before the deadline.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import resource
import socket
import time
from collections.abc import Callable, Sequence

import structlog

from kpx.backends import Backend, FrontendMap
from kpx.dial import BackendKey, Dial, Dialer
from kpx.origdst import original_dst, unmap_ipv4
from kpx.poller import Poller
from kpx.splice import DEFAULT_PIPE_SIZE, PipePool, Relay, RelayCounters, reset_socket
from kpx.transparent import make_transparent

log = structlog.get_logger("kpx.proxy")

DEFAULT_CONNECT_LADDER: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
# Connections accepted per readiness callback before yielding to the other callbacks.
_ACCEPT_BATCH = 64
# After EMFILE/ENFILE on accept the listener rests this long instead of spinning.
_ACCEPT_PAUSE_SECONDS = 0.1
# At most one `connection_limit_reached` line per this many seconds (it can fire per accept).
_LIMIT_LOG_INTERVAL = 1.0
# fds per connection at worst: two sockets plus one pipe (two fds) per direction in flight.
_FDS_PER_CONNECTION = 3
_FDS_RESERVED = 256

# (frontend ip, frontend port, client ip) -> the address to connect to the backend from, or
# None for the node's own (kpx/source.py).
SourceAddress = Callable[[str, int, str], str | None]


def default_max_connections() -> int:
    """As many connections as the open-file limit allows, keeping room for everything else."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, (soft - _FDS_RESERVED) // _FDS_PER_CONNECTION)


class ProxyStats(RelayCounters):
    """Counters for /metrics. Bytes are counted as delivered to the receiving socket."""

    __slots__ = (
        "accept_errors",
        "backend_failures",
        "backend_retries",
        "backends_exhausted",
        "connections_active",
        "connections_total",
        "drain_resets",
        "idle_closes",
        "limit_hits",
        "refused_no_endpoints",
        "unknown_frontend",
    )

    def __init__(self) -> None:
        super().__init__()
        # Accepted connections not yet closed (connecting or relaying).
        self.connections_active = 0
        # Accepted connections ever (including refused ones).
        self.connections_total = 0
        # Connect attempts to a backend that were refused, failed or timed out.
        self.backend_failures = 0
        # Connect attempts after the first for one client connection.
        self.backend_retries = 0
        # Client connections reset because every candidate failed.
        self.backends_exhausted = 0
        # Client connections reset because their frontend had no candidate at all.
        self.refused_no_endpoints = 0
        # Client connections reset because kpx does not serve their original destination.
        self.unknown_frontend = 0
        # Client connections reset because `max_connections` were open.
        self.limit_hits = 0
        # Connections to a removed backend reset when its drain timeout expired.
        self.drain_resets = 0
        # Connections closed by kpx because no byte moved for `idle_timeout`.
        self.idle_closes = 0
        # accept() failures other than "nothing to accept" (EMFILE, ENFILE, ...).
        self.accept_errors = 0


class Listener:
    """One listening socket; `frontend` is fixed in ports mode, None in redirect mode."""

    __slots__ = (
        "_accepting",
        "_family",
        "_held",
        "_paused",
        "_proxy",
        "bound_port",
        "fd",
        "frontend",
        "sock",
    )

    def __init__(self, proxy: Proxy, sock: socket.socket, frontend: BackendKey | None) -> None:
        self._proxy = proxy
        self.sock = sock
        self.fd = sock.fileno()
        # The port it is bound to (`port` without a getsockname per connection).
        self.bound_port: int = sock.getsockname()[1]
        # The address family as a plain int, for the sockets `Proxy._on_acceptable` makes.
        self._family = int(sock.family)
        self.frontend = frontend
        # Listening and registered with the loop (false while only bound: `bind_redirect`).
        self._accepting = False
        # Resting after EMFILE/ENFILE (`_pause_listener`), resumed by a timer.
        self._paused = False
        # Held by the caller (`hold`): new connections wait in the kernel's accept queue.
        self._held = False

    @property
    def _registered(self) -> bool:
        """Whether the event loop watches the socket for connections to accept."""
        return self._accepting and not self._paused and not self._held

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    def close(self) -> None:
        """Stop accepting; established connections are not affected."""
        self._proxy._close_listener(self)

    def hold(self) -> None:
        """Stop accepting but keep listening: new clients complete the handshake in the
        kernel and wait, unanswered, in the accept queue (and once it is full the kernel
        drops their SYNs). `--mode ports` uses it for frontends nftables would drop."""
        self._proxy._hold_listener(self, True)

    def resume(self) -> None:
        """Accept again after `hold`, the waiting clients first."""
        self._proxy._hold_listener(self, False)


class Proxy:
    """The userspace TCP proxy. Create it, call `serve_redirect` or `serve_port`, and `stop`."""

    def __init__(
        self,
        frontends: FrontendMap,
        *,
        connect_ladder: Sequence[float] = DEFAULT_CONNECT_LADDER,
        max_connections: int | None = None,
        drain_timeout: float | None = None,
        idle_timeout: float | None = None,
        pipe_size: int = DEFAULT_PIPE_SIZE,
        transparent: bool = False,
        source_address: SourceAddress | None = None,
        same_link: Callable[[str, str], bool] | None = None,
    ) -> None:
        if not connect_ladder:
            raise ValueError("connect_ladder needs at least one timeout")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive (None: no idle timeout)")
        self.frontends = frontends
        # Connect timeout per attempt; its length is also the number of attempts (kube-proxy's
        # userspace mode: 250 ms, 500 ms, 1 s, 2 s).
        self.connect_ladder = tuple(connect_ladder)
        self.max_connections = (
            default_max_connections() if max_connections is None else max_connections
        )
        # Seconds a removed backend's connections may live on; None: until they end.
        self.drain_timeout = drain_timeout
        # Seconds without a byte moving after which kpx closes a connection; None (kube-proxy's
        # behaviour for TCP) never does. Enforced by a sweep every idle_timeout / 2, so a
        # connection goes between 1x and 1.5x the timeout after its last byte.
        self.idle_timeout = idle_timeout
        self._idle_sweeper: asyncio.TimerHandle | None = None
        # Redirect listeners accept tproxied connections too (IP_TRANSPARENT).
        self.transparent = transparent
        self.source_address = source_address
        # Whether two addresses share a link (kpx/links.py): such a backend would answer the
        # client directly, so the dial connects to it from the node's address.
        self.same_link = same_link
        self.stats = ProxyStats()
        self.pool = PipePool(pipe_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: Poller | None = None
        self._dialer: Dialer | None = None
        self._listeners: set[Listener] = set()
        self._relays: set[Relay] = set()
        self._by_backend: dict[BackendKey, set[Relay]] = {}
        # Backends closed with a drain timeout: the relays to reset when it fires.
        self._draining: dict[BackendKey, set[Relay]] = {}
        self._drain_timers: dict[BackendKey, asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        # Bound once: a relay's close callback without a bound-method object per connection.
        self._relay_closed = self._on_relay_closed
        self._limit_logged_at = 0.0
        self._limit_hits_unlogged = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def poller(self) -> Poller:
        """The epoll set the connections' sockets are watched in (kpx/poller.py)."""
        if self._poller is None:
            self._poller = Poller(self.loop)
        return self._poller

    @property
    def dialer(self) -> Dialer:
        """The connects under way (kpx/dial.py), ending in `_end_dial`."""
        if self._dialer is None:
            self._dialer = Dialer(
                self.poller,
                self.loop.call_later,
                self.connect_ladder,
                self.stats,
                self._end_dial,
                self.same_link,
            )
        return self._dialer

    # -- listeners -------------------------------------------------------------------------

    async def serve_redirect(self, host: str, port: int, backlog: int = 4096) -> Listener:
        """Listen for nftables-redirected connections; the frontend is each one's original
        destination. Returns once listening (port 0 picks a free port: see `Listener.port`).
        An IPv6 host listens for IPv6 only: call once per family ("0.0.0.0" and "::")."""
        return self._start(self._bind(host, port, frontend=None), backlog)

    def bind_redirect(self, host: str, port: int) -> Listener:
        """`serve_redirect` in two steps: claim host:port now (connections to it are still
        refused by the kernel), accept later with `accept_on`. Raises OSError (EADDRINUSE)
        when another process, e.g. a second kpx on this node, listens there."""
        return self._bind(host, port, frontend=None)

    async def accept_on(self, listener: Listener, backlog: int = 4096) -> Listener:
        """Start accepting on a listener from `bind_redirect`."""
        return self._start(listener, backlog)

    async def serve_port(
        self,
        listen_host: str,
        listen_port: int,
        frontend_ip: str,
        frontend_port: int,
        backlog: int = 4096,
    ) -> Listener:
        """Listen on listen_host:listen_port for the one frontend frontend_ip:frontend_port."""
        listener = self._bind(listen_host, listen_port, frontend=(frontend_ip, frontend_port))
        return self._start(listener, backlog)

    def _bind(self, host: str, port: int, frontend: BackendKey | None) -> Listener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt per
            # listener instead of one per connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if family == socket.AF_INET6:
                # One listener per family: "::" and "0.0.0.0" can then share a port, so both
                # families' redirect rules can point at the same `redirect to :PORT`.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.transparent and frontend is None:
                make_transparent(sock)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        listener = Listener(self, sock, frontend)
        self._listeners.add(listener)  # closed by `stop` even if never started
        return listener

    def _start(self, listener: Listener, backlog: int) -> Listener:
        sock = listener.sock
        try:
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            self._close_listener(listener)
            raise
        listener._accepting = True
        if self.idle_timeout is not None and self._idle_sweeper is None:
            self._idle_sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep_idle)
        if listener._registered:
            self.loop.add_reader(listener.fd, self._on_acceptable, listener)
        frontend = listener.frontend
        log.info(
            "proxy_listening",
            address=listener.address[0],
            port=listener.port,
            mode="redirect" if frontend is None else "port",
            frontend=None if frontend is None else f"{frontend[0]}:{frontend[1]}",
        )
        return listener

    def _close_listener(self, listener: Listener) -> None:
        if listener not in self._listeners:
            return
        self._listeners.discard(listener)
        if listener._registered:
            self.loop.remove_reader(listener.fd)
        listener._accepting = False
        listener.sock.close()

    def _set_listener_flag(self, listener: Listener, flag: str, value: bool) -> None:
        """Set `_paused` or `_held`, (un)registering the socket with the loop to match."""
        was = listener._registered
        setattr(listener, flag, value)
        if was and not listener._registered:
            self.loop.remove_reader(listener.fd)
        elif listener._registered and not was:
            self.loop.add_reader(listener.fd, self._on_acceptable, listener)

    def _pause_listener(self, listener: Listener) -> None:
        self._set_listener_flag(listener, "_paused", True)
        self.loop.call_later(_ACCEPT_PAUSE_SECONDS, self._resume_listener, listener)

    def _resume_listener(self, listener: Listener) -> None:
        if listener in self._listeners and listener._paused:
            self._set_listener_flag(listener, "_paused", False)

    def _hold_listener(self, listener: Listener, held: bool) -> None:
        if listener in self._listeners and listener._held != held:
            self._set_listener_flag(listener, "_held", held)

    # -- accept ----------------------------------------------------------------------------

    def _on_acceptable(self, listener: Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                # socket.accept() without its wrapper, which converts the listener's family and
                # type to enums on every call: 1.4 us per connection.
                fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stats.accept_errors += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept_failed", error=exc.strerror, port=listener.port)
                    self._pause_listener(listener)
                    return
                continue  # ECONNABORTED and friends concern one client only
            # The C socket type, not socket.socket: no Python-level __init__ and close
            # wrappers (three Python calls per socket).
            client = _socket.socket(listener._family, socket.SOCK_STREAM, 0, fd)
            self.stats.connections_total += 1
            try:
                self._route(listener, client, peer[0])
            except Exception:  # a crashing picker must not kill the listener
                log.exception("connection_routing_crashed")
                reset_socket(client)

    def _route(self, listener: Listener, client: _socket.socket, peer_ip: str) -> None:
        """Find the frontend and its candidates and dial them, or refuse the client (reset)."""
        stats = self.stats
        if stats.connections_active >= self.max_connections:
            self._refuse_over_limit(client)
            return
        client.setblocking(False)
        frontend = listener.frontend
        if frontend is None and self.transparent:
            # tproxied: the local address is the frontend; redirected (host processes): the
            # local port is the listener's and conntrack knows the frontend.
            local = client.getsockname()
            if local[1] != listener.bound_port:
                frontend = (local[0], local[1])
        if frontend is None:
            try:
                frontend = original_dst(client, peer_ip)
            except OSError as exc:
                stats.unknown_frontend += 1
                log.warning("original_dst_unavailable", client=peer_ip, error=exc.strerror)
                reset_socket(client)
                return
        if listener._family == socket.AF_INET6:
            client_ip, frontend_ip = unmap_ipv4(peer_ip), unmap_ipv4(frontend[0])
        else:
            client_ip, frontend_ip = peer_ip, frontend[0]
        picker = self.frontends.lookup(frontend_ip, frontend[1])
        if picker is None:
            stats.unknown_frontend += 1
            log.info("frontend_unknown", frontend_ip=frontend_ip, frontend_port=frontend[1])
            reset_socket(client)
            return
        candidates = picker.candidates(client_ip)
        if not candidates:
            stats.refused_no_endpoints += 1
            log.debug("frontend_without_endpoints", frontend_ip=frontend_ip, port=frontend[1])
            reset_socket(client)
            return
        source = None
        if self.source_address is not None:
            source = self.source_address(frontend_ip, frontend[1], client_ip)
        stats.connections_active += 1
        if stats.connections_active == 1:
            self._idle.clear()
        (self._dialer or self.dialer).dial(client, client_ip, picker, candidates, source)

    def _refuse_over_limit(self, client: _socket.socket) -> None:
        self.stats.limit_hits += 1
        self._limit_hits_unlogged += 1
        reset_socket(client)
        now = time.monotonic()
        if now - self._limit_logged_at >= _LIMIT_LOG_INTERVAL:
            log.warning(
                "connection_limit_reached",
                limit=self.max_connections,
                active=self.stats.connections_active,
                refused=self._limit_hits_unlogged,
            )
            self._limit_logged_at = now
            self._limit_hits_unlogged = 0

    def _end_dial(
        self, dial: Dial, backend_sock: _socket.socket | None, watched: bool = False
    ) -> None:
        """The connect phase is over: relay on success, reset the client otherwise. `watched`:
        the poller still watches `backend_sock` for writability (the connect's readiness);
        the relay turns that into a watch for reading with one epoll_ctl."""
        if backend_sock is None:
            reset_socket(dial.client)
            self._connection_closed()
            return
        backend = dial.backend
        assert backend is not None
        try:
            dial.picker.report_success(backend, dial.client_ip)
        except Exception:
            log.exception("picker_report_success_crashed")
        key = (backend.ip, backend.port)
        if dial.draining and key not in self._draining:
            # The backend was removed while this connect ran and its drain deadline has passed
            # since: the connection would outlive the deadline, so it ends like the others.
            self.stats.drain_resets += 1
            if watched:
                self.poller.forget(backend_sock.fileno())
            reset_socket(backend_sock)
            reset_socket(dial.client)
            self._connection_closed()
            return
        poller = self._poller
        assert poller is not None  # made with the dialer
        relay = Relay(
            poller,
            dial.client,
            backend_sock,
            self.pool,
            self.stats,
            self._relay_closed,
            key,
        )
        self._relays.add(relay)
        group = self._by_backend.get(key)
        if group is None:
            group = self._by_backend[key] = set()
        group.add(relay)
        if dial.draining:
            draining = self._draining.get(key)
            if draining is not None:
                draining.add(relay)
        relay.start(backend_watched=watched)
        relay.read_client()

    def _on_relay_closed(self, relay: Relay) -> None:
        self._relays.discard(relay)
        key: BackendKey = relay.tag  # type: ignore[assignment]
        group = self._by_backend.get(key)
        if group is not None:
            group.discard(relay)
            if not group:
                del self._by_backend[key]
        draining = self._draining.get(key)
        if draining is not None:
            draining.discard(relay)
        self._connection_closed()

    def _connection_closed(self) -> None:
        self.stats.connections_active -= 1
        if self.stats.connections_active == 0:
            self._idle.set()

    # -- drain -----------------------------------------------------------------------------

    def connections_to(self, backend: Backend) -> int:
        """Relayed connections currently open to `backend` (ip and port)."""
        return len(self._by_backend.get((backend.ip, backend.port), ()))

    def close_backend(self, backend: Backend) -> int:
        """`backend` left its EndpointSlice. The picker no longer offers it, so no new connection
        goes there; its open connections continue until they end, or, with a `drain_timeout`,
        are reset when it expires. Returns the number of connections left draining."""
        key = (backend.ip, backend.port)
        open_relays = set(self._by_backend.get(key, ()))
        # Candidate lists drawn up before the removal: no new connection may reach it.
        dialer = self._dialer  # none yet: no connect under way
        drain = self.drain_timeout is not None
        connecting = dialer.close_backend(key, drain) if dialer is not None else 0
        log.info(
            "backend_draining",
            backend_ip=backend.ip,
            backend_port=backend.port,
            connections=len(open_relays),
            connecting=connecting,
            timeout=self.drain_timeout,
        )
        if self.drain_timeout is None:
            return len(open_relays)
        draining = self._draining.setdefault(key, set())
        draining.update(open_relays)
        # A repeated close of a backend already draining keeps the first deadline.
        if key not in self._drain_timers:
            self._drain_timers[key] = self.loop.call_later(
                self.drain_timeout, self._drain_expired, key
            )
        return len(open_relays)

    def restore_backend(self, backend: Backend) -> None:
        """`backend` is offered again (say a readiness blip ended before its drain deadline):
        its open connections are no longer reset when the deadline passes."""
        key = (backend.ip, backend.port)
        timer = self._drain_timers.pop(key, None)
        if timer is None:
            return
        timer.cancel()
        self._draining.pop(key, None)
        if self._dialer is not None:
            self._dialer.restore_backend(key)
        log.info("backend_drain_cancelled", backend_ip=backend.ip, backend_port=backend.port)

    def _drain_expired(self, key: BackendKey) -> None:
        del self._drain_timers[key]
        draining = self._draining.pop(key, set())
        if draining:
            log.info(
                "backend_drain_expired", backend_ip=key[0], backend_port=key[1], reset=len(draining)
            )
        for relay in list(draining):
            self.stats.drain_resets += 1
            relay.abort()

    # -- idle timeout ----------------------------------------------------------------------

    def _sweep_idle(self) -> None:
        """Every relay counts sweeps since its last splice; the third in a row means at least
        `idle_timeout` (two sweep intervals) passed without a byte: close it. One counter
        store per splice keeps the hot path free of clocks and per-connection timers."""
        assert self.idle_timeout is not None
        self._idle_sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep_idle)
        idle: list[Relay] = []
        for relay in self._relays:
            relay.idle_sweeps += 1
            if relay.idle_sweeps >= 3:
                idle.append(relay)
        if idle:
            log.info("idle_connections_closed", count=len(idle), timeout=self.idle_timeout)
            self.stats.idle_closes += len(idle)
            for relay in idle:
                relay.close()

    # -- handover (kpx/handover.py) -------------------------------------------------------

    def adopt_listener(self, sock: socket.socket) -> Listener:
        """A redirect listener handed over by the kpx this one replaces: as `bind_redirect`'s,
        accepted on with `accept_on`."""
        listener = Listener(self, sock, None)
        self._listeners.add(listener)
        return listener

    def redirect_listeners(self) -> list[Listener]:
        return [listener for listener in self._listeners if listener.frontend is None]

    @property
    def connecting(self) -> int:
        """Accepted connections whose backend connect is still under way."""
        return len(self._dialer.dials) if self._dialer is not None else 0

    def detach_relays(self) -> list[Relay]:
        """Every relayed connection, no longer this proxy's: the caller `freeze`s them and
        hands them over (then `release`s them), or gives them back with `make_relay`."""
        relays = list(self._relays)
        self._relays.clear()
        self._by_backend.clear()
        for draining in self._draining.values():
            draining.clear()
        for _ in relays:
            self._connection_closed()
        return relays

    def make_relay(
        self, client: socket.socket, backend_sock: socket.socket, backend: BackendKey
    ) -> Relay:
        """A relay of this proxy for a handed-over connection; the caller `resume`s it."""
        relay = Relay(
            self.poller, client, backend_sock, self.pool, self.stats, self._on_relay_closed, backend
        )
        self._relays.add(relay)
        self._by_backend.setdefault(backend, set()).add(relay)
        self.stats.connections_active += 1
        self._idle.clear()
        return relay

    # -- stop ------------------------------------------------------------------------------

    async def stop(self, drain_seconds: float = 0.0) -> int:
        """Stop accepting, let open connections finish for up to `drain_seconds`, then reset
        the rest and release every fd. Returns the number of connections reset."""
        for listener in list(self._listeners):
            self._close_listener(listener)
        if self.stats.connections_active and drain_seconds > 0:
            log.info(
                "proxy_draining", connections=self.stats.connections_active, seconds=drain_seconds
            )
            try:
                await asyncio.wait_for(self._idle.wait(), drain_seconds)
            except TimeoutError:
                pass
        reset = self._dialer.cancel_all() if self._dialer is not None else 0
        for relay in list(self._relays):
            relay.abort()
            reset += 1
        for timer in self._drain_timers.values():
            timer.cancel()
        if self._idle_sweeper is not None:
            self._idle_sweeper.cancel()
            self._idle_sweeper = None
        self._drain_timers.clear()
        self._draining.clear()
        self.pool.close()
        if self._poller is not None:
            self._poller.close()
            self._poller = None
        self._dialer = None
        log.info("proxy_stopped", reset=reset)
        return reset
