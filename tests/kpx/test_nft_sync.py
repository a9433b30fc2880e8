"""The coalescing sync loop (store events -> table -> steering writer) and ports mode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from kpx.balancer import Balancer
from kpx.health import ProxierHealth
from kpx.nft import NftError
from kpx.ports import PortsWriter
from kpx.sync import RuleSyncer
from kpx.table import ServiceTable, Steer, SteerKey
from kwatch.cluster import DEFAULT_INDEXERS
from kwatch.resources import ENDPOINTSLICES, SERVICES
from kwatch.store import Store


def service(name: str, ip: str) -> Any:
    return SERVICES.parse(
        {
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
        }
    )


def endpoint_slice(service_name: str, ips: list[str], trigger: float | None = None) -> Any:
    annotations = {}
    if trigger is not None:
        stamp = datetime.fromtimestamp(trigger, UTC).isoformat().replace("+00:00", "Z")
        annotations["endpoints.kubernetes.io/last-change-trigger-time"] = stamp
    return ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": f"{service_name}-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": service_name},
                "annotations": annotations,
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]} for ip in ips],
            "ports": [{"name": "http", "port": 8080}],
        }
    )


class FakeWriter:
    def __init__(self) -> None:
        self.calls: list[dict[SteerKey, bool | None]] = []
        self.fail = 0

    async def sync(
        self, steering: Mapping[SteerKey, bool], changed: Iterable[SteerKey] = ()
    ) -> bool:
        if self.fail:
            self.fail -= 1
            raise NftError("boom")
        self.calls.append({key: steering.get(key) for key in changed})
        return True

    async def remove(self) -> None:
        pass


def setup(min_sync_period: float = 0.05) -> tuple[Store[Any], Store[Any], FakeWriter, RuleSyncer]:
    services: Store[Any] = Store("services")
    slices: Store[Any] = Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])
    table = ServiceTable(services, slices, None, "node-a", Balancer())
    writer = FakeWriter()
    syncer = RuleSyncer(table, writer, ProxierHealth(60), min_sync_period=min_sync_period)
    return services, slices, writer, syncer


async def test_bursts_of_changes_are_coalesced_into_one_sync():
    services, slices, writer, syncer = setup(min_sync_period=0.1)
    task = asyncio.create_task(syncer.run())
    try:
        await asyncio.sleep(0.02)
        assert syncer.syncs == 1  # the initial sync runs at once
        for i in range(20):
            services.upsert(f"default/s{i}", service(f"s{i}", f"10.96.0.{i + 1}"))
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        assert syncer.syncs == 2
        assert len(writer.calls[1]) == 20 and set(writer.calls[1].values()) == {"reject"}
        # Endpoints arrive: frontends become usable.
        slices.upsert("default/s0-1", endpoint_slice("s0", ["10.1.0.1"]))
        await asyncio.sleep(0.2)
        assert writer.calls[-1] == {(4, "10.96.0.1", 80): "serve"}
        # More endpoints for a usable frontend: nothing for the kernel.
        slices.upsert("default/s0-1", endpoint_slice("s0", ["10.1.0.1", "10.1.0.2"]))
        await asyncio.sleep(0.2)
        assert writer.calls[-1] == {}
        assert syncer.health.healthy()
    finally:
        task.cancel()


async def test_network_programming_latency_is_observed_after_the_sync():
    services, slices, _writer, syncer = setup(min_sync_period=0.0)
    services.upsert("default/web", service("web", "10.96.0.1"))
    await syncer.sync_once()
    before = _histogram_count("kubeproxy_network_programming_duration_seconds")
    slices.upsert("default/web-1", endpoint_slice("web", ["10.1.0.1"], trigger=time.time()))
    await syncer.sync_once()
    assert _histogram_count("kubeproxy_network_programming_duration_seconds") == before + 1
    await syncer.sync_once()  # observed once only
    assert _histogram_count("kubeproxy_network_programming_duration_seconds") == before + 1


async def test_a_failed_kernel_update_is_retried_and_keeps_health_pending():
    services, _slices, writer, syncer = setup(min_sync_period=0.0)
    writer.fail = 1
    syncer.health.timeout = 0.05
    task = asyncio.create_task(syncer.run())
    try:
        services.upsert("default/web", service("web", "10.96.0.1"))
        await asyncio.sleep(0.3)
        assert not syncer.health.healthy()  # queued change not applied in time
        await asyncio.sleep(1.0)  # retried after RETRY_AFTER_FAILURE
        assert syncer.health.healthy()
        assert writer.calls and syncer.syncs >= 1
    finally:
        task.cancel()


def _histogram_count(name: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name + "_count")
    return value or 0.0


class FakeListener:
    def __init__(self, port: int) -> None:
        self.port = port
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeProxy:
    def __init__(self) -> None:
        self.bound: list[tuple[str, int, str, int]] = []
        self.listeners: list[FakeListener] = []

    async def serve_port(
        self, listen_host: str, listen_port: int, frontend_ip: str, frontend_port: int
    ) -> FakeListener:
        self.bound.append((listen_host, listen_port, frontend_ip, frontend_port))
        listener = FakeListener(40000 + len(self.bound))
        self.listeners.append(listener)
        return listener


async def test_ports_mode_binds_one_port_per_frontend_and_lists_them():
    proxy = FakeProxy()
    writer = PortsWriter(proxy, "127.0.0.1")
    state: dict[SteerKey, Steer] = {(4, "10.96.0.1", 80): "serve", (4, "", 30080): "reject"}
    assert await writer.sync(state)
    assert proxy.bound == [
        ("127.0.0.1", 0, "0.0.0.0", 30080),  # a NodePort is looked up by family and port
        ("127.0.0.1", 0, "10.96.0.1", 80),
    ]
    assert writer.assignments() == [
        {"frontend": "nodeport/4:30080", "address": "127.0.0.1", "port": 40001, "endpoints": False},
        {"frontend": "10.96.0.1:80", "address": "127.0.0.1", "port": 40002, "endpoints": True},
    ]
    state[(4, "", 30080)] = "serve"
    del state[(4, "10.96.0.1", 80)]
    await writer.sync(state, [(4, "", 30080), (4, "10.96.0.1", 80)])
    assert proxy.listeners[1].closed and not proxy.listeners[0].closed
    assert writer.assignments()[0]["endpoints"] is True
    await writer.remove()
    assert proxy.listeners[0].closed
