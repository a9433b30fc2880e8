"""The coalescing sync loop (store events -> table -> steering writer) and ports mode."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kpx.backends import Backend
from kpx.balancer import Balancer
from kpx.health import ProxierHealth
from kpx.nft import NftError, NftWriter
from kpx.ports import PortsWriter
from kpx.rules import Steer, SteerKey
from kpx.sync import RuleSyncer
from kpx.table import ServiceTable
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
        self.needs_full = True  # as NftWriter: set by the syncer after a failure

    async def sync(
        self, steering: Mapping[SteerKey, bool], changed: Iterable[SteerKey] = ()
    ) -> bool:
        if self.fail:
            self.fail -= 1
            raise NftError("boom")
        self.calls.append({key: steering.get(key) for key in changed})
        self.needs_full = False
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


async def test_a_failed_kernel_update_still_drains_backends_and_keeps_their_trigger_times():
    # The pickers stop offering a removed backend when the table syncs, whatever the kernel
    # update does next: its connections must drain now, and the change's programming latency
    # is observed once it is in the kernel (after the retry), not lost.
    services, slices, writer, syncer = setup(min_sync_period=0.0)
    removed: list[Backend] = []
    added: list[Backend] = []
    syncer.on_backend_removed = removed.append
    syncer.on_backend_added = added.append  # calls off a drain still running for them
    services.upsert("default/web", service("web", "10.96.0.1"))
    slices.upsert("default/web-1", endpoint_slice("web", ["10.1.0.1", "10.1.0.2"]))
    await syncer.sync_once()
    assert sorted(b.ip for b in added) == ["10.1.0.1", "10.1.0.2"]
    before = _histogram_count("kubeproxy_network_programming_duration_seconds")
    slices.upsert("default/web-1", endpoint_slice("web", ["10.1.0.2"], trigger=time.time()))
    writer.fail = 1
    with pytest.raises(NftError):
        await syncer.sync_once()
    assert [(b.ip, b.port) for b in removed] == [("10.1.0.1", 8080)]
    assert _histogram_count("kubeproxy_network_programming_duration_seconds") == before
    await syncer.sync_once()  # the retry
    assert _histogram_count("kubeproxy_network_programming_duration_seconds") == before + 1
    assert len(removed) == 1


async def test_the_sync_after_a_failed_one_is_a_full_one():
    services, _slices, writer, syncer = setup(min_sync_period=0.0)
    services.upsert("default/web", service("web", "10.96.0.1"))
    await syncer.sync_once()

    def counts() -> tuple[float, float]:
        return (
            _histogram_count("kubeproxy_sync_full_proxy_rules_duration_seconds"),
            _histogram_count("kubeproxy_sync_partial_proxy_rules_duration_seconds"),
        )

    full, partial = counts()
    services.upsert("default/api", service("api", "10.96.0.2"))
    writer.fail = 1
    with pytest.raises(NftError):
        await syncer.sync_once()
    await syncer.sync_once()  # what reached the kernel is unknown: everything is rewritten
    assert counts() == (full + 1, partial)
    services.upsert("default/db", service("db", "10.96.0.3"))
    await syncer.sync_once()
    assert counts() == (full + 1, partial + 1)


async def test_endpoint_only_changes_never_run_nft(tmp_path: Path) -> None:
    """The real NftWriter with `nft` replaced by a recorder: only a frontend appearing or
    changing state (usable <-> no endpoints) costs a kernel transaction."""
    transcript = tmp_path / "nft.log"
    record = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read() + '=====\\n')"
    services: Store[Any] = Store("services")
    slices: Store[Any] = Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])
    table = ServiceTable(services, slices, None, "node-a", Balancer())
    writer = NftWriter(10262, command=[sys.executable, "-c", record, str(transcript)])
    syncer = RuleSyncer(table, writer, ProxierHealth(60), min_sync_period=0.0)

    def transactions() -> list[str]:
        text = transcript.read_text() if transcript.exists() else ""
        return text.split("=====\n")[:-1]  # one per nft run, an empty script included

    services.upsert("default/web", service("web", "10.96.0.1"))
    await syncer.sync_once()
    assert len(transactions()) == 1  # startup: the full table
    slices.upsert("default/web-1", endpoint_slice("web", ["10.1.0.1"]))
    await syncer.sync_once()
    assert transactions()[-1].splitlines() == [
        "delete element inet kpx svc4-reject { 10.96.0.1 . 80 }",
        "add element inet kpx svc4 { 10.96.0.1 . 80 }",
    ]
    for ips in (["10.1.0.1", "10.1.0.2"], ["10.1.0.2", "10.1.0.3"], ["10.1.0.4"], ["10.1.0.5"]):
        slices.upsert("default/web-1", endpoint_slice("web", ips))
        await syncer.sync_once()
    slices.upsert("default/web-2", endpoint_slice("web", ["10.1.0.9"]))  # a second slice
    await syncer.sync_once()
    slices.delete("default/web-2")
    await syncer.sync_once()
    assert len(transactions()) == 2  # seven endpoint changes, no kernel work
    slices.upsert("default/web-1", endpoint_slice("web", []))  # the last endpoint leaves
    await syncer.sync_once()
    assert len(transactions()) == 3 and "svc4-reject" in transactions()[-1]


def _histogram_count(name: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name + "_count")
    return value or 0.0


class FakeListener:
    def __init__(self, port: int) -> None:
        self.port = port
        self.closed = False
        self.held = False

    def close(self) -> None:
        self.closed = True

    def hold(self) -> None:
        self.held = True

    def resume(self) -> None:
        self.held = False


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
        {
            "frontend": "nodeport/4:30080",
            "address": "127.0.0.1",
            "port": 40001,
            "endpoints": False,
            "state": "reject",
        },
        {
            "frontend": "10.96.0.1:80",
            "address": "127.0.0.1",
            "port": 40002,
            "endpoints": True,
            "state": "serve",
        },
    ]
    state[(4, "", 30080)] = "serve"
    del state[(4, "10.96.0.1", 80)]
    await writer.sync(state, [(4, "", 30080), (4, "10.96.0.1", 80)])
    assert proxy.listeners[1].closed and not proxy.listeners[0].closed
    assert writer.assignments()[0]["endpoints"] is True
    # A Local policy without endpoints here: the listener is held (the port stays), then
    # accepts again once endpoints are back.
    state[(4, "", 30080)] = "drop"
    assert not await writer.sync(state, [(4, "", 30080)])  # no listener opened or closed
    assert proxy.listeners[0].held and writer.assignments()[0]["state"] == "drop"
    state[(4, "", 30080)] = "local"
    await writer.sync(state, [(4, "", 30080)])
    assert not proxy.listeners[0].held
    await writer.remove()
    assert proxy.listeners[0].closed
