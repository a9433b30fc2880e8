"""Upgrades that cut nothing: a starting kpx takes the running one's sockets over.

As haproxy's seamless reload and Envoy's hot restart do, the sockets themselves move from one
process to the other over a unix socket (SCM_RIGHTS), so the kernel's connections never notice:
- the listening sockets (the TCP redirect/tproxy listeners and the UDP tproxy sockets) move
  first, as soon as the new kpx starts: both processes accept on them until the handover ends,
  so a new connection is served throughout (the new kpx reads the UDP ones only once the UDP
  sessions are there, so that a client does not get a second session);
- once the new kpx has listed the cluster, programmed the rules and accepts, it says `ready`;
  the old one stops accepting, lets the connects under way finish (at most `timeout`), freezes
  every relay and sends each one's client and backend sockets, with the pipes that hold bytes
  in flight and each direction's state (kpx/splice.py `DirectionState`): no byte is lost or
  sent twice, since the bytes not yet read stay in the sockets and the bytes read and not yet
  written stay in the pipes, which move too; then every UDP session with its socket connected
  to the endpoint, so the endpoint keeps seeing the same source address and port;
- after the new kpx acknowledged them, the old one closes its copies (no FIN, no reset) and
  serves nothing more. It leaves the nftables table and the policy routes alone: the new kpx
  programmed the same ones in its first sync.

The protocol's messages are in kpx/handover_wire.py. `HandoverSession` is the new kpx's side,
`HandoverServer` the old one's. Should either process die mid-way, the other carries on: a new
kpx whose predecessor vanished binds what it did not receive and starts as usual (the rules are
whole: a SIGKILL leaves them), an old kpx whose successor vanished accepts again and resumes
the connections it had not sent yet (those it sent are reset: their state may have moved; the
UDP sessions it sent end, and a client's next datagram starts a new one).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence

import structlog
from prometheus_client import Counter, Gauge

from kpx import handover_wire as wire
from kpx.backends import Backend
from kpx.proxy import Proxy
from kpx.splice import DirectionState, Pipe, Relay
from kpx.udp_relay import UdpRelay
from kpx.udp_sessions import Session

log = structlog.get_logger("kpx.handover")

HANDOVERS = Counter(
    "kpx_handover",
    "Handovers by this process's role (old: gave its sockets, new: took them) and result",
    ["role", "result"],
)
UDP_SESSIONS = Counter(
    "kpx_handover_udp_sessions",
    "UDP sessions handed over (sent by the old kpx, adopted by the new one; a client the new "
    "kpx had already met keeps the session it has there)",
    ["event"],
)
CONNECTIONS = Counter(
    "kpx_handover_connections",
    "Established connections handed over (sent by the old kpx, adopted by the new one, or "
    "reset by the old one when a handover failed after sending them)",
    ["event"],
)
SECONDS = Gauge(
    "kpx_handover_seconds",
    "The last handover's duration on this side: old, from `ready` to the acknowledgement; "
    "new, from `ready` to the last connection adopted",
    ["role"],
)
for _role in ("old", "new"):
    for _result in ("completed", "failed"):
        HANDOVERS.labels(_role, _result)
for _event in ("sent", "adopted", "reset"):
    CONNECTIONS.labels(_event)
for _event in ("sent", "adopted"):
    UDP_SESSIONS.labels(_event)

# How often the old kpx checks whether its connects under way have finished.
_POLL_SECONDS = 0.005


def unix_address(path: str) -> str | bytes:
    """`@name` -> the abstract address (kept in the network namespace, gone with its owner);
    anything else: a filesystem path."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


class HandoverError(Exception):
    pass


