"""The UDP relay in `--mode ports` with real sockets on 127.0.0.0/8 (no root, no namespaces).

Modelled on Kubernetes e2e conntrack.go and networking.go's UDP checks: a client keeps one
source port while endpoints come and go, endpoints that start unready, ClientIP affinity, large
datagrams, a frontend without endpoints (ICMP port unreachable), and the same port with both
protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.core import Metric

from kpx.balancer import Balancer
from kpx.health import ProxierHealth
from kpx.metrics import UdpStatsCollector
from kpx.sync import RuleSyncer
from kpx.table import ServiceTable
from kpx.udp_ports import UdpPortsWriter
from kpx.udp_relay import UdpRelay
from kwatch.cluster import DEFAULT_INDEXERS
from kwatch.resources import ENDPOINTSLICES, SERVICES
from kwatch.store import Store

VIP = "10.96.0.53"
BACKEND_IPS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")


def service(ports: list[dict[str, Any]] | None = None, **spec: Any) -> Any:
    spec.setdefault("clusterIP", VIP)
    spec["ports"] = ports or [{"name": "dns", "port": 53, "protocol": "UDP"}]
    return SERVICES.parse({"metadata": {"name": "dns", "namespace": "default"}, "spec": spec})


def endpoint_slice(port: int, ready: dict[str, bool], protocol: str = "UDP") -> Any:
    return ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": "dns-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "dns"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [ip], "conditions": {"ready": ok}} for ip, ok in ready.items()
            ],
            "ports": [{"name": "dns", "port": port, "protocol": protocol}],
        }
    )


class Echo(asyncio.DatagramProtocol):
    """A backend: answers `<its ip>|<datagram>` to whoever sent it."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.transport: Any = None
        self.peers: list[tuple[str, int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.peers.append(addr)
        self.transport.sendto(self.ip.encode() + b"|" + data, addr)


class Harness:
    def __init__(self, idle_timeout: float = 30.0, max_sessions: int = 1000) -> None:
        self.services: Store[Any] = Store("services")
        self.slices: Store[Any] = Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])
        self.table = ServiceTable(
            self.services, self.slices, None, "node-a", Balancer(), protocol="UDP"
        )
        self.relay = UdpRelay(self.table, idle_timeout=idle_timeout, max_sessions=max_sessions)
        self.writer = UdpPortsWriter(self.relay)
        self.syncer = RuleSyncer(self.table, self.writer, ProxierHealth(60), min_sync_period=0)
        self.backends: dict[str, Echo] = {}
        self.port = 0

    async def start_backends(self, ips: tuple[str, ...] = BACKEND_IPS) -> None:
        loop = asyncio.get_running_loop()
        for ip in ips:
            echo = Echo(ip)
            await loop.create_datagram_endpoint(lambda e=echo: e, local_addr=(ip, self.port))
            assert echo.transport is not None
            self.port = echo.transport.get_extra_info("sockname")[1]
            self.backends[ip] = echo

    def stop_backend(self, ip: str) -> None:
        echo = self.backends.pop(ip)
        assert echo.transport is not None
        echo.transport.close()

    async def apply(self, *objects: Any) -> None:
        for obj in objects:
            store = self.services if type(obj).__name__ == "Service" else self.slices
            store.upsert(obj.key, obj)
        await self.syncer.sync_once()

    def frontend_port(self, frontend: str = f"{VIP}:53") -> int:
        rows = [r for r in self.writer.assignments() if r["frontend"] == frontend]
        assert rows, self.writer.assignments()
        return int(rows[0]["port"])

    async def close(self) -> None:
        await self.relay.stop()
        for ip in list(self.backends):
            self.stop_backend(ip)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    await h.start_backends()
    try:
        yield h
    finally:
        await h.close()


@contextlib.contextmanager
def client(ip: str = "127.0.0.1", port: int = 0) -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((ip, port))
    try:
        yield sock
    finally:
        sock.close()


