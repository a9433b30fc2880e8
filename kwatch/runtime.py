"""Process plumbing: run on uvloop and turn SIGTERM/SIGINT into a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int | None = None) -> None:
    """Get SIGTERM when the parent process dies (Linux PR_SET_PDEATHSIG): a worker or child
    must not outlive the daemon that started it. With `parent` (its pid, passed before an
    exec), exit now if it already died: then the signal was set too late to come."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        sys.exit(0)


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


# glibc mallopt() parameter: the size from which malloc serves a block with its own mmap.
M_MMAP_THRESHOLD = -3
# glibc's initial value, pinned: a forwarded query's 65535-byte receive buffer stays below it.
STEADY_MMAP_THRESHOLD = 128 * 1024


def steady_heap(mmap_threshold: int = STEADY_MMAP_THRESHOLD) -> bool:
    """Serve blocks from `mmap_threshold` bytes up with their own mmap, for good (mallopt).

    glibc starts at 128 KiB but raises the threshold to the size of every mmapped block
    freed (up to 32 MiB): after the first big list body or dict table is freed, every later
    one comes from the main heap. A watcher under churn keeps making such blocks (list pages,
    a relist's `objects`, store, zone and name-cache dict tables rebuilt as they fill), and
    each leaves a hole that the long-lived blocks around it pin. Measured with the
    convergence soak's churn (bench/soak.py) on dnsd: glibc's heap grew from 15.4 to 19.2 MB
    between the first and the twelfth minute with 14 MB in use, RSS following; pinned, it
    stayed at 12.8 MB. Returns whether glibc took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    except (OSError, AttributeError):  # not glibc
        return False
