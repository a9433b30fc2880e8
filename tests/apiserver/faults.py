"""Injected failures: fail the next N matching requests, forbid a resource, pause the API."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from .errors import reason_for, status_body

_MESSAGES = {
    429: "Too many requests, please try again later.",
    500: "Internal error occurred: injected fault",
    503: "The server is currently unable to handle the request (injected fault)",
    504: "The server was unable to return a response in the time allotted (injected fault)",
}


@dataclass(slots=True)
class FaultRule:
    remaining: int
    status: int
    retry_after: float | None
    verb: str | None
    resource: str | None
    raw_body: bytes | None = None  # sent as is (a body that breaks the protocol)

    def matches(self, verb: str | None, resource: str | None) -> bool:
        return (self.verb is None or self.verb == verb) and (
            self.resource is None or self.resource == resource
        )

    def retry_after_header(self) -> str | None:
        # HTTP wants whole seconds; round up so clients never retry early.
        if self.retry_after is None:
            return None
        return str(max(0, math.ceil(self.retry_after)))

    def body(self) -> dict[str, Any]:
        details: dict[str, Any] = {}
        header = self.retry_after_header()
        if header is not None:
            details["retryAfterSeconds"] = int(header)
        message = _MESSAGES.get(self.status, f"injected fault (HTTP {self.status})")
        return status_body(self.status, message, reason_for(self.status), details)


class Faults:
    """Only touched from the server's event loop thread (or before it starts)."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._forbidden: set[str] = set()
        self._paused = False
        self._gate: asyncio.Event | None = None
        # Raw lines for open watch streams: (sequence number, resource or None: every one).
        self._watch_lines: list[tuple[int, str | None, bytes]] = []
        self._watch_seq = 0

    # ---- fail_next ----------------------------------------------------------------------

    def fail_next(
        self,
        n: int,
        status: int = 500,
        retry_after: float | None = None,
        verb: str | None = None,
        resource: str | None = None,
    ) -> None:
        if n > 0:
            self._rules.append(FaultRule(n, status, retry_after, verb, resource))

    def garbage_next(
        self, n: int, body: bytes, verb: str | None = None, resource: str | None = None
    ) -> None:
        """The next n matching requests get HTTP 200 with `body` as it is."""
        if n > 0:
            self._rules.append(FaultRule(n, 200, None, verb, resource, raw_body=body))

    # ---- raw watch lines ----------------------------------------------------------------

    def inject_watch_lines(self, lines: list[bytes], resource: str | None = None) -> None:
        """Every watch stream open now (of `resource`, or all) writes these lines next, each
        followed by a newline, between real events: garbage in a real protocol stream."""
        for line in lines:
            self._watch_seq += 1
            self._watch_lines.append((self._watch_seq, resource, line))
        del self._watch_lines[:-1000]  # bounded

    @property
    def watch_line_mark(self) -> int:
        """Where a stream opened now starts reading injected lines."""
        return self._watch_seq

    def watch_lines_after(self, mark: int, resource: str) -> tuple[int, list[bytes]]:
        """(new mark, lines injected after `mark` for `resource`)."""
        lines = [
            line
            for seq, target, line in self._watch_lines
            if seq > mark and target in (None, resource)
        ]
        return self._watch_seq, lines

    def take(self, verb: str | None, resource: str | None) -> FaultRule | None:
        """Consume one failure from the first rule (in order of registration) that matches."""
        for rule in self._rules:
            if rule.matches(verb, resource):
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._rules.remove(rule)
                return rule
        return None

    def clear(self) -> None:
        self._rules.clear()
        self._forbidden.clear()
        self._watch_lines.clear()

    # ---- forbid -------------------------------------------------------------------------

    def forbid(self, resource: str) -> None:
        self._forbidden.add(resource)

    def allow(self, resource: str) -> None:
        self._forbidden.discard(resource)

    def is_forbidden(self, resource: str | None) -> bool:
        return resource in self._forbidden

    # ---- pause --------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def attach(self) -> None:
        """Bind the pause gate to the running loop (a new one after every start)."""
        self._gate = asyncio.Event()
        self._sync_gate()

    def detach(self) -> None:
        if self._gate is not None:
            self._gate.set()  # let anything still parked run to its cancellation
        self._gate = None

    def pause(self) -> None:
        self._paused = True
        self._sync_gate()

    def resume(self) -> None:
        self._paused = False
        self._sync_gate()

    def _sync_gate(self) -> None:
        if self._gate is not None:
            if self._paused:
                self._gate.clear()
            else:
                self._gate.set()

    async def wait_running(self) -> None:
        """Park while paused: requests (and watch deliveries) hang, nothing is answered."""
        if self._paused and self._gate is not None:
            await self._gate.wait()
