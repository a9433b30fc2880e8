"""kpx in `redirect` mode for real: a node namespace with an nftables `redirect to :PORT` rule,
pods with whoami servers, a client namespace; the proxy reads SO_ORIGINAL_DST to find the
frontend the client dialled.

The proxy runs on the test's own thread, moved into the node namespace for the scenario, so its
listener and backend sockets live there; the client's sockets are made in the client namespace.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from kpx.backends import Backend
from kpx.proxy import Proxy
from tests.kpx.conftest import Runner, StaticFrontends, StaticPicker
from tests.kpx.netns import (
    CLIENT_IPV4,
    CLIENT_IPV6,
    NODE_IPV4,
    Netns,
    Pod,
    Topology,
    netns_available,
)

WEB_V4 = ("10.96.0.10", 80)
API_V4 = ("10.96.0.11", 80)
WEB_V6 = ("fd00:96::10", 80)
POD_PORT = 8080


def redirect_rules(port: int) -> str:
    """What kpx's control path installs, reduced to the essentials: frontends in a set,
    redirected from pods (prerouting) and from the node's own processes (output)."""
    return f"""
table ip kpxt_proxy {{
  set frontends {{
    type ipv4_addr . inet_service; elements = {{ 10.96.0.10 . 80, 10.96.0.11 . 80 }}
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr . tcp dport @frontends redirect to :{port}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr . tcp dport @frontends redirect to :{port}
  }}
}}
table ip6 kpxt_proxy6 {{
  set frontends {{ type ipv6_addr . inet_service; elements = {{ fd00:96::10 . 80 }} }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip6 daddr . tcp dport @frontends redirect to :{port}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip6 daddr . tcp dport @frontends redirect to :{port}
  }}
}}
"""


def backend_v4(pod: Pod) -> Backend:
    return Backend(pod.ipv4, POD_PORT, node_name=pod.pod_name)


def backend_v6(pod: Pod) -> Backend:
    return Backend(pod.ipv6, POD_PORT, node_name=pod.pod_name)


