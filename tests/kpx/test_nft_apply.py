"""Applying kpx's nftables ruleset in a network namespace: real kernel, real sockets.

A stand-in listener on the proxy port (in the node namespace) answers with the destination the
client dialled (SO_ORIGINAL_DST), so each test sees exactly which connections were steered.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

from kpx.nft import NftWriter
from kpx.rules import Steer, SteerKey
from tests.kpx.netns import Topology

PROXY_PORT = 10262
# Listens on the proxy port and on 30081 (a NodePort that must be rejected even though a local
# process listens there); replies "<original dst ip> <port>\n" or "direct <port>\n".
LISTENER = r"""
import socket, struct, threading
def serve(port, steered):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port)); srv.listen(64)
    def loop():
        while True:
            conn, _ = srv.accept()
            if steered:
                raw = conn.getsockopt(socket.SOL_IP, 80, 16)
                dport, = struct.unpack_from("!H", raw, 2)
                conn.sendall(f"{socket.inet_ntoa(raw[4:8])} {dport}\n".encode())
            else:
                conn.sendall(f"direct {port}\n".encode())
            conn.close()
    threading.Thread(target=loop, daemon=True).start()
serve(10262, True); serve(30081, False)
print("ready", flush=True)
threading.Event().wait()
"""


def dial(ns: Any, ip: str, port: int, timeout: float = 2.0) -> str:
    """'<orig ip> <port>' when steered, 'refused', or 'timeout'."""
    sock = ns.socket()
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
        return sock.makefile().readline().strip()
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    finally:
        sock.close()


def listed_sets(topo: Topology) -> dict[str, set[str]]:
    out = topo.node.run("nft", "-j", "list", "table", "inet", "kpx")
    sets: dict[str, set[str]] = {}
    for item in json.loads(out)["nftables"]:
        if "set" in item:
            elems = set()
            for e in item["set"].get("elem", []):
                if isinstance(e, dict) and "concat" in e:
                    elems.add(" . ".join(str(p) for p in e["concat"]))
                else:
                    elems.add(str(e))
            sets[item["set"]["name"]] = elems
    return sets


def writer_for(topo: Topology) -> NftWriter:
    # Real nodes have a default route; without one the kernel refuses to route ClusterIP
    # traffic (ENETUNREACH) before any hook sees it.
    topo.node.ip("route", "replace", "10.96.0.0/16", "dev", "br0")
    topo.node.ip("-6", "route", "replace", "fd00:96::/64", "dev", "br0")
    return NftWriter(PROXY_PORT, command=["ip", "netns", "exec", topo.node.name, "nft"])


STATE: dict[SteerKey, Steer] = {
    (4, "10.96.0.1", 80): "serve",
    (4, "10.96.0.2", 80): "reject",
    (4, "", 30080): "serve",
    (4, "", 30081): "reject",
}


def test_steering_redirects_and_rejects_for_pods_hosts_and_external_clients(
    netns_topology: Topology,
) -> None:
    topo = netns_topology
    ext = topo.add_external("x")
    topo.node.spawn_python(LISTENER)
    writer = writer_for(topo)
    assert asyncio.run(writer.sync(STATE))

    # From a pod-like client (prerouting) and from the node itself (output).
    assert dial(topo.client, "10.96.0.1", 80) == "10.96.0.1 80"
    assert dial(topo.node, "10.96.0.1", 80) == "10.96.0.1 80"
    started = time.monotonic()
    assert dial(topo.client, "10.96.0.2", 80) == "refused"
    assert dial(topo.node, "10.96.0.2", 80) == "refused"
    assert time.monotonic() - started < 1.0  # at once, not after a timeout
    # A ClusterIP port that is not a frontend is not intercepted.
    assert dial(topo.client, "10.96.0.1", 81, timeout=0.5) in ("timeout", "refused")
    # NodePorts on any node address, from outside and from the node.
    assert dial(ext, "10.245.1.1", 30080) == "10.245.1.1 30080"
    assert dial(topo.client, "10.244.0.1", 30080) == "10.244.0.1 30080"
    assert dial(topo.node, "10.244.0.1", 30080) == "10.244.0.1 30080"
    assert dial(ext, "10.245.1.1", 30081) == "refused"  # even with a local listener
    # Not a NodePort on a non-local destination.
    assert dial(topo.client, "10.96.0.9", 30080, timeout=0.5) == "timeout"

    sets = {name: elems for name, elems in listed_sets(topo).items() if elems}
    assert sets == {
        "svc4": {"10.96.0.1 . 80"},
        "svc4-reject": {"10.96.0.2 . 80"},
        "np4": {"30080"},
        "np4-reject": {"30081"},
    }


def test_deltas_move_elements_and_restart_rewrites_idempotently(netns_topology: Topology) -> None:
    topo = netns_topology
    topo.node.spawn_python(LISTENER)
    writer = writer_for(topo)
    state = dict(STATE)

    async def scenario() -> None:
        await writer.sync(state)
        state[(4, "10.96.0.2", 80)] = "serve"  # endpoints appeared
        state[(4, "10.96.0.3", 443)] = "serve"  # new frontend
        del state[(4, "10.96.0.1", 80)]  # service deleted
        changed = [(4, "10.96.0.2", 80), (4, "10.96.0.3", 443), (4, "10.96.0.1", 80)]
        assert await writer.sync(state, changed)
        assert not await writer.sync(state, changed)  # nothing left to do: kernel untouched

    asyncio.run(scenario())
    assert dial(topo.client, "10.96.0.2", 80) == "10.96.0.2 80"
    assert dial(topo.client, "10.96.0.3", 443) == "10.96.0.3 443"
    assert dial(topo.client, "10.96.0.1", 80, timeout=0.5) == "timeout"
    expected = listed_sets(topo)
    assert expected["svc4"] == {"10.96.0.2 . 80", "10.96.0.3 . 443"}
    assert expected["svc4-reject"] == set()

    # A restarted kpx (fresh writer, table still there) rewrites everything in one go.
    again = writer_for(topo)
    asyncio.run(again.sync(state))
    assert listed_sets(topo) == expected
    assert dial(topo.client, "10.96.0.2", 80) == "10.96.0.2 80"

    asyncio.run(again.remove())
    assert "kpx" not in topo.node.run("nft", "list", "tables")
    asyncio.run(again.remove())  # removing twice is fine


def test_failed_delta_falls_back_to_a_full_rewrite(netns_topology: Topology) -> None:
    topo = netns_topology
    writer = writer_for(topo)
    state = dict(STATE)

    async def scenario() -> None:
        await writer.sync(state)
        # Someone deleted our table behind our back: the delta fails, the next sync heals.
        topo.node.run("nft", "delete", "table", "inet", "kpx")
        state[(4, "10.96.0.5", 80)] = "serve"
        try:
            await writer.sync(state, [(4, "10.96.0.5", 80)])
        except Exception as err:
            assert "kpx" in str(err) or "No such file" in str(err)
        else:
            raise AssertionError("delta on a missing table must fail")
        assert writer.needs_full
        await writer.sync(state, [])

    asyncio.run(scenario())
    assert "10.96.0.5 . 80" in listed_sets(topo)["svc4"]


def test_ipv6_frontends_are_steered(netns_topology: Topology) -> None:
    topo = netns_topology
    listener = r"""
