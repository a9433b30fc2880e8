"""The UDP steering ruleset (pure rendering) and the table's protocol split (SCTP left alone)."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from kpx.balancer import Balancer
from kpx.endpoints import NodeInfo
from kpx.nft import TPROXY_MARK as MARK
from kpx.rules import compute_service
from kpx.table import ServiceTable
from kpx.udp_nft import render_delta, render_firewall_delta, render_full, render_table
from kwatch.cluster import DEFAULT_INDEXERS
from kwatch.resources import ENDPOINTSLICES, SERVICES
from kwatch.store import Store


def test_serving_frontends_are_tproxied_with_the_mark_in_prerouting():
    text = render_full({(4, "10.96.0.10", 53): "serve", (6, "", 30053): "serve"}, 10262)
    assert text.startswith("add table inet kpx-udp\ndelete table inet kpx-udp\n")
    mark = f"{MARK:#x}"
    assert f"ip daddr . udp dport @usvc4 tproxy ip to :10262 meta mark set {mark} accept" in text
    assert f"udp dport @unp6 tproxy ip6 to :10262 meta mark set {mark} accept" in text
    assert "add element inet kpx-udp usvc4 { 10.96.0.10 . 53 }" in text
    assert "add element inet kpx-udp unp6 { 30053 }" in text
    # Host processes: marked in a route chain, looped through lo, tproxied there.
    assert "type route hook output priority mangle" in text
    assert 'iif "lo" ip daddr . udp dport @usvc4-local tproxy ip to :10262' in text


def test_no_endpoints_is_icmp_port_unreachable_and_local_policy_drops():
    text = render_table(10262)
    assert "ip daddr . udp dport @usvc4-reject reject with icmpx port-unreachable" in text
    assert "ip daddr . udp dport @usvc4-drop drop" in text
    assert "ip daddr . udp dport @usvc4-local drop" in text
    # What was steered (marked) passes the refusing rules.
    assert f"meta mark {MARK:#x} return" in text


def test_cluster_cidrs_get_the_local_short_circuit_and_nodeport_addresses_restrict():
    text = render_table(10262, ["192.168.0.0/24"], ["10.244.0.0/16"])
    assert "ip saddr @cluster4 ip daddr . udp dport @usvc4-local tproxy" in text
    assert "fib daddr type local ip daddr @np-addresses4 udp dport @unp4 tproxy" in text
    assert "udp dport @unp6 tproxy" not in text  # no IPv6 CIDR: no IPv6 NodePorts


def test_delta_moves_a_frontend_between_sets():
    applied = {(4, "10.96.0.10", 53): "serve"}
    delta = render_delta(applied, {(4, "10.96.0.10", 53): "reject"})  # type: ignore[dict-item]
    assert delta == (
        "delete element inet kpx-udp usvc4 { 10.96.0.10 . 53 }\n"
        "add element inet kpx-udp usvc4-reject { 10.96.0.10 . 53 }\n"
    )
    assert render_delta(applied, {(4, "10.96.0.10", 53): "serve"}) == ""  # type: ignore[dict-item]


def test_load_balancer_source_ranges_get_the_firewall_sets_for_udp():
    firewall = {(4, "192.0.2.50", 53): ("10.245.1.0/24",)}
    text = render_full({(4, "192.0.2.50", 53): "serve"}, 10262, firewall=firewall)
    assert "add element inet kpx-udp lbfw4 { 192.0.2.50 . 53 }" in text
    assert "add element inet kpx-udp lbfw-allow4 { 192.0.2.50 . 53 . 10.245.1.0/24 }" in text
    assert (
        "ip daddr . udp dport @lbfw4 ip daddr . udp dport . ip saddr != @lbfw-allow4 drop" in text
    )
    assert render_firewall_delta(firewall, {}) == [
        "delete element inet kpx-udp lbfw-allow4 { 192.0.2.50 . 53 . 10.245.1.0/24 }",
        "delete element inet kpx-udp lbfw4 { 192.0.2.50 . 53 }",
    ]


def test_no_rule_mentions_sctp():
    # A rule matching sctp would make the kernel load the sctp module.
    assert "sctp" not in render_table(10262, ["10.0.0.0/8"], ["10.244.0.0/16"])


def _svc(ports: list[dict[str, Any]]) -> Any:
    return SERVICES.parse(
        {
            "metadata": {"name": "mixed", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.9", "ports": ports},
        }
    )


def _slice(ports: list[dict[str, Any]]) -> Any:
    return ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": "mixed-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "mixed"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.1"]}],
            "ports": ports,
        }
    )


def test_each_protocol_table_takes_its_own_ports_and_endpoints():
    svc = _svc(
        [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]
    )
    # A slice port joins on name *and* protocol: "dns" over TCP is no endpoint of UDP "dns".
    slices = [_slice([{"name": "dns", "port": 5353, "protocol": "TCP"}])]
    node = NodeInfo("node-a")
    udp = compute_service(svc, slices, node, "UDP")
    tcp = compute_service(svc, slices, node, "TCP")
    assert udp is not None and tcp is not None
    assert [p.port_id for p in udp.ports] == ["default/mixed:dns"]
    assert [p.port_id for p in tcp.ports] == ["default/mixed:dns-tcp"]
    assert udp.ports[0].backends[("internal", 4)] == ()
    slices = [_slice([{"name": "dns", "port": 5353, "protocol": "UDP"}])]
    udp = compute_service(svc, slices, node, "UDP")
    assert udp is not None and [b.port for b in udp.ports[0].backends[("internal", 4)]] == [5353]


def test_sctp_ports_are_counted_logged_once_and_never_proxied():
    def ignored() -> float:
        return REGISTRY.get_sample_value("kpx_sctp_service_ports_ignored") or 0.0

    services: Store[Any] = Store("services")
    slices: Store[Any] = Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])
    tcp = ServiceTable(services, slices, None, "node-a", Balancer())
    udp = ServiceTable(services, slices, None, "node-a", Balancer(), protocol="UDP")
    before = ignored()
    svc = _svc(
        [
            {"name": "s1", "port": 9, "protocol": "SCTP"},
            {"name": "s2", "port": 10, "protocol": "SCTP"},
            {"name": "u", "port": 11, "protocol": "UDP"},
        ]
    )
    services.upsert(svc.key, svc)
    tcp.sync()
    udp.sync()  # only the TCP table counts, so nothing is counted twice
    assert ignored() == before + 2
    assert tcp.steering == {} and udp.steering == {(4, "10.96.0.9", 11): "reject"}
    services.delete(svc.key)
    tcp.sync()
    assert ignored() == before


async def test_without_a_transparent_socket_udp_is_disabled_and_tcp_unaffected(
    monkeypatch: Any,
) -> None:
    from kpx.health import ProxierHealth
    from kpx.local import LocalClients
    from kpx.policyroute import PolicyRouting
    from kpx.settings import KpxSettings
    from kpx.udp_nft import UdpNftWriter
    from kpx.udp_path import UdpPath

    services: Store[Any] = Store("services")
    slices: Store[Any] = Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])
    nodes: Store[Any] = Store("nodes")
    settings = KpxSettings(node_name="node-a", mode="nftables")
    path = UdpPath(settings, (services, slices, nodes), LocalClients([], set()), ProxierHealth(60))
    removed: list[str] = []
    writer = UdpNftWriter(path.relay, 10262, command=["true"])

    async def remove() -> None:
        removed.append("table")

    monkeypatch.setattr(writer, "remove", remove)
    path.writer = writer

    def refuse(host: str, port: int) -> None:
        raise PermissionError(1, "Operation not permitted")  # what a process without the cap gets

    monkeypatch.setattr(path.relay, "serve_transparent", refuse)
    try:
        await path.claim(["0.0.0.0"], 10262, PolicyRouting([4]), True)
        assert not path.enabled and path.synced  # readiness does not wait for UDP
        assert removed == ["table"]  # a table an earlier, capable kpx left is removed
        assert REGISTRY.get_sample_value("kpx_udp_enabled") == 0
        await path.sync_once()  # nothing to do, nothing raised
        assert path.syncer.syncs == 0
    finally:
        await path.stop(programmed=True)


def test_a_udp_only_local_policy_load_balancer_keeps_its_health_check_and_local_endpoints():
    svc = SERVICES.parse(
        {
            "metadata": {"name": "game", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.8",
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 32000,
                "ports": [{"name": "g", "port": 7777, "protocol": "UDP", "nodePort": 30777}],
            },
        }
    )
    slices = [
        ENDPOINTSLICES.parse(
            {
                "metadata": {
                    "name": "game-1",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "game"},
                },
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": ["10.1.0.1"], "nodeName": "node-a"},
                    {"addresses": ["10.1.0.2"], "nodeName": "node-b"},
                ],
                "ports": [{"name": "g", "port": 7777, "protocol": "UDP"}],
            }
        )
    ]
    node = NodeInfo("node-a")
    tcp = compute_service(svc, slices, node, "TCP")
    udp = compute_service(svc, slices, node, "UDP")
    assert tcp is not None and udp is not None
    # The health check belongs to the Service, whatever its protocols: the TCP table, which
    # serves them, has it although the Service has no TCP port.
    assert tcp.ports == () and tcp.health_check_node_port == 32000
    assert tcp.local_ready_endpoints == 1
    (port,) = udp.ports
    assert [b.ip for b in port.backends[("external", 4)]] == ["10.1.0.1"]  # local only
    assert sorted(b.ip for b in port.backends[("internal", 4)]) == ["10.1.0.1", "10.1.0.2"]


def test_a_udp_change_waiting_too_long_makes_kpx_unhealthy():
    from kpx.health import ProxierHealth
    from kpx.main import _alive_with_udp

    now = [1000.0]
    udp_health = ProxierHealth(60, clock=lambda: now[0])
    health = ProxierHealth(
        60, clock=lambda: now[0], alive=_alive_with_udp(lambda: (True, ""), udp_health)
    )
    health.updated()  # the TCP syncer keeps succeeding
    udp_health.queued()  # a UDP change is queued and its sync keeps failing
    now[0] += 30
    assert health.healthy()
    now[0] += 31
    assert not health.healthy()
    udp_health.updated()
    assert health.healthy()
