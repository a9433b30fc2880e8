"""The supervisor: restart with backoff, count, log once, and what liveness says."""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import REGISTRY

from kwatch.backoff import Backoff
from kwatch.supervisor import Supervisor
from tests.waiting import eventually


def fast() -> Backoff:
    return Backoff(initial=0.01, maximum=0.05, jitter=0.1)


def restarts(task: str) -> float:
    return REGISTRY.get_sample_value("kwatch_task_restarts_total", {"task": task}) or 0.0


async def test_a_failing_task_restarts_and_resumes_from_state_kept_outside_it():
    supervisor = Supervisor(backoff=fast)
    done: list[int] = []
    state = {"next": 0}
    before = restarts("counter-a")

    async def counter() -> None:
        while True:
            value = state["next"]
            if value in (3, 6):
                state["next"] += 1  # the bad item is consumed, as a store keeps moving on
                raise RuntimeError(f"boom at {value}")
            done.append(value)
            state["next"] += 1
            if value >= 9:
                await asyncio.Event().wait()
            await asyncio.sleep(0)

    supervisor.spawn("counter-a", counter)
    try:
        await eventually(lambda: 9 in done)
        assert done == [0, 1, 2, 4, 5, 7, 8, 9]  # nothing redone, nothing lost
        assert restarts("counter-a") - before == 2
        assert supervisor.liveness() == (True, "ok")
    finally:
        await supervisor.stop()


async def test_the_traceback_is_logged_once_per_problem():
    supervisor = Supervisor(backoff=fast, crash_loop_failures=100)
    runs = {"n": 0}

    async def always_fails() -> None:
        runs["n"] += 1
        raise ValueError("same problem")

    with structlog.testing.capture_logs() as logs:
        supervisor.spawn("fails-b", always_fails)
        await eventually(lambda: runs["n"] >= 4)
        await supervisor.stop()
    first = [e for e in logs if e["event"] == "task_failed"]
    again = [e for e in logs if e["event"] == "task_failed_again"]
    assert len(first) == 1 and "ValueError: same problem" in first[0]["traceback"]
    assert len(again) >= 3 and all("traceback" not in e for e in again)


async def test_a_crash_looping_task_fails_liveness_and_a_healthy_step_clears_it():
    supervisor = Supervisor(backoff=fast, crash_loop_failures=3)
    healthy = asyncio.Event()

    async def flaky() -> None:
        if healthy.is_set():
            await asyncio.Event().wait()
        raise OSError("disk on fire")

    supervisor.spawn("flaky-c", flaky)
    try:
        await eventually(lambda: not supervisor.liveness()[0])
        _, why = supervisor.liveness()
        assert "flaky-c failed" in why and "disk on fire" in why
        healthy.set()
        await eventually(lambda: supervisor.liveness()[0])  # restarted, running: alive
        supervisor.mark_healthy("flaky-c")
        assert supervisor.failures("flaky-c") == 0
    finally:
        await supervisor.stop()


async def test_a_task_that_ends_is_dead_unless_it_may():
    supervisor = Supervisor(backoff=fast)

    async def ends() -> None:
        return None

    supervisor.spawn("once-d", ends, forever=False)
    supervisor.spawn("forever-d", ends)
    try:
        await eventually(lambda: not supervisor.liveness()[0])
        _, why = supervisor.liveness()
        assert why == "task forever-d is dead"
    finally:
        await supervisor.stop()


async def test_work_left_unapplied_past_the_deadline_is_wedged():
    now = {"t": 100.0}
    supervisor = Supervisor(wedge_deadline=10, clock=lambda: now["t"])
    progress = supervisor.progress("zone-e")
    progress.pending()
    now["t"] += 5
    progress.pending()  # the oldest unapplied change counts
    assert supervisor.liveness()[0]
    now["t"] += 6
    alive, why = supervisor.liveness()
    assert not alive and "zone-e has work waiting for 11s" in why
    assert REGISTRY.get_sample_value("kwatch_task_work_waiting_seconds", {"task": "zone-e"}) == 11
    progress.done()
    assert supervisor.liveness() == (True, "ok")
