"""UDP sessions: (client address, frontend) -> endpoint, bounded, expired when idle. Pure code.

A session is what the kernel's conntrack entry is for kube-proxy: it keeps one client's
datagrams on one endpoint and routes the endpoint's answers back to that client. Unlike a
conntrack entry it is never stale: the relay stamps each session with the table's `epoch`,
bumps the epoch after every sync, and re-checks a session whose stamp is old on its next
datagram (kpx/udp_relay.py); a session whose endpoint left moves to another one then.

Idle timeout: 30 s by default, the kernel's `nf_conntrack_udp_timeout`, so a client sees the
same lifetime as with kube-proxy (a DNS resolver's retry, a statsd client's next flush every
10 s, a QUIC connection's keepalive all stay on their endpoint). Every datagram either way
refreshes it, as a packet refreshes a conntrack entry. Expiry runs every timeout / 4, so a
session ends 1 to 1.25 x the timeout after its last datagram.

The table is bounded: at `max_sessions`, the oldest idle sixteenth is evicted in one pass
(amortised O(log n) per new session, instead of keeping an LRU order on every datagram).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

from kpx.backends import Backend

DEFAULT_IDLE_TIMEOUT = 30.0  # seconds: nf_conntrack_udp_timeout
DEFAULT_MAX_SESSIONS = 65536
_EVICT_FRACTION = 16


class Session:
    """One client of one frontend. `sock`/`fd`/`reply` belong to the relay."""

    __slots__ = (
        "backend",
        "client",
        "client_ip",
        "epoch",
        "fd",
        "frontend",
        "key",
        "last",
        "name",
        "picker",
        "reply",
        "sock",
    )

    def __init__(
        self,
        key: bytes,
        name: bytes,
        client_ip: str,
        frontend: tuple[str, int],
        backend: Backend,
        picker: Any,
        epoch: int,
        now: float,
    ) -> None:
        self.key = key  # the table key: raw client sockaddr + frontend tag
        self.name = name  # the client's raw sockaddr, where answers are sent
        self.client_ip = client_ip
        self.frontend = frontend  # (ip, port) the client sent to; ip "" for ports-mode NodePort
        self.backend = backend
        self.picker = picker  # the frontend's Picker when the session was (re)checked
        self.epoch = epoch  # the relay's epoch when the session was last checked
        self.last = now  # monotonic time of the last datagram either way
        self.sock: Any = None
        self.fd = -1
        self.reply: Any = None  # the client-facing socket answers leave from


class SessionTable:
    """Sessions by key; the relay adds, looks up and removes; `expire` and `make_room` say
    which sessions to end."""

    def __init__(
        self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_sessions: int = DEFAULT_MAX_SESSIONS
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.sessions: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.sessions.values()))

    def get(self, key: bytes) -> Session | None:
        return self.sessions.get(key)

    def make_room(self) -> list[Session]:
        """Before adding one: the sessions to evict (removed here) when the table is full."""
        if len(self.sessions) < self.max_sessions:
            return []
        count = max(1, self.max_sessions // _EVICT_FRACTION)
        oldest = heapq.nsmallest(count, self.sessions.values(), key=lambda s: s.last)
        for session in oldest:
            del self.sessions[session.key]
        return oldest

    def add(self, session: Session) -> None:
        self.sessions[session.key] = session

    def remove(self, session: Session) -> bool:
        """Forget `session`; False when it was already gone."""
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            return True
        return False

    def expire(self, now: float) -> list[Session]:
        """Remove and return the sessions idle for at least the timeout."""
        limit = now - self.idle_timeout
        gone = [s for s in self.sessions.values() if s.last <= limit]
        for session in gone:
            del self.sessions[session.key]
        return gone

    def of_frontend(self, frontend: tuple[str, int]) -> list[Session]:
        return [s for s in self.sessions.values() if s.frontend == frontend]
