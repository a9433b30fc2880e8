"""The ClusterRoles grant exactly what the daemons use: dnsd and kpx run as subprocesses with
their deployed configuration against the test API server until they are ready and have seen
watch events; every request they make must be allowed by their ClusterRole, and every
permission the role grants must have been used."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apiserver import FakeApiServer, RequestRecord, free_port
from tests.deploy.manifests import (
    build,
    build_with_component,
    config_file,
    container,
    find,
)
from tests.deploy.rbac import Access, access_of, allows, default_non_resource, granted

NODE = "node-a"
CLUSTER: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}},
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]},
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": NODE}],
        "ports": [{"name": "http", "port": 8080}],
    },
    {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "default"},
        "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]},
    },
]
# Objects created once the daemon is ready, so that watch events flow too.
LATER: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "later"}},
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "api", "namespace": "later"},
        "spec": {"clusterIP": "10.96.0.21", "ports": [{"name": "http", "port": 80}]},
    },
]


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.2) as api:
        api.start()
        for obj in CLUSTER:
            api.create(obj)
        yield api


def literal_env(item: dict[str, Any]) -> dict[str, str]:
    """The container's plain `env` values (downward-API ones are the test's to supply)."""
    return {e["name"]: e["value"] for e in item.get("env", []) if "value" in e}


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def run_until_synced(
    argv: list[str], env: dict[str, str], readyz: str, api: FakeApiServer, log: Path
) -> list[RequestRecord]:
    """Start the daemon, wait for /readyz 200 and a watch on every listed resource, create
    LATER, let the events arrive, stop it with SIGTERM; the requests it made."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 20
            while not (get(readyz) == 200 and _watching_all_listed(api.requests)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            for obj in LATER:
                api.create(obj)
            time.sleep(0.6)  # events, then a bookmark (every 0.2 s)
            assert proc.poll() is None, log.read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return api.requests


def _watching_all_listed(requests: list[RequestRecord]) -> bool:
    listed = {r.resource for r in requests if r.verb == "list"}
    watched = {r.resource for r in requests if r.verb == "watch"}
    return bool(listed) and listed <= watched


def check_least_privilege(rules: list[dict[str, Any]], requests: list[RequestRecord]) -> None:
    assert requests, "the daemon made no request"
    used: set[Access] = set()
    for record in requests:
        access = access_of(record)
        if access is None:
            assert default_non_resource(record.path), f"non-resource request {record.path}"
            continue
        assert allows(rules, access), f"{access} ({record.path}) is not allowed by {rules}"
        used.add(access)
    unused = granted(rules) - used
    assert not unused, f"granted but never requested: {sorted(map(str, unused))}"


def dnsd_requests(
    objects: list[dict[str, Any]], api: FakeApiServer, tmp_path: Path
) -> list[RequestRecord]:
    config = config_file(objects, "dnsd-config", "dnsd.yaml", tmp_path / "dnsd.yaml")
    main = container(find(objects, "DaemonSet", "dnsd"), "dnsd")
    http = free_port()
    argv = [
        sys.executable, "-m", "dnsd.main", f"--config={config}",
        "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")),
        # Loopback instead of the node's addresses; everything else as deployed.
        "--listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{http}",
        "--upstream", f"127.0.0.1:{free_port()}", "--log-format", "json",
        # The deployed arguments a component adds (--multicluster=...).
        *[a for a in main.get("args", []) if not a.startswith(("--config", "--log-format"))],
    ]  # fmt: skip
    return run_until_synced(
        argv, literal_env(main), f"http://127.0.0.1:{http}/readyz", api, tmp_path / "dnsd.log"
    )


def test_dnsd_role_is_exactly_what_dnsd_requests(server: FakeApiServer, tmp_path: Path) -> None:
    objects = build("base")
    requests = dnsd_requests(objects, server, tmp_path)
    assert not any(r.resource == "pods" for r in requests)  # `pods: insecure` reads no pods
    check_least_privilege(find(objects, "ClusterRole", "kpx-dnsd:dnsd")["rules"], requests)


