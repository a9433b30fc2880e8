"""Objects, write history and the global resourceVersion of the fake API server.

Not thread-safe by itself: FakeApiServer runs every call on its event loop thread while
the server is up (so watch fan-out is ordered with HTTP writes), or directly while it is
down (no watcher can exist then).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import random
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .defaults import ClusterIPAllocator, apply_defaults, service_ip
from .errors import (
    AlreadyExists,
    BadRequest,
    Conflict,
    Expired,
    Invalid,
    NotFound,
    TooLargeResourceVersion,
)
from .resources import RESOURCES, ResourceType, type_for_object
from .selectors import ObjectFilter
from .watch import Entry, Event, Watcher

Key = tuple[str, str]  # (namespace or "", name)

_CONTINUE_TOO_OLD = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue token "
    "in this response to retrieve the remainder of the results. Continuing with the "
    "provided token results in an inconsistent list - objects that were created, modified, "
    "or deleted between the time the first chunk was returned and now may show up in the list."
)
_NAME_SUFFIX_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # apiserver's generateName alphabet
_SNAPSHOTS_KEPT = 64


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class Snapshot:
    """A resource's objects at one moment, sorted by (namespace, name)."""

    keys: list[Key]
    entries: list[Entry]

    def bounds(self, namespace: str | None) -> tuple[int, int]:
        if namespace is None:
            return 0, len(self.keys)
        lo = bisect.bisect_left(self.keys, (namespace, ""))
        # chr(0x10FFFF) sorts after any name, so hi is the end of this namespace.
        hi = bisect.bisect_left(self.keys, (namespace, "\U0010ffff"), lo)
        return lo, hi


@dataclass(slots=True)
class Collection:
    rtype: ResourceType
    objects: dict[Key, Entry] = field(default_factory=dict)
    history: deque[Event] = field(default_factory=deque)
    floor: int = 0  # a watch from rv R can be served from history iff R >= floor
    watchers: set[Watcher] = field(default_factory=set)
    changed_rv: int = 0
    _snapshot: Snapshot | None = None
    _snapshot_rv: int = -1

    def snapshot(self) -> Snapshot:
        if self._snapshot is None or self._snapshot_rv != self.changed_rv:
            keys = sorted(self.objects)
            self._snapshot = Snapshot(keys, [self.objects[k] for k in keys])
            self._snapshot_rv = self.changed_rv
        return self._snapshot


@dataclass(slots=True)
class ListPage:
    rtype: ResourceType
    rv: int
    items: list[Entry]
    continue_token: str | None
    remaining: int | None

    def to_json(self) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if self.continue_token:
            meta["continue"] = self.continue_token
            if self.remaining is not None:
                meta["remainingItemCount"] = self.remaining
        return b"".join(
            (
                b'{"kind":"',
                self.rtype.list_kind.encode(),
                b'","apiVersion":"',
                self.rtype.api_version.encode(),
                b'","metadata":',
                orjson.dumps(meta),
                b',"items":[',
                b",".join(entry.item_json() for entry in self.items),
                b"]}",
            )
        )


@dataclass(slots=True)
class WatchStart:
    """What opening a watch produced: a registered watcher and the events to send first,
    or an `error` (410 Expired) to send as a single ERROR event."""

    watcher: Watcher | None
    initial: list[tuple[str, Entry]]
    error: Expired | None = None


def encode_continue(rv: int, key: Key) -> str:
    raw = orjson.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(key)})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, Key]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = orjson.loads(raw)
        rv, (namespace, name) = int(data["rv"]), data["start"]
        return rv, (str(namespace), str(name))
    except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise BadRequest(f"continue key is not valid: {token!r}") from None


def parse_rv(value: str) -> int:
    try:
        rv = int(value)
    except ValueError:
        raise BadRequest(f"invalid resource version: {value!r}") from None
    if rv < 0:
        raise BadRequest(f"invalid resource version: {value!r}")
    return rv


