"""Transparent mode's pure parts: whose address a backend sees (kpx/source.py), the shared-link
check (kpx/links.py), the policy-routing listing check and the transparent ruleset text."""

from __future__ import annotations

import ipaddress
import json
import struct
import threading

import pytest

from kpx import links as links_module
from kpx.links import Network, SharedLinks, connected_routes
from kpx.nft import TPROXY_MARK, render_firewall_delta, render_table
from kpx.policyroute import ack_error, route_message, rule_message
from kpx.rules import source_ranges
from kpx.source import FrontendClass, SourceAddresses, keeps_client_address
from kwatch.models import Service
from kwatch.resources import SERVICES
from tests.kpx.test_table import Env, ep, eps, svc


@pytest.mark.parametrize(
    ("frontend", "node", "in_cluster", "masq", "kept"),
    [
        ("internal", False, True, False, True),  # pod -> ClusterIP
        ("internal", False, None, False, True),  # cluster CIDRs unknown: kube-proxy keeps it
        ("internal", False, False, False, False),  # off-cluster -> ClusterIP: masqueraded
        ("internal", True, None, False, False),  # host client
        ("external_local", False, False, False, True),  # outside -> ETP Local
        ("external_local", False, True, False, True),  # pod -> ETP Local (short-circuit)
        ("external_local", True, False, False, False),  # host -> ETP Local
        ("external_cluster", False, False, False, False),  # ETP Cluster
        ("external_cluster", False, True, False, False),
        ("internal", False, True, True, False),  # --masquerade-all
        ("external_local", False, False, True, False),
    ],
)
def test_kube_proxys_masquerade_decisions(
    frontend: FrontendClass, node: bool, in_cluster: bool | None, masq: bool, kept: bool
) -> None:
    assert keeps_client_address(frontend, node, in_cluster, masq) is kept


def test_source_addresses_per_connection() -> None:
    classes: dict[tuple[str, int], FrontendClass] = {
        ("10.96.0.10", 80): "internal",
        ("192.168.100.10", 80): "external_local",
        ("10.0.0.1", 30040): "external_cluster",
    }
    source = SourceAddresses(
        lambda ip, port: classes.get((ip, port)),
        lambda: {"10.0.0.1"},
        lambda ip: ip.startswith("10.244."),
    )
    assert source("10.96.0.10", 80, "10.244.1.11") == "10.244.1.11"
    assert source("10.96.0.10", 80, "172.30.0.2") is None  # off-cluster
    assert source("10.96.0.10", 80, "10.0.0.1") is None  # the node itself
    assert source("10.96.0.10", 80, "127.0.0.1") is None
    assert source("192.168.100.10", 80, "172.30.0.2") == "172.30.0.2"
    assert source("10.0.0.1", 30040, "172.30.0.2") is None
    assert source("10.96.9.9", 80, "10.244.1.11") is None  # unknown frontend
    masq = SourceAddresses(lambda ip, port: "internal", set, None, masquerade_all=True)
    assert masq("10.96.0.10", 80, "10.244.1.11") is None


def test_shared_links_from_connected_routes() -> None:
    v4 = json.dumps(
        [
            {"dst": "default", "gateway": "192.168.50.1", "dev": "eth0"},
            {"dst": "default", "dev": "br0", "scope": "link"},
            {"dst": "10.244.0.0/24", "dev": "cbr0", "scope": "link"},
            {"dst": "10.244.1.11", "dev": "vp1", "scope": "link"},
            {"dst": "10.244.1.12", "dev": "vp2", "scope": "link"},
            {"dst": "10.244.2.0/24", "gateway": "192.168.50.12", "dev": "eth0"},
            {"dst": "192.168.50.0/24", "dev": "eth0", "scope": "link"},
        ]
    )
    v6 = json.dumps([{"dst": "fe80::/64", "dev": "vp1"}, {"dst": "fd00:1::/64", "dev": "cbr0"}])
    links = SharedLinks(connected_routes([v4, v6]))
    assert links("10.244.0.5", "10.244.0.6")  # one bridge
    assert links("fd00:1::5", "fd00:1::6")
    assert not links("10.244.1.11", "10.244.1.12")  # routed veths
    assert not links("10.244.2.5", "10.244.2.6")  # via a gateway: not a link of ours
    assert not links("10.244.0.5", "fd00:1::6")
    assert not links("172.30.0.2", "172.30.0.3")  # only the default route covers them
    assert not links("garbage", "garbage")


async def test_connected_routes_are_read_off_the_loop_and_unknown_ones_keep_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readers: list[int] = []
    answers: list[list[tuple[Network, str]] | None] = [
        [(ipaddress.ip_network("10.244.0.0/24"), "cbr0")],
        None,  # `ip` failed: the routes known so far stay
    ]

    def read() -> list[tuple[Network, str]] | None:
        readers.append(threading.get_ident())
        return answers.pop(0)

    monkeypatch.setattr(links_module, "read_connected_routes", read)
    links = SharedLinks([])
    assert await links.refresh_off_loop()
    assert links("10.244.0.5", "10.244.0.6")
    assert not await links.refresh_off_loop()
    assert links("10.244.0.5", "10.244.0.6")
    assert threading.get_ident() not in readers


def test_a_backend_on_this_nodes_own_address_answers_past_kpx() -> None:
    # A host-network endpoint here (the API server behind kubernetes.default on a control
    # plane) replies to a pod straight over the pod's veth: connect from the node instead.
    node = {"172.18.0.2", "10.244.0.1"}
    links = SharedLinks([], node_addresses=lambda: node)
    assert links("10.244.0.5", "172.18.0.2")
    assert not links("10.244.0.5", "172.18.0.3")  # another node's host-network endpoint
    assert not SharedLinks([])("10.244.0.5", "172.18.0.2")  # without the node's addresses


