"""CPU time and memory of running processes from /proc, for the benchmarks.

CPU = utime + stime of every thread of a process (/proc/<pid>/stat fields 14 and 15, in clock
ticks), summed over a process and its live descendants (dnsd's `--workers` children are forked
from the first process; they are sampled directly because their time only reaches the parent's
cutime once they are reaped). Memory: VmRSS (/proc/<pid>/status) and, for forked workers that
share pages, Pss (/proc/<pid>/smaps_rollup). dnsd's footprint (`dnsd_footprint`): its VmRSS
plus the private memory (Private_Clean + Private_Dirty) of its --forward-process child, which
is what the child adds to the pod's memory (the libraries both map are counted once).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's children list)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant (bounded walk)."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < 1000:
        p = todo.pop()
        if p in seen or not os.path.exists(f"/proc/{p}"):
            continue
        seen.append(p)
        todo.extend(children_of(p))
    return seen


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (those that still exist), in seconds."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            # After the ')' the list starts at field 3 (state): utime is field 14 -> index 11.
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def user_kernel_seconds(pids: list[int]) -> tuple[float, float]:
    """utime and stime, apart, of the given processes (those that still exist), in seconds."""
    user = kernel = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            user += int(fields[11])
            kernel += int(fields[12])
    return user / CLK_TCK, kernel / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pids: list[int]) -> float:
    """Sum of VmRSS (MB, 10^6 bytes) of the processes."""
    return sum(_status_kb(p, "VmRSS") for p in pids) * 1024 / 1e6


def pss_mb(pids: list[int]) -> float:
    """Sum of Pss (MB): shared pages of forked workers counted once overall."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total * 1024 / 1e6


def private_mb(pids: list[int]) -> float:
    """Sum of the pages only these processes map (Private_Clean + Private_Dirty, MB)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    return total * 1024 / 1e6


def forward_children(pid: int) -> list[int]:
    """dnsd's --forward-process children among `pid`'s descendants."""
    out = []
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"dnsd.forward_child" in f.read():
                out.append(child)
    return out


def dnsd_footprint(pid: int, wait_s: float = 10.0) -> dict[str, float]:
    """dnsd's memory once ready: its own VmRSS, its --forward-process child's private memory
    (waiting up to `wait_s` for the child, which starts once the listeners are bound; none
    with --no-forward-process), and their sum, `total_mb`."""
    deadline = time.monotonic() + wait_s
    while not (children := forward_children(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = private_mb(children)
    while children and time.monotonic() < deadline:  # until its imports are done
        time.sleep(0.3)
        before, child = child, private_mb(forward_children(pid))
        if abs(child - before) < 0.1:
            break
    own = rss_mb([pid])
    return {"rss_mb": own, "child_private_mb": child, "total_mb": own + child}


@dataclass
class CpuMeter:
    """CPU seconds used by a process tree between `start()` and `stop()`; the tree is
    re-walked at both ends so workers forked in between are counted (from their start)."""

    pid: int
    _t0: float = 0.0
    _cpu0: float = 0.0
    wall: float = 0.0
    cpu: float = 0.0

    def start(self) -> CpuMeter:
        self._pids = process_tree(self.pid)
        self._cpu0 = cpu_seconds(self._pids)
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        pids = process_tree(self.pid)
        self.wall = time.perf_counter() - self._t0
        self.cpu = cpu_seconds(pids) - self._cpu0  # processes that exited are lost
        return self.cpu
