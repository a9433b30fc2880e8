"""`--workers N` without namespaces: the channel's frames, a worker applying what it is fed,
the control side's writer feeding the workers before the kernel (kpx/worker*.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from kpx.backends import Backend
from kpx.balancer import Balancer
from kpx.frontends import Frontends
from kpx.proxy import ProxyStats
from kpx.rules import ServiceRules, Steer, SteerKey, compute_service
from kpx.worker import Worker, stats_snapshot
from kpx.worker_channel import Channel, WorkerConfig
from kpx.worker_feed import FedWriter, rules_snapshot
from kpx.worker_pool import WorkerPool, WorkerSlot
from kwatch.backoff import Backoff
from kwatch.supervisor import Supervisor
from tests.kpx.test_table import NODE, ep, eps, svc
from tests.waiting import eventually


def rules(name: str, cluster_ip: str, *ips: str) -> ServiceRules:
    found = compute_service(
        svc(name, clusterIP=cluster_ip), [eps([ep(ip) for ip in ips], f"{name}-1", name)], NODE
    )
    assert found is not None
    return found


def config(**changes: Any) -> WorkerConfig:
    base: dict[str, Any] = dict(
        index=0, listen_hosts=("127.0.0.1",), proxy_port=0, transparent=False,
        connect_timeouts=(0.25,), max_connections=100, drain_timeout=None, idle_timeout=None,
        cooldown_base=1.0, cooldown_max=30.0, affinity_max_entries=100, cluster_cidrs=(),
        masquerade_all=False, housekeeping_period=30.0, log_format="json", log_level="info",
    )  # fmt: skip
    return WorkerConfig(**{**base, **changes})


def test_a_rules_message_crosses_the_channel_and_a_closed_peer_reads_as_none() -> None:
    async def scenario() -> tuple[Any, Any, Any]:
        left_sock, right_sock = socket.socketpair()
        left, right = await Channel.open(left_sock), await Channel.open(right_sock)
        web = rules("web", "10.96.0.10", "10.244.0.5")
        left.send(config(index=1))
        left.send(("rules", 7, {"default/web": web, "default/gone": None}, True))
        await left.drain()
        first, second = await right.receive(), await right.receive()
        left.close()
        return first, second, await right.receive()

    first, second, after_close = asyncio.run(scenario())
    assert first == config(index=1)
    assert second == (
        "rules", 7, {"default/web": rules("web", "10.96.0.10", "10.244.0.5"), "default/gone": None},
        True,
    )  # fmt: skip
    assert after_close is None


def test_a_worker_applies_deltas_a_full_snapshot_forgets_the_rest_and_drains_removed() -> None:
    worker = Worker(config(), channel=None)  # type: ignore[arg-type]
    closed: list[Backend] = []
    worker.proxy.close_backend = lambda backend: closed.append(backend) or 0  # type: ignore[method-assign]
    worker.apply(
        {
            "default/web": rules("web", "10.96.0.10", "10.244.0.5", "10.244.0.6"),
            "default/api": rules("api", "10.96.0.11", "10.244.0.7"),
        },
        full=True,
    )
    picker = worker.frontends.lookup("10.96.0.10", 80)
    assert picker is not None and worker.frontends.lookup("10.96.0.11", 80) is not None
    # A delta: web loses an endpoint (drained), api is untouched.
    worker.apply({"default/web": rules("web", "10.96.0.10", "10.244.0.6")}, full=False)
    assert [b.ip for b in closed] == ["10.244.0.5"]
    assert worker.frontends.lookup("10.96.0.11", 80) is not None
    # A full snapshot without api (the worker restarted after api was deleted): api goes.
    worker.apply({"default/web": rules("web", "10.96.0.10", "10.244.0.6")}, full=True)
    assert worker.frontends.lookup("10.96.0.11", 80) is None
    assert worker.frontends.lookup("10.96.0.10", 80) is not None
    assert [b.ip for b in closed] == ["10.244.0.5", "10.244.0.7"]


class RecordingWriter:
    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.needs_full = True

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool:
        self.events.append(("kernel", sorted(changed)))
        return True

    async def remove(self) -> None:
        self.events.append(("remove",))


class RecordingPool:
    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.fail = False

    async def publish(self, changes: Mapping[str, ServiceRules | None]) -> None:
        self.events.append(("workers", dict(changes)))
        if self.fail:
            raise ConnectionError("worker gone")


def test_the_workers_get_the_changed_services_before_the_kernel_and_again_after_a_failure() -> None:
    events: list[Any] = []
    frontends = Frontends(Balancer())
    pool = RecordingPool(events)
    writer = FedWriter(RecordingWriter(events), frontends, pool)  # type: ignore[arg-type]
    web = rules("web", "10.96.0.10", "10.244.0.5")

    def apply(key: str, new: ServiceRules | None) -> dict[SteerKey, Steer | None]:
        steering: dict[SteerKey, Steer | None] = {}
        frontends.begin()
        frontends.set_service(key, new)
        frontends.end(steering)
        return steering

    changed = apply("default/web", web)
    asyncio.run(writer.sync(frontends.steering, changed))
    assert events == [("workers", {"default/web": web}), ("kernel", sorted(changed))]
    # Nothing applied since: the kernel alone (a retry, a full rewrite).
    events.clear()
    asyncio.run(writer.sync(frontends.steering, ()))
    assert events == [("kernel", [])]
    # A publish that fails: the kernel is not touched, and the next sync sends it again.
    events.clear()
    pool.fail = True
    apply("default/web", None)
    try:
        asyncio.run(writer.sync(frontends.steering, ()))
    except ConnectionError:
        pass
    pool.fail = False
    asyncio.run(writer.sync(frontends.steering, ()))
    assert events == [("workers", {"default/web": None})] * 2 + [("kernel", [])]
    assert writer.needs_full is True
    writer.needs_full = False
    assert writer.inner.needs_full is False
    assert rules_snapshot(frontends) == {}


def test_a_worker_reports_every_proxy_counter() -> None:
    stats = ProxyStats()
    stats.connections_total = 3
    stats.bytes_to_backend = 10
    found = stats_snapshot(stats)
    assert found["connections_total"] == 3 and found["bytes_to_backend"] == 10
    assert {"connections_active", "unknown_frontend", "bytes_to_client"} <= set(found)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_pool_worker_listens_once_fed_and_is_started_again_when_killed() -> None:
    """Real `python -m kpx.worker` processes on 127.0.0.1 (no namespace needed): none listens
    before the first rules, each acknowledges them, and a killed one comes back, fed again."""
    port = free_port()
    web = rules("web", "10.96.0.10", "10.244.0.5")

    def connects() -> bool:
        """Something listens (it resets the connection at once: 127.0.0.1 was no
        redirected frontend)."""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except ConnectionRefusedError:
            return False
        except ConnectionResetError:
            return True

    async def scenario() -> None:
        pool = WorkerPool(2, lambda index: config(index=index, proxy_port=port), dict)
        supervisor = Supervisor()
        pool.start(supervisor.spawn)
        try:
            await asyncio.sleep(0.5)
            assert pool.listening == 0 and not connects()
            await pool.publish({"default/web": web})
            assert pool.listening == 2 and connects()
            pids = {slot.pid for slot in pool.slots}
            victim = pool.slots[0]
            assert victim.process is not None
            victim.process.kill()
            await eventually(lambda: victim.restarts == 1 and victim.listening, within=20)
            assert victim.pid not in pids and connects()
            await pool.publish({"default/web": None})  # both acknowledge again
            assert pool.listening == 2
        finally:
            await supervisor.stop()
            await pool.stop(0.0)
        assert all(slot.process and slot.process.returncode is not None for slot in pool.slots)
        assert not connects()

    asyncio.run(scenario())


def test_a_worker_keeper_that_fails_unexpectedly_is_restarted_by_the_supervisor() -> None:
    """A bug in the loop that reads a worker's channel must not leave its slot without a
    worker for good: the supervisor logs and counts it, and the keeper starts a fresh worker
    (the old one, whose channel nobody reads any more, is ended), fed before it listens."""
    port = free_port()
    web = rules("web", "10.96.0.10", "10.244.0.5")

    def restarts() -> float:
        found = REGISTRY.get_sample_value("kwatch_task_restarts_total", {"task": "kpx-worker-0"})
        return found or 0.0

    async def scenario() -> None:
        pool = WorkerPool(1, lambda index: config(index=index, proxy_port=port), dict)
        real_serve = pool._serve
        failing = {"once": True}

        async def serve(slot: WorkerSlot) -> None:
            if failing.pop("once", False):
                raise RuntimeError("injected: channel reader bug")
            await real_serve(slot)

        pool._serve = serve  # type: ignore[method-assign]
        supervisor = Supervisor(backoff=lambda: Backoff(0.02, 0.05, jitter=0.1))
        before = restarts()
        pool.start(supervisor.spawn)
        slot = pool.slots[0]
        try:
            await eventually(lambda: restarts() == before + 1, within=10)
            await eventually(lambda: slot.process is not None and slot.channel is not None)
            await pool.publish({"default/web": web})
            assert pool.listening == 1 and supervisor.liveness() == (True, "ok")
        finally:
            await supervisor.stop()
            await pool.stop(0.0)
        assert slot.process is not None and slot.process.returncode is not None

    with capture_logs() as logs:
        asyncio.run(scenario())
    failed = [e for e in logs if e["event"] == "task_failed"]
    assert [e["task"] for e in failed] == ["kpx-worker-0"]
    started = [e["pid"] for e in logs if e["event"] == "worker_started"]
    assert len(started) == 2 and started[0] != started[1]  # the first one was ended


def test_a_dead_workers_counters_carry_over_but_what_it_held_does_not() -> None:
    pool = WorkerPool(1, lambda index: config(index=index), dict)
    slot = pool.slots[0]
    slot.stats = {"connections_total": 7, "connections_active": 2, "affinity_entries": 3}
    assert slot.counter("affinity_entries") == 3
    pool._lost(slot)
    assert slot.counter("connections_total") == 7
    assert slot.counter("connections_active") == 0 and slot.counter("affinity_entries") == 0