async def recv_line(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while not data.endswith(b"\n"):
        chunk = await loop.sock_recv(sock, 100)
        if not chunk:
            break
        data += chunk
    return data


async def connect_from(ns: Netns | None, address: tuple[str, int]) -> socket.socket:
    """A connected non-blocking socket made in `ns` (None: the calling thread's namespace)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family) if ns is None else ns.socket(family)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), 3)
    return sock


async def ask_name(ns: Netns | None, address: tuple[str, int]) -> str:
    sock = await connect_from(ns, address)
    try:
        return (await asyncio.wait_for(recv_line(sock), 3)).decode().strip()
    finally:
        sock.close()


@pytest.fixture
def pods(netns_topology: Topology) -> Iterator[list[Pod]]:
    pods = [netns_topology.add_pod(name) for name in ("web-1", "api-1", "api-2")]
    for pod in pods:
        pod.start_whoami(POD_PORT)
    yield pods


async def start_redirect_proxy(
    topology: Topology, frontends: StaticFrontends, **options: float | tuple[float, ...]
) -> tuple[Proxy, int]:
    """A proxy listening on one port for both families, and the rules sending traffic there."""
    proxy = Proxy(frontends, **options)  # type: ignore[arg-type]
    port = (await proxy.serve_redirect("0.0.0.0", 0)).port
    await proxy.serve_redirect("::", port)
    topology.node.nft(redirect_rules(port))
    return proxy, port


def test_each_client_reaches_the_frontend_it_dialled_through_the_redirect(
    netns_topology: Topology, pods: list[Pod], run_uvloop: Runner[None]
) -> None:
    web, api1, api2 = pods
    web_picker = StaticPicker([backend_v4(web)])
    api_picker = StaticPicker([backend_v4(api1), backend_v4(api2)])
    frontends = StaticFrontends({WEB_V4: web_picker, API_V4: api_picker})

    async def scenario() -> None:
        proxy, _port = await start_redirect_proxy(netns_topology, frontends)
        client = netns_topology.client
        assert [await ask_name(client, WEB_V4) for _ in range(3)] == ["web-1"] * 3
        assert [await ask_name(client, API_V4) for _ in range(4)] == ["api-1", "api-2"] * 2
        assert set(frontends.lookups) == {WEB_V4, API_V4}
        assert {ip for _, ip in web_picker.successes} == {CLIENT_IPV4}
        # A process on the node itself goes through the output hook.
        assert await ask_name(None, WEB_V4) == "web-1"
        await proxy.stop(0)

    with netns_topology.node.entered():
        run_uvloop(scenario())


def test_redirected_ipv6_clients_reach_their_frontend(
    netns_topology: Topology, pods: list[Pod], run_uvloop: Runner[None]
) -> None:
    web = pods[0]
    picker = StaticPicker([backend_v6(web)])
    frontends = StaticFrontends({WEB_V6: picker})

    async def scenario() -> None:
        proxy, _port = await start_redirect_proxy(netns_topology, frontends)
        assert await ask_name(netns_topology.client, WEB_V6) == "web-1"
        assert await ask_name(None, WEB_V6) == "web-1"
        assert frontends.lookups == [WEB_V6, WEB_V6]
        assert picker.successes[0] == (backend_v6(web), CLIENT_IPV6)
        await proxy.stop(0)

    with netns_topology.node.entered():
        run_uvloop(scenario())


def test_a_blackholed_and_a_refusing_pod_are_retried_past_through_the_redirect(
    netns_topology: Topology, pods: list[Pod], run_uvloop: Runner[None]
) -> None:
    web, api1, _api2 = pods
    silent = netns_topology.add_pod("silent")  # no server: its kernel refuses
    web.drop_tcp(POD_PORT)  # SYNs vanish
    picker = StaticPicker([backend_v4(web), backend_v4(silent), backend_v4(api1)], rotate=False)
    frontends = StaticFrontends({WEB_V4: picker})

    async def scenario() -> None:
        proxy, _port = await start_redirect_proxy(
            netns_topology, frontends, connect_ladder=(0.2, 0.5, 1)
        )
        started = time.monotonic()
        sock = await connect_from(netns_topology.client, WEB_V4)
        assert await asyncio.wait_for(recv_line(sock), 3) == b"api-1\n"
        elapsed = time.monotonic() - started
        assert 0.19 < elapsed < 1.0, elapsed  # one ladder step, not the SYN retry
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"through the retry")
        sock.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 100), 3):
            echoed += chunk
        assert echoed == b"through the retry"
        sock.close()
        assert picker.failures == [backend_v4(web), backend_v4(silent)]
        assert proxy.stats.backend_retries == 2
        await proxy.stop(0)

    with netns_topology.node.entered():
        run_uvloop(scenario())


def test_a_client_dialling_the_listener_itself_is_reset(
    netns_topology: Topology, pods: list[Pod], run_uvloop: Runner[None]
) -> None:
    frontends = StaticFrontends({WEB_V4: StaticPicker([backend_v4(pods[0])])})

    async def scenario() -> None:
        proxy, port = await start_redirect_proxy(netns_topology, frontends)
        with pytest.raises(ConnectionResetError):
            sock = await connect_from(netns_topology.client, (NODE_IPV4, port))
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 10), 2)
            finally:
                sock.close()
        assert proxy.stats.unknown_frontend == 1
        await proxy.stop(0)

    with netns_topology.node.entered():
        run_uvloop(scenario())


def test_a_topology_leaves_nothing_behind_when_its_test_fails() -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="test failed"), Topology() as topology:
        server = topology.add_pod("p").start_whoami(POD_PORT)
        topology.add_external("outside")
        names = topology.namespace_names
        raise RuntimeError("test failed")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert len(names) == 4
    assert not [name for name in names if name in left]
    assert server.poll() is not None