class Store:
    def __init__(self, history_limit: int = 10_000, watch_queue_limit: int = 100_000) -> None:
        self.rv = 0
        self.compacted_rv = 0
        self.history_limit = history_limit
        self.watch_queue_limit = watch_queue_limit
        self.collections = {r.resource: Collection(r) for r in RESOURCES}
        self._page_snapshots: OrderedDict[tuple[str, int], Snapshot] = OrderedDict()
        self._ips = ClusterIPAllocator()

    # ---- writes -------------------------------------------------------------------------

    def create(self, obj: dict[str, Any], url_namespace: str | None = None) -> Entry:
        return self._create(obj, url_namespace, _now())

    def update(
        self, obj: dict[str, Any], url_namespace: str | None = None, check_rv: bool = False
    ) -> Entry:
        rtype = type_for_object(obj)
        data = self._normalize(obj, rtype, url_namespace)
        coll = self.collections[rtype.resource]
        key = (data["metadata"].get("namespace", ""), data["metadata"]["name"])
        old = coll.objects.get(key)
        if old is None:
            raise NotFound(f'{rtype.resource} "{key[1]}" not found', details=_details(rtype, key))
        sent_rv = data["metadata"].get("resourceVersion")
        if check_rv and sent_rv and sent_rv != str(old.rv):
            raise Conflict(
                f'Operation cannot be fulfilled on {rtype.resource} "{key[1]}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                details=_details(rtype, key),
            )
        # Identity fields belong to the server, whatever the client sent.
        for name in ("uid", "creationTimestamp"):
            data["metadata"][name] = old.obj["metadata"][name]
        data["metadata"]["resourceVersion"] = str(old.rv)
        apply_defaults(rtype.resource, data, self._ips, old.obj)
        if data == old.obj:
            return old  # a no-op update neither bumps the rv nor produces an event
        self._release_replaced_ip(old.obj, data)
        rv = self._bump()
        data["metadata"]["resourceVersion"] = str(rv)
        entry = Entry(data, rv)
        coll.objects[key] = entry
        self._record(coll, Event("MODIFIED", rv, entry, old))
        return entry

    def apply(self, obj: dict[str, Any]) -> Entry:
        rtype = type_for_object(obj)
        data = self._normalize(obj, rtype, None)
        key = (data["metadata"].get("namespace", ""), data["metadata"].get("name", ""))
        if key in self.collections[rtype.resource].objects:
            return self.update(obj)
        return self.create(obj)

    def delete(self, resource: str, namespace: str | None, name: str) -> Entry:
        coll = self.collections[resource]
        rtype = coll.rtype
        key = ((namespace or "") if rtype.namespaced else "", name)
        old = coll.objects.get(key)
        if old is None:
            raise NotFound(f'{resource} "{name}" not found', details=_details(rtype, key))
        rv = self._bump()
        final = old.restamped(rv)
        del coll.objects[key]
        if resource == "services" and (ip := service_ip(old.obj)):
            self._ips.release(ip)
        self._record(coll, Event("DELETED", rv, final, old))
        return final

    def load(self, objs: Iterable[dict[str, Any]]) -> int:
        """Bulk create: one timestamp, no per-object work beyond create itself."""
        now = _now()
        count = 0
        for obj in objs:
            self._create(obj, None, now)
            count += 1
        return count

    def _create(self, obj: dict[str, Any], url_namespace: str | None, now: str) -> Entry:
        rtype = type_for_object(obj)
        data = self._normalize(obj, rtype, url_namespace)
        meta = data["metadata"]
        if not meta.get("name"):
            meta["name"] = self._generate_name(rtype, meta)
        coll = self.collections[rtype.resource]
        key = (meta.get("namespace", ""), meta["name"])
        if key in coll.objects:
            raise AlreadyExists(
                f'{rtype.resource} "{key[1]}" already exists', details=_details(rtype, key)
            )
        apply_defaults(rtype.resource, data, self._ips, None)
        rv = self._bump()
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(rv)
        meta["creationTimestamp"] = now
        entry = Entry(data, rv)
        coll.objects[key] = entry
        self._record(coll, Event("ADDED", rv, entry, None))
        return entry

    def _generate_name(self, rtype: ResourceType, meta: dict[str, Any]) -> str:
        prefix = meta.pop("generateName", None)
        if not prefix:
            raise Invalid(
                f'{rtype.kind} "" is invalid: metadata.name: Required value: '
                "name or generateName is required"
            )
        return str(prefix) + "".join(random.choices(_NAME_SUFFIX_CHARS, k=5))

    def _normalize(
        self, obj: dict[str, Any], rtype: ResourceType, url_namespace: str | None
    ) -> dict[str, Any]:
        """A private deep copy in kube-apiserver's field order, namespace resolved."""
        try:
            data = orjson.loads(orjson.dumps(obj))
        except TypeError as exc:
            raise BadRequest(f"object is not JSON-serializable: {exc}") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        data.pop("kind", None)
        data.pop("apiVersion", None)
        meta = data.pop("metadata", None) or {}
        if not isinstance(meta, dict):
            raise BadRequest("metadata must be an object")
        if rtype.namespaced:
            body_ns = meta.get("namespace")
            if url_namespace and body_ns and body_ns != url_namespace:
                raise BadRequest(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            meta["namespace"] = url_namespace or body_ns or "default"
        else:
            meta.pop("namespace", None)
        return {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta, **data}

    def _release_replaced_ip(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        if old.get("kind") == "Service":
            old_ip = service_ip(old)
            if old_ip and old_ip != service_ip(new):
                self._ips.release(old_ip)

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _record(self, coll: Collection, event: Event) -> None:
        coll.changed_rv = event.rv
        coll.history.append(event)
        if len(coll.history) > self.history_limit:
            coll.floor = coll.history.popleft().rv
        if coll.watchers:
            # Fan-out only queues: a slow client never stalls the writer or other watchers.
            dead = [w for w in coll.watchers if not w.offer(event)]
            coll.watchers.difference_update(dead)

    # ---- reads --------------------------------------------------------------------------

    def get(self, resource: str, namespace: str | None, name: str) -> Entry | None:
        coll = self.collections[resource]
        return coll.objects.get(((namespace or "") if coll.rtype.namespaced else "", name))

    def list_page(
        self, resource: str, flt: ObjectFilter, limit: int | None, continue_token: str | None
    ) -> ListPage:
        coll = self.collections[resource]
        if continue_token:
            rv, start_key = decode_continue(continue_token)
            snap = self._continued_snapshot(resource, rv)
            lo, hi = snap.bounds(flt.namespace)
            lo = max(lo, bisect.bisect_right(snap.keys, start_key))
        else:
            rv, snap = self.rv, coll.snapshot()
            lo, hi = snap.bounds(flt.namespace)
        items, next_index = self._take(snap, flt, lo, hi, limit)
        if next_index is None:
            return ListPage(coll.rtype, rv, items, None, None)
        self._keep_snapshot(resource, rv, snap)
        token = encode_continue(rv, snap.keys[next_index - 1])
        # Like the real server: remainingItemCount only when it is exact (no selectors).
        remaining = None if flt.has_selectors else hi - next_index
        return ListPage(coll.rtype, rv, items, token, remaining)

    def _take(
        self, snap: Snapshot, flt: ObjectFilter, lo: int, hi: int, limit: int | None
    ) -> tuple[list[Entry], int | None]:
        """Matching entries in [lo, hi) up to `limit`; also the index after the last one
        taken when another match follows (None when the list is complete)."""
        items: list[Entry] = []
        check = flt.has_selectors
        last = lo - 1
        for index in range(lo, hi):
            entry = snap.entries[index]
            if check and not flt.matches(entry.obj):
                continue
            if limit and len(items) >= limit:
                return items, last + 1
            items.append(entry)
            last = index
        return items, None

    def _continued_snapshot(self, resource: str, rv: int) -> Snapshot:
        snap = self._page_snapshots.get((resource, rv))
        if rv < self.compacted_rv or snap is None:
            raise Expired(_CONTINUE_TOO_OLD)
        self._page_snapshots.move_to_end((resource, rv))
        return snap

    def _keep_snapshot(self, resource: str, rv: int, snap: Snapshot) -> None:
        self._page_snapshots[(resource, rv)] = snap
        self._page_snapshots.move_to_end((resource, rv))
        while len(self._page_snapshots) > _SNAPSHOTS_KEPT:
            self._page_snapshots.popitem(last=False)

    # ---- watch --------------------------------------------------------------------------

    def open_watch(self, resource: str, flt: ObjectFilter, rv_param: str | None) -> WatchStart:
        """Register a watcher and compute its first events in one step, so no write can
        fall between the replay/initial state and the live stream."""
        coll = self.collections[resource]
        watcher = Watcher(coll.rtype, flt, self.watch_queue_limit)
        if rv_param in (None, "", "0"):
            initial = list(self._initial_state(coll, flt))
        else:
            since = parse_rv(rv_param)
            if since < coll.floor:
                return WatchStart(
                    None, [], Expired(f"too old resource version: {since} ({coll.floor})")
                )
            if since > self.rv:
                raise TooLargeResourceVersion(
                    f"Too large resource version: {since}, current: {self.rv}",
                    details={
                        "causes": [
                            {
                                "reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version",
                            }
                        ],
                        "retryAfterSeconds": 1,
                    },
                )
            initial = list(self._replay(coll, watcher, since))
        coll.watchers.add(watcher)
        return WatchStart(watcher, initial)

    def _initial_state(self, coll: Collection, flt: ObjectFilter) -> Iterator[tuple[str, Entry]]:
        snap = coll.snapshot()
        lo, hi = snap.bounds(flt.namespace)
        for entry in snap.entries[lo:hi]:
            if not flt.has_selectors or flt.matches(entry.obj):
                yield ("ADDED", entry)

    def _replay(
        self, coll: Collection, watcher: Watcher, since: int
    ) -> Iterator[tuple[str, Entry]]:
        start = bisect.bisect_right(coll.history, since, key=lambda ev: ev.rv)
        for index in range(start, len(coll.history)):
            item = watcher.convert(coll.history[index])
            if item is not None:
                yield item

    def close_watch(self, watcher: Watcher) -> None:
        self.collections[watcher.rtype.resource].watchers.discard(watcher)

    def end_watches(self, abort: bool = False) -> int:
        """End every open watch: cleanly after queued events, or (abort) right away."""
        count = 0
        for coll in self.collections.values():
            for watcher in coll.watchers:
                if abort:
                    watcher.abort()
                else:
                    watcher.end()
                count += 1
            coll.watchers.clear()
        return count

    def watcher_count(self) -> int:
        return sum(len(c.watchers) for c in self.collections.values())

    # ---- compaction ---------------------------------------------------------------------

    def compact(self) -> None:
        """Forget history up to now, as etcd compaction plus a watch-cache reset would."""
        self.compacted_rv = self.rv
        for coll in self.collections.values():
            coll.history.clear()
            coll.floor = self.rv
        self._page_snapshots.clear()


def _details(rtype: ResourceType, key: Key) -> dict[str, Any]:
    details: dict[str, Any] = {"name": key[1], "kind": rtype.resource}
    if rtype.group:
        details["group"] = rtype.group
    return details