@pytest.mark.parametrize(
    "component",
    [
        "components/dnsd-pods-verified",
        "components/dnsd-autopath",
        "components/dnsd-namespace-isolation",
    ],
)
def test_dnsd_role_with_a_pod_watching_component_is_exactly_what_dnsd_requests(
    server: FakeApiServer, tmp_path: Path, component: str
) -> None:
    objects = build_with_component(component, tmp_path)
    requests = dnsd_requests(objects, server, tmp_path)
    assert any(r.resource == "pods" for r in requests)
    check_least_privilege(find(objects, "ClusterRole", "kpx-dnsd:dnsd")["rules"], requests)


def test_dnsd_role_with_multicluster_is_exactly_what_dnsd_requests(
    server: FakeApiServer, tmp_path: Path
) -> None:
    objects = build_with_component("components/dnsd-multicluster", tmp_path)
    requests = dnsd_requests(objects, server, tmp_path)
    imports = [r for r in requests if r.resource == "serviceimports"]
    assert {r.verb for r in imports} == {"list", "watch"}
    check_least_privilege(find(objects, "ClusterRole", "kpx-dnsd:dnsd")["rules"], requests)


def test_kpx_role_is_exactly_what_kpx_requests(server: FakeApiServer, tmp_path: Path) -> None:
    objects = build("base")
    config = config_file(objects, "kpx-config", "kpx.yaml", tmp_path / "kpx.yaml")
    main = container(find(objects, "DaemonSet", "kpx"), "kpx")
    metrics = free_port()
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        sys.executable, "-c", code, f"--config={config}",
        "--kubeconfig", str(server.write_kubeconfig(tmp_path / "kubeconfig")),
        # --mode ports: no nftables needed; the watches are the same as in nftables mode.
        "--mode", "ports", "--node-name", NODE,
        "--healthz-bind-address", f"127.0.0.1:{free_port()}",
        "--metrics-bind-address", f"127.0.0.1:{metrics}", "--log-format", "json",
    ]  # fmt: skip
    requests = run_until_synced(
        argv, literal_env(main), f"http://127.0.0.1:{metrics}/readyz", server,
        tmp_path / "kpx.log",
    )  # fmt: skip
    nodes = [r for r in requests if r.resource == "nodes"]
    assert nodes and all(r.query.get("fieldSelector") == f"metadata.name={NODE}" for r in nodes)
    check_least_privilege(find(objects, "ClusterRole", "kpx-dnsd:kpx")["rules"], requests)


def test_the_check_fails_for_a_missing_and_for_a_superfluous_permission() -> None:
    """The two failure modes, on a fixed request log."""
    records = [
        RequestRecord("GET", "/api/v1/services", {}, verb="list", resource="services"),
        RequestRecord("GET", "/apis/discovery.k8s.io/v1/endpointslices", {}, verb="watch",
                      resource="endpointslices"),
        RequestRecord("GET", "/version", {}),
    ]  # fmt: skip
    exact = [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["list"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["watch"]},
    ]
    check_least_privilege(exact, records)
    with pytest.raises(AssertionError, match="is not allowed"):
        check_least_privilege(exact[:1], records)
    with pytest.raises(AssertionError, match="is not allowed"):  # wrong group
        check_least_privilege(
            [exact[0], {"apiGroups": [""], "resources": ["endpointslices"], "verbs": ["watch"]}],
            records,
        )
    with pytest.raises(AssertionError, match="never requested"):
        check_least_privilege([*exact, {"apiGroups": [""], "resources": ["pods"],
                                        "verbs": ["list"]}], records)  # fmt: skip
    with pytest.raises(AssertionError, match="too broad"):
        check_least_privilege([*exact, {"apiGroups": [""], "resources": ["*"],
                                        "verbs": ["get"]}], records)  # fmt: skip
    with pytest.raises(AssertionError, match="non-resource"):
        check_least_privilege(exact, [*records, RequestRecord("GET", "/metrics", {})])
