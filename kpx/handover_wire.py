"""The handover protocol's messages (kpx/handover.py), as bytes: pure, no sockets.

A handover runs over one SOCK_SEQPACKET unix socket, so every message is one datagram: a JSON
object with a `kind`, and `fds`, the number of file descriptors that travel with it as
SCM_RIGHTS, in the order the message lists what they belong to.

    new kpx                                   old kpx
    hello {version, pid}             ->
                                     <-       listeners {tcp: [[host, port]...], udp: [...]}
                                              (fds: the TCP listeners, then the UDP sockets)
    (lists the cluster, programs the rules, accepts on the listeners)
    ready                            ->
                                              (stops accepting, lets its connects finish,
                                              freezes every relay)
                                     <-       connections {items: [...]} (any number)
                                     <-       sessions {items: [...]} (any number)
                                     <-       done {count, sessions}
    ack {adopted, sessions}          ->
                                              (closes its copies of the fds, serves no more)

A connection item is `{"backend": [ip, port], "up": [pending, eof, done], "down": [...]}` with
its fds: the client socket, the backend socket, then for each direction (upstream first) that
has bytes in flight, its pipe's read and write ends. A batch carries at most `MAX_FDS` fds
(the kernel's SCM_MAX_FD is 253).

A UDP session item is `{"key": hex, "name": hex, "client": ip, "frontend": [ip, port],
"backend": [ip, port, node, zone]}` (kpx/udp_sessions.py's fields: the raw table key and client
sockaddr; the endpoint whole, as the balancer compares it) with one fd, its socket connected to
the endpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERSION = 1
MAX_FDS = 240
# A message's bytes at most: SEQPACKET datagrams must fit the socket's send buffer.
MAX_MESSAGE = 128 * 1024

Address = tuple[str, int]
# An endpoint as kpx.backends.Backend holds it: ip, port, node name, zone.
Endpoint = tuple[str, int, str | None, str | None]
# (bytes in the pipe, source said EOF, EOF passed on): kpx.splice.DirectionState's fields.
Direction = tuple[int, bool, bool]


class WireError(ValueError):
    """A message that is not one of the protocol's, or whose fds do not match it."""


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    pid: int


@dataclass(frozen=True, slots=True)
class Listeners:
    tcp: tuple[Address, ...]
    udp: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class Connection:
    backend: Address
    up: Direction
    down: Direction

    @property
    def fds(self) -> int:
        """2 sockets, plus 2 pipe ends per direction with bytes in flight."""
        return 2 + 2 * (self.up[0] > 0) + 2 * (self.down[0] > 0)


@dataclass(frozen=True, slots=True)
class Connections:
    items: tuple[Connection, ...]


@dataclass(frozen=True, slots=True)
class UdpSession:
    key: bytes
    name: bytes
    client: str
    frontend: Address
    backend: Endpoint


@dataclass(frozen=True, slots=True)
class Sessions:
    items: tuple[UdpSession, ...]


@dataclass(frozen=True, slots=True)
class Done:
    count: int  # connections sent
    sessions: int  # UDP sessions sent


@dataclass(frozen=True, slots=True)
class Ack:
    adopted: int  # connections adopted (all of them, or the handover failed)
    sessions: int  # UDP sessions adopted (those of clients the new kpx had not met yet)


Message = Hello | Listeners | Ready | Connections | Sessions | Done | Ack


