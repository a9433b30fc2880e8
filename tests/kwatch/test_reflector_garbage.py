"""Chaos on the wire: bodies and watch lines that break the protocol, and objects full of
nulls. After each, the store converges to what the API server holds, and the watch task
never dies (no supervisor restart: the reflector handles all of it itself)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kwatch.backoff import Backoff
from kwatch.cluster import ClusterState
from kwatch.resources import ENDPOINTSLICES, NAMESPACES, PODS, SERVICES
from kwatch.settings import AccessSettings
from tests.apiserver import FakeApiServer
from tests.waiting import eventually


def service(name: str, ip: str, ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80}]},
    }


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.3, jitter=0.2)


def api_view(api: FakeApiServer, resource: str) -> dict[str, str]:
    out = {}
    for obj in api.list_objects(resource):
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
        out[key] = meta["resourceVersion"]
    return out


def store_view(state: ClusterState, resource: Any) -> dict[str, str]:
    return {k: o.metadata.resource_version for k, o in state.store(resource).items()}


def restarts() -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "kwatch_task_restarts":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


async def start(kubeconfig: Any, resources: list[Any]) -> ClusterState:
    state = ClusterState(resources, backoff=fast_backoff)
    await state.start(AccessSettings(kubeconfig=str(kubeconfig)), "kwatch-chaos")
    await asyncio.wait_for(state.wait_synced(), 10)
    return state


GARBAGE_LINES = {
    "not_json": b"this is not json {",
    "array": b"[1, 2, 3]",
    "string": b'"just a string"',
    "number": b"42",
    "null": b"null",
    "unknown_type": b'{"type": "SURPRISE", "object": {"metadata": {"name": "x"}}}',
    "no_type": b'{"object": {"metadata": {"name": "x", "namespace": "shop"}}}',
    "type_not_string": b'{"type": ["ADDED"], "object": {"metadata": {"name": "x"}}}',
    "no_object": b'{"type": "ADDED"}',
    "object_is_list": b'{"type": "MODIFIED", "object": [1]}',
    "name_not_string": b'{"type": "ADDED", "object": {"metadata": {"name": 5}}}',
    "metadata_is_list": b'{"type": "BOOKMARK", "object": {"metadata": []}}',
    "rv_is_object": b'{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": {}}}}',
    "error_code_text": b'{"type": "ERROR", "object": {"code": "bad", "message": {"a": 1}}}',
    "error_code_float": b'{"type": "ERROR", "object": {"code": 500.5, "reason": 7}}',
    "error_code_huge": b'{"type": "ERROR", "object": {"code": 1e400}}',
    "error_status_text": b'{"type": "ERROR", "object": "something broke"}',
    "error_status_null": b'{"type": "ERROR", "object": null}',
    "error_no_code": b'{"type": "ERROR", "object": {"kind": "Status"}}',
    "error_code_bool": b'{"type": "ERROR", "object": {"code": true}}',
    "error_410_text": b'{"type": "ERROR", "object": {"code": "410", "reason": "Expired"}}',
    "invalid_utf8": b'{"type": "ADDED", "object": {"metadata": {"name": "\xff\xfe"}}}',
}


@pytest.mark.parametrize("kind", sorted(GARBAGE_LINES))
async def test_garbage_on_the_watch_stream_is_survived_and_the_store_converges(
    api_server: FakeApiServer, kubeconfig: Any, kind: str
) -> None:
    api_server.load([service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    state = await start(kubeconfig, [SERVICES])
    before = restarts()
    try:
        await eventually(lambda: api_server.watch_count() == 1)
        api_server.inject_watch_lines([GARBAGE_LINES[kind]], "services")
        api_server.update(service("a", "10.96.0.11"))
        api_server.delete("services", "shop", "b")
        api_server.create(service("c", "10.96.0.3"))
        await eventually(
            lambda: store_view(state, SERVICES) == api_view(api_server, "services"), within=10
        )
        assert state.store(SERVICES).get("shop/a").spec.cluster_ip == "10.96.0.11"
        assert restarts() == before  # handled by the reflector, not by a crash
        assert state.supervisor.liveness() == (True, "ok")
        # The stream is still (or again) followed: one more change arrives.
        api_server.create(service("d", "10.96.0.4"))
        await eventually(lambda: "shop/d" in state.store(SERVICES), within=10)
    finally:
        await state.stop()


GARBAGE_LISTS = {
    "not_json": b"<html>proxy error</html>",
    "array": b"[]",
    "null": b"null",
    "items_not_array": b'{"metadata": {"resourceVersion": "5"}, "items": {"a": 1}}',
    "items_with_junk": b'{"metadata": {"resourceVersion": "5"}, "items": [1, "x", null]}',
    "no_resource_version": b'{"metadata": {}, "items": []}',
    "metadata_is_string": b'{"metadata": "x", "items": []}',
}


@pytest.mark.parametrize("kind", sorted(GARBAGE_LISTS))
async def test_garbage_list_bodies_are_retried_not_trusted(
    api_server: FakeApiServer, kubeconfig: Any, kind: str
) -> None:
    api_server.load([service("a", "10.96.0.1"), service("b", "10.96.0.2")])
    api_server.garbage_next(2, GARBAGE_LISTS[kind], verb="list", resource="services")
    state = await start(kubeconfig, [SERVICES])
    try:
        assert store_view(state, SERVICES) == api_view(api_server, "services")
        # A relist (after compaction) that gets garbage keeps the store as it was.
        api_server.garbage_next(2, GARBAGE_LISTS[kind], verb="list", resource="services")
        api_server.compact()
        api_server.delete("services", "shop", "a")
        api_server.drop_watches()
        await eventually(
            lambda: store_view(state, SERVICES) == api_view(api_server, "services"), within=10
        )
        assert state.supervisor.liveness() == (True, "ok")
    finally:
        await state.stop()


NULLS: list[dict[str, Any]] = [
    {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "nulls", "labels": None, "annotations": None},
        "spec": {"finalizers": None},
        "status": {"phase": None, "conditions": None},
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "all-null", "namespace": "nulls", "labels": None, "annotations": None},
        "spec": {
            "type": None,
            "clusterIP": "10.96.5.1",
            "clusterIPs": None,
            "ipFamilies": None,
            "ipFamilyPolicy": None,
            "selector": None,
            "externalIPs": None,
            "externalName": None,
            "externalTrafficPolicy": None,
            "internalTrafficPolicy": None,
            "sessionAffinity": None,
            "sessionAffinityConfig": {"clientIP": None},
            "loadBalancerIP": None,
            "healthCheckNodePort": None,
            "publishNotReadyAddresses": None,
            "ports": [
                {
                    "name": None,
                    "port": 80,
                    "protocol": None,
                    "targetPort": None,
                    "nodePort": None,
                    "appProtocol": None,
                }
            ],
        },
        "status": {"loadBalancer": {"ingress": None}},
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "all-null-1",
            "namespace": "nulls",
            "labels": {"kubernetes.io/service-name": "all-null"},
            "annotations": None,
            "ownerReferences": None,
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["10.0.5.1"],
                "conditions": None,
                "hostname": None,
                "nodeName": None,
                "zone": None,
                "hints": None,
                "targetRef": None,
                "deprecatedTopology": None,
            },
            {
                "addresses": ["10.0.5.2"],
                "conditions": {"ready": None, "serving": None, "terminating": None},
                "hints": {"forZones": None},
            },
        ],
        "ports": [{"name": None, "port": 8080, "protocol": None, "appProtocol": None}],
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "empty-null", "namespace": "nulls", "labels": None},
        "addressType": "IPv4",
        "endpoints": None,
        "ports": None,
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "nulls", "labels": None},
        "spec": None,
        "status": {"podIP": None, "podIPs": None, "phase": None},
    },
]


async def test_objects_with_null_in_every_optional_field_are_taken_as_unset(
    api_server: FakeApiServer, kubeconfig: Any
) -> None:
    state = await start(kubeconfig, [SERVICES, ENDPOINTSLICES, NAMESPACES, PODS])
    try:
        await eventually(lambda: api_server.watch_count() == 4)
        api_server.load(NULLS)
        for resource, name in (
            (SERVICES, "services"),
            (ENDPOINTSLICES, "endpointslices"),
            (NAMESPACES, "namespaces"),
            (PODS, "pods"),
        ):
            await eventually(
                lambda r=resource, n=name: store_view(state, r) == api_view(api_server, n)
            )
        svc = state.store(SERVICES).get("nulls/all-null")
        assert svc.spec.ports[0].protocol == "TCP" and svc.spec.session_affinity == "None"
        eps = state.store(ENDPOINTSLICES).get("nulls/all-null-1")
        assert [list(e.addresses) for e in eps.endpoints] == [["10.0.5.1"], ["10.0.5.2"]]
    finally:
        await state.stop()


async def test_a_crashed_watch_restarts_from_the_store_it_had_without_a_relist(
    api_server: FakeApiServer, kubeconfig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kwatch.reflector import Reflector

    api_server.load([service("a", "10.96.0.1")])
    state = await start(kubeconfig, [SERVICES])
    real_apply = Reflector._apply
    crashes = {"left": 1}

    def apply_crashes_once(self: Reflector, event: dict[str, Any], rv: str) -> str:
        if crashes["left"] and event.get("type") == "ADDED":
            crashes["left"] -= 1
            raise RuntimeError("injected: a bug in the reflector")
        return real_apply(self, event, rv)

    monkeypatch.setattr(Reflector, "_apply", apply_crashes_once)
    before = restarts()
    lists = api_server.count("list", "services")
    try:
        await eventually(lambda: api_server.watch_count() == 1)
        api_server.create(service("b", "10.96.0.2"))
        await eventually(lambda: restarts() > before, within=5)
        await eventually(
            lambda: store_view(state, SERVICES) == api_view(api_server, "services"), within=10
        )
        assert api_server.count("list", "services") == lists  # resumed, not relisted
        assert state.supervisor.liveness() == (True, "ok")
    finally:
        await state.stop()
