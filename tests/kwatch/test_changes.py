"""The change tracker shared by dnsd's zone controller and kpx's service tables, and its loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kwatch.changes import ChangeTracker, SyncLoop, parse_trigger_time, trigger_time
from kwatch.cluster import DEFAULT_INDEXERS
from kwatch.resources import ENDPOINTSLICES, SERVICES
from kwatch.store import Store

T0 = "2026-01-01T00:00:00Z"
T0_EPOCH = 1767225600.0


def service(name: str, ns: str = "ns") -> Any:
    return SERVICES.parse(
        {"metadata": {"name": name, "namespace": ns}, "spec": {"clusterIP": "10.96.0.1"}}
    )


def eps(name: str, svc: str, trigger: str | None = None, ns: str = "ns") -> Any:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "labels": {"kubernetes.io/service-name": svc},
    }
    if trigger is not None:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return ENDPOINTSLICES.parse({"metadata": meta, "addressType": "IPv4", "endpoints": []})


def stores() -> tuple[Store[Any], Store[Any]]:
    return Store("services"), Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])


def settled(services: Store[Any], slices: Store[Any], **kwargs: Any) -> ChangeTracker:
    """A tracker whose first (full) batch was applied."""
    tracker = ChangeTracker(services, slices, **kwargs)
    for key in tracker.take().keys:
        tracker.applied(key)
    return tracker


def test_trigger_time_parses_rfc3339_and_refuses_garbage():
    assert parse_trigger_time(T0) == T0_EPOCH
    assert parse_trigger_time("2026-01-01T00:00:00.5+00:00") == T0_EPOCH + 0.5
    assert parse_trigger_time("yesterday") is None
    assert parse_trigger_time("") is None and parse_trigger_time(None) is None
    assert trigger_time(eps("a-1", "a", T0)) == T0_EPOCH
    assert trigger_time(eps("a-1", "a")) is None


def test_the_first_batch_takes_every_service_and_is_full():
    services, slices = stores()
    services.upsert("ns/b", service("b"))
    services.upsert("ns/a", service("a"))
    tracker = ChangeTracker(services, slices)
    assert tracker.pending
    batch = tracker.take()
    assert batch.keys == ["ns/a", "ns/b"] and batch.full
    for key in batch.keys:
        tracker.applied(key)
    assert not tracker.pending
    assert tracker.take().keys == [] and not tracker.take().full


def test_a_full_batch_also_takes_what_the_caller_still_holds():
    services, slices = stores()
    services.upsert("ns/a", service("a"))
    held = {"ns/gone"}  # applied once, deleted while the caller was not looking
    tracker = ChangeTracker(services, slices, everything=lambda: set(services.keys()) | held)
    assert tracker.take().keys == ["ns/a", "ns/gone"]


def test_service_events_mark_their_key():
    services, slices = stores()
    tracker = settled(services, slices)
    services.upsert("ns/a", service("a"))
    services.upsert("ns/b", service("b"))
    services.delete("ns/a")
    assert tracker.take().keys == ["ns/a", "ns/b"]


def test_a_slice_marks_its_service_and_a_relabelled_slice_marks_both():
    services, slices = stores()
    tracker = settled(services, slices)
    slices.upsert("ns/x-1", eps("x-1", "x"))
    assert tracker.take().keys == ["ns/x"]
    tracker.applied("ns/x")
    slices.upsert("ns/x-1", eps("x-1", "y"))  # moved to another Service
    assert tracker.take().keys == ["ns/x", "ns/y"]


def test_a_slice_without_a_service_name_marks_nothing():
    services, slices = stores()
    tracker = settled(services, slices)
    orphan = ENDPOINTSLICES.parse(
        {"metadata": {"name": "o", "namespace": "ns"}, "addressType": "IPv4", "endpoints": []}
    )
    slices.upsert("ns/o", orphan)
    assert not tracker.pending


def test_keys_stay_dirty_until_applied_even_when_taken_twice():
    services, slices = stores()
    tracker = settled(services, slices)
    for name in ("a", "b", "c"):
        services.upsert(f"ns/{name}", service(name))
    assert tracker.take(limit=2).keys == ["ns/a", "ns/b"]
    # The caller failed before applying anything: the same keys come back.
    assert tracker.take(limit=2).keys == ["ns/a", "ns/b"]
    tracker.applied("ns/a")
    assert tracker.take(limit=2).keys == ["ns/b", "ns/c"]
    assert tracker.pending


def test_a_failure_makes_the_next_batch_full_without_recomputing_everything():
    services, slices = stores()
    services.upsert("ns/a", service("a"))
    tracker = settled(services, slices)
    services.upsert("ns/b", service("b"))
    assert not tracker.take().full
    tracker.failed()
    batch = tracker.take()
    assert batch.full and batch.keys == ["ns/b"]  # still only what changed
    assert not tracker.take().full  # once


def test_mark_all_takes_every_key_again():
    services, slices = stores()
    services.upsert("ns/a", service("a"))
    tracker = settled(services, slices)
    tracker.mark_all()
    batch = tracker.take()
    assert batch.keys == ["ns/a"] and batch.full


def test_trigger_times_are_kept_per_service_until_applied_and_deletes_ignored():
    services, slices = stores()
    tracker = settled(services, slices)
    slices.upsert("ns/a-1", eps("a-1", "a", T0))
    slices.upsert("ns/a-2", eps("a-2", "a", "2026-01-01T00:00:01Z"))
    slices.upsert("ns/b-1", eps("b-1", "b", "not a time"))
    slices.delete("ns/a-1")  # carries the last update's time, not the deletion's
    tracker.take()
    assert tracker.applied("ns/a") == [T0_EPOCH, T0_EPOCH + 1]
    assert tracker.applied("ns/a") == []  # reported once
    assert tracker.applied("ns/b") == []


def test_trigger_times_from_before_the_start_are_history():
    services, slices = stores()
    tracker = settled(services, slices, since=T0_EPOCH)
    slices.upsert("ns/a-1", eps("a-1", "a", T0))  # replayed by the initial list
    slices.upsert("ns/a-2", eps("a-2", "a", "2026-01-01T00:00:02Z"))
    assert tracker.applied("ns/a") == [T0_EPOCH + 2]


def test_listeners_hear_every_mark_and_the_loop_is_woken():
    services, slices = stores()
    tracker = settled(services, slices)
    tracker.clear_wake()
    heard: list[bool] = []
    tracker.listen(lambda: heard.append(tracker.woken))  # told before the wake-up
    services.upsert("ns/a", service("a"))
    slices.upsert("ns/a-1", eps("a-1", "a"))
    assert heard == [False, True] and tracker.woken


async def test_the_loop_coalesces_a_burst_into_one_sync_per_period():
    services, slices = stores()
    tracker = settled(services, slices)
    syncs: list[list[str]] = []

    async def sync() -> bool:
        batch = tracker.take()
        syncs.append(batch.keys)
        for key in batch.keys:
            tracker.applied(key)
        return False

    loop = SyncLoop(tracker, sync, name="test", min_period=0.2)
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0.05)  # the start-up sync ran
    for name in ("a", "b", "c"):
        services.upsert(f"ns/{name}", service(name))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.4)
    task.cancel()
    assert syncs == [[], ["ns/a", "ns/b", "ns/c"]]


async def test_the_loop_comes_back_for_the_rest_of_a_chunked_batch_then_goes_idle():
    services, slices = stores()
    for i in range(5):
        services.upsert(f"ns/s{i}", service(f"s{i}"))
    tracker = ChangeTracker(services, slices)
    chunks: list[int] = []
    idle: list[float] = []

    async def sync() -> bool:
        batch = tracker.take(limit=2)
        chunks.append(len(batch.keys))
        for key in batch.keys:
            tracker.applied(key)
        return tracker.pending

    loop = SyncLoop(tracker, sync, name="test", on_idle=lambda: idle.append(time.monotonic()))
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0.1)
    task.cancel()
    assert chunks == [2, 2, 1] and len(idle) == 1


async def test_the_loop_waits_until_ready_and_is_woken_again():
    services, slices = stores()
    tracker = ChangeTracker(services, slices)
    ready = False
    syncs = 0

    async def sync() -> bool:
        nonlocal syncs
        syncs += 1
        return False

    task = asyncio.create_task(SyncLoop(tracker, sync, name="test", ready=lambda: ready).run())
    await asyncio.sleep(0.05)
    assert syncs == 0
    ready = True
    tracker.wake()  # what a store finishing its list does
    await asyncio.sleep(0.05)
    task.cancel()
    assert syncs == 1


async def test_a_failed_sync_is_retried_or_left_to_the_supervisor():
    services, slices = stores()
    tracker = ChangeTracker(services, slices)
    calls = 0

    async def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("nft exploded")
        return False

    retrying = asyncio.create_task(SyncLoop(tracker, flaky, name="t", retry_after=0.05).run())
    await asyncio.sleep(0.2)
    retrying.cancel()
    assert calls == 2

    async def broken() -> bool:
        raise RuntimeError("zone exploded")

    with pytest.raises(RuntimeError, match="zone exploded"):
        await asyncio.wait_for(SyncLoop(tracker, broken, name="t").run(), 1)