def fd_count(message: Message) -> int:
    """How many fds travel with `message`."""
    if isinstance(message, Listeners):
        return len(message.tcp) + len(message.udp)
    if isinstance(message, Connections):
        return sum(item.fds for item in message.items)
    if isinstance(message, Sessions):
        return len(message.items)
    return 0


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    if isinstance(message, Hello):
        body = {"kind": "hello", "version": message.version, "pid": message.pid}
    elif isinstance(message, Listeners):
        body = {"kind": "listeners", "tcp": message.tcp, "udp": message.udp}
    elif isinstance(message, Ready):
        body = {"kind": "ready"}
    elif isinstance(message, Connections):
        body = {
            "kind": "connections",
            "items": [
                {"backend": item.backend, "up": item.up, "down": item.down}
                for item in message.items
            ],
        }
    elif isinstance(message, Sessions):
        body = {
            "kind": "sessions",
            "items": [
                {
                    "key": item.key.hex(),
                    "name": item.name.hex(),
                    "client": item.client,
                    "frontend": item.frontend,
                    "backend": item.backend,
                }
                for item in message.items
            ],
        }
    elif isinstance(message, Done):
        body = {"kind": "done", "count": message.count, "sessions": message.sessions}
    else:
        body = {"kind": "ack", "adopted": message.adopted, "sessions": message.sessions}
    body["fds"] = fd_count(message)
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def session_batches(items: list[UdpSession]) -> list[Sessions]:
    """`items` cut into messages of at most MAX_FDS sessions (one fd each)."""
    return [Sessions(tuple(items[i : i + MAX_FDS])) for i in range(0, len(items), MAX_FDS)]


def batches(items: list[Connection]) -> list[Connections]:
    """`items` cut into messages of at most MAX_FDS fds each."""
    out: list[Connections] = []
    batch: list[Connection] = []
    fds = 0
    for item in items:
        if batch and fds + item.fds > MAX_FDS:
            out.append(Connections(tuple(batch)))
            batch, fds = [], 0
        batch.append(item)
        fds += item.fds
    if batch:
        out.append(Connections(tuple(batch)))
    return out


def decode(data: bytes, received_fds: int) -> Message:
    """The message in `data`, which arrived with `received_fds` fds; raises WireError."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise WireError(f"not JSON: {err}") from None
    if not isinstance(body, dict):
        raise WireError("not a JSON object")
    try:
        message = _parse(body)
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"bad {body.get('kind')!r} message: {err!r}") from None
    expected = fd_count(message)
    if body.get("fds") != expected or received_fds != expected:
        raise WireError(
            f"{body.get('kind')} message needs {expected} fds, "
            f"says {body.get('fds')!r}, came with {received_fds}"
        )
    return message


def _address(value: Any) -> Address:
    host, port = value
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"bad address {value!r}")
    return host, port


def _endpoint(value: Any) -> Endpoint:
    ip, port, node, zone = value
    for text in (node, zone):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"bad endpoint {value!r}")
    return (*_address([ip, port]), node, zone)


def _ip(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"bad address {value!r}")
    return value


def _direction(value: Any) -> Direction:
    pending, eof, done = value
    if not isinstance(pending, int) or pending < 0:
        raise ValueError(f"bad pending {pending!r}")
    if not isinstance(eof, bool) or not isinstance(done, bool) or (done and not eof):
        raise ValueError(f"bad direction {value!r}")
    return pending, eof, done


def _parse(body: dict[str, Any]) -> Message:
    kind = body["kind"]
    if kind == "hello":
        version, pid = body["version"], body["pid"]
        if not isinstance(version, int) or not isinstance(pid, int):
            raise ValueError("version and pid must be integers")
        return Hello(version, pid)
    if kind == "listeners":
        return Listeners(
            tuple(_address(a) for a in body["tcp"]), tuple(_address(a) for a in body["udp"])
        )
    if kind == "ready":
        return Ready()
    if kind == "connections":
        return Connections(
            tuple(
                Connection(_address(i["backend"]), _direction(i["up"]), _direction(i["down"]))
                for i in body["items"]
            )
        )
    if kind == "sessions":
        return Sessions(
            tuple(
                UdpSession(
                    bytes.fromhex(i["key"]),
                    bytes.fromhex(i["name"]),
                    _ip(i["client"]),
                    _address(i["frontend"]),
                    _endpoint(i["backend"]),
                )
                for i in body["items"]
            )
        )
    if kind in ("done", "ack"):
        count = body["count" if kind == "done" else "adopted"]
        sessions = body["sessions"]
        for value in (count, sessions):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"bad count {value!r}")
        return Done(count, sessions) if kind == "done" else Ack(count, sessions)
    raise ValueError(f"unknown kind {kind!r}")