def test_netlink_messages_and_acks() -> None:
    rule = rule_message(4, seq=7)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", rule)
    assert (length, kind, seq) == (len(rule), 32, 7)  # RTM_NEWRULE
    assert flags & 0x200  # NLM_F_EXCL: an identical rule answers EEXIST, kept as it is
    assert struct.pack("=HHI", 8, 10, TPROXY_MARK) in rule  # FRA_FWMARK
    route = route_message(6, 1, delete=True, seq=8)
    assert struct.unpack_from("=H", route, 4)[0] == 25  # RTM_DELROUTE
    ack = struct.pack("=IHHII", 36, 2, 0, 8, 0) + struct.pack("=i", -17) + bytes(16)
    assert ack_error(ack, 8) == 17  # EEXIST
    assert ack_error(ack, 9) is None


def test_transparent_ruleset_tproxies_prerouting_and_redirects_the_rest() -> None:
    plain = render_table(10262)
    assert "tproxy" not in plain and "socket" not in plain
    text = render_table(10262, cluster_cidrs=["10.244.0.0/16"], transparent=True)
    mark = f"meta mark set meta mark | {TPROXY_MARK:#x}"
    assert f"meta l4proto udp socket transparent 1 {mark} accept" in text
    # A connection's first SYN is never taken by a TIME_WAIT socket: tproxy reopens those.
    assert f"tcp flags & (syn | ack) != syn socket transparent 1 {mark} accept" in text
    assert f"ip daddr . tcp dport @svc4 tproxy ip to :10262 {mark} accept" in text
    assert f"ip6 daddr . tcp dport @svc6 tproxy ip6 to :10262 {mark} accept" in text
    assert "ip saddr @cluster4 ip daddr . tcp dport @svc4-local tproxy ip to :10262" in text
    # Host processes and bridged pods are still redirected; tproxied packets skip the refusals.
    assert 'meta iifkind "bridge" meta nfproto ipv4 jump steer4' in text
    assert "chain nat-output" in text and "redirect to :10262" in text
    assert f"ct state new meta mark & {TPROXY_MARK:#x} == 0 meta nfproto ipv4 jump refuse4" in text


def test_firewall_elements_follow_the_ranges() -> None:
    key = (4, "192.168.100.10", 80)
    assert render_firewall_delta({}, {}) == []
    added = render_firewall_delta({}, {key: ("10.0.0.0/8",)})
    assert added == [
        "add element inet kpx lbfw-allow4 { 192.168.100.10 . 80 . 10.0.0.0/8 }",
        "add element inet kpx lbfw4 { 192.168.100.10 . 80 }",
    ]
    changed = render_firewall_delta({key: ("10.0.0.0/8",)}, {key: ()})
    assert "delete element inet kpx lbfw-allow4 { 192.168.100.10 . 80 . 10.0.0.0/8 }" in changed
    assert "add element inet kpx lbfw4 { 192.168.100.10 . 80 }" in changed  # all dropped now
    text = render_table(10262)
    rule = "ip daddr . tcp dport @lbfw4 ip daddr . tcp dport . ip saddr != @lbfw-allow4 drop"
    assert rule in text


def test_source_ranges_are_collapsed_per_family_and_only_for_load_balancers() -> None:
    def svc(kind: str, ranges: list[str]) -> Service:
        spec = {"type": kind, "clusterIP": "10.96.0.1", "loadBalancerSourceRanges": ranges}
        meta = {"name": "s", "namespace": "d"}
        parsed: Service = SERVICES.parse({"metadata": meta, "spec": spec})
        return parsed

    ranged = svc("LoadBalancer", ["10.1.0.0/16", "10.0.0.0/8", "fd00::1/64", "nonsense"])
    assert source_ranges(ranged) == ("10.0.0.0/8", "fd00::/64")
    assert source_ranges(svc("LoadBalancer", [])) is None
    assert source_ranges(svc("NodePort", ["10.0.0.0/8"])) is None


def test_the_table_classes_frontends_and_keeps_their_firewall() -> None:
    env = Env()
    env.put(
        svc(
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            loadBalancerSourceRanges=["10.0.0.0/8", "fd00::/64"],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "192.168.100.10"}]}},
        )
    )
    env.put(eps([ep("10.1.0.1", node="node-a")]))
    env.table.sync()
    table = env.table
    assert table.frontend_class("10.96.0.10", 80) == "internal"
    assert table.frontend_class("192.168.100.10", 80) == "external_local"
    assert table.frontend_class("192.168.50.11", 30080) == "external_local"  # NodePort
    assert table.frontend_class("::ffff:10.96.0.10", 80) == "internal"
    assert table.frontend_class("10.96.0.99", 80) is None
    assert table.firewall == {(4, "192.168.100.10", 80): ("10.0.0.0/8",)}
    # The ranges go: so does the firewall (a Service change, the steering unchanged).
    env.put(
        svc(
            type="LoadBalancer",
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "192.168.100.10"}]}},
        )
    )
    result = env.table.sync()
    assert table.firewall == {} and not result.steering
    assert table.frontend_class("192.168.100.10", 80) == "external_cluster"
    env.services.delete("default/web")
    env.table.sync()
    assert table.frontend_class("10.96.0.10", 80) is None
