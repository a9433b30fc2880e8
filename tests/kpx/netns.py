"""Network-namespace topologies for kpx end-to-end tests (real kernel, real sockets, real nft).

What `Topology` builds (every namespace is named `kpxt-<6 hex>-<role>`, every address lives only
inside namespaces it created, so nothing touches the host's interfaces or nftables ruleset):

    client ns (eth0 10.244.0.2, fd00:244::2) ─┐
                                              ├─ br0 in the node ns (10.244.0.1/24, fd00:244::1/64)
    pod ns "p1" (eth0 10.244.0.11, ::b) ──────┤    the node routes (ip_forward on) and is where
    pod ns "p2" (eth0 10.244.0.12, ::c) ──────┘    kpx and its nftables table run
    external ns "x" (eth0 10.245.N.2/24) ── veth xN in the node ns (10.245.N.1/24): for NodePort

Every pod and the client have default routes via the node, so traffic to a ClusterIP (any
address, e.g. 10.96.0.10) leaves the pod towards the node, where a prerouting `redirect` rule can
catch it; connections made by processes in the node namespace itself go through its output hook
(the node has default routes on br0, so such a connect() finds a route first).

Usage (pytest: the `netns_topology` fixture in tests/kpx/conftest.py yields a Topology and skips
when namespaces are not available)::

    def test_something(netns_topology: Topology) -> None:
        p1 = netns_topology.add_pod("p1")
        p1.start_whoami(8080)                      # answers "p1\\n", then echoes; half-close aware
        netns_topology.node.nft("table ip t { ... }")   # `nft -f -` inside the node namespace
        sock = netns_topology.client.socket()     # a socket created inside the client namespace
        with netns_topology.node.entered():        # this thread now lives in the node namespace:
            ...                                   # sockets created here (kpx's) belong to it
        netns_topology.node.popen("python", "-m", "kpx", ...)  # a process in the node ns

Cleanup is guaranteed: `Topology.close()` (the fixture calls it; an atexit hook calls it for any
topology left open) kills the processes it started and deletes its namespaces, which deletes the
veths, the bridge and the nftables tables with them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

NODE_IPV4 = "10.244.0.1"
NODE_IPV6 = "fd00:244::1"
CLIENT_IPV4 = "10.244.0.2"
CLIENT_IPV6 = "fd00:244::2"
_POD_HOST_BASE = 10  # the n-th pod gets host number 10 + n

_libc = ctypes.CDLL(None, use_errno=True)
_T = TypeVar("_T")

# The whoami server run inside pod namespaces: says its name, then echoes until EOF, then
# closes its write side (so half-close through the proxy can be observed), thread per client.
WHOAMI_SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", port))
srv.listen(1024)
print("ready", flush=True)

def serve(conn):
    try:
        conn.sendall((name + "\n").encode())
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (not root, no `ip`, no netns support)."""


def netns_available() -> str | None:
    """None when topologies can be built here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command"
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


class Netns:
    """One network namespace created by a Topology (`name` is its /run/netns name)."""

    def __init__(self, topology: Topology, name: str) -> None:
        self.topology = topology
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name})"

    def ip(self, *args: str, check: bool = True) -> str:
        """`ip -n <ns> args...`."""
        return _run(["ip", "-n", self.name, *args], check=check)

    def run(self, *argv: str, input: str | None = None, check: bool = True) -> str:
        """Run a command inside the namespace and return its stdout."""
        return _run(["ip", "netns", "exec", self.name, *argv], input=input, check=check)

    def nft(self, ruleset: str) -> None:
        """Apply an nftables script (`nft -f -`) inside this namespace only."""
        self.run("nft", "-f", "-", input=ruleset)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def popen(self, *argv: str, **kwargs: object) -> subprocess.Popen[str]:
        """Start a process inside the namespace; the Topology kills it at cleanup."""
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.name, *argv], text=True, **kwargs
        )
        self.topology._processes.append(proc)
        return proc

    def spawn_python(
        self, code: str, *args: str, ready_line: str = "ready", timeout: float = 10.0
    ) -> subprocess.Popen[str]:
        """Run `python -c code args...` inside the namespace and wait until it prints
        `ready_line` on stdout (so its listener exists before the test goes on)."""
        argv = (sys.executable, "-u", "-c", code, *args)
        proc = self.popen(*argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if line != ready_line:
            proc.kill()
            raise RuntimeError(f"{self.name}: process did not get ready (got {line!r})")
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling THREAD into this namespace for the block (other threads stay where
        they are). Sockets keep the namespace they were created in, so sockets created inside
        the block (e.g. by a kpx Proxy running on this thread's event loop) live here."""
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

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on a short-lived thread that lives inside this namespace."""
        result: list[_T] = []
        error: list[BaseException] = []

        def inside() -> None:
            try:
                with self.entered():
                    result.append(fn())
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that belongs to this namespace (usable from any thread or event loop)."""
        return self.call(lambda: socket.socket(family, type))

    def drop_tcp(self, port: int) -> None:
        """Blackhole: silently drop incoming TCP to `port` in this namespace (SYNs vanish, so a
        connect times out instead of being refused)."""
        self.nft(
            "table inet kpxt_blackhole {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    tcp dport {port} drop\n"
            "  }\n"
            "}\n"
        )


