"""The control process <-> worker channel (`--workers N`): messages over one unix socketpair.

A frame is a 4-byte big-endian length and a pickled message. Both ends are kpx of the same
build started from the same interpreter (kpx/worker_pool.py spawns `sys.executable -m
kpx.worker`), so pickle's only hazard, a foreign peer, cannot occur: the socket is a
socketpair inherited by the child, never a path anyone else can connect to.

Messages, control -> worker:
- `WorkerConfig` once, first;
- `("rules", seq, {service key: ServiceRules | None}, full)`: the Services whose applied rules
  changed (`full`: every Service, the worker drops what is not named);
- `("stop", drain_seconds)`.
Worker -> control: `("ack", seq)` once a rules message is applied (the first one also means
"listening"), `("stats", {counter: value})` about once a second.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

_LENGTH = struct.Struct("!I")
# A message larger than this is a bug (the full rules of 10,000 Services pickle to ~5 MB).
MAX_FRAME = 1 << 30


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What a worker needs from the control process's settings (no pydantic in the worker:
    every module it imports is resident once per worker)."""

    index: int  # 0..N-1, the `worker` label of its metrics
    listen_hosts: tuple[str, ...]  # the redirect listeners' hosts, one per address family
    proxy_port: int
    transparent: bool  # connections keep their clients' addresses
    connect_timeouts: tuple[float, ...]
    max_connections: int | None
    drain_timeout: float | None
    idle_timeout: float | None
    cooldown_base: float
    cooldown_max: float
    affinity_max_entries: int
    cluster_cidrs: tuple[str, ...]
    masquerade_all: bool
    housekeeping_period: float  # seconds between sweeps (affinity, local addresses, links)
    log_format: str
    log_level: str


def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class Channel:
    """One end of the socketpair, on the running event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    def send(self, message: Any) -> None:
        """Queue `message` (the transport writes it out; `drain` waits for it)."""
        if not self._writer.is_closing():
            self._writer.write(encode(message))

    async def drain(self) -> None:
        await self._writer.drain()

    async def receive(self) -> Any:
        """The next message; None once the peer is gone (EOF, reset)."""
        try:
            header = await self._reader.readexactly(_LENGTH.size)
            (length,) = _LENGTH.unpack(header)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes")
            return pickle.loads(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self._writer.close()
