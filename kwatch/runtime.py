"""Process plumbing: run on uvloop and turn SIGTERM/SIGINT into a graceful stop."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import uvloop


def run(main: Coroutine[Any, Any, int | None]) -> int:
    """Run the daemon's main coroutine on uvloop; returns its exit status."""
    return uvloop.run(main) or 0


def stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT; a second one kills the process."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if event.is_set():
            raise SystemExit(128 + signum)
        event.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return event


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim), once the first
    full load is in: parsing tens of thousands of API objects leaves megabytes of freed
    buffers that the allocator would otherwise keep (about 6 MB at 10,000 Services)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
