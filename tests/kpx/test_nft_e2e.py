"""kpx end to end in nftables mode: the real daemon (a subprocess in the node namespace) fed by a
manifest, real pods, a real client, real nftables."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.kpx.netns import Topology
from tests.waiting import wait_for

PROXY_PORT = 10262


def manifest(pods: list[Any]) -> str:
    endpoints = [
        {"addresses": [p.ipv4], "nodeName": "node-b", "conditions": {"ready": True}} for p in pods
    ]
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ipFamilies": ["IPv4", "IPv6"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "empty", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 80}]},
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
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-v6",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv6",
            "endpoints": [{"addresses": [p.ipv6], "nodeName": "node-b"} for p in pods],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        },
    ]
    return yaml.safe_dump_all(docs)


def whoami(ns: Any, ip: str, port: int, timeout: float = 2.0) -> str:
    sock = ns.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
        return sock.makefile().readline().strip()
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    finally:
        sock.close()


def write_atomically(path: Path, text: str) -> None:
    # The manifest source polls the file; a rename keeps it from reading a half-written one.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def test_kpx_steers_balances_rejects_updates_and_cleans_up(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1, p2 = topo.add_pod("p1"), topo.add_pod("p2")
    p1.start_whoami(8080)
    p2.start_whoami(8080)
    ext = topo.add_external("x")
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1, p2]))
    log = (tmp_path / "kpx.log").open("w")
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    kpx = topo.node.popen(
        sys.executable, "-c", code,
        "--manifests", str(path), "--node-name", "node-a", "--proxy-port", str(PROXY_PORT),
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address",
        "127.0.0.1:10249", "--min-sync-period", "0.01", "--log-format", "json",
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80, 0.5) in ("p1", "p2"))
        seen = Counter(whoami(topo.client, "10.96.0.10", 80) for _ in range(20))
        assert seen == {"p1": 10, "p2": 10}  # round robin
        assert whoami(topo.client, "10.96.0.11", 80) == "refused"
        assert whoami(ext, "10.245.1.1", 30080) in ("p1", "p2")
        seen6 = Counter(whoami(topo.client, "fd00:96::10", 80) for _ in range(4))
        assert seen6 == {"p1": 2, "p2": 2}  # dual-stack: IPv6 frontend, IPv6 endpoints
        assert whoami(ext, "fd00:245:1::1", 30080) in ("p1", "p2")

        # p1 leaves the slice: new connections go to p2 only, no kernel change needed.
        write_atomically(path, manifest([p2]))
        assert wait_for(
            lambda: all(whoami(topo.client, "10.96.0.10", 80) == "p2" for _ in range(4))
        )
        # Every endpoint leaves: refused at once.
        write_atomically(path, manifest([]))
        assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80) == "refused")

        health = topo.node.run("curl", "-s", "http://127.0.0.1:10256/healthz", check=False)
        if health:  # curl may be absent; the health module has its own tests
            assert json.loads(health)["nodeEligible"] is True
        metrics = topo.node.run(
            sys.executable, "-c",
            "import urllib.request;"
            "print(urllib.request.urlopen('http://127.0.0.1:10249/metrics').read().decode())",
        )  # fmt: skip
        assert "kubeproxy_sync_proxy_rules_duration_seconds_count" in metrics
        assert "kpx_connections_total" in metrics
    finally:
        kpx.send_signal(signal.SIGTERM)
        status = kpx.wait(timeout=40)
        log.close()
    output = (tmp_path / "kpx.log").read_text()
    assert status == 0, output
    assert "kpx" not in topo.node.run("nft", "list", "tables")  # table removed on clean exit


def test_ports_mode_without_root_binds_frontends_on_local_ports(tmp_path: Path) -> None:
    """--mode ports: no nftables; the frontend table is printed and served on /debug/services.
    Everything runs on 127.0.0.1 in the test's own namespace-free process tree."""
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(16)
    backend_port = backend.getsockname()[1]
    docs = [
        {
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"]}],
            "ports": [{"name": "http", "port": backend_port}],
        },
    ]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    kpx = subprocess.Popen(
        [sys.executable, "-c", code, "--mode", "ports", "--manifests", str(path),
         "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "kpx.log").open("w"), text=True,
    )  # fmt: skip
    try:
        assert kpx.stdout is not None
        ready, _, _ = select.select([kpx.stdout], [], [], 20)
        line = kpx.stdout.readline() if ready else ""
        assert line.startswith("{"), (line, (tmp_path / "kpx.log").read_text())
        rows = json.loads(line)["services"]
        assert rows == [
            {"frontend": "10.96.0.10:80", "address": "127.0.0.1", "port": rows[0]["port"],
             "endpoints": True, "state": "serve", "protocol": "TCP"}
        ]  # fmt: skip
        client = socket.create_connection(("127.0.0.1", rows[0]["port"]), timeout=5)
        backend.settimeout(5)
        conn, _ = backend.accept()
        conn.sendall(b"hello from the backend\n")
        assert client.makefile().readline() == "hello from the backend\n"
        conn.close()
        client.close()
    finally:
        kpx.send_signal(signal.SIGTERM)
        status = kpx.wait(timeout=40)
        backend.close()
    assert status == 0


def test_crash_leaves_rules_whole_and_a_restart_takes_over(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.start_whoami(8080)
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1]))
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        sys.executable, "-c", code, "--manifests", str(path), "--node-name", "node-a",
        "--healthz-bind-address", "127.0.0.1:10256", "--min-sync-period", "0.01",
    ]  # fmt: skip
    first = topo.node.popen(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80, 0.5) == "p1")
    rules = topo.node.run("nft", "list", "table", "inet", "kpx")
    first.kill()  # SIGKILL: no cleanup at all
    first.wait(timeout=10)
    # The last complete ruleset stays; with nobody listening the kernel refuses at once.
    assert topo.node.run("nft", "list", "table", "inet", "kpx") == rules
    assert whoami(topo.client, "10.96.0.10", 80) == "refused"
    second = topo.node.popen(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80, 0.5) == "p1")
        assert topo.node.run("nft", "list", "table", "inet", "kpx") == rules  # idempotent
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=40) == 0
    assert "kpx" not in topo.node.run("nft", "list", "tables")


