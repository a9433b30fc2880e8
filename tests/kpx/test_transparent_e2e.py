"""kpx in transparent mode across a small cluster (tests/kpx/cluster_netns.py): the real daemon
on node n1 fed by a manifest, backends that report the address they see, a router, two nodes,
an external client. Every rule and route lives in namespaces the test created.

Whose address the backend sees, as kube-proxy decides it (kpx/source.py):
pod -> ClusterIP: the pod's (local and remote endpoints, IPv4 and IPv6); external client ->
externalTrafficPolicy Local NodePort / LB IP: the client's; Cluster policy: the node's; host
clients, hairpin and --masquerade-all: the node's.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kpx.cluster_netns import (
    EXTERNAL_V4,
    LB_V4,
    Cluster,
    ClusterPod,
    kpx_argv,
)
from tests.kpx.netns import Netns, netns_available
from tests.waiting import wait_for

CLUSTER_CIDRS = "10.244.0.0/16,fd00:244::/32"
GUARDED_PORT = 9090


def _service(name: str, ips: list[str], **spec: Any) -> dict[str, Any]:
    ports = spec.pop("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ipFamilies": ["IPv6" if ":" in ip else "IPv4" for ip in ips],
            "ports": ports,
            **spec,
        },
    }


def _slice(service: str, pods: list[ClusterPod], family: int, port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{family}",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": f"IPv{family}",
        "endpoints": [
            {
                "addresses": [p.ipv4 if family == 4 else p.ipv6],
                "nodeName": f"n{p.node}",
                "conditions": {"ready": True},
            }
            for p in pods
        ],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def manifest(pods: dict[str, ClusterPod]) -> str:
    a1, a2, b1 = pods["a1"], pods["a2"], pods["b1"]
    docs = [
        _service("web", ["10.96.0.10", "fd00:96::10"]),
        _slice("web", [a2, b1], 4),
        _slice("web", [a2, b1], 6),
        _service("guarded", ["10.96.0.20"], ports=[{"name": "http", "port": 80}]),
        _slice("guarded", [b1], 4, GUARDED_PORT),
        _service(
            "local-lb",
            ["10.96.0.30"],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "nodePort": 30030}],
        ),
        _slice("local-lb", [a2], 4),
        _service(
            "cluster-np",
            ["10.96.0.40"],
            type="NodePort",
            ports=[{"name": "http", "port": 80, "nodePort": 30040}],
        ),
        _slice("cluster-np", [b1], 4),
        _service("hairpin", ["10.96.0.50"]),
        _slice("hairpin", [a1], 4),
        _service(
            "remote-local",
            ["10.96.0.70"],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "nodePort": 30070}],
        ),
        _slice("remote-local", [b1], 4),
    ]
    docs[5]["status"] = {"loadBalancer": {"ingress": [{"ip": LB_V4}]}}
    docs[-2]["status"] = {"loadBalancer": {"ingress": [{"ip": "192.168.100.12"}]}}
    return yaml.safe_dump_all(docs)


def ask(ns: Netns, ip: str, port: int, timeout: float = 2.0) -> str:
    """`<backend> <address it saw>`, or what went wrong."""
    sock = ns.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
        return sock.makefile().readline().strip() or "closed"
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as err:  # e.g. unreachable: nothing steers this frontend
        return f"error {err.errno}"
    finally:
        sock.close()


def seen_by(ns: Netns, ip: str, port: int, count: int = 6) -> set[str]:
    return {ask(ns, ip, port) for _ in range(count)}


class Kpx:
    """One kpx process on node n1 (its log in `log_path`)."""

    def __init__(self, cluster: Cluster, workdir: Path, *extra: str, user: int | None = None):
        self.cluster = cluster
        self.log_path = workdir / f"kpx-{time.monotonic_ns()}.log"
        argv = kpx_argv(
            "--manifests", str(workdir / "cluster.yaml"), "--node-name", "n1",
            "--cluster-cidrs", CLUSTER_CIDRS, "--healthz-bind-address", "127.0.0.1:10256",
            "--metrics-bind-address", "127.0.0.1:10249", "--min-sync-period", "0.01",
            "--connect-timeouts", "1,1", "--drain-timeout", "0", "--log-format", "json",
            *extra,
        )  # fmt: skip
        env = dict(os.environ)
        env.pop("KPX_SOURCE_ADDRESS_MODE", None)  # the suite-wide mode switch: not here
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
            env["PATH"] = f"{workdir}:{env['PATH']}"
        with self.log_path.open("w") as log:
            self.proc = cluster.nodes[0].popen(
                *argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()
            )

    def log(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def events(self) -> list[str]:
        return [entry.get("event", "") for entry in self.log()]

    def metrics(self) -> str:
        def fetch() -> str:
            with urllib.request.urlopen("http://127.0.0.1:10249/metrics", timeout=2) as resp:
                return str(resp.read().decode())

        return self.cluster.nodes[0].call(fetch)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with Cluster(nodes=2) as built:
        yield built


@pytest.fixture
def workdir() -> Iterator[Path]:
    # World-readable (the fallback test runs kpx as an unprivileged user).
    path = Path(tempfile.mkdtemp(prefix="kpxt-transparent-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_pods(cluster: Cluster) -> dict[str, ClusterPod]:
    pods = {
        "a1": cluster.add_pod("a1", 1),
        "a2": cluster.add_pod("a2", 1),
        "a3": cluster.add_pod("a3", 1),
        "b1": cluster.add_pod("b1", 2),
    }
    for pod in pods.values():
        pod.start_peer_server(8080)
    pods["b1"].start_peer_server(GUARDED_PORT)
    # NetworkPolicy stand-in: b1 admits only a1 on the guarded port.
    pods["b1"].nft(
        "table inet netpol {\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    tcp dport {GUARDED_PORT} ip saddr != {pods['a1'].ipv4} drop\n"
        "  }\n"
        "}\n"
    )
    return pods


def policy_routing(node: Netns) -> str:
    return node.ip("rule", "show", "pref", "10262") + node.ip("-6", "rule", "show", "pref", "10262")


def kpx_table_exists(node: Netns) -> bool:
    return bool(node.run("nft", "list", "tables").count("inet kpx"))


def test_backends_see_whom_kube_proxy_would_show_them(cluster: Cluster, workdir: Path) -> None:
    pods = start_pods(cluster)
    a1, a3 = pods["a1"], pods["a3"]
    n1 = cluster.nodes[0]
    node_addresses = cluster.node_addresses(1)
    (workdir / "cluster.yaml").write_text(manifest(pods))
    kpx = Kpx(cluster, workdir)
    assert wait_for(lambda: ask(a1, "10.96.0.10", 80, 0.5).startswith(("a2", "b1")))
    assert 'kpx_source_address_mode{mode="transparent"} 1.0' in kpx.metrics()
    assert policy_routing(n1).count("lookup 10262") == 2

    # Pod -> ClusterIP, a local (a2) and a remote (b1) endpoint: the pod's own address.
    # (wait_for: a first connect across the router may wait for neighbour discovery, and a
    # timed-out backend is skipped for a while.)
    want4, want6 = {f"a2 {a1.ipv4}", f"b1 {a1.ipv4}"}, {f"a2 {a1.ipv6}", f"b1 {a1.ipv6}"}
    assert wait_for(lambda: seen_by(a1, "10.96.0.10", 80) == want4), seen_by(a1, "10.96.0.10", 80)
    assert wait_for(lambda: seen_by(a1, "fd00:96::10", 80) == want6), seen_by(a1, "fd00:96::10", 80)
    # NetworkPolicy stand-in: a1 is admitted through the ClusterIP, a3 is not.
    assert ask(a1, "10.96.0.20", 80) == f"b1 {a1.ipv4}"
    assert ask(a3, "10.96.0.20", 80, 5.0) in ("reset", "closed")
    # External client, externalTrafficPolicy Local (NodePort and LB IP): the client's address.
    assert ask(cluster.external, cluster.node_ipv4(1), 30030) == f"a2 {EXTERNAL_V4}"
    assert ask(cluster.external, LB_V4, 80) == f"a2 {EXTERNAL_V4}"
    # ... Cluster policy: the node's (b1 is on the other node).
    assert ask(cluster.external, cluster.node_ipv4(1), 30040) == f"b1 {cluster.node_ipv4(1)}"
    # A pod to an externalTrafficPolicy Local LB IP: its own (kube-proxy's short-circuit).
    assert ask(a3, LB_V4, 80) == f"a2 {a3.ipv4}"
    # ... from a node without a local endpoint: short-circuited to the other node's, still
    # with the pod's address (the reply is routed back through n1); outsiders are dropped.
    assert ask(a1, "192.168.100.12", 80) == f"b1 {a1.ipv4}"
    assert ask(cluster.external, "192.168.100.12", 80, 1.0) == "timeout"
    # A pod to a Cluster-policy NodePort: the node's.
    assert ask(a3, cluster.node_ipv4(1), 30040) == f"b1 {cluster.node_ipv4(1)}"
    # Hairpin: a1 reaching itself through a Service sees a node address.
    backend, seen = ask(a1, "10.96.0.50", 80).split()
    assert backend == "a1" and seen in node_addresses
    # A host-network client: the node's address.
    for backend_seen in seen_by(n1, "10.96.0.10", 80):
        backend, seen = backend_seen.split()
        assert backend in ("a2", "b1") and seen in node_addresses

    # SIGKILL: the table and the policy routing stay; a restarted kpx (here with
    # --masquerade-all) takes over and steers again.
    assert kpx.stop(signal.SIGKILL) == -signal.SIGKILL
    assert kpx_table_exists(n1) and policy_routing(n1).count("lookup 10262") == 2
    assert ask(a1, "10.96.0.10", 80) in ("refused", "reset")  # no kpx: reset at once
    kpx = Kpx(cluster, workdir, "--masquerade-all")
    assert wait_for(lambda: ask(a1, "10.96.0.10", 80, 0.5).startswith(("a2", "b1")))
    assert policy_routing(n1).count("lookup 10262") == 2  # idempotent: not doubled
    for backend_seen in seen_by(a1, "10.96.0.10", 80):
        backend, seen = backend_seen.split()
        assert seen in node_addresses, backend_seen
    # ... which the NetworkPolicy stand-in does not admit, even from a1.
    assert ask(a1, "10.96.0.20", 80, 5.0) in ("reset", "closed")
    backend, seen = ask(cluster.external, cluster.node_ipv4(1), 30030).split()
    assert backend == "a2" and seen in node_addresses

    # The clean exit removes the table, the rules and the route.
    assert kpx.stop() == 0
    assert not kpx_table_exists(n1)
    assert policy_routing(n1).strip() == ""
    assert n1.ip("route", "show", "table", "10262", check=False).strip() == ""


def test_node_mode_and_fallback_without_capability(cluster: Cluster, workdir: Path) -> None:
    pods = start_pods(cluster)
    a1 = pods["a1"]
    n1 = cluster.nodes[0]
    node_addresses = cluster.node_addresses(1)
    (workdir / "cluster.yaml").write_text(manifest(pods))

    # Explicit node mode: as before this feature (nftables redirect, the node's address).
    kpx = Kpx(cluster, workdir, "--source-address-mode", "node")
    assert wait_for(lambda: ask(a1, "10.96.0.10", 80, 0.5).startswith(("a2", "b1")))
    assert 'kpx_source_address_mode{mode="node"} 1.0' in kpx.metrics()
    for backend_seen in seen_by(a1, "10.96.0.10", 80):
        assert backend_seen.split()[1] in node_addresses
    # TCP is redirected; the policy routing is there for UDP, whose steering is always tproxy
    # (kpx/udp_nft.py: REDIRECT would lose a datagram's original destination).
    assert "tproxy" not in n1.run("nft", "list", "table", "inet", "kpx")
    assert kpx.stop() == 0
    assert policy_routing(n1).strip() == ""

    # auto as an unprivileged user whose `nft` carries cap_net_admin (as in the image) but
    # whose interpreter has no capability: no IP_TRANSPARENT, so one warning and node mode.
    nft = workdir / "nft"
    shutil.copy(shutil.which("nft") or "/usr/sbin/nft", nft)
    subprocess.run(["setcap", "cap_net_admin+ep", str(nft)], check=True)
    kpx = Kpx(cluster, workdir, user=65532)
    assert wait_for(lambda: ask(a1, "10.96.0.10", 80, 0.5).startswith(("a2", "b1")))
    warnings = [e for e in kpx.log() if e.get("event") == "transparent_mode_unavailable"]
    assert len(warnings) == 1 and "CAP_NET_ADMIN" in warnings[0]["problem"]
    assert 'kpx_source_address_mode{mode="node"} 1.0' in kpx.metrics()
    for backend_seen in seen_by(a1, "10.96.0.10", 80):
        assert backend_seen.split()[1] in node_addresses
    assert kpx.stop() == 0

    # Explicit transparent where it cannot be had: exit 1 at start, nothing programmed.
    kpx = Kpx(cluster, workdir, "--source-address-mode", "transparent", user=65532)
    assert kpx.proc.wait(timeout=30) == 1
    assert "kpx_start_failed" in kpx.events()
    assert not kpx_table_exists(n1)


def test_nodeport_addresses_primary_from_a_kube_proxy_configuration(
    cluster: Cluster, workdir: Path
) -> None:
    """`nodePortAddresses: [primary]` in a KubeProxyConfiguration: NodePorts answer on the
    Node's InternalIP only, not on the node's other addresses."""
    pods = start_pods(cluster)
    n1 = cluster.nodes[0]
    # A second address on n1, routed to it from outside like the first.
    n1.ip("addr", "add", "192.168.60.11/24", "dev", "eth0")
    cluster.router.ip("route", "add", "192.168.60.0/24", "via", cluster.node_ipv4(1))
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n1"},
        "status": {"addresses": [{"type": "InternalIP", "address": cluster.node_ipv4(1)}]},
    }
    (workdir / "cluster.yaml").write_text(manifest(pods) + "---\n" + yaml.safe_dump(node))
    config = workdir / "kube-proxy.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "nodePortAddresses: [primary]\n"
    )
    kpx = Kpx(cluster, workdir, "--config", str(config))
    x = cluster.external
    assert wait_for(lambda: ask(x, cluster.node_ipv4(1), 30040, 0.5).startswith("b1"))
    assert ask(x, "192.168.60.11", 30040) in ("refused", "timeout", "reset")
    assert "nodeport_addresses_primary" in kpx.events()
    assert kpx.stop() == 0


def ranged_manifest(pods: dict[str, ClusterPod], ranges: list[str]) -> str:
    svc = _service(
        "ranged",
        ["10.96.0.60"],
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        loadBalancerSourceRanges=ranges,
        ports=[{"name": "http", "port": 80, "nodePort": 30060}],
    )
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.168.100.11"}]}}
    return yaml.safe_dump_all([svc, _slice("ranged", [pods["a2"]], 4)])


def test_load_balancer_source_ranges_are_enforced_in_the_table(
    cluster: Cluster, workdir: Path
) -> None:
    """Only clients inside loadBalancerSourceRanges reach the LB IP (dropped otherwise, as
    kube-proxy's firewall); the NodePort is not filtered; a change applies without restart."""
    pods = start_pods(cluster)
    a1, x = pods["a1"], cluster.external
    path = workdir / "cluster.yaml"
    path.write_text(ranged_manifest(pods, ["10.0.0.0/8", "10.244.0.0/16", "bogus"]))
    kpx = Kpx(cluster, workdir)
    assert wait_for(lambda: ask(a1, "192.168.100.11", 80, 0.5) == f"a2 {a1.ipv4}")
    assert ask(x, "192.168.100.11", 80, 1.0) == "timeout"  # outside the ranges: dropped
    assert ask(x, cluster.node_ipv4(1), 30060) == f"a2 {EXTERNAL_V4}"  # NodePort: not filtered
    write_atomically(path, ranged_manifest(pods, [f"{EXTERNAL_V4}/32"]))
    assert wait_for(lambda: ask(x, "192.168.100.11", 80, 0.5) == f"a2 {EXTERNAL_V4}")
    assert ask(a1, "192.168.100.11", 80, 1.0) == "timeout"
    assert "source_range_invalid" in kpx.events()
    assert kpx.stop() == 0


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def syn_retransmits(ns: Netns) -> int:
    """TcpExt TCPSynRetrans of `ns` (/proc/net/netstat is per network namespace)."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/netstat").splitlines()]
    for names, values in itertools.pairwise(lines):
        if names[0] == "TcpExt:" and values[0] == "TcpExt:":
            return int(values[names.index("TCPSynRetrans")])
    raise AssertionError("no TcpExt line in /proc/net/netstat")


def ask_from_port(ns: Netns, ip: str, port: int, source_port: int) -> str:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = ns.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(5.0)
    try:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", source_port))
        sock.connect((ip, port))
        # To the end: kpx, told by the backend, closes first and keeps the TIME_WAIT.
        return sock.makefile().read().strip() or "closed"
    finally:
        sock.close()


CLOSING_SERVER = r"""
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port))
srv.listen(64)
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    conn.sendall(f"{name} {peer[0].removeprefix('::ffff:')}\n".encode())
    conn.close()