class Pod(Netns):
    """A pod namespace on the node's bridge, with its addresses."""

    def __init__(self, topology: Topology, name: str, pod_name: str, host: int) -> None:
        super().__init__(topology, name)
        self.pod_name = pod_name
        self.ipv4 = f"10.244.0.{host}"
        self.ipv6 = f"fd00:244::{host:x}"

    def start_whoami(self, port: int = 8080) -> subprocess.Popen[str]:
        """Serve TCP `port` (IPv4 and IPv6): send `<pod_name>\\n`, then echo until EOF."""
        return self.spawn_python(WHOAMI_SERVER, self.pod_name, str(port))


class Topology:
    """A node namespace with a bridge, pods and a client on it, external namespaces on routed
    veths. Create it as a context manager (or call `close()`)."""

    def __init__(self) -> None:
        reason = netns_available()
        if reason is not None:
            raise NetnsUnavailable(reason)
        self.prefix = f"kpxt-{secrets.token_hex(3)}"
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[str]] = []
        self.pods: dict[str, Pod] = {}
        self.externals: dict[str, Netns] = {}
        self._closed = False
        _open_topologies.add(self)
        try:
            self.node = self._new_ns("node", Netns)
            self._setup_node()
            self.client = self._new_ns("client", Netns)
            self._attach_to_bridge(self.client, "vclient", CLIENT_IPV4, CLIENT_IPV6)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_ns(self, role: str, cls: Callable[[Topology, str], _T]) -> _T:
        name = f"{self.prefix}-{role}"
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return cls(self, name)

    def _setup_node(self) -> None:
        node = self.node
        node.ip("link", "add", "br0", "type", "bridge")
        node.ip("addr", "add", f"{NODE_IPV4}/24", "dev", "br0")
        node.ip("addr", "add", f"{NODE_IPV6}/64", "dev", "br0", "nodad")
        node.ip("link", "set", "br0", "up")
        # Like a real node's default gateway: lets node processes dial any ClusterIP, external
        # or LoadBalancer IP (connect() needs a route before the output hook can redirect).
        node.ip("route", "add", "default", "dev", "br0")
        node.ip("-6", "route", "add", "default", "dev", "br0")
        node.sysctl("net.ipv4.ip_forward", "1")
        node.sysctl("net.ipv6.conf.all.forwarding", "1")

    def _attach_to_bridge(self, ns: Netns, veth: str, ipv4: str, ipv6: str) -> None:
        self.node.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        self.node.ip("link", "set", veth, "master", "br0", "up")
        ns.ip("addr", "add", f"{ipv4}/24", "dev", "eth0")
        ns.ip("addr", "add", f"{ipv6}/64", "dev", "eth0", "nodad")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "via", NODE_IPV4)
        ns.ip("-6", "route", "add", "default", "via", NODE_IPV6)

    def add_pod(self, pod_name: str) -> Pod:
        """A new pod namespace on the bridge; addresses 10.244.0.(10+n) and fd00:244::(10+n)."""
        if pod_name in self.pods:
            raise ValueError(f"pod {pod_name} exists")
        host = _POD_HOST_BASE + len(self.pods) + 1
        name = f"{self.prefix}-p{len(self.pods) + 1}"
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        pod = Pod(self, name, pod_name, host)
        pod.ip("link", "set", "lo", "up")
        self._attach_to_bridge(pod, f"vp{len(self.pods) + 1}", pod.ipv4, pod.ipv6)
        self.pods[pod_name] = pod
        return pod

    def add_external(self, label: str) -> Netns:
        """An "outside the cluster" namespace on its own routed link: it is 10.245.N.2 /
        fd00:245:N::2, the node is 10.245.N.1 / fd00:245:N::1 (use those for NodePort)."""
        n = len(self.externals) + 1
        ext = self._new_ns(f"x{n}", Netns)
        veth = f"vx{n}"
        self.node.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ext.name)
        self.node.ip("addr", "add", f"10.245.{n}.1/24", "dev", veth)
        self.node.ip("addr", "add", f"fd00:245:{n}::1/64", "dev", veth, "nodad")
        self.node.ip("link", "set", veth, "up")
        ext.ip("addr", "add", f"10.245.{n}.2/24", "dev", "eth0")
        ext.ip("addr", "add", f"fd00:245:{n}::2/64", "dev", "eth0", "nodad")
        ext.ip("link", "set", "eth0", "up")
        ext.ip("route", "add", "default", "via", f"10.245.{n}.1")
        ext.ip("-6", "route", "add", "default", "via", f"fd00:245:{n}::1")
        self.externals[label] = ext
        return ext

    @property
    def namespace_names(self) -> list[str]:
        """Every namespace this topology created (they all start with `prefix`)."""
        return list(self._namespaces)

    def close(self) -> None:
        """Kill every process started here and delete every namespace (idempotent)."""
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
        _open_topologies.discard(self)


_open_topologies: set[Topology] = set()


@atexit.register
def _close_leftovers() -> None:
    for topology in list(_open_topologies):
        topology.close()
