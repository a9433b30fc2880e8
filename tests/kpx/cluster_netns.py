"""A small multi-node cluster in network namespaces, for kpx's transparent mode.

    external "x" (172.30.0.2, fd00:30::2) ── router "r": bridge 192.168.50.0/24, fd00:50::/64
                                            ├─ node n1 (192.168.50.11, fd00:50::b)
                                            │    pods 10.244.1.11.., fd00:244:1::b..
                                            └─ node n2 (192.168.50.12, fd00:50::c)
                                                 pods 10.244.2.11.., fd00:244:2::b..

Pods are wired as routed CNIs (Calico, Cilium, the ptp plugin) do it: each on its own veth, a /32
(/128) address, a default route to a link-local gateway on the node (169.254.1.1 with proxy ARP,
fe80::1), and a host route to the pod on the node. So every packet a pod sends or receives
crosses its node's IP stack, which is what lets the node hand a backend's reply to a client pod
to kpx. The router routes each node's pod CIDR to that node and the LoadBalancer IPs
(192.168.100.0/24, fd00:100::/64) to node n1, as a load balancer announcing them would.

Every namespace is named `kpxt-<6 hex>-<role>` and deleted by `close()` with everything in it
(policy routing rules and nftables tables included), so nothing reaches the host's network.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys

from tests.kpx.netns import Netns, NetnsUnavailable, _run, netns_available

LB_V4 = "192.168.100.10"
LB_V6 = "fd00:100::10"
EXTERNAL_V4 = "172.30.0.2"
EXTERNAL_V6 = "fd00:30::2"

# A backend that reports what it sees: `<pod name> <peer address>\n`, then echoes until EOF.
PEER_SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port))
srv.listen(1024)
print("ready", flush=True)

def serve(conn, peer):
    if peer.startswith("::ffff:"):
        peer = peer[7:]
    try:
        conn.sendall(f"{name} {peer}\n".encode())
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close()

while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer[0]), daemon=True).start()
"""


class ClusterPod(Netns):
    def __init__(self, cluster: Cluster, ns_name: str, name: str, node: int, host: int) -> None:
        super().__init__(cluster, ns_name)  # type: ignore[arg-type]
        self.pod_name = name
        self.node = node
        self.ipv4 = f"10.244.{node}.{host}"
        self.ipv6 = f"fd00:244:{node}::{host:x}"

    def start_peer_server(self, port: int = 8080) -> subprocess.Popen[str]:
        return self.spawn_python(PEER_SERVER, self.pod_name, str(port))