"""


def test_a_client_port_reused_during_time_wait_connects_at_once(
    cluster: Cluster, workdir: Path
) -> None:
    """A backend that closes first makes kpx close first towards the client, so kpx's
    transparent socket facing the client (local address: the ClusterIP) ends in TIME_WAIT, for
    a minute. A client that connects again from the same port meanwhile (any busy client
    cycles through its ports within that minute) must reach the proxy at once: its SYN is
    tproxied to the listener, which takes the TIME_WAIT tuple over. Matched by `socket
    transparent 1` instead, it went to the TIME_WAIT socket, was answered with a bare ACK, and
    the client, which reset it, connected only with a retransmitted SYN: bench/proxy.py's
    transparent connection rate was half of node mode's."""
    pods = start_pods(cluster)
    a1, a2, n1 = pods["a1"], pods["a2"], cluster.nodes[0]
    a2.spawn_python(CLOSING_SERVER, "a2", "8081")
    closing = [
        _service("closing", ["10.96.0.80", "fd00:96::80"]),
        _slice("closing", [a2], 4, 8081),
        _slice("closing", [a2], 6, 8081),
    ]
    (workdir / "cluster.yaml").write_text(manifest(pods) + "---\n" + yaml.safe_dump_all(closing))
    kpx = Kpx(cluster, workdir, "--source-address-mode", "transparent")
    assert wait_for(lambda: ask(a1, "10.96.0.80", 80, 0.5).startswith("a2"))
    for ip, mine, source_port in (("10.96.0.80", a1.ipv4, 41000), ("fd00:96::80", a1.ipv6, 41001)):
        assert ask_from_port(a1, ip, 80, source_port) == f"a2 {mine}"
        frontend = f"[{ip}]:80" if ":" in ip else f"{ip}:80"
        client = f"[{mine}]:{source_port}" if ":" in ip else f"{mine}:{source_port}"

        def in_time_wait(frontend: str = frontend, client: str = client) -> bool:
            listing = n1.run("ss", "-Htan", "state", "time-wait")
            return any(line.split()[-2:] == [frontend, client] for line in listing.splitlines())

        assert wait_for(in_time_wait), n1.run("ss", "-Htan")
        before = syn_retransmits(a1)
        started = time.monotonic()
        again = ask_from_port(a1, ip, 80, source_port)
        took = time.monotonic() - started
        assert again == f"a2 {mine}", again
        assert syn_retransmits(a1) == before, f"the SYN was retransmitted ({took:.2f} s)"
    assert kpx.stop() == 0
