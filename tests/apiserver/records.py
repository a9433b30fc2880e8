"""The log of every request the fake API server received."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    verb: str | None = None  # list | watch | get | create | update | delete; None: non-resource
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    status: int | None = None  # filled in once the response status is decided
    user: str | None = None  # "token" | "cert" | None (unauthenticated)
    time: float = field(default_factory=time.time)


class RequestLog:
    """Appended from the server loop, read from test threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def append(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self._records
                if (verb is None or r.verb == verb) and (resource is None or r.resource == resource)
            )