async def ask(sock: socket.socket, port: int, data: bytes, wait: float = 2.0) -> bytes:
    """Send one datagram to 127.0.0.1:port and return the answer (its source checked)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, data, ("127.0.0.1", port))
    answer, source = await asyncio.wait_for(loop.sock_recvfrom(sock, 70000), wait)
    assert source == ("127.0.0.1", port)  # from the address the client sent to
    return answer


async def answered_by(sock: socket.socket, port: int, data: bytes = b"ping") -> str:
    answer = await ask(sock, port, data)
    ip, _, echoed = answer.partition(b"|")
    assert echoed == data
    return ip.decode()


async def test_datagrams_are_relayed_and_a_client_port_keeps_its_endpoint(harness: Harness):
    await harness.apply(service(), endpoint_slice(harness.port, dict.fromkeys(BACKEND_IPS, True)))
    port = harness.frontend_port()
    with client() as one, client() as two:
        first = {await answered_by(one, port) for _ in range(5)}
        assert len(first) == 1  # one session, one endpoint
        second = await answered_by(two, port)
        assert second != first.pop()  # round robin for the next client
    stats = harness.relay.stats
    assert stats.sessions_created == 2 and len(harness.relay.sessions) == 2
    assert stats.datagrams_to_backend == stats.datagrams_to_client == 6


async def test_a_client_reusing_its_source_port_follows_the_endpoint_change(harness: Harness):
    # conntrack.go "should be able to preserve UDP traffic when server pod cycles": the same
    # client port must reach the new endpoint once the old one is gone.
    ip1, ip2 = BACKEND_IPS[:2]
    await harness.apply(service(), endpoint_slice(harness.port, {ip1: True}))
    port = harness.frontend_port()
    with client() as sock:
        assert await answered_by(sock, port) == ip1
        await harness.apply(endpoint_slice(harness.port, {ip2: True}))
        assert await answered_by(sock, port) == ip2
        await harness.apply(endpoint_slice(harness.port, {ip1: True}))
        assert await answered_by(sock, port) == ip1
    assert harness.relay.stats.sessions_retargeted == 2


async def test_no_endpoints_is_port_unreachable_then_the_same_client_port_is_answered(
    harness: Harness,
):
    # kube-proxy rejects (ICMP port unreachable); conntrack.go checks that a client that kept
    # sending while there were no endpoints is answered once one appears (#48370).
    await harness.apply(service(), endpoint_slice(harness.port, {}))
    port = harness.frontend_port()
    assert harness.writer.assignments()[0]["state"] == "reject"
    with client() as sock:
        sock.connect(("127.0.0.1", port))  # a connected socket reports ICMP errors
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"ping")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(loop.sock_recv(sock, 100), 2)
        await harness.apply(endpoint_slice(harness.port, {BACKEND_IPS[0]: True}))
        assert harness.frontend_port() == port  # the frontend kept its port
        await loop.sock_sendall(sock, b"ping")
        answer = await asyncio.wait_for(loop.sock_recv(sock, 100), 2)
        assert answer == f"{BACKEND_IPS[0]}|ping".encode()


async def test_an_initially_unready_endpoint_serves_once_ready(harness: Harness):
    # conntrack.go "proxy implementation should not be vulnerable to the invalid conntrack
    # state bug" / #105657: endpoints unready at first, then ready.
    ip1 = BACKEND_IPS[0]
    await harness.apply(service(), endpoint_slice(harness.port, {ip1: False}))
    port = harness.frontend_port()
    with client() as sock:
        with pytest.raises(TimeoutError):
            await ask(sock, port, b"early", wait=0.3)
        await harness.apply(endpoint_slice(harness.port, {ip1: True}))
        assert await answered_by(sock, port) == ip1


async def test_client_ip_affinity_pins_every_port_of_one_client_ip(harness: Harness):
    await harness.apply(
        service(sessionAffinity="ClientIP"),
        endpoint_slice(harness.port, dict.fromkeys(BACKEND_IPS, True)),
    )
    port = harness.frontend_port()
    seen = set()
    for _ in range(6):
        with client("127.0.0.5") as sock:
            seen.add(await answered_by(sock, port))
    assert len(seen) == 1
    others = set()
    for n in range(6, 12):
        with client(f"127.0.0.{n}") as sock:
            others.add(await answered_by(sock, port))
    assert len(others) > 1  # other client IPs still spread


@pytest.mark.parametrize("size", [2000, 65507])
async def test_large_datagrams_pass_whole(harness: Harness, size: int):
    # networking.go sends a 2,000-byte UDP request; the legacy proxy cut at 4 KiB (#47659).
    await harness.apply(service(), endpoint_slice(harness.port, {BACKEND_IPS[0]: True}))
    port = harness.frontend_port()
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    with client() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        answer = await ask(sock, port, payload[: size - len(BACKEND_IPS[0]) - 1])
    assert answer == BACKEND_IPS[0].encode() + b"|" + payload[: size - len(BACKEND_IPS[0]) - 1]
    assert len(answer) == size


async def test_an_endpoint_that_answers_icmp_unreachable_is_left_for_another(harness: Harness):
    ip1, ip2 = BACKEND_IPS[:2]
    await harness.apply(service(), endpoint_slice(harness.port, {ip1: True, ip2: True}))
    port = harness.frontend_port()
    with client() as sock:
        first = await answered_by(sock, port)
        harness.stop_backend(first)  # its port now answers ICMP port unreachable
        other = ip2 if first == ip1 else ip1
        with contextlib.suppress(TimeoutError):
            await ask(sock, port, b"lost?", wait=0.3)
        assert await answered_by(sock, port) == other
    assert harness.relay.stats.drops["backend_unreachable"] >= 1


async def test_idle_sessions_expire_and_a_full_table_evicts():
    h = Harness(idle_timeout=0.2, max_sessions=2)
    await h.start_backends(BACKEND_IPS[:1])
    try:
        await h.apply(service(), endpoint_slice(h.port, {BACKEND_IPS[0]: True}))
        port = h.frontend_port()
        with client() as a, client() as b, client() as c:
            for sock in (a, b, c):
                await answered_by(sock, port)
            assert h.relay.stats.sessions_evicted == 1 and len(h.relay.sessions) == 2
            # Expiry runs every timeout / 4: poll (a busy machine delays the sweep timer).
            for _ in range(250):
                if not len(h.relay.sessions):
                    break
                await asyncio.sleep(0.02)
            assert len(h.relay.sessions) == 0 and h.relay.stats.sessions_expired == 2
            assert await answered_by(a, port) == BACKEND_IPS[0]  # a new session
    finally:
        await h.close()


async def test_same_port_both_protocols_removing_udp_stops_only_udp(harness: Harness):
    # service.go "should serve endpoints on same port and different protocols".
    both = [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]
    tcp_table = ServiceTable(harness.services, harness.slices, None, "node-a", Balancer())
    await harness.apply(service(both), endpoint_slice(harness.port, {BACKEND_IPS[0]: True}))
    assert tcp_table.sync().steering == {(4, VIP, 53): "reject"}  # no TCP endpoints yet
    port = harness.frontend_port()
    with client() as sock:
        assert await answered_by(sock, port) == BACKEND_IPS[0]
        await harness.apply(service(both[1:]))
        assert harness.writer.assignments() == []  # the UDP frontend is gone
        assert tcp_table.sync().steering == {}  # the TCP one did not change
        assert tcp_table.lookup(VIP, 53) is not None
        with pytest.raises((TimeoutError, ConnectionRefusedError)):
            await ask(sock, port, b"after", wait=0.3)
    assert len(harness.relay.sessions) == 0


async def test_udp_metrics_are_exported(harness: Harness):
    await harness.apply(service(), endpoint_slice(harness.port, {BACKEND_IPS[0]: True}))
    with client() as sock:
        await answered_by(sock, harness.frontend_port(), b"12345")
    collector = UdpStatsCollector(harness.relay.stats, lambda: len(harness.relay.sessions))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in collector.collect()
        for s in _samples(metric)
    }
    assert samples[("kpx_udp_sessions_active", ())] == 1
    assert samples[("kpx_udp_sessions_created_total", ())] == 1
    assert samples[("kpx_udp_datagrams_total", (("direction", "to_backend"),))] == 1
    assert samples[("kpx_udp_bytes_total", (("direction", "to_backend"),))] == 5
    assert samples[("kpx_udp_bytes_total", (("direction", "to_client"),))] == 5 + 11
    assert samples[("kpx_udp_drops_total", (("reason", "no_endpoints"),))] == 0


def _samples(metric: Metric) -> list[Any]:
    return list(metric.samples)


def test_kpx_in_ports_mode_relays_udp_and_lists_the_udp_frontend(tmp_path: Path) -> None:
    """The real daemon, `--mode ports`, no root: a TCP and a UDP port of one Service on the
    same number each get their own local port; the UDP one relays (a real UDP backend)."""
    backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    backend.bind(("127.0.0.1", 0))
    backend.settimeout(5)
    port = backend.getsockname()[1]
    both = [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]
    docs = [
        {"kind": "Service", "metadata": {"name": "dns"}, "spec": {"clusterIP": VIP, "ports": both}},
        {
            "kind": "EndpointSlice",
            "metadata": {"name": "dns-1", "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"]}],
            "ports": [
                {"name": "dns", "port": port, "protocol": "UDP"},
                {"name": "dns-tcp", "port": port, "protocol": "TCP"},
            ],
        },
    ]
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    kpx = subprocess.Popen(
        [sys.executable, "-c", code, "--mode", "ports", "--manifests", str(manifest),
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
        assert sorted((r["frontend"], r["protocol"], r["state"]) for r in rows) == [
            (f"{VIP}:53", "TCP", "serve"),
            (f"{VIP}:53", "UDP", "serve"),
        ]
        udp_port = next(r["port"] for r in rows if r["protocol"] == "UDP")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"question", ("127.0.0.1", udp_port))
            data, relay = backend.recvfrom(100)
            assert data == b"question"
            backend.sendto(b"answer", relay)
            assert client.recvfrom(100) == (b"answer", ("127.0.0.1", udp_port))
    finally:
        kpx.send_signal(signal.SIGTERM)
        assert kpx.wait(timeout=40) == 0
        backend.close()
