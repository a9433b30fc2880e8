"""Tests for the fake Kubernetes API server, over real HTTPS like the daemons use it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.apiserver import AlreadyExists, FakeApiServer, NotFound, free_port

REPO = Path(__file__).resolve().parent.parent
UNAUTHORIZED = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "Unauthorized",
    "reason": "Unauthorized",
    "code": 401,
}


# ---- helpers ------------------------------------------------------------------------------


@pytest.fixture
def srv() -> Iterator[FakeApiServer]:
    server = FakeApiServer(token="t0k3n", bookmark_interval=0.2)
    server.start()
    try:
        yield server
    finally:
        server.close()


def service(name: str, namespace: str = "default", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }


def pod(name: str, node: str, phase: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": phase},
    }


def call(
    srv: FakeApiServer,
    path: str,
    method: str = "GET",
    body: dict[str, Any] | None = None,
    token: str | None = "default",
    client_cert: bool = False,
    params: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTPS request with urllib; returns (status, headers, parsed body)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {srv.token if token == 'default' else token}"
    url = srv.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    ctx = srv.ssl_context(client_cert=client_cert)
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
            status, resp_headers, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, resp_headers, raw = err.code, dict(err.headers), err.read()
    is_json = resp_headers.get("Content-Type", "").startswith("application/json")
    return status, resp_headers, json.loads(raw) if is_json else raw.decode()


def names(items: list[dict[str, Any]]) -> list[str]:
    return [f"{i['metadata'].get('namespace', '')}/{i['metadata']['name']}" for i in items]


class Watch:
    """An open watch stream read line by line."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, wait_s: float = 5.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.response.content.readline(), wait_s)
        assert line, "watch stream ended"
        event: dict[str, Any] = json.loads(line)
        return event

    async def next_event(self, wait_s: float = 5.0) -> dict[str, Any]:
        """The next event that is not a BOOKMARK."""
        while True:
            event = await self.next(wait_s)
            if event["type"] != "BOOKMARK":
                return event

    async def rest(self, wait_s: float = 5.0) -> list[dict[str, Any]]:
        """Every remaining event until the server ends the stream."""
        events = []
        async with asyncio.timeout(wait_s):
            while line := await self.response.content.readline():
                events.append(json.loads(line))
        return events


@asynccontextmanager
async def watch(srv: FakeApiServer, path: str, **params: str) -> AsyncIterator[Watch]:
    connector = aiohttp.TCPConnector(ssl=srv.ssl_context())
    async with aiohttp.ClientSession(connector=connector, headers=srv.auth_headers) as session:
        query = {"watch": "true", **params}
        async with session.get(srv.url + path, params=query) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            try:
                yield Watch(response)
            finally:
                # Abort rather than close: a graceful TLS shutdown would still be waiting
                # for the server's close_notify when the test's loop is closed.
                if response.connection is not None and response.connection.transport:
                    response.connection.transport.abort()
        await asyncio.sleep(0)  # let the aborted socket close


def brief(event: dict[str, Any]) -> tuple[str, str, int]:
    meta = event["object"]["metadata"]
    return event["type"], meta["name"], int(meta["resourceVersion"])


# ---- auth ---------------------------------------------------------------------------------


def test_auth_token_cert_and_401(srv: FakeApiServer) -> None:
    assert call(srv, "/api/v1/services", token=None)[::2] == (401, UNAUTHORIZED)
    assert call(srv, "/api/v1/services", token="wrong")[::2] == (401, UNAUTHORIZED)
    status, _, body = call(srv, "/api/v1/services")
    assert (status, body["kind"]) == (200, "ServiceList")
    status, _, body = call(srv, "/api/v1/namespaces/x/pods", token=None, client_cert=True)
    assert (status, body["kind"]) == (200, "PodList")
    assert [r.user for r in srv.requests] == [None, None, "token", "cert"]
    assert [r.status for r in srv.requests] == [401, 401, 200, 200]
    assert call(srv, "/healthz", token=None)[::2] == (200, "ok")


def test_forbidden_resource(srv: FakeApiServer) -> None:
    srv.forbid("endpointslices")
    status, _, body = call(srv, "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices")
    assert (status, body["reason"], body["code"]) == (403, "Forbidden", 403)
    assert call(srv, "/api/v1/services")[0] == 200
    srv.allow("endpointslices")
    assert call(srv, "/apis/discovery.k8s.io/v1/endpointslices")[0] == 200


