"""kpx's lifecycle as a rolling update sees it, in process (ports mode, manifests, 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import REGISTRY

import kpx.local
from kpx.balancer import Balancer
from kpx.health import ServiceHealthServers
from kpx.local import LocalClients
from kpx.main import _housekeeping, serve
from kpx.settings import load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def whoami(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"backend\n")
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def manifest(backend_port: int, health_check_port: int) -> str:
    docs: list[dict[str, Any]] = [
        {
            "kind": "Service",
            "metadata": {"name": "lb", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": health_check_port,
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
            },
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "name": "lb-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "lb"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "nodeName": "node-a"}],
            "ports": [{"name": "http", "port": backend_port}],
        },
    ]
    return yaml.safe_dump_all(docs)


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


async def test_on_sigterm_health_fails_at_once_while_open_connections_drain(tmp_path: Path):
    """While kpx drains it accepts no new connection, so the load balancers probing its
    /healthz and the healthCheckNodePorts must see 503 from the start of the drain, not
    keep sending clients to a node that refuses them."""
    backend = await asyncio.start_server(whoami, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    healthz, metrics, health_check = free_port(), free_port(), free_port()
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest(backend_port, health_check))
    settings = load(
        ["--mode", "ports", "--manifests", str(path), "--node-name", "node-a",
         "--healthz-bind-address", f"127.0.0.1:{healthz}",
         "--metrics-bind-address", f"127.0.0.1:{metrics}", "--nodeport-addresses", "127.0.0.0/8",
         "--min-sync-period", "0.01", "--drain-timeout", "10"]
    )  # fmt: skip
    stop = asyncio.Event()
    kpx = asyncio.create_task(serve(settings, stop))
    try:
        async with aiohttp.ClientSession() as http:
            rows: list[dict[str, Any]] = []
            async with asyncio.timeout(10):
                while not any(r["frontend"] == "10.96.0.10:80" for r in rows):
                    await asyncio.sleep(0.05)
                    try:
                        async with http.get(f"http://127.0.0.1:{metrics}/debug/services") as resp:
                            rows = json.loads(await resp.text())
                    except aiohttp.ClientConnectionError:
                        continue
            port = next(r["port"] for r in rows if r["frontend"] == "10.96.0.10:80")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"backend\n"
            probes = [f"http://127.0.0.1:{healthz}/healthz", f"http://127.0.0.1:{health_check}/"]
            assert [await status_of(http, url) for url in probes] == [200, 200]

            stop.set()  # SIGTERM
            await asyncio.sleep(0.2)
            assert not kpx.done()  # draining: one connection is open
            assert [await status_of(http, url) for url in probes] == [503, 503]
            writer.write(b"still served\n")
            assert await reader.readline() == b"still served\n"
            writer.close()
            async with asyncio.timeout(5):
                assert await kpx == 0  # the last connection ended: the drain is over
    finally:
        stop.set()
        backend.close()
        if not kpx.done():
            kpx.cancel()


async def frontend_port(http: aiohttp.ClientSession, metrics: int, frontend: str) -> int:
    """The local port --mode ports bound for `frontend`, once the first sync listed it."""
    rows: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not any(r["frontend"] == frontend for r in rows):
            await asyncio.sleep(0.05)
            try:
                async with http.get(f"http://127.0.0.1:{metrics}/debug/services") as resp:
                    rows = json.loads(await resp.text())
            except aiohttp.ClientConnectionError:
                continue
    return int(next(r["port"] for r in rows if r["frontend"] == frontend))


async def scrape(http: aiohttp.ClientSession, metrics: int, name: str) -> float:
    async with http.get(f"http://127.0.0.1:{metrics}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_idle_timeout_option_closes_silent_connections_and_exports_the_count(
    tmp_path: Path,
):
    backend = await asyncio.start_server(whoami, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    metrics = free_port()
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest(backend_port, free_port()))
    config = tmp_path / "kpx.yaml"
    config.write_text("idle-timeout: 10s\n")  # the flag below wins over the file
    settings = load(
        ["--mode", "ports", "--manifests", str(path), "--node-name", "node-a",
         "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address",
         f"127.0.0.1:{metrics}", "--min-sync-period", "0.01", "--config", str(config),
         "--idle-timeout", "300ms"],
    )  # fmt: skip
    assert settings.idle_timeout == pytest.approx(0.3)
    stop = asyncio.Event()
    kpx = asyncio.create_task(serve(settings, stop))
    try:
        async with aiohttp.ClientSession() as http:
            port = await frontend_port(http, metrics, "10.96.0.10:80")
            before = await scrape(http, metrics, "kpx_idle_closes_total")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"backend\n"
            async with asyncio.timeout(2):
                assert await reader.read() == b""  # closed by kpx (a FIN) after ~0.3-0.45 s
            writer.close()
            assert await scrape(http, metrics, "kpx_idle_closes_total") == before + 1
    finally:
        stop.set()
        backend.close()
        async with asyncio.timeout(10):
            assert await kpx == 0


async def test_health_check_listeners_follow_the_node_addresses_inside_nodeport_addresses(
    monkeypatch: pytest.MonkeyPatch,
):
    found = {"127.0.0.1", "10.9.9.9"}
    monkeypatch.setattr(kpx.local, "local_addresses", lambda: set(found))
    servers = ServiceHealthServers(lambda: True, hosts=["127.0.0.1"])
    port = free_port()
    await servers.sync({"ns/a": (port, 1)})
    clients = LocalClients([], set(found))
    housekeeping = asyncio.create_task(
        _housekeeping([Balancer()], clients, servers, ["127.0.0.0/8"], 0.01)
    )
    try:
        found.add("127.0.0.2")  # an address inside --nodeport-addresses came up
        async with asyncio.timeout(2):
            while servers.bound() != {port: ["127.0.0.1", "127.0.0.2"]}:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        found.discard("127.0.0.1")
        async with asyncio.timeout(2):
            while servers.bound() != {port: ["127.0.0.2"]}:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert clients("127.0.0.2") and not clients("127.0.0.1")
    finally:
        housekeeping.cancel()
        await servers.stop()


async def test_a_service_and_a_slice_count_once_each_although_tcp_and_udp_tables_watch_them(
    tmp_path: Path,
):
    """kube-proxy counts one Service event and one EndpointSlice event once each in
    kubeproxy_sync_proxy_rules_{service,endpoint}_changes_total; kpx's TCP and UDP tables
    both see every event, and must not each add one."""
    metrics = free_port()
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest(free_port(), free_port()))  # one Service, one EndpointSlice
    settings = load(
        ["--mode", "ports", "--manifests", str(path), "--node-name", "node-a",
         "--healthz-bind-address", "127.0.0.1:0",
         "--metrics-bind-address", f"127.0.0.1:{metrics}", "--min-sync-period", "0.01"]
    )  # fmt: skip
    names = [f"kubeproxy_sync_proxy_rules_{kind}_changes_total" for kind in ("service", "endpoint")]
    # The counters are this process's (earlier tests counted too): compare with their values
    # before this kpx starts.
    before = [REGISTRY.get_sample_value(name) or 0.0 for name in names]
    stop = asyncio.Event()
    kpx = asyncio.create_task(serve(settings, stop))
    try:
        async with aiohttp.ClientSession() as http:
            await frontend_port(http, metrics, "10.96.0.10:80")  # listed and synced
            after = [await scrape(http, metrics, name) for name in names]
            assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
    finally:
        stop.set()
        async with asyncio.timeout(10):
            assert await kpx == 0
