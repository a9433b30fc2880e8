"""One open watch: its filter, its bounded queue, and real selector-transition semantics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from .resources import ResourceType
from .selectors import ObjectFilter


class Entry:
    """One stored version of an object. The dict is never mutated once stored, so its
    serialized forms can be cached and shared by every list and watch that sends it."""

    __slots__ = ("_full", "_item", "name", "namespace", "obj", "rv")

    def __init__(self, obj: dict[str, Any], rv: int) -> None:
        self.obj = obj
        self.rv = rv
        meta = obj["metadata"]
        self.namespace: str = meta.get("namespace", "")
        self.name: str = meta["name"]
        self._full: bytes | None = None
        self._item: bytes | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def full_json(self) -> bytes:
        """With kind/apiVersion: the form used by get, writes and watch events."""
        if self._full is None:
            self._full = orjson.dumps(self.obj)
        return self._full

    def item_json(self) -> bytes:
        """Without kind/apiVersion: the form kube-apiserver uses for list items."""
        if self._item is None:
            item = {k: v for k, v in self.obj.items() if k not in ("kind", "apiVersion")}
            self._item = orjson.dumps(item)
        return self._item

    def restamped(self, rv: int) -> Entry:
        """The same content carrying another resourceVersion (shares nested dicts)."""
        meta = {**self.obj["metadata"], "resourceVersion": str(rv)}
        return Entry({**self.obj, "metadata": meta}, rv)


@dataclass(slots=True)
class Event:
    """One write in the history. For DELETED, `entry` is the final state stamped with the
    deletion's rv and `prev` the last stored version."""

    type: str
    rv: int
    entry: Entry
    prev: Entry | None
    _left: Entry | None = field(default=None, repr=False)

    def left_entry(self) -> Entry:
        """What a selector watch gets when the object stops matching: the previous content
        with this event's rv (as the cacher's convertToWatchEvent does)."""
        if self.type == "DELETED" or self.prev is None:
            return self.entry
        if self._left is None:
            self._left = self.prev.restamped(self.rv)
        return self._left


def event_line(event_type: str, entry: Entry) -> bytes:
    return b'{"type":"' + event_type.encode() + b'","object":' + entry.full_json() + b"}\n"


class WatchEnd:
    """Queue sentinel: finish the stream after what is already queued."""


END = WatchEnd()
WatchItem = tuple[str, Entry] | WatchEnd


class Watcher:
    """Receives the events of one resource type, filtered and converted for its selectors."""

    def __init__(self, rtype: ResourceType, flt: ObjectFilter, queue_limit: int) -> None:
        self.rtype = rtype
        self.filter = flt
        self.queue_limit = queue_limit
        # Unbounded queue with a manual bound: the END sentinel must always fit.
        self.queue: asyncio.Queue[WatchItem] = asyncio.Queue()
        self.aborted = False

    def convert(self, event: Event) -> tuple[str, Entry] | None:
        """The event this watcher should see, or None (cache_watcher.go semantics)."""
        if not self.filter.in_namespace(event.entry.namespace):
            return None
        if not self.filter.has_selectors:
            return (event.type, event.entry)
        now = event.type != "DELETED" and self.filter.matches(event.entry.obj)
        before = event.prev is not None and self.filter.matches(event.prev.obj)
        if now:
            return ("MODIFIED" if before else "ADDED", event.entry)
        if before:
            return ("DELETED", event.left_entry())
        return None

    def offer(self, event: Event) -> bool:
        """Queue a live event without ever blocking the writer. Returns False when the
        watcher fell too far behind and was aborted (its client will resume from its
        last rv, as with a real apiserver dropping a slow watcher)."""
        item = self.convert(event)
        if item is None or self.aborted:
            return not self.aborted
        if self.queue.qsize() >= self.queue_limit:
            self.abort()
            return False
        self.queue.put_nowait(item)
        return True

    def end(self) -> None:
        self.queue.put_nowait(END)

    def abort(self) -> None:
        """End now, dropping whatever is still queued."""
        self.aborted = True
        self.queue.put_nowait(END)