# ---- list -----------------------------------------------------------------------------------


def test_list_pagination_is_a_consistent_snapshot(srv: FakeApiServer) -> None:
    srv.load([service(f"s{i:02d}", f"ns{i % 3}") for i in range(25)])
    expected = sorted(names(srv.list_objects("services")))
    status, _, page = call(srv, "/api/v1/services", params={"limit": "10"})
    assert status == 200
    rv = page["metadata"]["resourceVersion"]
    assert rv == str(srv.resource_version)
    assert page["metadata"]["remainingItemCount"] == 15
    assert all("kind" not in item and "apiVersion" not in item for item in page["items"])
    # Writes between pages must not show up in later pages.
    srv.create(service("zzz", "ns2"))
    srv.delete("services", "ns2", "s23")
    items = page["items"]
    while token := page["metadata"].get("continue"):
        status, _, page = call(srv, "/api/v1/services", params={"limit": "10", "continue": token})
        assert status == 200
        assert page["metadata"]["resourceVersion"] == rv
        items += page["items"]
    assert names(items) == expected
    assert "remainingItemCount" not in page["metadata"]

    _, _, page = call(srv, "/api/v1/namespaces/ns1/services", params={"limit": "3"})
    assert names(page["items"]) == ["ns1/s01", "ns1/s04", "ns1/s07"]
    _, _, full = call(srv, "/api/v1/namespaces/ns1/services")
    assert len(full["items"]) == 8 and "continue" not in full["metadata"]


def test_continue_after_compact_is_410(srv: FakeApiServer) -> None:
    srv.load([service(f"s{i}") for i in range(5)])
    _, _, page = call(srv, "/api/v1/services", params={"limit": "2"})
    srv.compact()
    params = {"limit": "2", "continue": page["metadata"]["continue"]}
    status, _, body = call(srv, "/api/v1/services", params=params)
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)
    assert body["message"].startswith("The provided continue parameter is too old")
    assert call(srv, "/api/v1/services", params={"continue": "garbage!"})[0] == 400