class _Channel:
    """One SEQPACKET connection carrying `handover_wire` messages and their fds."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def _wait(self, writable: bool) -> None:
        future = self.loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        if writable:
            self.loop.add_writer(fd, ready)
        else:
            self.loop.add_reader(fd, ready)
        try:
            await future
        finally:
            if writable:
                self.loop.remove_writer(fd)
            else:
                self.loop.remove_reader(fd)

    async def send(self, message: wire.Message, fds: Sequence[int] = ()) -> None:
        data = wire.encode(message)
        while True:
            try:
                if fds:
                    socket.send_fds(self.sock, [data], list(fds))
                else:
                    self.sock.send(data)
                return
            except BlockingIOError:
                await self._wait(writable=True)

    async def receive(self) -> tuple[wire.Message, list[int]]:
        """The next message and the fds that came with it (the caller owns them)."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, wire.MAX_MESSAGE, wire.MAX_FDS)
                break
            except BlockingIOError:
                await self._wait(writable=False)
        if not data and not fds:
            raise HandoverError("the other kpx closed the handover")
        try:
            if flags & socket.MSG_CTRUNC:
                raise wire.WireError("fds were truncated")
            return wire.decode(data, len(fds)), fds
        except wire.WireError:
            _close_fds(fds)
            raise

    def close(self) -> None:
        self.sock.close()


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _socket_of(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def _pipes(fds: Sequence[int]) -> list[Pipe]:
    return [(fds[i], fds[i + 1]) for i in range(0, len(fds), 2)]


# --- the new kpx's side ------------------------------------------------------------------


AdoptConnection = Callable[[socket.socket, socket.socket, wire.Address], Relay]
# kpx.udp_relay.UdpRelay.adopt_session: (key, name, client ip, frontend, endpoint, socket).
AdoptSession = Callable[[bytes, bytes, str, wire.Address, Backend, socket.socket], bool]


class HandoverSession:
    """The starting kpx's handover: `connect` gets the listeners (None: nobody to take over
    from), `take_connections` the established connections once this kpx accepts."""

    def __init__(
        self, channel: _Channel, tcp: list[socket.socket], udp: list[socket.socket]
    ) -> None:
        self._channel = channel
        # The listening sockets received, to accept on instead of binding.
        self.tcp = tcp
        self.udp = udp

    @classmethod
    async def connect(cls, path: str, step_timeout: float) -> HandoverSession | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(unix_address(path))
        except OSError as err:
            sock.close()
            if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                log.warning("handover_unavailable", socket=path, problem=str(err))
            return None  # no kpx runs here: start from scratch
        channel = _Channel(sock)
        try:
            async with asyncio.timeout(step_timeout):
                await channel.send(wire.Hello(wire.VERSION, os.getpid()))
                message, fds = await channel.receive()
            if not isinstance(message, wire.Listeners):
                _close_fds(fds)
                raise HandoverError(f"expected listeners, got {type(message).__name__}")
        except (OSError, TimeoutError, HandoverError, wire.WireError) as err:
            channel.close()
            HANDOVERS.labels("new", "failed").inc()
            log.error("handover_failed", step="listeners", problem=str(err) or type(err).__name__)
            return None
        tcp = [_socket_of(fd) for fd in fds[: len(message.tcp)]]
        udp = [_socket_of(fd) for fd in fds[len(message.tcp) :]]
        log.info("handover_listeners_received", tcp=len(tcp), udp=len(udp))
        return cls(channel, tcp, udp)

    def close(self) -> None:
        """Give the handover up (this kpx stops before serving): the old one carries on."""
        self._channel.close()

    async def take_connections(
        self, adopt: AdoptConnection, adopt_session: AdoptSession, step_timeout: float
    ) -> int:
        """Say `ready` and adopt every connection and UDP session the old kpx sends; the
        number of connections adopted. `step_timeout` bounds each wait (twice: the old kpx
        lets its connects finish first)."""
        channel = self._channel
        adopted = sessions = 0
        started = time.monotonic()
        try:
            await channel.send(wire.Ready())
            while True:
                async with asyncio.timeout(2 * step_timeout):
                    message, fds = await channel.receive()
                if isinstance(message, wire.Done):
                    break
                if isinstance(message, wire.Connections):
                    adopted += _adopt_batch(message, fds, adopt)
                elif isinstance(message, wire.Sessions):
                    sessions += _adopt_sessions(message, fds, adopt_session)
                else:
                    _close_fds(fds)
                    raise HandoverError(f"expected connections, got {type(message).__name__}")
            SECONDS.labels("new").set(time.monotonic() - started)
            await channel.send(wire.Ack(adopted, sessions))
        except (OSError, TimeoutError, HandoverError, wire.WireError) as err:
            HANDOVERS.labels("new", "failed").inc()
            log.error(
                "handover_failed",
                step="connections",
                adopted=adopted,
                problem=str(err) or type(err).__name__,
            )
            return adopted
        finally:
            channel.close()
        HANDOVERS.labels("new", "completed").inc()
        log.info(
            "handover_completed",
            role="new",
            connections=adopted,
            udp_sessions=sessions,
            seconds=round(time.monotonic() - started, 4),
        )
        return adopted


def _adopt_batch(message: wire.Connections, fds: list[int], adopt: AdoptConnection) -> int:
    at = 0
    for item in message.items:
        mine = fds[at : at + item.fds]
        at += item.fds
        relay = adopt(_socket_of(mine[0]), _socket_of(mine[1]), item.backend)
        relay.resume(DirectionState(*item.up), DirectionState(*item.down), _pipes(mine[2:]))
        CONNECTIONS.labels("adopted").inc()
    return len(message.items)


def _adopt_sessions(message: wire.Sessions, fds: list[int], adopt: AdoptSession) -> int:
    adopted = 0
    for item, fd in zip(message.items, fds, strict=True):
        backend = Backend(*item.backend)
        if adopt(item.key, item.name, item.client, item.frontend, backend, _socket_of(fd)):
            adopted += 1
    UDP_SESSIONS.labels("adopted").inc(adopted)
    return adopted


# --- the old kpx's side ------------------------------------------------------------------


class HandoverSource:
    """What the old kpx hands over (`of`: its proxy's and UDP relay's sockets)."""

    def __init__(
        self,
        tcp_listeners: Callable[[], list[socket.socket]],
        udp_sockets: Callable[[], list[socket.socket]],
        hold: Callable[[bool], None],
        connecting: Callable[[], int],
        detach_relays: Callable[[], list[Relay]],
        give_back: AdoptConnection,
        detach_sessions: Callable[[], list[Session]] = list,
        give_back_session: AdoptSession | None = None,
    ) -> None:
        self.tcp_listeners = tcp_listeners
        self.udp_sockets = udp_sockets
        # Stop (True) or resume (False) accepting on the listeners.
        self.hold = hold
        self.connecting = connecting
        self.detach_relays = detach_relays
        # A relay of this process again, for a connection frozen for a failed handover.
        self.give_back = give_back
        # The UDP sessions, no longer read here; and back, after a failed handover.
        self.detach_sessions = detach_sessions
        self.give_back_session = give_back_session

    @classmethod
    def of(cls, proxy: Proxy, udp: UdpRelay | None) -> HandoverSource:
        """The redirect listeners and connections of `proxy`, the transparent sockets and
        sessions of `udp` (None: UDP is off)."""

        def hold(held: bool) -> None:
            for listener in proxy.redirect_listeners():
                (listener.hold if held else listener.resume)()
            if udp is not None:
                udp.hold(held)

        return cls(
            tcp_listeners=lambda: [listener.sock for listener in proxy.redirect_listeners()],
            udp_sockets=udp.transparent_sockets if udp is not None else list,
            hold=hold,
            connecting=lambda: proxy.connecting,
            detach_relays=proxy.detach_relays,
            give_back=proxy.make_relay,
            detach_sessions=udp.detach_sessions if udp is not None else list,
            give_back_session=udp.adopt_session if udp is not None else None,
        )


class HandoverServer:
    """The running kpx's side: serves `path` until one successor took everything over."""

    def __init__(self, path: str, source: HandoverSource, timeout: float) -> None:
        self.path = path
        self.source = source
        self.timeout = timeout
        self._sock: socket.socket | None = None
        # A successor is connected and the handover not over: readiness says no, so that a
        # probe meant for the successor's pod (the ports are shared) does not find this
        # process ready in its place.
        self.busy = False

    async def run(self) -> None:
        """Serve handovers until one completes (then return), one at a time."""
        loop = asyncio.get_running_loop()
        while True:
            if self._sock is None:
                await self._listen()
            assert self._sock is not None
            conn, _ = await loop.sock_accept(self._sock)
            self.busy = True
            try:
                if await self._serve(_Channel(conn)):
                    return
            finally:
                self.busy = False

    async def _listen(self) -> None:
        """Bind `path`; while the kpx this one replaced still holds it, retry (it lets go
        when its handover starts)."""
        warned = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.bind(unix_address(self.path))
                sock.listen(1)
                sock.setblocking(False)
            except OSError as err:
                sock.close()
                if err.errno != errno.EADDRINUSE:
                    raise
                if not warned:
                    log.warning("handover_socket_busy", socket=self.path)
                    warned = True
                await asyncio.sleep(0.5)
                continue
            self._sock = sock
            log.info("handover_listening", socket=self.path)
            return

    def _stop_listening(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _serve(self, channel: _Channel) -> bool:
        """One handover; True once it completed."""
        source = self.source
        try:
            async with asyncio.timeout(self.timeout):
                hello, fds = await channel.receive()
            _close_fds(fds)
            if not isinstance(hello, wire.Hello) or hello.version != wire.VERSION:
                raise HandoverError(f"unexpected first message {hello!r}")
            log.info("handover_started", peer_pid=hello.pid)
            tcp, udp = source.tcp_listeners(), source.udp_sockets()
            await channel.send(
                wire.Listeners(tuple(_address(s) for s in tcp), tuple(_address(s) for s in udp)),
                [s.fileno() for s in tcp + udp],
            )
            # The successor lists the cluster and programs the rules first: no deadline
            # (it is alive as long as the channel is open).
            ready, fds = await channel.receive()
            _close_fds(fds)
            if not isinstance(ready, wire.Ready):
                raise HandoverError(f"expected ready, got {type(ready).__name__}")
        except (OSError, TimeoutError, HandoverError, wire.WireError) as err:
            channel.close()
            HANDOVERS.labels("old", "failed").inc()
            log.error("handover_failed", step="listeners", problem=str(err) or type(err).__name__)
            return False
        # From here this process gives its connections away: the successor binds the
        # handover socket for the next upgrade.
        self._stop_listening()
        started = time.monotonic()
        source.hold(True)
        deadline = started + self.timeout
        while source.connecting() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_SECONDS)
        relays = source.detach_relays()
        frozen = [(relay, relay.freeze()) for relay in relays]
        sessions = source.detach_sessions()
        sent = sessions_sent = 0
        try:
            items = [
                wire.Connection(relay.tag, up, down)  # type: ignore[arg-type]
                for relay, (up, down, _pipes) in frozen
            ]
            # Every connection is frozen until the successor acknowledged them: bounded.
            async with asyncio.timeout(self.timeout):
                for batch in wire.batches(items):
                    batch_fds: list[int] = []
                    for relay, (_up, _down, pipes) in frozen[sent : sent + len(batch.items)]:
                        batch_fds += [relay.client.fileno(), relay.backend.fileno()]
                        for pipe in pipes:
                            batch_fds += pipe
                    await channel.send(batch, batch_fds)
                    sent += len(batch.items)
                    CONNECTIONS.labels("sent").inc(len(batch.items))
                session_items = [
                    wire.UdpSession(
                        s.key,
                        s.name,
                        s.client_ip,
                        s.frontend,
                        (s.backend.ip, s.backend.port, s.backend.node_name, s.backend.zone),
                    )
                    for s in sessions
                ]
                for session_batch in wire.session_batches(session_items):
                    count = len(session_batch.items)
                    part = sessions[sessions_sent : sessions_sent + count]
                    await channel.send(session_batch, [s.fd for s in part])
                    sessions_sent += count
                    UDP_SESSIONS.labels("sent").inc(count)
                await channel.send(wire.Done(sent, sessions_sent))
                ack, fds = await channel.receive()
            _close_fds(fds)
            if not isinstance(ack, wire.Ack) or ack.adopted != sent:
                raise HandoverError(f"expected ack of {sent}, got {ack!r}")
        except (OSError, TimeoutError, HandoverError, wire.WireError) as err:
            channel.close()
            self._recover(frozen, sent, sessions, sessions_sent)
            HANDOVERS.labels("old", "failed").inc()
            log.error(
                "handover_failed",
                step="connections",
                sent=sent,
                problem=str(err) or type(err).__name__,
            )
            return False
        channel.close()
        for relay in relays:
            relay.release()
        for session in sessions:
            session.sock.close()  # the successor's copy carries on
        seconds = time.monotonic() - started
        SECONDS.labels("old").set(seconds)
        HANDOVERS.labels("old", "completed").inc()
        log.info(
            "handover_completed",
            role="old",
            connections=sent,
            udp_sessions=sessions_sent,
            seconds=round(seconds, 4),
        )
        return True

    def _recover(
        self,
        frozen: list[tuple[Relay, tuple[DirectionState, DirectionState, list[Pipe]]]],
        sent: int,
        sessions: list[Session],
        sessions_sent: int,
    ) -> None:
        """The successor vanished mid-way: accept again, resume what was not sent, reset what
        was (the successor may have moved its bytes already). UDP sessions sent end (a
        client's next datagram starts a new one)."""
        self.source.hold(False)
        give_back_session = self.source.give_back_session
        for index, s in enumerate(sessions):
            if index < sessions_sent or give_back_session is None:
                s.sock.close()
            else:
                give_back_session(s.key, s.name, s.client_ip, s.frontend, s.backend, s.sock)
        for index, (relay, (up, down, pipes)) in enumerate(frozen):
            again = self.source.give_back(relay.client, relay.backend, relay.tag)  # type: ignore[arg-type]
            again.resume(up, down, pipes)
            if index < sent:
                CONNECTIONS.labels("reset").inc()
                again.abort()


def _address(sock: socket.socket) -> wire.Address:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)
