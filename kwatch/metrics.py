"""Prometheus metrics of the watch layer (prefix `kwatch_`), shared by both daemons."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

LIST_REQUESTS = Counter(
    "kwatch_list_requests_total", "List requests sent (one per page)", ["resource"]
)
WATCH_REQUESTS = Counter("kwatch_watch_requests_total", "Watch requests opened", ["resource"])
WATCH_RESTARTS = Counter(
    "kwatch_watch_restarts_total",
    "Watch streams that ended and were reopened, by why they ended",
    ["resource", "reason"],
)
RELISTS = Counter(
    "kwatch_relists_total", "Full relists after the first one, by cause", ["resource", "reason"]
)
EVENTS = Counter("kwatch_events_total", "Watch events applied to the store", ["resource", "type"])
OBJECTS = Gauge("kwatch_objects", "Objects held in the store", ["resource"])
SKIPPED = Counter(
    "kwatch_skipped_objects_total",
    "Objects rejected as invalid (last good version kept)",
    ["resource", "reason"],
)
API_ERRORS = Counter(
    "kwatch_api_errors_total",
    "Failed API requests by HTTP status (0 = transport error)",
    ["resource", "code"],
)
SYNCED = Gauge("kwatch_synced", "1 once the first complete list was applied", ["resource"])
TASK_RESTARTS = Counter(
    "kwatch_task_restarts_total",
    "Supervised background tasks restarted after an unexpected exception",
    ["task"],
)
TASK_WAITING = Gauge(
    "kwatch_task_work_waiting_seconds",
    "Seconds the oldest unapplied work of a supervised task has waited (0: none)",
    ["task"],
)