def test_large_load_and_paged_list(srv: FakeApiServer) -> None:
    started = time.monotonic()
    srv.load([service(f"svc-{i}", f"ns-{i % 50}") for i in range(10_000)])
    slices = [
        {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": f"svc-{i}-abc", "namespace": f"ns-{i % 50}"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [f"10.1.{i // 250}.{i % 250}"]}],
            "ports": [{"port": 8080}],
        }
        for i in range(10_000)
    ]
    srv.load(slices)
    assert time.monotonic() - started < 10
    seen, token = 0, ""
    for _ in range(100):
        params = {"limit": "500", **({"continue": token} if token else {})}
        _, _, page = call(srv, "/apis/discovery.k8s.io/v1/endpointslices", params=params)
        seen += len(page["items"])
        if not (token := page["metadata"].get("continue", "")):
            break
    assert seen == 10_000


# ---- selectors ------------------------------------------------------------------------------


def test_label_and_field_selectors_on_list(srv: FakeApiServer) -> None:
    srv.load(
        [
            service("web", app="web", tier="front"),
            service("api", app="api", tier="back"),
            service("db", app="db"),
            service("other", "kube-system", app="web"),
        ]
    )
    cases = {
        "app=web": ["default/web", "kube-system/other"],
        "app==web,tier=front": ["default/web"],
        "app!=web": ["default/api", "default/db"],
        "app in (api, db)": ["default/api", "default/db"],
        "app notin (web)": ["default/api", "default/db"],
        "tier": ["default/api", "default/web"],
        "!tier": ["default/db", "kube-system/other"],
    }
    for selector, expected in cases.items():
        _, _, body = call(srv, "/api/v1/services", params={"labelSelector": selector})
        assert names(body["items"]) == expected, selector
    params = {"fieldSelector": "metadata.namespace!=default,metadata.name=other"}
    assert names(call(srv, "/api/v1/services", params=params)[2]["items"]) == ["kube-system/other"]

    srv.load([pod("p1", "n1", "Running"), pod("p2", "n2", "Running"), pod("p3", "n1", "Pending")])
    params = {"fieldSelector": "spec.nodeName=n1,status.phase==Running"}
    assert names(call(srv, "/api/v1/pods", params=params)[2]["items"]) == ["default/p1"]

    for bad in ({"labelSelector": "app in ("}, {"labelSelector": "a b"}):
        status, _, body = call(srv, "/api/v1/services", params=bad)
        assert (status, body["reason"]) == (400, "BadRequest"), bad
    status, _, body = call(srv, "/api/v1/services", params={"fieldSelector": "spec.nodeName=x"})
    assert (status, body["message"]) == (400, "field label not supported: spec.nodeName")


async def test_selector_watch_transitions(srv: FakeApiServer) -> None:
    srv.create(service("a", app="web"))
    srv.create(service("b", app="db"))
    async with watch(srv, "/api/v1/namespaces/default/services", labelSelector="app=web") as w:
        assert brief(await w.next_event())[:2] == ("ADDED", "a")
        leave = srv.update(service("a", app="other"))
        srv.update(service("b", app="web"))  # starts matching
        srv.update(service("b", app="web", extra="1"))  # still matching
        srv.create(service("c", app="db"))  # never matches
        srv.delete("services", "default", "b")
        srv.create(service("end", app="web"))
        got = [await w.next_event() for _ in range(5)]
    assert [e["type"] for e in got] == ["DELETED", "ADDED", "MODIFIED", "DELETED", "ADDED"]
    assert [e["object"]["metadata"]["name"] for e in got] == ["a", "b", "b", "b", "end"]
    # Leaving the selector: previous content (still labelled web), the update's rv.
    left = got[0]["object"]["metadata"]
    assert left["labels"] == {"app": "web"}
    assert left["resourceVersion"] == leave["metadata"]["resourceVersion"]


async def test_field_selector_watch(srv: FakeApiServer) -> None:
    async with watch(srv, "/api/v1/pods", fieldSelector="spec.nodeName=n1") as w:
        srv.create(pod("p1", "n2", "Pending"))
        srv.create(pod("p2", "n1", "Pending"))
        assert brief(await w.next_event())[:2] == ("ADDED", "p2")


# ---- watch ----------------------------------------------------------------------------------


async def test_watch_replay_then_live_in_order(srv: FakeApiServer) -> None:
    first = srv.create(service("a"))
    srv.create(service("b"))
    since = first["metadata"]["resourceVersion"]
    async with watch(srv, "/api/v1/services", resourceVersion=since) as w:
        assert brief(await w.next_event()) == ("ADDED", "b", int(since) + 1)
        srv.update({**service("b"), "spec": {"ports": [{"port": 81}]}})
        srv.delete("services", "default", "a")
        status, _, _ = call(
            srv, "/api/v1/namespaces/default/services", "POST", service("c", app="x")
        )
        assert status == 201
        events = [brief(await w.next_event()) for _ in range(3)]
    assert [e[:2] for e in events] == [("MODIFIED", "b"), ("DELETED", "a"), ("ADDED", "c")]
    rvs = [e[2] for e in events]
    assert rvs == sorted(rvs) and rvs[-1] == srv.resource_version


async def test_watch_without_rv_starts_with_synthetic_adds(srv: FakeApiServer) -> None:
    srv.load([service("x"), service("y", "other")])
    async with watch(srv, "/api/v1/services") as w:
        assert [brief(await w.next_event())[:2] for _ in range(2)] == [
            ("ADDED", "x"),
            ("ADDED", "y"),
        ]
        srv.create(service("z"))
        event = await w.next_event()
    assert brief(event)[:2] == ("ADDED", "z")
    assert event["object"]["kind"] == "Service" and event["object"]["apiVersion"] == "v1"


async def test_watch_bookmarks(srv: FakeApiServer) -> None:
    srv.create(service("a"))
    async with watch(srv, "/api/v1/services", resourceVersion="1", allowWatchBookmarks="true") as w:
        srv.create(service("b"))
        assert (await w.next())["type"] == "ADDED"
        bookmark = await w.next(wait_s=2)
    assert bookmark == {
        "type": "BOOKMARK",
        "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "2"}},
    }


async def test_watch_from_compacted_rv_gets_410_error_event(srv: FakeApiServer) -> None:
    srv.create(service("a"))
    srv.create(service("b"))
    srv.compact()
    async with watch(srv, "/api/v1/services", resourceVersion="1") as w:
        events = await w.rest()
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 1 (2)",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    # From the current rv, a watch is fine.
    async with watch(srv, "/api/v1/services", resourceVersion="2", timeoutSeconds="1") as w:
        assert await w.rest() == []


async def test_history_limit_expires_old_rvs() -> None:
    with FakeApiServer(history_limit=3) as srv:
        srv.load([service(f"s{i}") for i in range(6)])
        async with watch(srv, "/api/v1/services", resourceVersion="2") as w:
            assert (await w.rest())[0]["object"]["code"] == 410
        async with watch(srv, "/api/v1/services", resourceVersion="3", timeoutSeconds="1") as w:
            assert [brief(e)[2] for e in await w.rest()] == [4, 5, 6]


async def test_watch_timeout_seconds_ends_stream(srv: FakeApiServer) -> None:
    started = time.monotonic()
    async with watch(srv, "/api/v1/nodes", timeoutSeconds="1") as w:
        assert await w.rest() == []
    assert 0.8 < time.monotonic() - started < 3


async def test_drop_watches_ends_streams_cleanly(srv: FakeApiServer) -> None:
    async with watch(srv, "/api/v1/namespaces") as w:
        srv.create({"kind": "Namespace", "metadata": {"name": "ns1"}})
        event = await w.next_event()
        await asyncio.to_thread(srv.drop_watches)
        assert await w.rest() == []
    assert event["object"]["status"]["phase"] == "Active"
    assert srv.watch_count() == 0


async def test_slow_watcher_is_dropped_not_blocking_writers() -> None:
    with FakeApiServer(watch_queue_limit=5) as srv:
        async with watch(srv, "/api/v1/services") as w:
            srv.pause()  # the stream stops delivering, so its queue fills up
            for i in range(20):
                srv.create(service(f"s{i}"))
            srv.resume()
            events = await w.rest()
        assert len(events) < 20
        assert len(srv.list_objects("services")) == 20


async def test_watch_from_future_rv_is_504(srv: FakeApiServer) -> None:
    params = {"watch": "1", "resourceVersion": "99"}
    status, _, body = await asyncio.to_thread(call, srv, "/api/v1/services", params=params)
    assert (status, body["reason"]) == (504, "Timeout")


# ---- faults, writes, lifecycle --------------------------------------------------------------


def test_fail_next_429_with_retry_after(srv: FakeApiServer) -> None:
    srv.fail_next(2, status=429, retry_after=3, verb="list", resource="services")
    assert call(srv, "/api/v1/pods")[0] == 200
    for _ in range(2):
        status, headers, body = call(srv, "/api/v1/services")
        assert (status, headers["Retry-After"]) == (429, "3")
        assert (body["kind"], body["reason"], body["code"]) == ("Status", "TooManyRequests", 429)
    assert call(srv, "/api/v1/services")[0] == 200
    srv.fail_next(1)
    status, headers, body = call(srv, "/api/v1/nodes")
    assert (status, body["reason"], "Retry-After" in headers) == (500, "InternalError", False)
    assert srv.count(verb="list", resource="services") == 3


def test_http_writes_and_errors(srv: FakeApiServer) -> None:
    base = "/api/v1/namespaces/default/services"
    status, _, created = call(srv, base, "POST", service("a"))
    assert (status, created["kind"], created["metadata"]["resourceVersion"]) == (
        201,
        "Service",
        "1",
    )
    assert created["spec"]["clusterIP"].startswith("10.96.")
    status, _, body = call(srv, base, "POST", service("a"))
    assert (status, body["reason"]) == (409, "AlreadyExists")
    stale = {**created, "spec": {**created["spec"], "ports": [{"port": 82}]}}
    stale["metadata"] = {**created["metadata"], "resourceVersion": "0"}
    assert call(srv, f"{base}/a", "PUT", stale)[2]["reason"] == "Conflict"
    stale["metadata"]["resourceVersion"] = "1"
    status, _, updated = call(srv, f"{base}/a", "PUT", stale)
    assert (status, updated["metadata"]["resourceVersion"]) == (200, "2")
    assert updated["spec"]["clusterIP"] == created["spec"]["clusterIP"]
    status, _, deleted = call(srv, f"{base}/a", "DELETE")
    assert (status, deleted["metadata"]["name"], deleted["metadata"]["resourceVersion"]) == (
        200,
        "a",
        "3",
    )
    status, _, body = call(srv, f"{base}/a")
    assert (status, body["reason"]) == (404, "NotFound")
    assert call(srv, "/api/v1/nosuch")[2]["reason"] == "NotFound"
    assert call(srv, "/apis")[2]["groups"][0]["name"] == "discovery.k8s.io"
    assert call(srv, "/version")[2]["major"] == "1"
    assert [r.verb for r in srv.requests[:4]] == ["create", "create", "update", "update"]
    srv.create(service("b"))
    with pytest.raises(AlreadyExists):
        srv.create(service("b"))
    with pytest.raises(NotFound):
        srv.delete("services", "default", "nope")
    assert srv.get("services", "default", "nope") is None


def test_stop_and_start_on_the_same_port() -> None:
    port = free_port()
    with FakeApiServer(port=port) as srv:
        srv.stop()  # "API down at start": the kubeconfig exists, nothing listens yet
        with pytest.raises(urllib.error.URLError):
            call(srv, "/healthz")
        srv.create(service("a"))
        srv.start()
        assert srv.url == f"https://127.0.0.1:{port}"
        assert names(call(srv, "/api/v1/services")[2]["items"]) == ["default/a"]
        srv.stop()
        srv.start()
        assert srv.port == port and call(srv, "/api/v1/services/")[0] == 200
        assert srv.get("services", "default", "a") is not None


def test_pause_hangs_requests_until_resume(srv: FakeApiServer) -> None:
    srv.pause()
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(call(srv, "/api/v1/services")[0]))
    thread.start()
    thread.join(timeout=0.5)
    assert thread.is_alive() and results == []
    srv.resume()
    thread.join(timeout=5)
    assert results == [200]