import socket, threading
srv = socket.socket(socket.AF_INET6); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", 10262)); srv.listen(8)
print("ready", flush=True)
while True:
    conn, _ = srv.accept(); conn.sendall(b"steered\n"); conn.close()
"""
    topo.node.spawn_python(listener)
    writer = writer_for(topo)
    asyncio.run(writer.sync({(6, "fd00:96::1", 80): "serve", (6, "fd00:96::2", 80): "reject"}))

    def dial6(ip: str) -> str:
        sock = topo.client.socket(socket.AF_INET6)
        sock.settimeout(2)
        try:
            sock.connect((ip, 80))
            return sock.makefile().readline().strip()
        except ConnectionRefusedError:
            return "refused"
        finally:
            sock.close()

    assert dial6("fd00:96::1") == "steered"
    assert dial6("fd00:96::2") == "refused"


def test_local_only_frontends_serve_the_node_and_cluster_cidrs_and_drop_the_rest(
    netns_topology: Topology,
) -> None:
    """externalTrafficPolicy Local without a local endpoint: kube-proxy's short-circuit sends
    the node's own and pods' connections to the cluster-wide endpoints; outsiders' SYNs are
    dropped (another node may serve them), not reset."""
    topo = netns_topology
    ext = topo.add_external("x")
    topo.node.spawn_python(LISTENER)
    writer = NftWriter(
        PROXY_PORT,
        command=["ip", "netns", "exec", topo.node.name, "nft"],
        cluster_cidrs=["10.244.0.0/24"],
    )
    writer_for(topo)  # routes only
    state: dict[SteerKey, Steer] = {(4, "192.0.2.7", 80): "local", (4, "", 30080): "local"}
    asyncio.run(writer.sync(state))
    topo.node.ip("route", "replace", "192.0.2.0/24", "dev", "br0")
    assert dial(topo.node, "192.0.2.7", 80) == "192.0.2.7 80"  # host process
    assert dial(topo.client, "192.0.2.7", 80) == "192.0.2.7 80"  # a pod (cluster CIDR)
    assert dial(topo.client, "10.245.1.1", 30080) == "10.245.1.1 30080"
    assert dial(ext, "10.245.1.1", 30080, timeout=0.5) == "timeout"  # from outside
    assert dial(ext, "192.0.2.7", 80, timeout=0.5) == "timeout"
    assert listed_sets(topo)["np4-local"] == {"30080"}


def test_local_policy_frontends_without_local_endpoints_drop_while_empty_services_reject(
    netns_topology: Topology,
) -> None:
    """kube-proxy's nftables verdicts: a Local policy with endpoints only on other nodes drops
    (internalTrafficPolicy Local ClusterIP, externalTrafficPolicy Local NodePort), a Service
    with no endpoint at all rejects."""
    topo = netns_topology
    ext = topo.add_external("x")
    topo.node.spawn_python(LISTENER)
    writer = writer_for(topo)
    state: dict[SteerKey, Steer] = {
        (4, "10.96.0.1", 80): "drop",
        (4, "10.96.0.2", 80): "reject",
        (4, "", 30080): "drop",
        (4, "", 30081): "reject",
    }
    asyncio.run(writer.sync(state))
    for ns in (topo.client, topo.node):  # a pod, a host process
        assert dial(ns, "10.96.0.1", 80, timeout=0.5) == "timeout"
        assert dial(ns, "10.96.0.2", 80) == "refused"
    assert dial(ext, "10.245.1.1", 30080, timeout=0.5) == "timeout"
    assert dial(ext, "10.245.1.1", 30081) == "refused"
    sets = listed_sets(topo)
    assert (sets["svc4-drop"], sets["np4-drop"]) == ({"10.96.0.1 . 80"}, {"30080"})
    # Endpoints on this node appear: the same frontend is served.
    asyncio.run(writer.sync({**state, (4, "10.96.0.1", 80): "serve"}, [(4, "10.96.0.1", 80)]))
    assert dial(topo.client, "10.96.0.1", 80) == "10.96.0.1 80"
