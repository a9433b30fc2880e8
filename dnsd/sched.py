"""A scheduler hint for the threads that answer cluster names: a short time slice.

Linux's EEVDF scheduler (6.6 and later) gives each task a virtual deadline of its eligible time
plus its slice; a task that asked for a shorter slice (sched_setattr with `sched_runtime` for
SCHED_OTHER, honoured since 6.12, 0.1 to 100 ms, no privilege needed) is picked, and may
preempt the running task, sooner when it wakes up. It gets no larger share of the CPU, only a
shorter wait for it: what a UDP thread that sleeps in recvmmsg until a query arrives wants on
a node whose cores are busy (measured here: the UDP thread of dnsd spent 7 s of a 30 s flood
waiting for a core, bench/dns_overload.py). Elsewhere the call fails or is ignored, and the
threads run as before.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
import threading

import structlog

log = structlog.get_logger("dnsd.sched")

_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}.get(platform.machine())
_SCHED_OTHER = 0
# struct sched_attr, SCHED_ATTR_SIZE_VER0: size, policy, flags, nice, priority, runtime,
# deadline, period.
_ATTR = struct.Struct("=IIQiIQQQ")


def request_slice(seconds: float) -> bool:
    """Ask for a scheduler slice of `seconds` for the calling thread; True if the kernel took
    the request (older kernels may take it and keep their own slice)."""
    if sys.platform != "linux" or _SCHED_SETATTR is None or seconds <= 0:
        return False
    tid = threading.get_native_id()
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    attr = ctypes.create_string_buffer(
        _ATTR.pack(_ATTR.size, _SCHED_OTHER, 0, nice, 0, int(seconds * 1e9), 0, 0), _ATTR.size
    )
    if libc.syscall(_SCHED_SETATTR, tid, attr, 0) != 0:
        log.info("sched_slice_refused", errno=ctypes.get_errno(), slice_s=seconds)
        return False
    return True