class Cluster:
    """Router, `nodes` nodes with routed pods, one external client. Use as a context manager."""

    def __init__(self, nodes: int = 2) -> None:
        reason = netns_available()
        if reason is not None:
            raise NetnsUnavailable(reason)
        self.prefix = f"kpxt-{secrets.token_hex(3)}"
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._pods_per_node: dict[int, int] = {}
        self.pods: dict[str, ClusterPod] = {}
        self._closed = False
        try:
            self.router = self._new_ns("r")
            self._setup_router()
            self.nodes = [self._add_node(i) for i in range(1, nodes + 1)]
            self.external = self._add_external()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_ns(self, role: str) -> Netns:
        name = f"{self.prefix}-{role}"
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        ns = Netns(self, name)  # type: ignore[arg-type]
        ns.ip("link", "set", "lo", "up")
        return ns

    @staticmethod
    def node_ipv4(i: int) -> str:
        return f"192.168.50.{10 + i}"

    @staticmethod
    def node_ipv6(i: int) -> str:
        return f"fd00:50::{10 + i:x}"

    def _setup_router(self) -> None:
        r = self.router
        r.ip("link", "add", "lan", "type", "bridge")
        r.ip("addr", "add", "192.168.50.1/24", "dev", "lan")
        r.ip("addr", "add", "fd00:50::1/64", "dev", "lan", "nodad")
        r.ip("link", "set", "lan", "up")
        r.sysctl("net.ipv4.ip_forward", "1")
        r.sysctl("net.ipv6.conf.all.forwarding", "1")

    def _add_node(self, i: int) -> Netns:
        node = self._new_ns(f"n{i}")
        self.router.ip(
            "link", "add", f"vn{i}", "type", "veth", "peer", "name", "eth0", "netns", node.name
        )
        self.router.ip("link", "set", f"vn{i}", "master", "lan", "up")
        node.ip("addr", "add", f"{self.node_ipv4(i)}/24", "dev", "eth0")
        node.ip("addr", "add", f"{self.node_ipv6(i)}/64", "dev", "eth0", "nodad")
        node.ip("link", "set", "eth0", "up")
        node.ip("route", "add", "default", "via", "192.168.50.1")
        node.ip("-6", "route", "add", "default", "via", "fd00:50::1")
        node.sysctl("net.ipv4.ip_forward", "1")
        node.sysctl("net.ipv6.conf.all.forwarding", "1")
        self.router.ip("route", "add", f"10.244.{i}.0/24", "via", self.node_ipv4(i))
        self.router.ip("-6", "route", "add", f"fd00:244:{i}::/64", "via", self.node_ipv6(i))
        if i == 1:
            self.router.ip("route", "add", "192.168.100.0/24", "via", self.node_ipv4(i))
            self.router.ip("-6", "route", "add", "fd00:100::/64", "via", self.node_ipv6(i))
        self._pods_per_node[i] = 0
        return node

    def _add_external(self) -> Netns:
        ext = self._new_ns("x")
        r = self.router
        r.ip("link", "add", "vx", "type", "veth", "peer", "name", "eth0", "netns", ext.name)
        self.router.ip("addr", "add", "172.30.0.1/24", "dev", "vx")
        self.router.ip("addr", "add", "fd00:30::1/64", "dev", "vx", "nodad")
        self.router.ip("link", "set", "vx", "up")
        ext.ip("addr", "add", f"{EXTERNAL_V4}/24", "dev", "eth0")
        ext.ip("addr", "add", f"{EXTERNAL_V6}/64", "dev", "eth0", "nodad")
        ext.ip("link", "set", "eth0", "up")
        ext.ip("route", "add", "default", "via", "172.30.0.1")
        ext.ip("-6", "route", "add", "default", "via", "fd00:30::1")
        return ext

    def add_pod(self, name: str, node: int) -> ClusterPod:
        """A pod on node `node` (1-based), routed through it."""
        k = self._pods_per_node[node] = self._pods_per_node[node] + 1
        ns_name = f"{self.prefix}-n{node}p{k}"
        _run(["ip", "netns", "add", ns_name])
        self._namespaces.append(ns_name)
        pod = ClusterPod(self, ns_name, name, node, 10 + k)
        host = self.nodes[node - 1]
        veth = f"vp{k}"
        pod.ip("link", "set", "lo", "up")
        host.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns_name)
        host.ip("addr", "add", "169.254.1.1/32", "dev", veth)
        host.ip("-6", "addr", "add", "fe80::1/64", "dev", veth, "nodad")
        host.ip("link", "set", veth, "up")
        host.sysctl(f"net.ipv4.conf.{veth}.proxy_arp", "1")
        pod.ip("addr", "add", f"{pod.ipv4}/32", "dev", "eth0")
        pod.ip("-6", "addr", "add", f"{pod.ipv6}/128", "dev", "eth0", "nodad")
        pod.ip("link", "set", "eth0", "up")
        pod.ip("route", "add", "169.254.1.1", "dev", "eth0")
        pod.ip("route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        pod.ip("-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
        host.ip("route", "add", f"{pod.ipv4}/32", "dev", veth)
        host.ip("-6", "route", "add", f"{pod.ipv6}/128", "dev", veth)
        self.pods[name] = pod
        return pod

    def node_addresses(self, i: int) -> set[str]:
        links = json.loads(self.nodes[i - 1].run("ip", "-j", "addr", "show"))
        return {a["local"] for link in links for a in link.get("addr_info", [])}

    def popen_in(self, ns: Netns, *argv: str, **kwargs: object) -> subprocess.Popen[str]:
        return ns.popen(*argv, **kwargs)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._processes:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()
        for name in reversed(self._namespaces):
            _run(["ip", "netns", "del", name], check=False)


KPX_CODE = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"


def kpx_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", KPX_CODE, *args]
