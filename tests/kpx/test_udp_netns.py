"""kpx's UDP path end to end in nftables mode: the real daemon in a node namespace, tproxy,
real pods, clients in pod, node and external namespaces (tests/kpx/netns.py).

Modelled on Kubernetes e2e: conntrack.go (a client keeping one source port while the server
pod cycles; ClusterIP, NodePort and internalTrafficPolicy Local; a Service without endpoints
that gets one), networking.go's UDP Granular Checks (pod, node and outside clients), service.go
(the same port with both protocols), and a DNS Service whose servers are replaced one by one
under `dig +notcp`.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.kpx.netns import NODE_IPV4, Netns, Topology
from tests.waiting import wait_for

PROXY_PORT = 10262
KPX = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"

# A UDP pod server: answers `<name>|<datagram>` from the address it was sent to.
UDP_ECHO = r"""
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port))
print("ready", flush=True)
while True:
    data, peer = srv.recvfrom(65535)
    srv.sendto(name.encode() + b"|" + data, peer)
"""


def service(name: str, ip: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": ports, **spec},
    }


def endpoint_slice(
    service_name: str,
    pods: list[Any],
    ports: list[dict[str, Any]],
    family: int = 4,
    node: str = "node-b",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-{family}",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": f"IPv{family}",
        "endpoints": [
            {"addresses": [p.ipv4 if family == 4 else p.ipv6], "nodeName": node} for p in pods
        ],
        "ports": ports,
    }


def write(path: Path, docs: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.rename(path)  # the manifest source never reads a half-written file


@contextlib.contextmanager
def running_kpx(
    topo: Topology, path: Path, log_path: Path, bridge_netfilter: bool = False
) -> Iterator[subprocess.Popen[str]]:
    kpx = start_kpx(topo, path, log_path, bridge_netfilter)
    try:
        yield kpx
    finally:
        kpx.send_signal(signal.SIGTERM)
        status = kpx.wait(timeout=40)
        assert status == 0, log_path.read_text()[-4000:]
    assert "kpx-udp" not in topo.node.run("nft", "list", "tables")
    assert "10262" not in topo.node.run("ip", "rule", "show")


def start_kpx(
    topo: Topology, path: Path, log_path: Path, bridge_netfilter: bool = False
) -> subprocess.Popen[str]:
    # br_netfilter (loaded on this machine) runs prerouting inside the bridge, where tproxy's
    # socket is lost (kpx/udp_nft.py): off unless a test checks the bridged path.
    for family in ("iptables", "ip6tables"):
        topo.node.sysctl(f"net.bridge.bridge-nf-call-{family}", "1" if bridge_netfilter else "0")
    # The per-host ICMP budget (1/s, burst 6) is spent by the redirects the node sends while a
    # client polls a not yet programmed ClusterIP; the rejects checked later must not wait.
    topo.node.sysctl("net.ipv4.icmp_ratelimit", "0")
    return topo.node.popen(
        sys.executable, "-c", KPX,
        "--manifests", str(path), "--node-name", "node-a", "--proxy-port", str(PROXY_PORT),
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address",
        "127.0.0.1:10249", "--min-sync-period", "0.01", "--log-format", "json",
        "--sync-period", "1",
        stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


class Client:
    """A UDP socket in a namespace with a fixed source port (conntrack.go's `nc -u -p`)."""

    def __init__(self, ns: Netns, family: int = socket.AF_INET, port: int = 0) -> None:
        self.sock = ns.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))

    def ask(self, ip: str, port: int, data: bytes = b"hi", wait: float = 0.5) -> str:
        """Who answered ("timeout", "refused"); asserts the answer's source address."""
        self.sock.settimeout(wait)
        try:
            self.sock.sendto(data, (ip, port))
            answer, source = self.sock.recvfrom(70000)
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        assert source[:2] == (ip, port), source  # the reply comes from what the client dialled
        name, _, echoed = answer.partition(b"|")
        assert echoed == data
        return name.decode()

    def close(self) -> None:
        self.sock.close()


