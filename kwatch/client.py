"""A small async client for the two API calls a reflector makes: list one page, and watch.

aiohttp is used because it is asyncio-native, streams chunked responses without buffering, and
doubles as the daemons' health/metrics server: one HTTP stack per process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from kwatch.access import ClusterAccess
from kwatch.resources import Resource

# A watch line is one whole object; anything bigger than this is not a Kubernetes object.
MAX_WATCH_LINE = 32 * 1024 * 1024


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


def api_error(code: int, body: bytes, retry_after: str | None = None) -> ApiError:
    """Build an ApiError from an HTTP status and a (possibly) Status-object body."""
    reason, message = "", body[:200].decode("utf-8", "replace").strip()
    try:
        status = orjson.loads(body)
        if isinstance(status, dict):
            reason = str(status.get("reason", ""))
            message = str(status.get("message", message))
            code = int(status.get("code", code) or code)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        pass
    delay: float | None = None
    if retry_after:
        try:
            delay = max(0.0, float(retry_after))
        except ValueError:
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
            connector = aiohttp.TCPConnector(ssl=self.access.ssl_context or False, limit=32)
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
        """One page decoded into plain JSON values."""
        return decode_page(await self.list_body(resource, params))

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
                yield orjson.loads(line)


def decode_page(body: bytes) -> ListPage:
    """A list response as plain JSON values; orjson.JSONDecodeError when it is not JSON."""
    doc = orjson.loads(body)
    meta = doc.get("metadata") or {}
    return ListPage(
        items=doc.get("items") or [],
        resource_version=str(meta.get("resourceVersion", "")),
        continue_token=str(meta.get("continue") or ""),
    )


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
