"""dnsd under injected failures: exceptions in the store callbacks, the zone build and the
controller task; records that cannot be encoded. Each time the served names converge to the
manifest's, and /healthz says when a task is wedged."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import aiohttp
import dns.message
import pytest
from prometheus_client import REGISTRY

import dnsd.controller
from kwatch.resources import SERVICES
from tests.dnsd.conftest import StartDnsd
from tests.dnsd.helpers import (
    ask,
    endpoint,
    endpoint_slice,
    namespace,
    rdatas,
    service,
    write_manifest,
)
from tests.waiting import eventually

Z = "cluster.local"


def cluster(web_ip: str = "10.96.0.5", api_ip: str = "10.96.0.6") -> list[dict[str, Any]]:
    return [
        namespace("default"),
        service("web", ips=[web_ip], ports=[{"name": "http", "port": 80}]),
        service("api", ips=[api_ip], ports=[{"name": "http", "port": 80}]),
        service("db", headless=True, ports=[{"name": "pg", "port": 5432}]),
        endpoint_slice(
            "db-1",
            "db",
            [endpoint("10.0.0.1", hostname="primary")],
            ports=[{"name": "pg", "port": 5432}],
        ),
    ]


async def a_of(port: int, name: str) -> list[str]:
    return sorted(rdatas(await ask(port, f"{name}.default.svc.{Z}"), "A"))


def restarts(task: str) -> float:
    return REGISTRY.get_sample_value("kwatch_task_restarts_total", {"task": task}) or 0.0


def kept() -> float:
    return REGISTRY.get_sample_value("dnsd_records_kept_total") or 0.0


async def test_records_that_fail_to_build_keep_the_last_good_ones(
    start_dnsd: StartDnsd, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await start_dnsd(cluster())
    assert await a_of(run.port, "web") == ["10.96.0.5"]
    real = dnsd.controller.service_records

    def refuses_web(svc: Any, slices: Any, options: Any) -> Any:
        if svc.metadata.name == "web":
            raise ValueError("a name the wire form cannot carry")
        return real(svc, slices, options)

    monkeypatch.setattr(dnsd.controller, "service_records", refuses_web)
    before = kept()
    await run.replace(cluster(web_ip="10.96.0.50", api_ip="10.96.0.60"))
    # web keeps what it had (the README's promise); api, unaffected, moves on.
    assert await a_of(run.port, "web") == ["10.96.0.5"]
    assert await a_of(run.port, "api") == ["10.96.0.60"]
    assert kept() > before
    monkeypatch.setattr(dnsd.controller, "service_records", real)
    await run.replace(cluster(web_ip="10.96.0.51", api_ip="10.96.0.60"))
    assert await a_of(run.port, "web") == ["10.96.0.51"]


async def test_a_name_too_long_to_encode_keeps_the_last_good_records(
    start_dnsd: StartDnsd,
) -> None:
    run = await start_dnsd(cluster())
    assert await a_of(run.port, "db") == ["10.0.0.1"]
    broken = cluster()
    broken[-1] = endpoint_slice(
        "db-1",
        "db",
        [endpoint("10.0.0.2", hostname="h" * 70)],  # a DNS label holds 63 bytes at most
        ports=[{"name": "pg", "port": 5432}],
    )
    await run.replace(broken)
    assert await a_of(run.port, "db") == ["10.0.0.1"]
    assert await a_of(run.port, "web") == ["10.96.0.5"]


async def test_a_failing_zone_batch_is_retried_by_the_supervisor_and_nothing_is_lost(
    start_dnsd: StartDnsd, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await start_dnsd(cluster())
    index = run.daemon.index
    real_finish = index.finish_batch
    failures = {"left": 2}

    def finish_fails_twice() -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected: zone build failed")
        real_finish()

    monkeypatch.setattr(index, "finish_batch", finish_fails_twice)
    before = restarts("zone-controller")
    write_manifest(run.manifest, cluster(web_ip="10.96.0.70", api_ip="10.96.0.71"))
    await eventually(lambda: failures["left"] == 0, within=10)
    for _ in range(200):
        if await a_of(run.port, "web") == ["10.96.0.70"]:
            break
        await asyncio.sleep(0.05)
    assert await a_of(run.port, "web") == ["10.96.0.70"]
    assert await a_of(run.port, "api") == ["10.96.0.71"]
    assert restarts("zone-controller") - before == 2
    assert run.daemon.supervisor.liveness() == (True, "ok")


async def test_a_store_subscriber_that_raises_does_not_stop_the_zone(
    start_dnsd: StartDnsd,
) -> None:
    run = await start_dnsd(cluster())

    def broken(_event: Any) -> None:
        raise KeyError("injected: subscriber bug")

    # Subscribed first (before the controller's) would be too late now: put it in front.
    store = run.daemon.state.store(SERVICES)
    store._subscribers.insert(0, broken)
    await run.replace(cluster(web_ip="10.96.0.80"))
    assert await a_of(run.port, "web") == ["10.96.0.80"]


async def test_healthz_is_503_while_changes_wait_past_the_deadline_then_200(
    start_dnsd: StartDnsd, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await start_dnsd(cluster(), "--task-deadline", "0.5")
    controller = run.daemon.controller
    real = controller.apply_pending
    stuck = {"on": True}

    def wedged(max_services: int | None = None) -> bool:
        if stuck["on"]:
            raise RuntimeError("injected: cannot apply")
        return real(max_services)

    monkeypatch.setattr(controller, "apply_pending", wedged)
    url = f"http://127.0.0.1:{run.http_port}/healthz"
    async with aiohttp.ClientSession() as http:

        async def status() -> tuple[int, str]:
            async with http.get(url) as resp:
                return resp.status, await resp.text()

        assert (await status())[0] == 200
        write_manifest(run.manifest, cluster(web_ip="10.96.0.90"))
        code, text = 200, ""
        for _ in range(200):
            code, text = await status()
            if code == 503:
                break
            await asyncio.sleep(0.05)
        assert code == 503 and "zone-controller has work waiting" in text
        stuck["on"] = False
        for _ in range(400):
            code, text = await status()
            if code == 200:
                break
            await asyncio.sleep(0.05)
        assert (code, text) == (200, "ok\n")
    assert await a_of(run.port, "web") == ["10.96.0.90"]


def _wire(name: str, qid: int) -> bytes:
    msg = dns.message.make_query(name, "A", use_edns=False)
    msg.id = qid
    return msg.to_wire()


async def test_a_flood_of_slow_path_queries_is_shed_and_cluster_names_stay_fast(
    start_dnsd: StartDnsd,
) -> None:
    """The event loop is blocked (as a flood of forwarded names keeps it busy): the UDP
    thread hands it at most --slow-queue queries, drops the rest (counted), and answers
    cluster names from the precomputed zone meanwhile. (Without --forward-process, so that the
    forwarded names wait for this event loop, as they do while the child is down.)"""
    run = await start_dnsd(cluster(), "--slow-queue", "5", "--no-forward-process")
    port = run.port
    out: dict[str, float] = {}

    def client() -> None:
        time.sleep(0.1)  # the loop is blocked by now
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            for i in range(100):
                flood.sendto(_wire(f"x{i}.flood.example.org", i), ("127.0.0.1", port))
        time.sleep(0.1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.settimeout(0.3)
            began = time.perf_counter()
            probe.sendto(_wire(f"web.default.svc.{Z}", 7), ("127.0.0.1", port))
            probe.recv(512)
            out["cluster_ms"] = (time.perf_counter() - began) * 1000

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(0.6)  # noqa: ASYNC251 - blocks the event loop on purpose
    thread.join()
    shed = sum(d.get("udp_queue_full", 0) for d in run.daemon.stats.thread_dropped)
    assert shed >= 90
    assert out["cluster_ms"] < 250  # answered while the loop was still blocked
    # Once the loop runs again, forwarding works as before.
    assert await a_of(run.port, "web") == ["10.96.0.5"]
    reply = await ask(run.port, "www.example.org")
    assert rdatas(reply, "A") == ["192.0.2.80"]


async def test_objects_with_null_in_every_optional_field_are_served(
    start_dnsd: StartDnsd,
) -> None:
    from tests.kwatch.test_reflector_garbage import NULLS

    run = await start_dnsd([*cluster(), *NULLS])
    reply = await ask(run.port, f"all-null.nulls.svc.{Z}")
    assert rdatas(reply, "A") == ["10.96.5.1"]
    srv = await ask(run.port, f"_http._tcp.all-null.nulls.svc.{Z}", "SRV")
    assert srv.rcode() == 3  # the port has no name (null): no SRV name, as unnamed ports
    assert await a_of(run.port, "web") == ["10.96.0.5"]