def test_udp_through_cluster_ip_node_port_and_local_policy_while_pods_cycle(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1, p2 = topo.add_pod("p1"), topo.add_pod("p2")
    servers = {p.pod_name: p.spawn_python(UDP_ECHO, p.pod_name, "5353") for p in (p1, p2)}
    ext = topo.add_external("x")
    udp = [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053}]
    cluster_only = [{k: v for k, v in udp[0].items() if k != "nodePort"}]
    slice_ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]

    def docs(pods: list[Any], local_pods: list[Any], empty_pods: list[Any]) -> list[Any]:
        return [
            service(
                "udp", "10.96.0.20", udp, type="NodePort",
                clusterIPs=["10.96.0.20", "fd00:96::20"], ipFamilies=["IPv4", "IPv6"],
            ),
            endpoint_slice("udp", pods, slice_ports),
            endpoint_slice("udp", pods, slice_ports, family=6),
            service("local", "10.96.0.22", cluster_only, internalTrafficPolicy="Local"),
            endpoint_slice("local", local_pods, slice_ports, node="node-a"),
            service("empty", "10.96.0.21", cluster_only),
            endpoint_slice("empty", empty_pods, slice_ports),
            # internalTrafficPolicy Local served on another node only: dropped, not rejected.
            service("elsewhere", "10.96.0.23", cluster_only, internalTrafficPolicy="Local"),
            endpoint_slice("elsewhere", [p1], slice_ports, node="node-b"),
        ]  # fmt: skip

    path = tmp_path / "cluster.yaml"
    write(path, docs([p1], [p1], []))
    pod_client = Client(topo.client, port=12345)
    pod_client6 = Client(topo.client, socket.AF_INET6, port=12345)
    outside = Client(ext, port=12346)
    node_client = Client(topo.node, port=12347)
    empty_client = Client(topo.client, port=12348)
    try:
        with running_kpx(topo, path, tmp_path / "kpx.log"):
            assert wait_for(lambda: pod_client.ask("10.96.0.20", 53) == "p1")
            assert pod_client6.ask("fd00:96::20", 53) == "p1"
            assert outside.ask("10.245.1.1", 30053) == "p1"  # NodePort from outside
            assert node_client.ask("10.96.0.20", 53) == "p1"  # a host process
            assert node_client.ask(NODE_IPV4, 30053) == "p1"  # NodePort on the node itself
            assert pod_client.ask("10.96.0.22", 53) == "p1"  # internalTrafficPolicy Local
            assert empty_client.ask("10.96.0.21", 53) in ("refused", "timeout")
            empty_client.sock.connect(("10.96.0.21", 53))
            empty_client.sock.settimeout(1)
            empty_client.sock.send(b"hi")
            try:
                empty_client.sock.recv(100)
                raise AssertionError("a Service without endpoints answered")
            except ConnectionRefusedError:
                pass  # ICMP port unreachable, as kube-proxy's reject
            elsewhere = Client(topo.client)
            elsewhere.sock.connect(("10.96.0.23", 53))
            assert elsewhere.ask("10.96.0.23", 53) == "timeout"  # dropped: no ICMP error
            elsewhere.close()

            # The pod cycles: p1 goes away and p2 takes over; every client keeps its source
            # port and must reach p2 (conntrack.go: within a minute; here within seconds).
            servers["p1"].kill()
            write(path, docs([p2], [p2], [p2]))
            assert wait_for(lambda: pod_client.ask("10.96.0.20", 53) == "p2", timeout=10)
            assert pod_client6.ask("fd00:96::20", 53) == "p2"
            assert outside.ask("10.245.1.1", 30053) == "p2"
            assert node_client.ask("10.96.0.20", 53) == "p2"
            assert pod_client.ask("10.96.0.22", 53) == "p2"
            # The client that kept sending while there were no endpoints: same port, answered.
            empty_client.sock.send(b"hi")
            assert empty_client.sock.recv(100) == b"p2|hi"
    finally:
        for c in (pod_client, pod_client6, outside, node_client, empty_client):
            c.close()


