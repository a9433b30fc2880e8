"""kube-proxy's /healthz and the healthCheckNodePort servers."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from kpx.health import (
    NodeEligibility,
    ProxierHealth,
    ProxierHealthServer,
    ServiceHealthServers,
    node_eligible,
)
from kwatch.resources import NODES
from kwatch.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_767_225_600.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_starting_up_is_healthy_and_a_stale_queued_change_is_not():
    clock = Clock()
    health = ProxierHealth(timeout=60, clock=clock)
    assert health.healthy()
    health.queued()
    clock.now += 59
    assert health.healthy()
    health.queued()  # a later change does not move the oldest pending time
    clock.now += 2
    assert not health.healthy()
    health.updated()
    assert health.healthy()
    body = json.loads(health.body(True))
    assert body == {
        "lastUpdated": "2026-01-01T00:01:01Z",
        "currentTime": "2026-01-01T00:01:01Z",
        "nodeEligible": True,
    }


def test_a_stopping_proxy_is_unhealthy_whatever_its_sync_state():
    health = ProxierHealth(timeout=60, clock=Clock())
    health.updated()
    health.stopping()
    assert not health.healthy()


async def test_healthz_and_livez_answer_like_kube_proxy():
    clock = Clock()
    health = ProxierHealth(timeout=60, clock=clock)
    eligible = [True]
    server = ProxierHealthServer("127.0.0.1:0", health, node_eligible=lambda: eligible[0])
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("application/json")
                assert (await resp.json())["lastUpdated"] == "0001-01-01T00:00:00Z"
            health.queued()
            clock.now += 61
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 503
            health.updated()
            eligible[0] = False
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 503
                assert (await resp.json())["nodeEligible"] is False
            async with http.get(base + "/livez") as resp:
                assert resp.status == 200
    finally:
        await server.stop()


async def test_health_check_node_ports_follow_local_endpoints():
    healthy = [True]
    servers = ServiceHealthServers(lambda: healthy[0], hosts=["127.0.0.1"])
    port_a, port_b = free_port(), free_port()
    try:
        await servers.sync({"ns/a": (port_a, 2), "ns/b": (port_b, 0)})
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port_a}/any/path") as resp:
                assert resp.status == 200
                assert resp.headers["X-Load-Balancing-Endpoint-Weight"] == "2"
                assert await resp.json() == {
                    "service": {"namespace": "ns", "name": "a"},
                    "localEndpoints": 2,
                    "serviceProxyHealthy": True,
                }
            async with http.get(f"http://127.0.0.1:{port_b}/") as resp:
                assert resp.status == 503  # no local endpoint
            healthy[0] = False
            async with http.get(f"http://127.0.0.1:{port_a}/") as resp:
                assert resp.status == 503
                assert (await resp.json())["serviceProxyHealthy"] is False
            healthy[0] = True
            await servers.sync({"ns/b": (port_b, 1)})  # a gone, b gained an endpoint
            async with http.get(f"http://127.0.0.1:{port_b}/") as resp:
                assert resp.status == 200
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port_a)) != 0  # closed
        assert servers.ports == {port_b: ("ns/b", 1)}
    finally:
        await servers.stop()


async def test_no_matching_nodeport_address_serves_nothing():
    servers = ServiceHealthServers(lambda: True, hosts=[])
    port = free_port()
    try:
        await servers.sync({"ns/a": (port, 1)})
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        await servers.stop()


def bind_failures() -> float:
    return REGISTRY.get_sample_value("kpx_health_check_bind_failures_total") or 0.0


async def get_status(url: str) -> int | str:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status
    except aiohttp.ClientConnectionError:
        return "refused"


async def test_a_health_check_port_that_cannot_be_bound_is_retried_with_backoff():
    blocker = socket.socket()  # someone else holds the port (no SO_REUSEPORT: EADDRINUSE)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    servers = ServiceHealthServers(
        lambda: True, hosts=["127.0.0.1"], retry_base=0.05, retry_max=0.2
    )
    failures_before = bind_failures()
    try:
        with capture_logs() as logs:
            await servers.sync({"ns/a": (port, 1)})
            await asyncio.sleep(0.5)  # tries at 0, 0.05, 0.15, 0.35: four failures
            assert servers.bound() == {}
            blocker.close()
            async with asyncio.timeout(2):
                while not servers.bound():  # noqa: ASYNC110 (no event for a bind)
                    await asyncio.sleep(0.01)
        failed = [e for e in logs if e["event"] == "health_check_port_failed"]
        assert 3 <= len(failed) <= 5
        assert [e["retry_in"] for e in failed[:4]] == [0.05, 0.1, 0.2, 0.2][: len(failed[:4])]
        assert {(e["service"], e["port"], e["host"]) for e in failed} == {
            ("ns/a", port, "127.0.0.1")
        }
        assert bind_failures() == failures_before + len(failed)  # one count per log line
        assert servers.bound() == {port: ["127.0.0.1"]}
        assert await get_status(f"http://127.0.0.1:{port}/") == 200
    finally:
        blocker.close()
        await servers.stop()


async def test_a_retry_stops_when_the_port_is_no_longer_wanted():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    servers = ServiceHealthServers(lambda: True, hosts=["127.0.0.1"], retry_base=0.05)
    try:
        await servers.sync({"ns/a": (port, 1)})
        await servers.sync({})  # the Service went away before the port came free
        blocker.close()
        before = bind_failures()
        await asyncio.sleep(0.2)
        assert servers.bound() == {} and bind_failures() == before
        assert await get_status(f"http://127.0.0.1:{port}/") == "refused"
    finally:
        blocker.close()
        await servers.stop()


async def test_health_check_listeners_move_when_the_node_addresses_change():
    servers = ServiceHealthServers(lambda: True, hosts=["127.0.0.1"])
    port = free_port()
    try:
        await servers.sync({"ns/a": (port, 1)})
        assert await get_status(f"http://127.0.0.1:{port}/") == 200
        await servers.set_hosts(["127.0.0.2", "127.0.0.1"])  # an address was added
        assert servers.bound() == {port: ["127.0.0.1", "127.0.0.2"]}
        await servers.set_hosts(["127.0.0.2"])  # and the first one removed
        assert servers.bound() == {port: ["127.0.0.2"]}
        assert await get_status(f"http://127.0.0.1:{port}/") == "refused"
        assert await get_status(f"http://127.0.0.2:{port}/") == 200
        other = free_port()
        await servers.sync({"ns/a": (port, 1), "ns/b": (other, 0)})  # new ports: current hosts
        assert servers.bound() == {port: ["127.0.0.2"], other: ["127.0.0.2"]}
        assert await get_status(f"http://127.0.0.2:{other}/") == 503
    finally:
        await servers.stop()


# --- nodeEligible (proxy_health.go SyncNode) --------------------------------------------------


def node(name: str = "node-a", deleting: bool = False, taints: tuple[str, ...] = ()) -> Any:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec = {"taints": [{"key": key, "effect": "NoSchedule"} for key in taints]}
    return NODES.parse({"metadata": meta, "spec": spec})


def test_a_node_being_deleted_or_marked_by_the_cluster_autoscaler_is_not_eligible():
    assert node_eligible(node())
    assert node_eligible(node(taints=("node.kubernetes.io/unschedulable",)))
    assert not node_eligible(node(deleting=True))
    assert not node_eligible(node(taints=("ToBeDeletedByClusterAutoscaler",)))
    assert node_eligible(None)  # not listed (yet): starting up counts as healthy


def test_node_eligibility_follows_this_nodes_object_in_the_store():
    nodes: Store[Any] = Store("nodes")
    eligible = NodeEligibility(nodes, "node-a")
    assert eligible()
    nodes.upsert("node-b", node("node-b", deleting=True))  # another node: irrelevant
    assert eligible()
    nodes.upsert("node-a", node(taints=("ToBeDeletedByClusterAutoscaler",)))
    assert not eligible()
    nodes.upsert("node-a", node())  # the autoscaler changed its mind
    assert eligible()
    nodes.upsert("node-a", node(deleting=True))
    assert not eligible()
    nodes.delete("node-a")  # gone from the API: still not a node to send traffic to
    assert not eligible()
    nodes.upsert("node-a", node())  # re-registered
    assert eligible()


async def test_healthz_is_503_for_a_node_the_autoscaler_removes_and_livez_stays_200():
    nodes: Store[Any] = Store("nodes")
    health = ProxierHealth(timeout=60, clock=Clock())
    server = ProxierHealthServer("127.0.0.1:0", health, NodeEligibility(nodes, "node-a"))
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as http:
            nodes.upsert("node-a", node())
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["nodeEligible"] is True
            nodes.upsert("node-a", node(taints=("ToBeDeletedByClusterAutoscaler",)))
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 503 and (await resp.json())["nodeEligible"] is False
            async with http.get(base + "/livez") as resp:
                assert resp.status == 200 and (await resp.json())["nodeEligible"] is False
    finally:
        await server.stop()
