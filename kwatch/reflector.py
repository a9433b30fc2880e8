"""List-then-watch one resource into a Store, the way client-go's reflector does.

- The first list is paginated (`limit`/`continue`); the watch then starts from the list's
  resourceVersion with bookmarks on, so a quiet resource still advances its resourceVersion.
- A watch that ends (server timeout, dropped connection) is reopened from the last seen
  resourceVersion, without a relist.
- 410 Expired (history compacted) forces a relist that *replaces* the store: objects deleted
  during the gap are reported DELETED.
- Errors back off exponentially with jitter; 429/5xx honour Retry-After.
- A watch silent for `idle_timeout` seconds (bookmarks come about every minute) is presumed
  blackholed (packets dropped, no reset) and reopened.
- A body that breaks the protocol (a list or watch line that is not a JSON object, an ERROR
  event with an odd Status) is retried like a failed request: the watch resumes from the last
  resourceVersion applied.
- An invalid object is skipped (its last good version kept), logged once and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from typing import Any

import structlog
from pydantic import ValidationError

from kwatch import metrics
from kwatch.backoff import Backoff
from kwatch.client import (
    TRANSPORT_ERRORS,
    ApiClient,
    ApiError,
    BadResponse,
    Expired,
    parse_list,
    status_code,
)
from kwatch.models import describe_error, object_key
from kwatch.resources import Resource
from kwatch.runtime import release_free_memory
from kwatch.store import Store, same_version

log = structlog.get_logger("kwatch.reflector")

# A watch stream that ends this fast without delivering anything counts as a failure, so a
# server that closes every watch at once cannot drive a hot reconnect loop.
MIN_HEALTHY_WATCH_SECONDS = 1.0


class Reflector:
    def __init__(
        self,
        client: ApiClient,
        resource: Resource,
        store: Store[Any],
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        # client-go lists 500 at a time; 500 real-world EndpointSlices decode to some 10 MB
        # of dicts, and that was most of the peak of a relist at 10,000 Services (issue 14).
        # 100 keeps the peak down for the same list time.
        page_size: int = 100,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        idle_timeout: float = 90.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.store = store
        self.selectors = {
            k: v
            for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector))
            if v
        }
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        # Longest silence on an open watch before the connection is given up: bookmarks
        # arrive about every minute, so only a dead (blackholed) connection is that quiet.
        self.idle_timeout = idle_timeout
        self.backoff = backoff or Backoff()
        self._failure: str | None = None  # the problem last logged, to log each one once
        self._name = resource.name

    async def run(self) -> None:
        """List and watch until cancelled; never raises on API or network failures, nor on
        a body that breaks the protocol (the supervisor restarts it after anything else)."""
        resource_version = self.store.resource_version if self.store.synced else ""
        relist_reason = ""
        while True:
            try:
                if not resource_version:
                    if relist_reason:
                        metrics.RELISTS.labels(self._name, relist_reason).inc()
                    resource_version = await self._list()
                    self._recovered()
                resource_version, healthy = await self._watch(resource_version)
                if healthy:
                    self._recovered()
                    continue
                metrics.WATCH_RESTARTS.labels(self._name, "closed_early").inc()
                await asyncio.sleep(self.backoff.next())
            except Expired as err:
                log.info(
                    "watch_expired", resource=self._name, rv=resource_version, message=err.message
                )
                metrics.WATCH_RESTARTS.labels(self._name, "expired").inc()
                resource_version, relist_reason = "", "expired"
                if self.backoff.failing:
                    await asyncio.sleep(self.backoff.next())
            except ApiError as err:
                metrics.API_ERRORS.labels(self._name, str(err.code)).inc()
                resource_version = self._resume_from(resource_version)
                delay = self.backoff.next()
                if err.retry_after is not None:
                    # API Priority and Fairness (429) and a restarting server (503) say when
                    # to come back; a little jitter keeps thousands of nodes from returning
                    # in the same millisecond.
                    delay = max(delay, err.retry_after * (1 + random.random() * 0.2))
                self._failed(f"{err.code} {err.reason}: {err.message}", delay)
                await asyncio.sleep(delay)
            except TRANSPORT_ERRORS as err:
                idle = isinstance(err, asyncio.TimeoutError) and bool(resource_version)
                if idle:
                    # No byte for `idle_timeout` seconds although the server sends bookmarks
                    # about every minute: the connection is presumed dead (blackholed).
                    metrics.WATCH_RESTARTS.labels(self._name, "idle").inc()
                metrics.API_ERRORS.labels(self._name, "0").inc()
                resource_version = self._resume_from(resource_version)
                delay = self.backoff.next()
                self._failed(f"{type(err).__name__}: {err}".strip(), delay)
                await asyncio.sleep(delay)

    def _resume_from(self, resource_version: str) -> str:
        """After a failed watch, the last resourceVersion applied (the store's); after a
        failed list, "" (list again)."""
        if not resource_version:
            return ""
        return self.store.resource_version or resource_version

    # --- list ------------------------------------------------------------------------------

    async def _list(self) -> str:
        objects: dict[str, Any] = {}
        continue_token = ""
        while True:
            params = {"limit": str(self.page_size), **self.selectors}
            if continue_token:
                params["continue"] = continue_token
            metrics.LIST_REQUESTS.labels(self._name).inc()
            body = await self.client.list_body(self.resource, params)
            resource_version, continue_token = self._take_page(body, objects)
            # Nothing of this page is kept but the models: the next page is fetched with only
            # those alive (a page of 500 real-world objects decodes to some 10 MB of dicts).
            del body
            if not continue_token:
                break
        changed = self.store.replace(objects, resource_version)
        metrics.OBJECTS.labels(self._name).set(len(self.store))
        if not self.store.synced:
            self.store.mark_synced()
            metrics.SYNCED.labels(self._name).set(1)
            log.info("synced", resource=self._name, objects=len(objects), rv=resource_version)
        else:
            log.info("relisted", resource=self._name, objects=len(objects), changes=changed)
            # The pages' buffers are free now; give them back rather than keep the relist's
            # peak for good (the first list is followed by the daemons' own release).
            release_free_memory()
        return resource_version

    def _take_page(self, body: bytes, objects: dict[str, Any]) -> tuple[str, str]:
        """Parse one list page into `objects`; returns its resourceVersion and continue token.

        The cyclic garbage collector is paused meanwhile: a page creates thousands of objects
        and no reference cycle, and each collection it would trigger walks every object of
        the stores (at 10,000 Services roughly a tenth of the list's CPU, measured on a busy
        machine)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            parsed, resource_version, continue_token = self.resource.parse_list(body)
        except ValidationError:
            # Some item is invalid (or the body is no JSON): item by item, so the valid ones
            # are kept and the invalid ones logged (JSONDecodeError: retried).
            return self._parse_page(body, objects)
        else:
            if not resource_version:
                return self._parse_page(body, objects)  # raises BadResponse, as for junk
            for obj in parsed:
                key = obj.metadata.key
                previous = self.store.get(key)
                # A relist returns mostly objects the store holds: keep those instances.
                same = previous is not None and same_version(previous, obj)
                objects[key] = previous if same else obj
            return resource_version, continue_token
        finally:
            if collecting:
                gc.enable()

    def _parse_page(self, body: bytes, objects: dict[str, Any]) -> tuple[str, str]:
        page = parse_list(body)  # BadResponse: the body is no List of objects
        items = page.items
        # Each raw object is released once parsed (the page's dicts are the peak of a list).
        items.reverse()
        while items:
            self._parse_into(items.pop(), objects)
        return page.resource_version, page.continue_token

    def _parse_into(self, raw: dict[str, Any], objects: dict[str, Any]) -> None:
        key = object_key(raw)
        if key is None:
            self._skip(raw, "no metadata.name")
            return
        unchanged = self._unchanged(key, raw)
        if unchanged is not None:
            # A relist (410) returns mostly objects the store already holds: reuse them, so a
            # relist at 10,000 Services does not build a second copy of the store beside the
            # first before replacing it (issue 14: peak RSS during a relist).
            objects[key] = unchanged
            return
        try:
            objects[key] = self.resource.parse(raw)
        except (ValidationError, ValueError, TypeError) as err:
            self._skip(raw, _problem(err))
            previous = self.store.get(key)
            if previous is not None:
                objects[key] = previous

    def _unchanged(self, key: str, raw: dict[str, Any]) -> Any:
        """The stored object when `raw` is the same version of it (equal resourceVersions)."""
        previous = self.store.get(key)
        if previous is None:
            return None
        meta = raw.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if version and version == previous.metadata.resource_version:
            return previous
        return None

    # --- watch -----------------------------------------------------------------------------

    async def _watch(self, resource_version: str) -> tuple[str, bool]:
        """Follow one watch stream; returns the last resourceVersion and whether it was healthy."""
        timeout = random.uniform(*self.watch_timeout)
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(int(timeout)),
            **self.selectors,
        }
        metrics.WATCH_REQUESTS.labels(self._name).inc()
        started = time.monotonic()
        received = 0
        stream = self.client.watch(self.resource, params, read_timeout=self.idle_timeout)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                if received == 0:
                    self._recovered()
                received += 1
                resource_version = self._apply(event, resource_version)
        metrics.WATCH_RESTARTS.labels(self._name, "ended").inc()
        healthy = received > 0 or time.monotonic() - started >= MIN_HEALTHY_WATCH_SECONDS
        return resource_version, healthy

    def _apply(self, event: dict[str, Any], resource_version: str) -> str:
        kind = event.get("type")
        raw = event.get("object")
        if kind == "ERROR":
            raise _watch_error(raw)
        if not isinstance(raw, dict):
            # Nothing to apply and no resourceVersion to trust: reopen from the last one.
            raise BadResponse(f"watch event {str(kind)[:40]} without an object")
        meta = raw.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        new_rv = str(rv) if isinstance(rv, str | int) and not isinstance(rv, bool) and rv else ""
        new_rv = new_rv or resource_version
        if kind == "BOOKMARK":
            self.store.resource_version = new_rv
            return new_rv
        key = object_key(raw)
        if key is None or kind not in ("ADDED", "MODIFIED", "DELETED"):
            # An event type this client does not know (a newer server) or an object without
            # a name: skipped, counted; the stream goes on.
            self._skip(raw, f"unusable {str(kind)[:40]} event")
            return new_rv
        metrics.EVENTS.labels(self._name, kind).inc()
        if kind == "DELETED":
            self.store.delete(key)
        else:
            try:
                parsed = self.resource.parse(raw)
            except (ValidationError, ValueError, TypeError) as err:
                self._skip(raw, _problem(err))
            else:
                self.store.upsert(key, parsed)
        self.store.resource_version = new_rv
        metrics.OBJECTS.labels(self._name).set(len(self.store))
        return new_rv

    # --- reporting -------------------------------------------------------------------------

    def _skip(self, raw: dict[str, Any], problem: str) -> None:
        metrics.SKIPPED.labels(self._name, "invalid").inc()
        log.warning(
            "object_skipped", resource=self._name, key=object_key(raw) or "?", problem=problem
        )

    def _failed(self, problem: str, retry_in: float) -> None:
        # One line per distinct problem, not one per retry: a down API server must not flood
        # the log of every node.
        if problem != self._failure:
            log.error(
                "api_unavailable",
                resource=self._name,
                server=self.client.access.server,
                problem=problem,
                retry_in=round(retry_in, 2),
            )
            self._failure = problem

    def _recovered(self) -> None:
        self.backoff.reset()
        if self._failure is not None:
            log.info("api_recovered", resource=self._name, server=self.client.access.server)
            self._failure = None


def _problem(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return describe_error(err)
    return f"{type(err).__name__}: {err}"


def _watch_error(raw: object) -> ApiError:
    """An ERROR event's Status object, whatever shape a broken server gives it."""
    if not isinstance(raw, dict):
        return BadResponse(f"ERROR event with a JSON {type(raw).__name__} for a Status")
    code = status_code(raw.get("code"), 500)
    reason = raw.get("reason")
    reason = reason if isinstance(reason, str) else ""
    message = str(raw.get("message") or "")[:500]
    if code == 410 or reason in ("Expired", "Gone"):
        return Expired(410, reason or "Expired", message)
    return ApiError(code, reason or "Error", message)
