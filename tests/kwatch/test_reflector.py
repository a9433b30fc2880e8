"""The watch layer against the fake API server, through a kubeconfig, as against a cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from kwatch.backoff import Backoff
from kwatch.cluster import ClusterState
from kwatch.health import HealthServer
from kwatch.resources import ENDPOINTSLICES, SERVICES
from kwatch.settings import AccessSettings
from kwatch.store import EventType, Store
from tests.apiserver import FakeApiServer
from tests.waiting import eventually


def service(name: str, ip: str, ns: str = "shop") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80}]},
    }


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.4, jitter=0.2)


async def started(kubeconfig: Path, page_size: int | None = None, **kw) -> ClusterState:
    state = ClusterState([SERVICES], backoff=fast_backoff)
    await state.start(AccessSettings(kubeconfig=str(kubeconfig), **kw), "kwatch-test")
    return state


@pytest.fixture
async def state(kubeconfig):
    st = await started(kubeconfig)
    yield st
    await st.stop()


def keys(state: ClusterState) -> list[str]:
    return sorted(state.store(SERVICES).keys())


async def test_initial_sync_lists_every_page_then_watches(api_server, kubeconfig, monkeypatch):
    api_server.load([service(f"s{i:04d}", f"10.96.{i // 250}.{i % 250 + 1}") for i in range(250)])
    state = await started(kubeconfig)
    try:
        await asyncio.wait_for(state.wait_synced(), 10)
        assert len(state.store(SERVICES)) == 250
        # 100 per page: three list requests for 250 objects, then one watch.
        assert api_server.count("list", "services") == 3
        await eventually(lambda: api_server.count("watch", "services") == 1)
    finally:
        await state.stop()


async def test_added_modified_deleted_arrive_in_order(api_server, state):
    await asyncio.wait_for(state.wait_synced(), 5)
    seen: list[tuple[str, str, str]] = []
    state.store(SERVICES).subscribe(
        lambda e: seen.append((e.type.value, e.key, e.obj.spec.cluster_ip))
    )
    await eventually(lambda: api_server.watch_count() == 1)
    api_server.create(service("a", "10.96.0.1"))
    api_server.update(service("a", "10.96.0.2"))
    api_server.create(service("b", "10.96.0.3"))
    api_server.delete("services", "shop", "a")
    await eventually(lambda: len(seen) == 4)
    assert seen == [
        ("ADDED", "shop/a", "10.96.0.1"),
        ("MODIFIED", "shop/a", "10.96.0.2"),
        ("ADDED", "shop/b", "10.96.0.3"),
        ("DELETED", "shop/a", "10.96.0.2"),
    ]


async def test_dropped_watch_resumes_from_last_version_without_relisting(api_server, kubeconfig):
    api_server.create(service("a", "10.96.0.1"))
    state = await started(kubeconfig)
    try:
        await asyncio.wait_for(state.wait_synced(), 5)
        await eventually(lambda: api_server.watch_count() == 1)
        for round_ in range(3):
            api_server.drop_watches()
            # A change made while no watch is open must still arrive, by resuming from the rv.
            api_server.create(service(f"gap{round_}", f"10.96.1.{round_ + 1}"))
            await eventually(lambda r=round_: f"shop/gap{r}" in keys(state))
    finally:
        await state.stop()
    assert api_server.count("list", "services") == 1
    watches = [r for r in api_server.requests if r.verb == "watch"]
    assert len(watches) >= 4
    assert all(r.query.get("resourceVersion") not in (None, "", "0") for r in watches)
    assert all(r.query.get("allowWatchBookmarks") == "true" for r in watches)


async def test_compacted_history_relists_and_reports_objects_deleted_in_the_gap(api_server, state):
    api_server.create(service("keep", "10.96.0.1"))
    api_server.create(service("gone", "10.96.0.2"))
    await asyncio.wait_for(state.wait_synced(), 5)
    await eventually(lambda: keys(state) == ["shop/gone", "shop/keep"])
    deleted: list[str] = []
    state.store(SERVICES).subscribe(
        lambda e: deleted.append(e.key) if e.type is EventType.DELETED else None
    )
    # Cut the client off its watch, change things while it cannot watch, compact history.
    api_server.fail_next(10_000, status=503, verb="watch")
    api_server.drop_watches()
    await eventually(lambda: any(r.status == 503 for r in api_server.requests))
    api_server.delete("services", "shop", "gone")
    api_server.create(service("new", "10.96.0.3"))
    api_server.compact()
    api_server.clear_faults()
    await eventually(lambda: keys(state) == ["shop/keep", "shop/new"])
    assert deleted == ["shop/gone"]
    assert api_server.count("list", "services") == 2


async def test_relist_reuses_the_objects_it_already_holds(api_server, state, monkeypatch):
    """Issue 14: a 410 relist hands the store the instance it already holds for every object
    whose resourceVersion did not change, so it never keeps two copies of the store."""
    api_server.create(service("same", "10.96.0.1"))
    api_server.create(service("edited", "10.96.0.2"))
    await asyncio.wait_for(state.wait_synced(), 5)
    await eventually(lambda: keys(state) == ["shop/edited", "shop/same"])
    store = state.store(SERVICES)
    same, edited = store.get("shop/same"), store.get("shop/edited")
    api_server.fail_next(10_000, status=503, verb="watch")
    api_server.drop_watches()
    await eventually(lambda: any(r.status == 503 for r in api_server.requests))
    changed = service("edited", "10.96.0.2")
    changed["spec"]["ports"][0]["port"] = 8080
    api_server.update(changed)
    relisted: list[dict] = []
    replace = Store.replace

    def recording(self: Store, objects: dict, resource_version: str = "") -> int:
        relisted.append(dict(objects))
        return replace(self, objects, resource_version)

    monkeypatch.setattr(Store, "replace", recording)
    api_server.compact()
    api_server.clear_faults()
    await eventually(lambda: store.get("shop/edited") is not edited)
    assert relisted[0]["shop/same"] is same
    assert relisted[0]["shop/edited"].spec.ports[0].port == 8080
    assert store.get("shop/same") is same
    assert api_server.count("list", "services") == 2


async def test_api_down_at_start_retries_and_readyz_follows_sync(tmp_path):
    server = FakeApiServer(bookmark_interval=0.5)  # port chosen, not listening yet
    kubeconfig = server.write_kubeconfig(tmp_path / "kc.yaml")
    state = await started(kubeconfig)
    health = HealthServer("127.0.0.1:0", ready=state.readiness)
    await health.start()
    url = f"http://127.0.0.1:{health.port}"
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(0.5)
            async with http.get(url + "/readyz") as resp:
                assert resp.status == 503
                assert "services" in await resp.text()
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
            server.start()
            server.create(service("a", "10.96.0.1"))
            await asyncio.wait_for(state.wait_synced(), 10)
            async with http.get(url + "/readyz") as resp:
                assert resp.status == 200
            async with http.get(url + "/metrics") as resp:
                text = await resp.text()
                assert 'kwatch_synced{resource="services"} 1.0' in text
        assert keys(state) == ["shop/a"]
    finally:
        await health.stop()
        await state.stop()
        server.close()


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_error_storms_back_off_instead_of_hammering(api_server, kubeconfig, status):
    api_server.fail_next(30, status=status, verb="list")
    state = await started(kubeconfig)
    try:
        await asyncio.sleep(1.5)
        # fast_backoff doubles from 50 ms up to 400 ms: about 6 attempts in 1.5 s, not hundreds.
        attempts = api_server.count("list", "services")
        assert 3 <= attempts <= 12
        assert not state.synced
    finally:
        await state.stop()


async def test_retry_after_is_honoured(api_server, kubeconfig):
    api_server.fail_next(1, status=429, retry_after=1, verb="list")
    state = await started(kubeconfig)
    try:
        await asyncio.sleep(0.6)
        assert api_server.count("list", "services") == 1  # still waiting out Retry-After
        await asyncio.wait_for(state.wait_synced(), 5)
    finally:
        await state.stop()


async def test_unauthorized_is_logged_once_and_retried(api_server, tmp_path, capsys):
    kubeconfig = api_server.write_kubeconfig(tmp_path / "kc.yaml", token="wrong")
    state = await started(kubeconfig)
    try:
        await eventually(lambda: sum(r.status == 401 for r in api_server.requests) >= 4)
        assert not state.synced
        api_server.token = "wrong"  # the credentials get fixed server-side
        await asyncio.wait_for(state.wait_synced(), 5)
    finally:
        await state.stop()
    captured = capsys.readouterr()
    logged = captured.out + captured.err
    assert logged.count("api_unavailable") == 1
    assert "401" in logged and "api_recovered" in logged


async def test_invalid_object_is_skipped_and_the_rest_kept(api_server, state):
    api_server.create(service("good", "10.96.0.1"))
    api_server.create(service("bad", "10.96.0.999"))
    await asyncio.wait_for(state.wait_synced(), 5)
    assert keys(state) == ["shop/good"]
    await eventually(lambda: api_server.watch_count() == 1)
    # A later invalid update keeps the last good version; a valid one replaces it.
    api_server.update(service("good", "not-an-ip"))
    api_server.create(service("after", "10.96.0.5"))
    await eventually(lambda: "shop/after" in keys(state))
    assert state.store(SERVICES).get("shop/good").spec.cluster_ip == "10.96.0.1"


async def test_client_certificate_kubeconfig(api_server, tmp_path):
    kubeconfig = api_server.write_kubeconfig(tmp_path / "kc.yaml", client_cert=True)
    api_server.create(service("a", "10.96.0.1"))
    state = await started(kubeconfig)
    try:
        await asyncio.wait_for(state.wait_synced(), 5)
        assert keys(state) == ["shop/a"]
        assert api_server.requests[0].user == "cert"
    finally:
        await state.stop()


async def test_missing_kubeconfig_is_reported_and_retried(tmp_path, capsys):
    missing = tmp_path / "absent.yaml"
    state = await started(missing)
    try:
        await asyncio.sleep(0.3)
        assert not state.synced
    finally:
        await state.stop()
    captured = capsys.readouterr()
    logged = captured.out + captured.err
    assert logged.count("cluster_access_failed") == 1 and str(missing) in logged


async def test_endpointslices_are_indexed_by_service(api_server, kubeconfig):
    api_server.create(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-1",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.1"]}],
            "ports": [{"name": "http", "port": 8080}],
        }
    )
    state = ClusterState([ENDPOINTSLICES], backoff=fast_backoff)
    await state.start(AccessSettings(kubeconfig=str(kubeconfig)), "kwatch-test")
    try:
        await asyncio.wait_for(state.wait_synced(), 5)
        slices = state.store(ENDPOINTSLICES).by_index("service", "shop/web")
        assert [s.endpoints[0].addresses for s in slices] == [("10.1.0.1",)]
    finally:
        await state.stop()
