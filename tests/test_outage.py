"""Recovery after an API outage, both daemons watching the fake API server (item 7 of issue
14): the API goes away for 30 s (connections reset), an endpoint is removed meanwhile, and
within 10 s of its return dnsd answers without it and kpx no longer offers it. Also: 429 with
Retry-After is honoured, and a watch that goes silent (blackholed) is given up and reopened."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
from prometheus_client import REGISTRY

from dnsd.main import Daemon
from dnsd.settings import DnsdSettings
from kpx.main import serve
from kpx.settings import load as load_kpx
from kwatch.backoff import Backoff
from kwatch.cluster import ClusterState
from kwatch.resources import SERVICES
from kwatch.settings import AccessSettings, load_settings
from tests.apiserver import FakeApiServer
from tests.waiting import eventually

OUTAGE_SECONDS = 30.0
CONVERGE_WITHIN = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def objects(endpoints: list[str], port: int = 8080) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]},
        },
        slice_for("web", endpoints, port, "http"),
        slice_for("db", endpoints, 5432, "pg"),
    ]


def slice_for(service: str, endpoints: list[str], port: int, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "nodeName": "node-a"} for ip in endpoints],
        "ports": [{"name": name, "port": port}],
    }


async def dns_a(port: int, name: str) -> list[str]:
    query = dns.message.make_query(name, "A")
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=1.0)
    return sorted(rr.address for rrset in reply.answer for rr in rrset if rr.rdtype == 1)


async def kpx_endpoints(http: aiohttp.ClientSession, metrics: int) -> list[str]:
    """The backends kpx sends new connections for web:80 to (6 connections, round robin)."""
    try:
        async with http.get(f"http://127.0.0.1:{metrics}/debug/services") as resp:
            rows = json.loads(await resp.text())
    except aiohttp.ClientError:
        return []
    port = next((r["port"] for r in rows if r["frontend"] == "10.96.0.5:80"), None)
    if port is None:
        return []
    seen = set()
    for _ in range(6):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            seen.add((await asyncio.wait_for(reader.readline(), 2)).decode().strip())
            writer.close()
        except (OSError, TimeoutError):
            seen.add("error")
    return sorted(seen)


async def backends(port: int) -> list[asyncio.Server]:
    """One TCP server per endpoint address, each saying who it is."""
    servers = []
    for ip in ("127.0.0.11", "127.0.0.12"):

        async def hello(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str = ip
        ) -> None:
            writer.write(ip.encode() + b"\n")
            await writer.drain()
            writer.close()

        servers.append(await asyncio.start_server(hello, ip, port))
    return servers


async def test_both_daemons_converge_within_10s_after_a_30s_outage(
    api_server: FakeApiServer, kubeconfig: Path
) -> None:
    backend_port = free_port()
    servers = await backends(backend_port)
    api_server.load(objects(["127.0.0.11", "127.0.0.12"], backend_port))
    dnsd_settings = load_settings(
        DnsdSettings,
        ["--kubeconfig", str(kubeconfig), "--listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"],
        env_prefix="DNSD", prog="dnsd", environ={},
    )  # fmt: skip
    dnsd = Daemon(dnsd_settings)
    await dnsd.start()
    metrics = free_port()
    kpx_settings = load_kpx(
        ["--mode", "ports", "--kubeconfig", str(kubeconfig), "--node-name", "node-a",
         "--healthz-bind-address", f"127.0.0.1:{free_port()}",
         "--metrics-bind-address", f"127.0.0.1:{metrics}", "--min-sync-period", "0.01"]
    )  # fmt: skip
    stop = asyncio.Event()
    kpx = asyncio.create_task(serve(kpx_settings, stop))
    name = "db.default.svc.cluster.local"
    both = ["127.0.0.11", "127.0.0.12"]
    try:
        async with aiohttp.ClientSession() as http:
            await eventually(lambda: dnsd.readiness()[0], within=10)
            assert await dns_a(dnsd.dns_port, name) == both
            for _ in range(200):
                if await kpx_endpoints(http, metrics) == both:
                    break
                await asyncio.sleep(0.05)
            assert await kpx_endpoints(http, metrics) == both

            api_server.stop()  # every connection reset, the port closed
            api_server.update(slice_for("web", ["127.0.0.11"], backend_port, "http"))
            api_server.update(slice_for("db", ["127.0.0.11"], 5432, "pg"))
            await asyncio.sleep(OUTAGE_SECONDS)
            # Still serving the last good state, and alive.
            assert await dns_a(dnsd.dns_port, name) == both
            assert dnsd.supervisor.liveness()[0]
            api_server.start()
            back = time.monotonic()
            dns_done = kpx_done = None
            while time.monotonic() - back < CONVERGE_WITHIN + 5:
                if dns_done is None and await dns_a(dnsd.dns_port, name) == ["127.0.0.11"]:
                    dns_done = time.monotonic() - back
                if kpx_done is None and await kpx_endpoints(http, metrics) == ["127.0.0.11"]:
                    kpx_done = time.monotonic() - back
                if dns_done is not None and kpx_done is not None:
                    break
                await asyncio.sleep(0.05)
            print(f"converged after the outage: dnsd {dns_done}s, kpx {kpx_done}s")
            assert dns_done is not None and dns_done <= CONVERGE_WITHIN
            assert kpx_done is not None and kpx_done <= CONVERGE_WITHIN
    finally:
        stop.set()
        async with asyncio.timeout(40):
            await kpx
        await dnsd.stop()
        for server in servers:
            server.close()


async def test_429_retry_after_is_honoured(api_server: FakeApiServer, kubeconfig: Path) -> None:
    api_server.load(objects(["127.0.0.11"]))
    api_server.fail_next(1, 429, retry_after=2, verb="list", resource="services")
    state = ClusterState([SERVICES], backoff=lambda: Backoff(0.05, 0.2, jitter=0.1))
    started = time.monotonic()
    await state.start(AccessSettings(kubeconfig=str(kubeconfig)), "outage-test")
    try:
        await asyncio.wait_for(state.wait_synced(), 10)
        assert time.monotonic() - started >= 2.0  # not the 0.05 s backoff
        assert api_server.count("list", "services") == 2
    finally:
        await state.stop()


def idle_restarts() -> float:
    value = REGISTRY.get_sample_value(
        "kwatch_watch_restarts_total", {"resource": "services", "reason": "idle"}
    )
    return value or 0.0


async def test_a_silent_watch_is_given_up_after_the_idle_timeout(
    api_server: FakeApiServer, kubeconfig: Path
) -> None:
    """The fake API server sends a bookmark every 0.5 s; paused, it sends nothing and answers
    nothing, as a blackholed connection looks from the client."""
    api_server.load(objects(["127.0.0.11"]))
    state = ClusterState([SERVICES], backoff=lambda: Backoff(0.05, 0.2, jitter=0.1))
    settings = AccessSettings(kubeconfig=str(kubeconfig), watch_idle_timeout=1.5)
    await state.start(settings, "outage-test")
    try:
        await asyncio.wait_for(state.wait_synced(), 10)
        await eventually(lambda: api_server.watch_count() == 1)
        before = idle_restarts()
        api_server.pause()
        paused = time.monotonic()
        await eventually(lambda: idle_restarts() > before, within=5)
        detected = time.monotonic() - paused
        # 1.5 s after the last byte received, which was a bookmark (every 0.5 s) or less ago.
        assert 0.9 <= detected <= 3.5
        api_server.resume()
        api_server.delete("services", "default", "db")
        await eventually(lambda: "default/db" not in state.store(SERVICES), within=5)
    finally:
        api_server.resume()
        await state.stop()
