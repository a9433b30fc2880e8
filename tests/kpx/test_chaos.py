"""kpx under injected failures: table compute, the apply path, nft that cannot start, the
health check servers. A change is forgotten only once applied; after a failure the next sync
rewrites everything, and the served state converges to the stores'."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

import kpx.table
from kpx.balancer import AffinityTable, Balancer
from kpx.health import ProxierHealth, ServiceHealthServers
from kpx.nft import NftError, NftWriter
from kpx.sync import RuleSyncer
from kpx.table import ServiceTable
from kwatch.cluster import DEFAULT_INDEXERS
from kwatch.resources import ENDPOINTSLICES, NODES
from kwatch.store import Store
from tests.kpx.test_nft_sync import FakeWriter, endpoint_slice, service


def stores() -> tuple[Store[Any], Store[Any]]:
    return Store("services"), Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])


def fill(services: Store[Any], slices: Store[Any], count: int, prefix: str = "10.0.0") -> None:
    for i in range(count):
        services.upsert(f"default/s{i}", service(f"s{i}", f"10.96.0.{i + 1}"))
        slices.upsert(f"default/s{i}-1", endpoint_slice(f"s{i}", [f"{prefix}.{i + 1}"]))


def backends_of(table: ServiceTable, ip: str) -> list[str]:
    picker = table.lookup(ip, 80)
    return [] if picker is None else [b.ip for b in picker.backends]  # type: ignore[union-attr]


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_a_service_whose_rules_fail_keeps_its_last_good_rules(monkeypatch):
    services, slices = stores()
    table = ServiceTable(services, slices, None, "node-a", Balancer())
    fill(services, slices, 3)
    table.sync()
    real = kpx.table.compute_service

    def fails_for_s1(svc: Any, sl: Any, node: Any, *protocol: Any) -> Any:
        if svc.metadata.name == "s1":
            raise RuntimeError("injected: compute failed")
        return real(svc, sl, node, *protocol)

    monkeypatch.setattr(kpx.table, "compute_service", fails_for_s1)
    before = counter("kpx_service_compute_failures_total")
    fill(services, slices, 3, prefix="10.0.9")
    table.sync()
    assert backends_of(table, "10.96.0.1") == ["10.0.9.1"]
    assert backends_of(table, "10.96.0.2") == ["10.0.0.2"]  # last good
    assert backends_of(table, "10.96.0.3") == ["10.0.9.3"]
    assert counter("kpx_service_compute_failures_total") - before == 1
    monkeypatch.setattr(kpx.table, "compute_service", real)
    slices.upsert("default/s1-1", endpoint_slice("s1", ["10.0.9.2"]))
    table.sync()
    assert backends_of(table, "10.96.0.2") == ["10.0.9.2"]


def test_an_exception_mid_sync_leaves_the_unapplied_services_dirty(monkeypatch):
    services, slices = stores()
    balancer = Balancer()
    table = ServiceTable(services, slices, None, "node-a", balancer)
    fill(services, slices, 4)
    table.sync()
    real_update = balancer.update
    calls = {"n": 0}

    def update_fails_on_third(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("injected: out of memory")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(balancer, "update", update_fails_on_third)
    fill(services, slices, 4, prefix="10.0.7")
    with pytest.raises(MemoryError):
        table.sync()
    assert table.pending
    # Applied before the failure: served already; the rest: still waiting, not forgotten.
    assert backends_of(table, "10.96.0.1") == ["10.0.7.1"]
    assert backends_of(table, "10.96.0.2") == ["10.0.7.2"]
    result = table.sync()
    assert result.services == 2 and not table.pending
    for i in range(4):
        assert backends_of(table, f"10.96.0.{i + 1}") == [f"10.0.7.{i + 1}"]


def test_a_zone_label_change_is_recomputed_in_chunks_without_losing_backends():
    services, slices = stores()
    nodes: Store[Any] = Store("nodes")
    table = ServiceTable(services, slices, nodes, "node-a", Balancer())
    fill(services, slices, 7)
    table.sync()
    nodes.upsert(
        "node-a",
        NODES.parse(
            {"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}}}
        ),
    )
    assert table.pending
    first = table.sync(max_services=3)
    assert first.services == 3 and table.pending
    while table.pending:
        first.merge(table.sync(max_services=3))
    assert first.services == 7
    # Every backend stayed offered: nothing to drain, nothing re-added.
    assert first.removed_backends == [] and first.added_backends == []


async def test_nft_that_cannot_start_forces_a_full_sync_that_applies_the_change(
    tmp_path: Path,
) -> None:
    services, slices = stores()
    table = ServiceTable(services, slices, None, "node-a", Balancer())
    written = tmp_path / "nft-input"
    writer = NftWriter(3000, command=[str(tmp_path / "no-such-nft")])
    syncer = RuleSyncer(table, writer, ProxierHealth(60))
    fill(services, slices, 2)
    before = counter("kpx_sync_failures_total")
    with pytest.raises(NftError, match="cannot start"):
        await syncer.sync_once()
    assert writer.needs_full and counter("kpx_sync_failures_total") - before == 1
    # The kernel state is unknown now; one more change arrives meanwhile.
    services.upsert("default/s9", service("s9", "10.96.0.9"))
    slices.upsert("default/s9-1", endpoint_slice("s9", ["10.0.0.9"]))
    writer.command = [
        sys.executable,
        "-c",
        f"import sys; open({str(written)!r}, 'w').write(sys.stdin.read())",
    ]
    await syncer.sync_once()
    script = written.read_text()
    assert script.startswith("add table")  # a full rewrite, not a delta
    for ip in ("10.96.0.1", "10.96.0.2", "10.96.0.9"):
        assert ip in script
    assert not writer.needs_full and not table.pending


async def test_failures_in_the_health_servers_and_the_writer_are_retried_until_converged(
    monkeypatch,
) -> None:
    services, slices = stores()
    table = ServiceTable(services, slices, None, "node-a", Balancer())
    writer = FakeWriter()
    health = ProxierHealth(60)
    service_health = ServiceHealthServers(health.healthy)
    real_sync = service_health.sync
    failures = {"health": 2}

    async def health_sync_fails(checks: Any) -> None:
        if failures["health"]:
            failures["health"] -= 1
            raise OSError("injected: health server failed")
        await real_sync(checks)

    monkeypatch.setattr(service_health, "sync", health_sync_fails)
    syncer = RuleSyncer(table, writer, health, service_health, min_sync_period=0.01)
    monkeypatch.setattr("kpx.sync.RETRY_AFTER_FAILURE", 0.05)
    writer.fail = 1
    fill(services, slices, 3)
    task = asyncio.create_task(syncer.run())
    try:
        for _ in range(200):
            if failures["health"] == 0 and syncer.syncs and not table.pending:
                break
            await asyncio.sleep(0.02)
        assert syncer.syncs >= 1 and not table.pending
        assert writer.calls  # applied in the end
        assert all(backends_of(table, f"10.96.0.{i + 1}") for i in range(3))
        assert health.healthy()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service_health.stop()


def test_the_affinity_table_is_bounded_and_evicts_the_least_recently_used():
    now = {"t": 0.0}
    table = AffinityTable(lambda: now["t"], timeout=3600, max_entries=3)
    backend = object()
    before = counter("kpx_affinity_evictions_total")
    for ip in ("a", "b", "c"):
        table.record(ip, backend)  # type: ignore[arg-type]
    table.record("a", backend)  # type: ignore[arg-type] # "a" used again: "b" is now oldest
    table.record("d", backend)  # type: ignore[arg-type]
    assert len(table) == 3
    assert table.get("b", 0) is None and table.get("a", 0) is backend
    assert counter("kpx_affinity_evictions_total") - before == 1


async def test_livez_is_503_while_a_background_task_crash_loops(tmp_path: Path, monkeypatch):
    import aiohttp

    import kpx.main
    from kpx.settings import load
    from kwatch.backoff import Backoff
    from kwatch.supervisor import Supervisor
    from tests.kpx.test_main import free_port

    failing = {"on": True}
    real_housekeeping = kpx.main._housekeeping

    async def housekeeping(*args: Any) -> None:
        if failing["on"]:
            raise RuntimeError("injected: housekeeping bug")
        await real_housekeeping(*args)

    monkeypatch.setattr(kpx.main, "_housekeeping", housekeeping)
    monkeypatch.setattr(
        kpx.main,
        "Supervisor",
        lambda **kw: Supervisor(backoff=lambda: Backoff(0.02, 0.05, jitter=0.1), **kw),
    )
    path = tmp_path / "cluster.yaml"
    path.write_text("")
    healthz, metrics = free_port(), free_port()
    settings = load(
        ["--mode", "ports", "--manifests", str(path), "--node-name", "node-a",
         "--healthz-bind-address", f"127.0.0.1:{healthz}",
         "--metrics-bind-address", f"127.0.0.1:{metrics}", "--drain-timeout", "0"]
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(kpx.main.serve(settings, stop))
    try:
        async with aiohttp.ClientSession() as http:

            async def status(url: str) -> int:
                try:
                    async with http.get(url) as resp:
                        return resp.status
                except aiohttp.ClientError:
                    return 0

            livez = f"http://127.0.0.1:{healthz}/livez"
            for _ in range(200):
                if await status(livez) == 503:
                    break
                await asyncio.sleep(0.05)
            assert await status(livez) == 503
            assert await status(f"http://127.0.0.1:{metrics}/healthz") == 503
            failing["on"] = False  # the next restart runs; a healthy run clears the verdict
            for _ in range(200):
                if await status(livez) == 200:
                    break
                await asyncio.sleep(0.05)
            assert await status(livez) == 200  # restarted and running: alive again
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await task


async def test_backends_removed_before_a_failing_chunk_are_still_drained(monkeypatch):
    services, slices = stores()
    balancer = Balancer()
    table = ServiceTable(services, slices, None, "node-a", balancer)
    removed: list[str] = []
    syncer = RuleSyncer(
        table, FakeWriter(), ProxierHealth(60), on_backend_removed=lambda b: removed.append(b.ip)
    )
    monkeypatch.setattr("kpx.sync.CHUNK", 2)
    fill(services, slices, 4)
    await syncer.sync_once()
    real_update = balancer.update
    calls = {"n": 0}

    def fails_in_second_chunk(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected: second chunk fails")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(balancer, "update", fails_in_second_chunk)
    fill(services, slices, 4, prefix="10.0.8")
    with pytest.raises(RuntimeError):
        await syncer.sync_once()
    # The first chunk (s0, s1) moved to new endpoints: the old ones are drained already.
    assert sorted(removed) == ["10.0.0.1", "10.0.0.2"]
    await syncer.sync_once()
    assert sorted(removed) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert not table.pending


def test_objects_with_null_in_every_optional_field_are_served():
    from kwatch.resources import SERVICES
    from tests.kwatch.test_reflector_garbage import NULLS

    services, slices = stores()
    table = ServiceTable(services, slices, None, "node-a", Balancer())
    for obj in NULLS:
        store = {"Service": services, "EndpointSlice": slices}.get(obj["kind"])
        if store is not None:
            parse = SERVICES.parse if obj["kind"] == "Service" else ENDPOINTSLICES.parse
            parsed = parse(obj)
            store.upsert(parsed.metadata.key, parsed)
    table.sync()
    # conditions null = ready; a port with a null name matches the Service's unnamed port.
    assert sorted(backends_of(table, "10.96.5.1")) == ["10.0.5.1", "10.0.5.2"]
    assert table.steering[(4, "10.96.5.1", 80)] == "serve"