def test_same_port_both_protocols_and_removing_udp_stops_only_udp(
    netns_topology: Topology, tmp_path: Path
) -> None:
    # service.go "should serve endpoints on same port and different protocols".
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.start_whoami(8080)
    p1.spawn_python(UDP_ECHO, "p1", "8080")
    tcp = {"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    udp = {"name": "udp", "port": 80, "targetPort": 8080, "protocol": "UDP"}
    slice_ports = [
        {"name": "tcp", "port": 8080, "protocol": "TCP"},
        {"name": "udp", "port": 8080, "protocol": "UDP"},
    ]
    path = tmp_path / "cluster.yaml"
    write(
        path, [service("both", "10.96.0.30", [tcp, udp]), endpoint_slice("both", [p1], slice_ports)]
    )

    def tcp_answer() -> str:
        sock = topo.client.socket()
        sock.settimeout(1)
        try:
            sock.connect(("10.96.0.30", 80))
            return sock.makefile().readline().strip()
        except OSError as err:
            return type(err).__name__
        finally:
            sock.close()

    client = Client(topo.client)
    try:
        with running_kpx(topo, path, tmp_path / "kpx.log"):
            assert wait_for(lambda: client.ask("10.96.0.30", 80) == "p1")
            assert tcp_answer() == "p1"
            write(
                path,
                [service("both", "10.96.0.30", [tcp]), endpoint_slice("both", [p1], slice_ports)],
            )
            assert wait_for(lambda: client.ask("10.96.0.30", 80) == "timeout", timeout=10)
            assert tcp_answer() == "p1"
            write(
                path,
                [
                    service("both", "10.96.0.30", [tcp, udp]),
                    endpoint_slice("both", [p1], slice_ports),
                ],
            )
            assert wait_for(lambda: client.ask("10.96.0.30", 80) == "p1", timeout=10)
            write(
                path,
                [service("both", "10.96.0.30", [udp]), endpoint_slice("both", [p1], slice_ports)],
            )
            assert wait_for(lambda: tcp_answer() != "p1", timeout=10)
            assert client.ask("10.96.0.30", 80) == "p1"
    finally:
        client.close()


def test_dig_notcp_through_a_udp_cluster_ip_while_dns_servers_are_replaced(
    netns_topology: Topology, tmp_path: Path
) -> None:
    """Real DNS servers (dnsd) in pod namespaces behind a UDP ClusterIP, replaced one by one
    during a steady `dig +notcp` stream (a new client port per query): no query is lost. Each
    server answers with its own address, so the test sees when kpx switched, and the old server
    is stopped only then (as a terminating pod keeps serving until its endpoint is gone)."""
    topo = netns_topology
    pods = [topo.add_pod(f"dns{n}") for n in range(3)]

    def start_dns(n: int) -> subprocess.Popen[str]:
        zone = tmp_path / f"zone{n}"
        zone.mkdir()
        answer = [{"name": "http", "port": 80, "protocol": "TCP"}]
        (zone / "svc.yaml").write_text(yaml.safe_dump(service("answer", f"10.96.7.{n}", answer)))
        pod = pods[n]
        proc = pod.popen(
            sys.executable, "-m", "dnsd.main", "--manifests", str(zone),
            "--listen", "0.0.0.0:53", "--http-listen", "127.0.0.1:8181",
            "--log-format", "json", "--log-level", "warning",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        ok = wait_for(lambda: _dig(pod, pod.ipv4) == f"10.96.7.{n}", timeout=20)
        assert ok, f"dnsd did not start in {pod.pod_name}"
        return proc

    dns = {"name": "dns", "port": 53, "protocol": "UDP"}
    slice_ports = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    path = tmp_path / "cluster.yaml"

    def publish(n: int) -> None:
        write(
            path,
            [
                service("kube-dns", "10.96.0.10", [dns]),
                endpoint_slice("kube-dns", [pods[n]], slice_ports),
            ],
        )

    procs = [start_dns(0)]
    publish(0)
    results: list[str] = []
    stop = threading.Event()

    def query_stream() -> None:
        while not stop.is_set():
            results.append(_dig(topo.client, "10.96.0.10"))
            time.sleep(0.01)

    with running_kpx(topo, path, tmp_path / "kpx.log"):
        assert wait_for(lambda: _dig(topo.client, "10.96.0.10") == "10.96.7.0")
        stream = threading.Thread(target=query_stream)
        stream.start()
        try:
            for n in (1, 2):
                procs.append(start_dns(n))  # the new server is ready first
                publish(n)  # the endpoint set changes
                assert wait_for(lambda n=n: results[-1:] == [f"10.96.7.{n}"], timeout=10)
                procs[n - 1].kill()  # then the old pod goes
                time.sleep(0.5)
        finally:
            stop.set()
            stream.join(timeout=30)
    lost = [r for r in results if not r.startswith("10.96.7.")]
    assert len(results) > 20 and lost == [], (len(results), lost)
    # Every query went to the current server: no answer from a replaced one after a switch.
    order = [r for i, r in enumerate(results) if i == 0 or r != results[i - 1]]
    assert order == ["10.96.7.0", "10.96.7.1", "10.96.7.2"], order


def _dig(ns: Any, server: str) -> str:
    out = ns.run(
        "dig", "+notcp", "+short", "+tries=1", "+time=1", f"@{server}",
        "answer.default.svc.cluster.local", "A", check=False,
    )  # fmt: skip
    return out.strip() or "no answer"


def test_a_sigkilled_kpx_restarts_and_the_same_client_port_is_served_again(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.spawn_python(UDP_ECHO, "p1", "5353")
    udp = [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
    path = tmp_path / "cluster.yaml"
    slice_ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    write(path, [service("udp", "10.96.0.20", udp), endpoint_slice("udp", [p1], slice_ports)])
    client = Client(topo.client, port=12345)
    try:
        first = start_kpx(topo, path, tmp_path / "first.log")
        assert wait_for(lambda: client.ask("10.96.0.20", 53) == "p1")
        first.kill()  # SIGKILL: the table and the policy routes stay
        first.wait(timeout=10)
        assert "kpx-udp" in topo.node.run("nft", "list", "tables")
        assert "lookup 10262" in topo.node.run("ip", "rule", "show")
        with running_kpx(topo, path, tmp_path / "second.log"):
            assert wait_for(lambda: client.ask("10.96.0.20", 53) == "p1", timeout=10)
        assert topo.node.run("ip", "rule", "show").count("lookup 10262") == 0
    finally:
        client.close()


# The relay alone in the node namespace, with the source-address hook transparent mode gives
# it (kpx/source.py decides whose address in the daemon): every client keeps its own.
RELAY_WITH_CLIENT_SOURCE = r"""
import asyncio, logging, sys
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
from kpx.backends import Backend
from kpx.balancer import Balancer
from kpx.udp_relay import UdpRelay

vip, backend_ip = sys.argv[1], sys.argv[2]
pickers = Balancer().update("t/echo:u", {("internal", 4): [Backend(backend_ip, 5353)]}, None)

class Frontends:
    def lookup(self, ip, port):
        return pickers[("internal", 4)] if (ip, port) == (vip, 53) else None

async def main():
    relay = UdpRelay(Frontends(), source_address=lambda fip, fport, client: client)
    relay.serve_transparent("0.0.0.0", 10262)
    relay.frontend_socket((vip, 53))  # as kpx/udp_nft.py's writer opens it
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

# Answers `<the sender's address>` so the test sees whose address the backend saw.
UDP_PEER = r"""
import socket
srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", 5353))
print("ready", flush=True)
while True:
    data, peer = srv.recvfrom(65535)
    seen = peer[0].removeprefix("::ffff:")
    srv.sendto(b"seen|" + seen.encode() + b"|" + data, peer)
"""


def test_a_session_can_send_from_the_clients_address_and_hairpin_from_the_nodes(
    netns_topology: Topology,
) -> None:
    from kpx.nft import TPROXY_MARK
    from kpx.nft import render_full as render_tcp_table
    from kpx.udp_nft import render_full

    # The endpoint sits behind a routed link (as on another node): its answers to a pod come
    # back through this node, where kpx takes them. (On one bridge they would go straight to
    # the pod, the same-node case the transparent mode handles on its own.)
    topo = netns_topology
    backend = topo.add_external("backend")
    backend.spawn_python(UDP_PEER)
    for family in ("iptables", "ip6tables"):
        topo.node.sysctl(f"net.bridge.bridge-nf-call-{family}", "0")
    mark = f"{TPROXY_MARK:#x}"
    topo.node.ip("rule", "add", "fwmark", f"{mark}/{mark}", "lookup", "10262")
    topo.node.ip("route", "add", "local", "default", "dev", "lo", "table", "10262")
    topo.node.nft(render_full({(4, "10.96.0.40", 53): "serve"}, 10262))
    # The TCP table in transparent mode marks what belongs to a transparent socket, UDP too.
    topo.node.nft(render_tcp_table({}, 10262, transparent=True))
    topo.node.spawn_python(RELAY_WITH_CLIENT_SOURCE, "10.96.0.40", "10.245.1.2")
    client, hairpin = Client(topo.client), Client(backend)
    try:
        # The pod on the bridge: the backend sees its address, the answer comes from the VIP.
        def answer(c: Client, data: bytes) -> Any:
            c.sock.settimeout(0.5)
            c.sock.sendto(data, ("10.96.0.40", 53))
            try:
                return c.sock.recvfrom(100)
            except TimeoutError:
                return None

        assert wait_for(lambda: answer(client, b"hi") is not None)
        assert answer(client, b"who") == (b"seen|10.244.0.2|who", ("10.96.0.40", 53))
        # The endpoint calling its own Service: from the node's address (kube-proxy's hairpin
        # masquerade), or its answer would never leave the pod.
        assert answer(hairpin, b"me") == (b"seen|10.245.1.1|me", ("10.96.0.40", 53))
    finally:
        client.close()
        hairpin.close()


def test_load_balancer_source_ranges_filter_udp_too(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.spawn_python(UDP_ECHO, "p1", "5353")
    ext = topo.add_external("x")
    udp = [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP", "nodePort": 30053}]
    lb = service("lb", "10.96.0.50", udp, type="LoadBalancer")
    lb["spec"]["loadBalancerSourceRanges"] = ["10.245.1.0/24"]
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.50"}]}}
    slice_ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    path = tmp_path / "cluster.yaml"
    write(path, [lb, endpoint_slice("lb", [p1], slice_ports)])
    outside, pod = Client(ext), Client(topo.client)
    try:
        with running_kpx(topo, path, tmp_path / "kpx.log"):
            assert wait_for(lambda: outside.ask("192.0.2.50", 53) == "p1")  # inside the ranges
            assert pod.ask("192.0.2.50", 53) == "timeout"  # outside them: dropped
            assert pod.ask("10.96.0.50", 53) == "p1"  # the ClusterIP is not filtered
    finally:
        outside.close()
        pod.close()


def test_bridged_pods_reach_udp_services_with_br_netfilter_on(
    netns_topology: Topology, tmp_path: Path
) -> None:
    """bridge-nf-call-iptables=1 (kube-proxy's requirement with bridge CNIs): a pod's datagram
    crosses prerouting inside the bridge, so tproxy cannot hand it over; it is marked and
    reaches the relay's socket bound to the ClusterIP instead, answered from there."""
    topo = netns_topology
    if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
        import pytest

        pytest.skip("br_netfilter is not loaded here")
    p1, p2 = topo.add_pod("p1"), topo.add_pod("p2")
    servers = {p.pod_name: p.spawn_python(UDP_ECHO, p.pod_name, "5353") for p in (p1, p2)}
    udp = [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
    slice_ports = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
    path = tmp_path / "cluster.yaml"
    write(path, [service("udp", "10.96.0.60", udp), endpoint_slice("udp", [p1], slice_ports)])
    client = Client(topo.client, port=12345)
    try:
        with running_kpx(topo, path, tmp_path / "kpx.log", bridge_netfilter=True):
            assert wait_for(lambda: client.ask("10.96.0.60", 53) == "p1")  # source checked
            servers["p1"].kill()
            write(
                path, [service("udp", "10.96.0.60", udp), endpoint_slice("udp", [p2], slice_ports)]
            )
            assert wait_for(lambda: client.ask("10.96.0.60", 53) == "p2", timeout=10)
    finally:
        client.close()