def test_a_second_kpx_that_cannot_start_leaves_the_running_ones_rules_alone(
    netns_topology: Topology, tmp_path: Path
) -> None:
    """A manual run on a node where kpx already runs, without a handover (kpx/handover.py,
    where the newcomer would take over instead): it fails to bind (health port, or the proxy
    port) and exits 1 without deleting the table the running kpx serves from."""
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.start_whoami(8080)
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1]))
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    argv = [
        sys.executable, "-c", code, "--manifests", str(path), "--node-name", "node-a",
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249",
        "--min-sync-period", "0.01", "--handover-socket", "",
    ]  # fmt: skip
    running = topo.node.popen(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80, 0.5) == "p1")
        rules = topo.node.run("nft", "list", "table", "inet", "kpx")
        other_ports = [
            "--healthz-bind-address", "127.0.0.1:10257",
            "--metrics-bind-address", "127.0.0.1:10250",
        ]  # fmt: skip
        for extra in ([], other_ports):  # health port taken; then only the proxy port taken
            second = topo.node.popen(
                *argv, *extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            out, _ = second.communicate(timeout=30)
            assert second.returncode == 1, out
            assert topo.node.run("nft", "list", "table", "inet", "kpx") == rules, out
            assert whoami(topo.client, "10.96.0.10", 80) == "p1"
    finally:
        running.send_signal(signal.SIGTERM)
        assert running.wait(timeout=40) == 0
    assert "kpx" not in topo.node.run("nft", "list", "tables")