# ---- real clients ---------------------------------------------------------------------------


@contextmanager
def official_client(kubeconfig: Path) -> Iterator[Any]:
    """An ApiClient of the official `kubernetes` package configured from `kubeconfig`."""
    from kubernetes import client, config

    # A private Configuration: loading must not change the process-wide default.
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), client_configuration=configuration
    )
    with client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.mark.parametrize("client_cert", [False, True])
def test_official_kubernetes_client_via_kubeconfig(
    srv: FakeApiServer, tmp_path: Path, client_cert: bool
) -> None:
    from kubernetes import client

    srv.load([service("a", app="x"), service("b"), service("c", "elsewhere")])
    kubeconfig = srv.write_kubeconfig(tmp_path / "kc.yaml", client_cert=client_cert)
    with official_client(kubeconfig) as api_client:
        services = client.CoreV1Api(api_client).list_namespaced_service("default")
        body = api_client.sanitize_for_serialization(services)
    assert names(body["items"]) == ["default/a", "default/b"]
    assert body["items"][0]["metadata"]["labels"] == {"app": "x"}
    assert srv.requests[-1].user == ("cert" if client_cert else "token")


def test_kubernetes_client_wrong_token_is_401(srv: FakeApiServer, tmp_path: Path) -> None:
    from kubernetes import client

    kubeconfig = srv.write_kubeconfig(tmp_path / "kc.yaml", token="other")
    with official_client(kubeconfig) as api_client:
        with pytest.raises(client.ApiException) as excinfo:
            client.CoreV1Api(api_client).list_node()
    assert excinfo.value.status == 401


def test_cli_serves_loaded_objects_until_sigterm(tmp_path: Path) -> None:
    objects = tmp_path / "objs.json"
    objects.write_text(json.dumps([service(f"s{i}") for i in range(3)]))
    manifests = tmp_path / "more.yaml"
    manifests.write_text(
        "kind: Namespace\nmetadata: {name: a}\n---\nkind: Node\nmetadata: {name: n}\n"
    )
    kubeconfig = tmp_path / "kc.yaml"
    command = [sys.executable, "-m", "tests.apiserver", "--port", "0", "--kubeconfig"]
    command += [str(kubeconfig), "--load", str(objects), str(manifests)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["kubeconfig"] == str(kubeconfig) and kubeconfig.exists()
            request = urllib.request.Request(
                ready["url"] + "/api/v1/services", headers={"Authorization": "Bearer t0k3n"}
            )
            ctx = ssl.create_default_context(cafile=ready["ca"])
            with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
                assert len(json.loads(resp.read())["items"]) == 3
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
