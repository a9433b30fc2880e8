"""The UDP threads' scheduler hint (dnsd.sched): a short EEVDF slice, no privilege needed."""

from __future__ import annotations

import threading

import pytest

from dnsd.sched import request_slice


def own_slice_ns() -> int | None:
    """se.slice of the calling thread (/proc/.../sched, on kernels that show it)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/sched") as f:
            for line in f:
                if line.startswith("se.slice"):
                    return int(line.split(":")[1])
    except OSError:
        return None
    return None


def in_a_thread(seconds: float) -> tuple[bool, int | None, int | None]:
    seen: list[tuple[bool, int | None, int | None]] = []

    def run() -> None:
        before = own_slice_ns()
        taken = request_slice(seconds)
        seen.append((taken, before, own_slice_ns()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


def test_a_thread_gets_the_slice_it_asks_for_and_no_other_thread_does():
    if own_slice_ns() is None:
        pytest.skip("this kernel does not show a task's slice")
    taken, before, after = in_a_thread(0.0003)
    if not taken:
        pytest.skip("this kernel refuses sched_setattr for SCHED_OTHER")
    assert after == 300_000 and before != 300_000
    assert own_slice_ns() == before  # the calling thread's own slice is untouched


def test_zero_asks_for_nothing():
    assert in_a_thread(0.0)[0] is False
