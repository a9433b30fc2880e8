"""A routed three-namespace chain for the proxy benchmark (bench/proxy.py).

    client ns                 node ns                               server ns
    eth0 10.233.1.2/24 ── vc 10.233.1.1/24   vs 10.233.2.1/24 ── eth0 10.233.2.2/24
                              (ip_forward on: proxies,               + 10.233.2.3/24
                               nftables, haproxy, kpx run here)

The client and the server have default routes via the node, so "direct" traffic crosses the
node as a router (the same two veth hops every proxied path takes) and traffic to a Service
address (10.96.0.0/12, routed nowhere) reaches the node, where a DNAT rule or kpx's redirect
catches it. Replies always come back through the node, so kernel NAT needs no masquerade.

Every namespace is named `kpxb-<6 hex>-<role>` and every address lives only inside them: the
host's interfaces and ruleset are never touched. `close()` (also run by atexit) kills every
process started through `popen` and deletes the namespaces, which removes the veths and any
nftables tables with them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

CLIENT_IP = "10.233.1.2"
NODE_CLIENT_SIDE_IP = "10.233.1.1"
NODE_SERVER_SIDE_IP = "10.233.2.1"
SERVER_IP = "10.233.2.2"
SERVER_IP_2 = "10.233.2.3"

_libc = ctypes.CDLL(None, use_errno=True)


def netns_unavailable() -> str | None:
    """None when the topology can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    return None


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Ns:
    """One namespace of the chain."""

    def __init__(self, chain: Chain, name: str) -> None:
        self.chain = chain
        self.name = name

    def ip(self, *args: str) -> str:
        return _run(["ip", "-n", self.name, *args])

    def run(self, *argv: str, input: str | None = None, check: bool = True) -> str:
        return _run(["ip", "netns", "exec", self.name, *argv], input=input, check=check)

    def nft(self, ruleset: str) -> None:
        self.run("nft", "-f", "-", input=ruleset)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """A process inside the namespace (`ip netns exec` execs, so `.pid` is the program's
        own pid); killed by `Chain.close()`."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv], **kwargs
        )
        self.chain.processes.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread lives in this namespace for the block; sockets created in it
        stay in this namespace afterwards."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(os.path.join(NETNS_DIR, self.name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        with self.entered():
            return socket.socket(family, kind)


class Chain:
    """client ns -- node ns -- server ns; a context manager."""

    def __init__(self) -> None:
        reason = netns_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        self.prefix = f"kpxb-{secrets.token_hex(3)}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self._closed = False
        _open.add(self)
        try:
            self.client = self._new("client")
            self.node = self._new("node")
            self.server = self._new("server")
            self._link(self.client, "vc", NODE_CLIENT_SIDE_IP, [CLIENT_IP])
            self._link(self.server, "vs", NODE_SERVER_SIDE_IP, [SERVER_IP, SERVER_IP_2])
            self.node.sysctl("net.ipv4.ip_forward", "1")
            for ns in (self.client, self.node, self.server):
                # Many short connections per second: do not run out of ports or TIME_WAIT.
                ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
                ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
                ns.sysctl("net.core.somaxconn", "8192")
                ns.sysctl("net.ipv4.tcp_max_syn_backlog", "8192")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new(self, role: str) -> Ns:
        name = f"{self.prefix}-{role}"
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        ns = Ns(self, name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def _link(self, peer: Ns, veth: str, node_ip: str, peer_ips: list[str]) -> None:
        node = self.node
        node.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", peer.name)
        node.ip("addr", "add", f"{node_ip}/24", "dev", veth)
        node.ip("link", "set", veth, "up")
        for ip in peer_ips:
            peer.ip("addr", "add", f"{ip}/24", "dev", "eth0")
        peer.ip("link", "set", "eth0", "up")
        peer.ip("route", "add", "default", "via", node_ip)

    def close(self) -> None:
        """Kill every process started here, delete every namespace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        for name in reversed(self.namespaces):
            _run(["ip", "netns", "del", name], check=False)
        _open.discard(self)


_open: set[Chain] = set()


@atexit.register
def _close_leftovers() -> None:
    for chain in list(_open):
        chain.close()
