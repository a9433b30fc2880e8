"""A small async client for the two API calls a reflector makes: list one page, and watch.

aiohttp is used because it is asyncio-native, streams chunked responses without buffering, and
doubles as the daemons' health/metrics server: one HTTP stack per process.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from kwatch.access import ClusterAccess
from kwatch.resources import Resource

# A watch line is one whole object; anything bigger than this is not a Kubernetes object.
MAX_WATCH_LINE = 32 * 1024 * 1024
# A Retry-After beyond this is not honoured in full: a typo must not silence a watch for hours.
MAX_RETRY_AFTER = 300.0
# TCP keepalive on every API connection: an idle watch whose packets are dropped (a dead NAT
# entry, a cut link: no reset ever comes) fails after KEEPALIVE_IDLE + KEEPALIVE_COUNT x
# KEEPALIVE_INTERVAL = 30 s, where client-go's HTTP/2 health check takes 30 s read idle + 15 s
# ping timeout. TCP_USER_TIMEOUT does the same for a connection with unacknowledged data (a
# request sent into the blackhole). The watch's read-idle deadline covers a server that is
# reachable but silent.
KEEPALIVE_IDLE = 15
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 30_000


def keepalive_socket(addr_info: Any) -> socket.socket:
    """aiohttp's socket factory: a TCP socket with the keepalive settings above."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
    )
    for name, value in options:
        option = getattr(socket, name, None)
        if option is not None:  # Linux has them all; elsewhere the system defaults stay
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


class ApiError(Exception):
    """A non-success answer from the API server (HTTP status, or an ERROR watch event)."""

    def __init__(
        self, code: int, reason: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class Expired(ApiError):
    """410 Gone: the resourceVersion (or continue token) is older than the server's history."""


class BadResponse(ApiError):
    """A 200 answer whose body is not what the protocol says (not JSON, not an object):
    retried with backoff like any failed request, never trusted."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "BadResponse", message)


def status_code(value: object, default: int) -> int:
    """A Status object's `code`, which a broken server may send as text, float or null."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value if 100 <= value <= 599 else default
    if isinstance(value, float | str):
        try:
            code = int(float(value))
        except (ValueError, OverflowError):
            return default
        return code if 100 <= code <= 599 else default
    return default


def api_error(code: int, body: bytes, retry_after: str | None = None) -> ApiError:
    """Build an ApiError from an HTTP status and a (possibly) Status-object body."""
    reason, message = "", body[:200].decode("utf-8", "replace").strip()
    try:
        status = orjson.loads(body)
        if isinstance(status, dict):
            reason = str(status.get("reason") or "")
            message = str(status.get("message") or message)
            code = status_code(status.get("code"), code)
    except orjson.JSONDecodeError:
        pass
    delay: float | None = None
    if retry_after:
        try:
            delay = min(max(0.0, float(retry_after)), MAX_RETRY_AFTER)
        except ValueError:
            delay = None  # an HTTP date: the backoff decides
        if delay is not None and delay != delay:  # NaN
            delay = None
    cls = Expired if code == 410 else ApiError
    return cls(code, reason or _default_reason(code), message, delay)


def _default_reason(code: int) -> str:
    return {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 410: "Expired"}.get(
        code, "Error"
    )


@dataclass(frozen=True)
class ListPage:
    items: list[dict[str, Any]]
    resource_version: str
    continue_token: str


class ApiClient:
    """One aiohttp session to one API server, created lazily inside the running loop."""

    def __init__(
        self,
        access: ClusterAccess,
        *,
        user_agent: str = "kwatch",
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.access = access
        self.user_agent = user_agent
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self.access.ssl_context or False, limit=32, socket_factory=keepalive_socket
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": self.user_agent, "Accept": "application/json"},
                json_serialize=lambda o: orjson.dumps(o).decode(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_page(self, resource: Resource, params: dict[str, str]) -> ListPage:
        """One page decoded into plain JSON values; BadResponse when it is no List."""
        return parse_list(await self.list_body(resource, params))

    async def list_body(self, resource: Resource, params: dict[str, str]) -> bytes:
        """One page as the server sent it (the reflector validates it straight from JSON)."""
        url = self.access.server + resource.collection_path()
        timeout = aiohttp.ClientTimeout(
            total=self.request_timeout, sock_connect=self.connect_timeout
        )
        session = self._get_session()
        async with session.get(
            url, params=params, headers=self.access.auth_headers(), timeout=timeout
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise api_error(resp.status, body, resp.headers.get("Retry-After"))
        return body

    async def watch(
        self, resource: Resource, params: dict[str, str], read_timeout: float
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield decoded watch events until the server ends the stream."""
        url = self.access.server + resource.collection_path()
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=read_timeout
        )
        session = self._get_session()
        async with session.get(
            url, params=params, headers=self.access.auth_headers(), timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise api_error(resp.status, await resp.read(), resp.headers.get("Retry-After"))
            async for line in _lines(resp.content):
                yield parse_event(line)


def parse_list(body: bytes) -> ListPage:
    """A list response body -> ListPage; raises BadResponse for anything but a List object
    of objects."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise BadResponse(f"list body is not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise BadResponse(f"list body is a JSON {type(doc).__name__}, not an object")
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    items = doc.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise BadResponse(f"list items is a JSON {type(items).__name__}, not an array")
    if not all(isinstance(item, dict) for item in items):
        # A page with junk in it is not trusted at all: replacing the store with the rest
        # would delete every object the junk stands for.
        raise BadResponse("list items that are not objects")
    rv = meta.get("resourceVersion")
    if not isinstance(rv, str | int) or isinstance(rv, bool) or not str(rv):
        raise BadResponse("list without metadata.resourceVersion")
    token = meta.get("continue")
    return ListPage(
        items=items,
        resource_version=str(rv),
        continue_token=token if isinstance(token, str) else "",
    )


def parse_event(line: bytes) -> dict[str, Any]:
    """One watch line -> the event object; raises BadResponse when it is not a JSON object
    (the stream is then reopened from the last resourceVersion applied)."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        raise BadResponse(f"watch line is not JSON: {err}") from None
    if not isinstance(event, dict):
        raise BadResponse(f"watch line is a JSON {type(event).__name__}, not an object")
    return event


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Split a chunked body into newline-delimited records of any size (up to a cap)."""
    buffer = bytearray()
    async for chunk in stream.iter_any():
        buffer += chunk
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if end > start:
                yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if len(buffer) > MAX_WATCH_LINE:
            raise ApiError(0, "LineTooLong", f"watch record over {MAX_WATCH_LINE} bytes")
    if buffer.strip():
        yield bytes(buffer)


# Errors that mean "the server could not be reached or the connection broke": retried.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
    orjson.JSONDecodeError,
)
