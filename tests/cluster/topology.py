"""Four kind-like nodes in network namespaces: a router namespace holds the node network's
bridge (172.18.0.0/16, as kind's docker network), each node has a pod CIDR 10.244.N.0/24 and
kindnet's routes (a pod's /32 on its veth, other nodes' pod CIDRs via their node IPs), and pods
are namespaces on veth pairs with kubelet-style resolv.conf (via /etc/netns/NAME/).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
CLONE_NEWNET = 0x40000000
ROUTER_IP = "172.18.0.1"
ETC_NETNS = Path("/etc/netns")


def run(argv: list[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Netns:
    name: str

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.name, *args])

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def sysctl(self, key: str, value: str) -> None:
        run(self.exec_argv("sysctl", "-qw", f"{key}={value}"))

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into this namespace for the block."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                yield
            finally:
                _libc.setns(original, CLONE_NEWNET)
        finally:
            os.close(target)
            os.close(original)

    def call(self, fn: Callable[[], _T]) -> _T:
        out: list[_T] = []
        err: list[BaseException] = []

        def inside() -> None:
            try:
                with self.entered():
                    out.append(fn())
            except BaseException as exc:
                err.append(exc)

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if err:
            raise err[0]
        return out[0]

    def socket(self, type: int = socket.SOCK_STREAM) -> socket.socket:
        return self.call(lambda: socket.socket(socket.AF_INET, type))


@dataclass
class Pod(Netns):
    pod_name: str = ""
    namespace: str = ""
    ip_addr: str = ""
    node: Node | None = None


@dataclass
class Node(Netns):
    node_name: str = ""
    index: int = 0
    ip_addr: str = ""
    pod_cidr: str = ""
    pods: list[Pod] = field(default_factory=list)


class Cluster:
    """The namespaces, created at once; close() removes every one (and /etc/netns entries)."""

    def __init__(self, node_names: list[str], cluster_domain: str, dns_ip: str) -> None:
        self.prefix = f"kpxt-{secrets.token_hex(3)}"
        self.cluster_domain = cluster_domain
        self.dns_ip = dns_ip
        self._names: list[str] = []
        self.nodes: list[Node] = []
        try:
            self.router = Netns(self._add("rt"))
            self.router.ip("link", "add", "br0", "type", "bridge")
            self.router.ip("addr", "add", f"{ROUTER_IP}/16", "dev", "br0")
            self.router.ip("link", "set", "br0", "up")
            for index, name in enumerate(node_names):
                self._add_node(index, name)
            hosts = "127.0.0.1 localhost\n" + "".join(
                f"{n.ip_addr} {n.node_name}\n" for n in self.nodes
            )
            for node in self.nodes:
                self._etc(node.name, hosts, f"nameserver {ROUTER_IP}\n")
                for other in self.nodes:
                    if other is not node:
                        node.ip("route", "add", other.pod_cidr, "via", other.ip_addr)
        except BaseException:
            self.close()
            raise

    def _add(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        run(["ip", "netns", "add", name])
        self._names.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def _etc(self, ns: str, hosts: str, resolv: str) -> None:
        directory = ETC_NETNS / ns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text(hosts)
        (directory / "resolv.conf").write_text(resolv)

    def _add_node(self, index: int, name: str) -> None:
        node = Node(self._add(f"n{index}"), node_name=name, index=index)
        node.ip_addr = f"172.18.0.{index + 2}"
        node.pod_cidr = f"10.244.{index}.0/24"
        self.router.ip(
            "link", "add", f"vn{index}", "type", "veth", "peer", "name", "eth0", "netns", node.name
        )
        self.router.ip("link", "set", f"vn{index}", "master", "br0", "up")
        node.ip("addr", "add", f"{node.ip_addr}/16", "dev", "eth0")
        node.ip("link", "set", "eth0", "up")
        node.ip("route", "add", "default", "via", ROUTER_IP)
        node.sysctl("net.ipv4.ip_forward", "1")
        self.nodes.append(node)

    def add_pod(self, node: Node, pod_name: str, namespace: str) -> Pod:
        k = len(node.pods) + 2
        pod = Pod(
            self._add(f"n{node.index}p{k}"), pod_name=pod_name, namespace=namespace, node=node
        )
        pod.ip_addr = f"10.244.{node.index}.{k}"
        gateway = f"10.244.{node.index}.1"
        veth = f"veth{k}"
        node.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.name)
        node.ip("addr", "add", f"{gateway}/32", "dev", veth)
        node.ip("link", "set", veth, "up")
        node.ip("route", "add", f"{pod.ip_addr}/32", "dev", veth)
        pod.ip("addr", "add", f"{pod.ip_addr}/32", "dev", "eth0")
        pod.ip("link", "set", "eth0", "up")
        pod.ip("route", "add", gateway, "dev", "eth0")
        pod.ip("route", "add", "default", "via", gateway, "dev", "eth0")
        domain = self.cluster_domain
        # As a kubelet writes it for dnsPolicy ClusterFirst.
        resolv = (
            f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
            f"nameserver {self.dns_ip}\noptions ndots:5\n"
        )
        self._etc(pod.name, f"127.0.0.1 localhost\n{pod.ip_addr} {pod_name}\n", resolv)
        node.pods.append(pod)
        return pod

    def close(self) -> None:
        for name in reversed(self._names):
            # Anything still running in a namespace this test made was started by the test.
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        self._names.clear()
