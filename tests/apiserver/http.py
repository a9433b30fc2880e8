"""aiohttp handlers speaking kube-apiserver's HTTP protocol for the served resources."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .authz import Rbac, Request
from .discovery import document_for
from .errors import ApiError, BadRequest, MethodNotAllowed, NotFound
from .faults import FaultRule, Faults
from .records import RequestLog, RequestRecord
from .routes import Route, parse_path, verb_for
from .selectors import ObjectFilter, parse_field_selector, parse_label_selector
from .state import Store
from .watch import Entry, WatchEnd, Watcher, WatchItem, event_line

logger = logging.getLogger(__name__)

JSON = "application/json"
_PUBLIC_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"})
_HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
_BATCH_LINES = 500  # watch lines per write: fewer syscalls, still small chunks
_IDLE_CHECK_S = 1.0  # how often an idle watch looks for a vanished client
_NOT_FOUND_PATH = "the server could not find the requested resource"


def json_response(body: bytes | dict[str, Any], status: int = 200) -> web.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(body=data, status=status, content_type=JSON)


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    response = json_response(err.status(), err.code)
    response.headers.update(headers or {})
    return response


def fault_response(fault: FaultRule) -> web.Response:
    if fault.raw_body is not None:
        return web.Response(body=fault.raw_body, status=fault.status, content_type=JSON)
    response = json_response(fault.body(), fault.status)
    if (header := fault.retry_after_header()) is not None:
        response.headers["Retry-After"] = header
    return response


def _object_filter(route: Route, query: dict[str, str]) -> ObjectFilter:
    return ObjectFilter(
        namespace=route.namespace,
        labels=parse_label_selector(query.get("labelSelector")),
        fields=parse_field_selector(query.get("fieldSelector"), route.rtype),
    )


def _int_param(query: dict[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"invalid {name}: {raw!r}") from None


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("true", "1")


def _forbidden(route: Route, verb: str, user: str = "fake-user") -> ApiError:
    rtype = route.rtype
    scope = f'in the namespace "{route.namespace}"' if route.namespace else "at the cluster scope"
    return ApiError(
        f'{rtype.resource} is forbidden: User "{user}" cannot {verb} resource '
        f'"{rtype.resource}" in API group "{rtype.group}" {scope}',
        code=403,
        details={"kind": rtype.resource, **({"name": route.name} if route.name else {})},
    )


@dataclass(slots=True)
class WatchOptions:
    deadline: float  # loop time at which to end the stream (inf: never)
    bookmarks: bool


class ApiHandlers:
    """Everything between an HTTP request and the store. Runs on the server loop only."""

    def __init__(
        self,
        store: Store,
        faults: Faults,
        log: RequestLog,
        token: Callable[[], str],
        server_address: Callable[[], str],
        bookmark_interval: float,
    ) -> None:
        self.store = store
        self.faults = faults
        self.log = log
        self._token = token
        self._server_address = server_address
        self.bookmark_interval = bookmark_interval
        # Set (FakeApiServer(rbac=...)) to authenticate service-account tokens and enforce
        # RBAC on them; the admin token and the client certificate stay unrestricted.
        self.rbac: Rbac | None = None

    # ---- pipeline -----------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        await self.faults.wait_running()
        query = dict(request.query)
        record = RequestRecord(request.method, request.path, query)
        self.log.append(record)
        try:
            response = await self._serve(request, record)
        except ApiError as err:
            response = error_response(err)
        except Exception as exc:  # a bug in the fake: still answer like an apiserver would
            logger.exception("fake apiserver failed on %s %s", request.method, request.path)
            response = error_response(ApiError(f"Internal error occurred: {exc!r}", code=500))
        if record.status is None:
            record.status = response.status
        return response

    async def _serve(self, request: web.BaseRequest, record: RequestRecord) -> web.StreamResponse:
        record.user = self._authenticate(request)
        has_credentials = "Authorization" in request.headers
        if record.user is None and (has_credentials or request.path not in _PUBLIC_PATHS):
            raise ApiError("Unauthorized", code=401)
        route = parse_path(request.path)
        if route is None:
            return self._non_resource(request)
        verb = verb_for(request.method, route, record.query)
        record.verb, record.resource = verb, route.rtype.resource
        record.namespace, record.name = route.namespace, route.name
        if verb is None:
            raise MethodNotAllowed(
                "the server does not allow this method on the requested resource"
            )
        if (fault := self.faults.take(verb, route.rtype.resource)) is not None:
            return fault_response(fault)
        if self.faults.is_forbidden(route.rtype.resource):
            raise _forbidden(route, verb)
        if self.rbac is not None and record.user not in ("cert", "token"):
            request_attrs = Request(
                verb, route.rtype.group, route.rtype.resource, route.namespace, route.name
            )
            if not self.rbac.allows(record.user or "", request_attrs):
                raise _forbidden(route, verb, record.user or "")
        return await self._dispatch(request, route, verb, record)

    def _authenticate(self, request: web.BaseRequest) -> str | None:
        """x509 first, then bearer token, like kube-apiserver's union authenticator."""
        transport = request.transport
        if transport is not None and transport.get_extra_info("peercert"):
            return "cert"
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = value.strip().encode()
        expected = self._token().encode()
        if scheme.lower() == "bearer" and token and hmac.compare_digest(token, expected):
            return "token"
        if scheme.lower() == "bearer" and token and self.rbac is not None:
            return self.rbac.authenticate(token.decode(errors="replace"))
        return None

    def _non_resource(self, request: web.BaseRequest) -> web.Response:
        # Only fail_next rules without a verb/resource filter apply to discovery and health.
        if (fault := self.faults.take(None, None)) is not None:
            return fault_response(fault)
        if request.method != "GET":
            raise NotFound(_NOT_FOUND_PATH, details={})
        if request.path in _HEALTH_PATHS:
            return web.Response(text="ok", content_type="text/plain")
        document = document_for(request.path, self._server_address())
        if document is None:
            raise NotFound(_NOT_FOUND_PATH, details={})
        return json_response(document)

    async def _dispatch(
        self, request: web.BaseRequest, route: Route, verb: str, record: RequestRecord
    ) -> web.StreamResponse:
        if verb == "list":
            return self._list(route, record.query)
        if verb == "watch":
            return await self._watch(request, route, record)
        if verb == "get":
            return json_response(self._existing(route).full_json())
        if verb == "delete":
            entry = self.store.delete(route.rtype.resource, route.namespace, route.name or "")
            return json_response(entry.full_json())
        body = await self._read_object(request, route)
        if verb == "create":
            return json_response(self.store.create(body, route.namespace).full_json(), 201)
        return json_response(self.store.update(body, route.namespace, check_rv=True).full_json())

    # ---- verbs --------------------------------------------------------------------------

    def _list(self, route: Route, query: dict[str, str]) -> web.Response:
        flt = _object_filter(route, query)
        limit = _int_param(query, "limit")
        page = self.store.list_page(route.rtype.resource, flt, limit, query.get("continue"))
        return json_response(page.to_json())

    def _existing(self, route: Route) -> Entry:
        entry = self.store.get(route.rtype.resource, route.namespace, route.name or "")
        if entry is None:
            raise NotFound(
                f'{route.rtype.resource} "{route.name}" not found',
                details={"name": route.name, "kind": route.rtype.resource},
            )
        return entry

    async def _read_object(self, request: web.BaseRequest, route: Route) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        rtype = route.rtype
        if body.setdefault("kind", rtype.kind) != rtype.kind:
            raise BadRequest(f"the kind {body['kind']!r} does not match {rtype.kind!r}")
        if body.setdefault("apiVersion", rtype.api_version) != rtype.api_version:
            raise BadRequest(f"the apiVersion {body['apiVersion']!r} is not {rtype.api_version}")
        name = (body.get("metadata") or {}).get("name")
        if route.name is not None and name != route.name:
            raise BadRequest(
                f"the name of the object ({name}) does not match the name on the URL ({route.name})"
            )
        return body

    # ---- watch --------------------------------------------------------------------------

    def _watch_options(self, query: dict[str, str]) -> WatchOptions:
        timeout = _int_param(query, "timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout and timeout > 0 else math.inf
        return WatchOptions(deadline, _flag(query, "allowWatchBookmarks"))

    async def _watch(
        self, request: web.BaseRequest, route: Route, record: RequestRecord
    ) -> web.StreamResponse:
        flt = _object_filter(route, record.query)
        options = self._watch_options(record.query)
        start = self.store.open_watch(
            route.rtype.resource, flt, record.query.get("resourceVersion")
        )
        response = web.StreamResponse(
            status=200, headers={"Content-Type": JSON, "Cache-Control": "no-cache, private"}
        )
        response.enable_chunked_encoding()
        record.status = 200
        try:
            await response.prepare(request)
            if start.error is not None:
                error = {"type": "ERROR", "object": start.error.status()}
                await response.write(orjson.dumps(error) + b"\n")
            elif start.watcher is not None:
                await self._stream(request, response, start.watcher, start.initial, options)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing left to tell it
        finally:
            if start.watcher is not None:
                self.store.close_watch(start.watcher)
        return response

    async def _stream(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        watcher: Watcher,
        initial: list[tuple[str, Entry]],
        options: WatchOptions,
    ) -> None:
        for index in range(0, len(initial), _BATCH_LINES):
            if watcher.aborted:
                return
            chunk = initial[index : index + _BATCH_LINES]
            await self._write(response, b"".join(event_line(t, e) for t, e in chunk))
        await self._pump(request, response, watcher, options)

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        await self.faults.wait_running()
        await response.write(data)

    def _bookmark_line(self, watcher: Watcher) -> bytes:
        rtype = watcher.rtype
        meta = {"resourceVersion": str(self.store.rv)}
        obj = {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta}
        return orjson.dumps({"type": "BOOKMARK", "object": obj}) + b"\n"

    async def _pump(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        watcher: Watcher,
        options: WatchOptions,
    ) -> None:
        """Send live events until the deadline, an END, or the client disappears."""
        loop = asyncio.get_running_loop()
        interval = self.bookmark_interval
        next_bookmark = loop.time() + interval if options.bookmarks else math.inf
        mark = self.faults.watch_line_mark
        while (now := loop.time()) < options.deadline:
            mark, garbage = self.faults.watch_lines_after(mark, watcher.rtype.resource)
            if garbage:  # injected: see Faults.inject_watch_lines
                await self._write(response, b"".join(line + b"\n" for line in garbage))
            if watcher.queue.empty() and now >= next_bookmark:
                # The queue is empty, so every event up to the current rv has been sent:
                # a bookmark at the current rv is truthful.
                await self._write(response, self._bookmark_line(watcher))
                next_bookmark = now + interval
                continue
            wait = min(options.deadline, next_bookmark, now + _IDLE_CHECK_S) - now
            item = await _get(watcher.queue, wait)
            if item is None:
                if request.transport is None or request.transport.is_closing():
                    return
                continue
            if not await self._send_batch(response, watcher, item):
                return

    async def _send_batch(
        self, response: web.StreamResponse, watcher: Watcher, first: WatchItem
    ) -> bool:
        """Write `first` and whatever else is queued; False once the stream should end."""
        lines: list[bytes] = []
        item = first
        while not isinstance(item, WatchEnd):
            lines.append(event_line(*item))
            if len(lines) >= _BATCH_LINES or watcher.queue.empty():
                break
            item = watcher.queue.get_nowait()
        if watcher.aborted:
            return False  # a dropped slow watcher gets nothing more
        if lines:
            await self._write(response, b"".join(lines))
        return not isinstance(item, WatchEnd)


async def _get(queue: asyncio.Queue[WatchItem], wait_s: float) -> WatchItem | None:
    """The next queued item, or None if none arrives within `wait_s` seconds."""
    if not queue.empty():
        return queue.get_nowait()
    if wait_s <= 0:
        return None
    try:
        async with asyncio.timeout(wait_s):
            return await queue.get()
    except TimeoutError:
        return None
