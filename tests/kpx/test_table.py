"""The service table as a pure function of Services, EndpointSlices and the node."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from kpx import metrics
from kpx.backends import Backend
from kpx.balancer import Balancer
from kpx.endpoints import NodeInfo
from kpx.rules import compute_service
from kpx.table import ServiceTable
from kwatch.cluster import DEFAULT_INDEXERS
from kwatch.resources import ENDPOINTSLICES, NODES, SERVICES
from kwatch.store import Store

NODE = NodeInfo("node-a", "zone-1")


def svc(name: str = "web", ns: str = "default", **spec: Any) -> Any:
    status = spec.pop("status", {})
    labels = spec.pop("labels", {})
    spec.setdefault("clusterIP", "10.96.0.10")
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    return SERVICES.parse(
        {
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": spec,
            "status": status,
        }
    )


def ep(ip: str, node: str | None = "node-b", **conditions: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if node is not None:
        out["nodeName"] = node
    zones = conditions.pop("zones", None)
    if zones is not None:
        out["hints"] = {"forZones": [{"name": z} for z in zones]}
    return out


def eps(
    endpoints: list[dict[str, Any]],
    name: str = "web-1",
    service: str | None = "web",
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> Any:
    all_labels = dict(labels or {})
    if service is not None:
        all_labels["kubernetes.io/service-name"] = service
    return ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": all_labels,
                "annotations": annotations or {},
            },
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": ports if ports is not None else [{"name": "http", "port": 8080}],
        }
    )


def backends(
    service: Any,
    slices: list[Any],
    scope: str = "internal",
    fam: int = 4,
    node: NodeInfo = NODE,
    port: int = 0,
) -> list[tuple[str, int]]:
    rules = compute_service(service, slices, node)
    assert rules is not None
    return sorted((b.ip, b.port) for b in rules.ports[port].backends[(scope, fam)])


def frontends(service: Any) -> list[tuple[str, int, str, int]]:
    rules = compute_service(service, [], NODE)
    assert rules is not None
    return [(f.kind, f.family, f.ip, f.port) for p in rules.ports for f in p.frontends]


# --- frontends ------------------------------------------------------------------------------


def test_every_frontend_kind_of_a_load_balancer_service():
    s = svc(
        type="LoadBalancer",
        externalIPs=["192.0.2.7"],
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        status={"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}, {"hostname": "lb.example"}]}},
    )
    assert frontends(s) == [
        ("cluster_ip", 4, "10.96.0.10", 80),
        ("node_port", 4, "", 30080),
        ("external_ip", 4, "192.0.2.7", 80),
        ("load_balancer", 4, "203.0.113.5", 80),
    ]


def test_load_balancer_ingress_with_ip_mode_proxy_is_not_captured():
    # kube-proxy's IsVIPMode: ipMode VIP or absent is programmed, Proxy is left to the LB.
    s = svc(
        type="LoadBalancer",
        status={
            "loadBalancer": {
                "ingress": [
                    {"ip": "203.0.113.5", "ipMode": "Proxy"},
                    {"ip": "203.0.113.6", "ipMode": "VIP"},
                    {"ip": "203.0.113.7"},
                ]
            }
        },
    )
    assert frontends(s) == [
        ("cluster_ip", 4, "10.96.0.10", 80),
        ("load_balancer", 4, "203.0.113.6", 80),
        ("load_balancer", 4, "203.0.113.7", 80),
    ]


def test_dual_stack_service_has_a_frontend_per_cluster_ip_and_node_port_family():
    s = svc(
        type="NodePort",
        clusterIPs=["10.96.0.10", "fd00::10"],
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        externalIPs=["fd00:1::7"],
    )
    assert frontends(s) == [
        ("cluster_ip", 4, "10.96.0.10", 80),
        ("cluster_ip", 6, "fd00::10", 80),
        ("node_port", 4, "", 30080),
        ("node_port", 6, "", 30080),
        ("external_ip", 6, "fd00:1::7", 80),
    ]


def test_external_ip_of_a_family_without_cluster_ip_is_ignored():
    s = svc(externalIPs=["fd00:1::7", "192.0.2.7"])
    assert frontends(s) == [
        ("cluster_ip", 4, "10.96.0.10", 80),
        ("external_ip", 4, "192.0.2.7", 80),
    ]


def test_headless_external_name_and_proxy_name_labelled_services_are_skipped():
    assert compute_service(svc(clusterIP="None"), [], NODE) is None
    assert (
        compute_service(svc(clusterIP="", type="ExternalName", externalName="x.y"), [], NODE)
        is None
    )
    assert compute_service(svc(type="ExternalName", externalName="x.y"), [], NODE) is None
    labelled = svc(labels={"service.kubernetes.io/service-proxy-name": "other"})
    assert compute_service(labelled, [], NODE) is None


def test_udp_and_sctp_ports_are_left_out_of_the_tcp_table():
    s = svc(
        ports=[
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "s", "port": 9, "protocol": "SCTP"},
            {"name": "http", "port": 80},
        ]
    )
    assert frontends(s) == [("cluster_ip", 4, "10.96.0.10", 80)]


# --- endpoints --------------------------------------------------------------------------------


def test_ready_endpoints_only_when_any_is_ready():
    s = svc()
    slices = [
        eps(
            [
                ep("10.1.0.1"),
                ep("10.1.0.2", ready=False),
                ep("10.1.0.3", ready=False, serving=True, terminating=True),
            ]
        )
    ]
    assert backends(s, slices) == [("10.1.0.1", 8080)]


def test_serving_terminating_endpoints_when_none_is_ready():
    s = svc()
    slices = [
        eps(
            [
                ep("10.1.0.2", ready=False, serving=False, terminating=True),
                ep("10.1.0.3", ready=False, serving=True, terminating=True),
                ep("10.1.0.4", ready=False, terminating=True),
            ]
        )
    ]
    # Absent `serving` reads as true, as kube-proxy's endpointslicecache does.
    assert backends(s, slices) == [("10.1.0.3", 8080), ("10.1.0.4", 8080)]


def test_not_ready_not_terminating_endpoints_are_never_used():
    s = svc()
    assert backends(s, [eps([ep("10.1.0.2", ready=False, serving=True)])]) == []


def test_named_target_port_resolves_per_slice():
    s = svc(ports=[{"name": "http", "port": 80, "targetPort": "web"}])
    slices = [
        eps([ep("10.1.0.1")], name="a", ports=[{"name": "http", "port": 8080}]),
        eps([ep("10.1.0.2")], name="b", ports=[{"name": "http", "port": 9090}]),
    ]
    assert backends(s, slices) == [("10.1.0.1", 8080), ("10.1.0.2", 9090)]


def test_ports_join_on_name_and_protocol():
    s = svc(ports=[{"name": "http", "port": 80}, {"name": "admin", "port": 81}])
    slices = [
        eps(
            [ep("10.1.0.1")],
            ports=[
                {"name": "http", "port": 8080, "protocol": "UDP"},
                {"name": "admin", "port": 9000},
            ],
        )
    ]
    assert backends(s, slices, port=0) == []
    assert backends(s, slices, port=1) == [("10.1.0.1", 9000)]


def test_duplicate_endpoints_across_slices_are_merged():
    s = svc()
    slices = [eps([ep("10.1.0.1"), ep("10.1.0.2")], name="a"), eps([ep("10.1.0.1")], name="b")]
    assert backends(s, slices) == [("10.1.0.1", 8080), ("10.1.0.2", 8080)]


def test_null_ports_fqdn_slices_and_unlabelled_slices_are_ignored():
    s = svc()
    null_port = eps([ep("10.1.0.1")], name="a", ports=[{"name": "http"}])
    fqdn = ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": "f",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["x.example"]}],
            "ports": [{"name": "http", "port": 8080}],
        }
    )
    proxy_named = eps(
        [ep("10.1.0.3")], name="c", labels={"service.kubernetes.io/service-proxy-name": "x"}
    )
    assert backends(s, [null_port, fqdn, proxy_named]) == []
    # The table finds slices through the service-name index, so an unlabelled slice never
    # reaches compute_service; that is tested through ServiceTable below.


def test_endpoints_of_the_other_family_are_not_used():
    s = svc()
    v6 = eps([ep("fd00::1")], name="v6", address_type="IPv6")
    assert backends(s, [v6, eps([ep("10.1.0.1")])]) == [("10.1.0.1", 8080)]


# --- traffic policies -----------------------------------------------------------------------


def test_internal_traffic_policy_local_uses_only_this_nodes_endpoints():
    s = svc(internalTrafficPolicy="Local")
    slices = [eps([ep("10.1.0.1", node="node-a"), ep("10.1.0.2", node="node-b")])]
    assert backends(s, slices) == [("10.1.0.1", 8080)]
    assert backends(s, slices, node=NodeInfo("node-c")) == []


def test_internal_local_falls_back_to_local_terminating_not_remote_ready():
    s = svc(internalTrafficPolicy="Local")
    slices = [
        eps(
            [
                ep("10.1.0.1", node="node-a", ready=False, serving=True, terminating=True),
                ep("10.1.0.2", node="node-b"),
            ]
        )
    ]
    assert backends(s, slices) == [("10.1.0.1", 8080)]


def test_external_traffic_policy_local_applies_to_external_frontends_only():
    s = svc(
        type="NodePort",
        externalTrafficPolicy="Local",
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    slices = [eps([ep("10.1.0.1", node="node-a"), ep("10.1.0.2", node="node-b")])]
    assert backends(s, slices, "external") == [("10.1.0.1", 8080)]
    assert backends(s, slices, "internal") == [("10.1.0.1", 8080), ("10.1.0.2", 8080)]


def test_external_policy_local_is_ignored_for_a_plain_cluster_ip_service():
    s = svc(externalTrafficPolicy="Local")
    rules = compute_service(s, [eps([ep("10.1.0.2", node="node-b")])], NODE)
    assert rules is not None and ("external", 4) not in rules.ports[0].backends


def test_health_check_node_port_counts_unique_local_ready_ips():
    s = svc(
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        healthCheckNodePort=31000,
        ports=[
            {"name": "http", "port": 80, "nodePort": 30080},
            {"name": "admin", "port": 81, "nodePort": 30081},
        ],
    )
    slices = [
        eps(
            [
                ep("10.1.0.1", node="node-a"),
                ep("10.1.0.2", node="node-a", ready=False),
                ep("10.1.0.3", node="node-b"),
            ],
            ports=[{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}],
        )
    ]
    rules = compute_service(s, slices, NODE)
    assert rules is not None
    assert (rules.health_check_node_port, rules.local_ready_endpoints) == (31000, 1)
    cluster = compute_service(svc(type="LoadBalancer", healthCheckNodePort=31000), slices, NODE)
    assert cluster is not None and cluster.health_check_node_port is None


# --- topology -------------------------------------------------------------------------------


def test_zone_hints_used_when_every_ready_endpoint_has_one():
    s = svc(trafficDistribution="PreferClose")
    slices = [
        eps(
            [
                ep("10.1.0.1", zones=["zone-1"]),
                ep("10.1.0.2", zones=["zone-2"]),
                ep("10.1.0.3", ready=False),
            ]
        )
    ]
    assert backends(s, slices) == [("10.1.0.1", 8080)]


def test_zone_hints_ignored_when_one_endpoint_lacks_them_or_none_matches():
    s = svc()
    partial = [eps([ep("10.1.0.1", zones=["zone-1"]), ep("10.1.0.2")])]
    assert backends(s, partial) == [("10.1.0.1", 8080), ("10.1.0.2", 8080)]
    other_zone = [eps([ep("10.1.0.1", zones=["zone-2"]), ep("10.1.0.2", zones=["zone-3"])])]
    assert backends(s, other_zone) == [("10.1.0.1", 8080), ("10.1.0.2", 8080)]
    assert backends(s, partial, node=NodeInfo("node-a", None)) == [
        ("10.1.0.1", 8080),
        ("10.1.0.2", 8080),
    ]


def test_zone_hints_do_not_filter_local_policy_endpoints():
    s = svc(internalTrafficPolicy="Local")
    slices = [eps([ep("10.1.0.1", node="node-a", zones=["zone-2"])])]
    assert backends(s, slices) == [("10.1.0.1", 8080)]


# --- affinity -------------------------------------------------------------------------------


def test_client_ip_affinity_timeout_defaults_to_three_hours():
    rules = compute_service(svc(sessionAffinity="ClientIP"), [], NODE)
    assert rules is not None and rules.ports[0].affinity_timeout == 10800
    rules = compute_service(
        svc(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
        [],
        NODE,
    )
    assert rules is not None and rules.ports[0].affinity_timeout == 60
    rules = compute_service(svc(), [], NODE)
    assert rules is not None and rules.ports[0].affinity_timeout is None


# --- the incremental table -------------------------------------------------------------------


class Env:
    def __init__(self, node: str = "node-a") -> None:
        self.services: Store[Any] = Store("services")
        self.slices: Store[Any] = Store("endpointslices", DEFAULT_INDEXERS[ENDPOINTSLICES])
        self.nodes: Store[Any] = Store("nodes")
        self.wakes = 0
        self.table = ServiceTable(
            self.services,
            self.slices,
            self.nodes,
            node,
            Balancer(),
            on_change=self._wake,
            wall_clock=lambda: 0.0,
        )

    def _wake(self) -> None:
        self.wakes += 1

    def put(self, obj: Any) -> None:
        store = {"Service": self.services}.get(type(obj).__name__)
        if store is None:
            store = self.slices if type(obj).__name__ == "EndpointSlice" else self.nodes
        store.upsert(obj.key, obj)


def test_service_and_endpoint_slice_changes_are_counted_once_whatever_tables_watch():
    # kubeproxy_sync_proxy_rules_{service,endpoint}_changes_total, one per object change:
    # counted by the process (metrics.count_changes), not by each protocol's table.
    def total(name: str) -> float:
        return REGISTRY.get_sample_value(f"kubeproxy_sync_proxy_rules_{name}_changes_total") or 0

    env = Env()
    ServiceTable(env.services, env.slices, env.nodes, "node-a", Balancer(), protocol="UDP")
    metrics.count_changes(env.services, env.slices)
    services, endpoints = total("service"), total("endpoint")
    env.put(svc())
    env.put(eps([ep("10.1.0.1")]))
    env.put(eps([ep("10.1.0.2")]))
    env.slices.delete("default/web-1")
    assert (total("service"), total("endpoint")) == (services + 1, endpoints + 3)


def test_table_serves_lookup_and_reports_steering_changes():
    env = Env()
    env.put(svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]))
    first = env.table.sync()
    assert first.full
    assert first.steering == {(4, "10.96.0.10", 80): "reject", (4, "", 30080): "reject"}
    picker = env.table.lookup("10.96.0.10", 80)
    assert picker is not None and picker.candidates("10.0.0.1") == []
    env.put(eps([ep("10.1.0.1")]))
    second = env.table.sync()
    assert second.steering == {(4, "10.96.0.10", 80): "serve", (4, "", 30080): "serve"}
    assert env.table.lookup("10.96.0.10", 80) is picker  # same picker object, updated in place
    assert picker.candidates("10.0.0.1") == [Backend("10.1.0.1", 8080, "node-b", None)]
    node_port = env.table.lookup("192.168.1.5", 30080)
    assert node_port is not None and node_port.candidates("1.2.3.4")[0].ip == "10.1.0.1"
    assert env.table.lookup("::ffff:10.96.0.10", 80) is picker
    assert env.table.lookup("10.96.0.10", 81) is None


def test_endpoint_change_that_keeps_a_frontend_usable_changes_no_steering():
    env = Env()
    env.put(svc())
    env.put(eps([ep("10.1.0.1")]))
    env.table.sync()
    env.put(eps([ep("10.1.0.1"), ep("10.1.0.2")]))
    result = env.table.sync()
    assert result.services == 1 and result.steering == {}
    picker = env.table.lookup("10.96.0.10", 80)
    assert picker is not None and len(picker.candidates("c")) == 2


def test_only_changed_services_are_recomputed():
    env = Env()
    for i in range(5):
        env.put(svc(name=f"s{i}", clusterIP=f"10.96.0.{i + 1}"))
    assert env.table.sync().services == 5
    env.put(eps([ep("10.1.0.1")], service="s3"))
    assert env.table.sync().services == 1
    assert env.table.sync().services == 0
    assert env.wakes >= 6


def test_deleting_a_service_removes_its_frontends():
    env = Env()
    env.put(svc())
    env.table.sync()
    env.services.delete("default/web")
    result = env.table.sync()
    assert result.steering == {(4, "10.96.0.10", 80): None}
    assert env.table.lookup("10.96.0.10", 80) is None and env.table.steering == {}


def test_unlabelled_slices_are_ignored():
    env = Env()
    env.put(svc())
    env.put(eps([ep("10.1.0.1")], service=None))
    env.table.sync()
    assert env.table.steering == {(4, "10.96.0.10", 80): "reject"}


def test_node_zone_change_triggers_a_full_recompute():
    env = Env()
    env.put(svc())
    env.put(eps([ep("10.1.0.1", zones=["zone-1"]), ep("10.1.0.2", zones=["zone-2"])]))
    env.table.sync()
    picker = env.table.lookup("10.96.0.10", 80)
    assert picker is not None and len(picker.candidates("c")) == 2  # no zone label yet
    env.put(
        NODES.parse(
            {"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-2"}}}
        )
    )
    result = env.table.sync()
    assert result.full
    assert [b.ip for b in picker.candidates("c")] == ["10.1.0.2"]


def test_slice_trigger_times_are_reported_once_and_deletes_ignored():
    env = Env()
    env.put(svc())
    env.put(
        eps(
            [ep("10.1.0.1")],
            annotations={
                "endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"
            },
        )
    )
    assert env.table.sync().trigger_times == [1767225600.0]
    env.slices.delete("default/web-1")
    assert env.table.sync().trigger_times == []


def test_two_services_claiming_one_external_ip_resolve_deterministically():
    env = Env()
    env.put(svc(name="a", clusterIP="10.96.0.1", externalIPs=["192.0.2.7"]))
    env.put(svc(name="b", clusterIP="10.96.0.2", externalIPs=["192.0.2.7"]))
    env.put(eps([ep("10.1.0.2")], name="b-1", service="b"))
    env.table.sync()
    assert env.table.steering[(4, "192.0.2.7", 80)] == "reject"  # "a" wins and has no endpoints
    env.services.delete("default/a")
    result = env.table.sync()
    assert result.steering == {(4, "10.96.0.1", 80): None, (4, "192.0.2.7", 80): "serve"}


def test_backends_that_leave_every_service_are_reported_for_draining():
    env = Env()
    env.put(svc(name="a", clusterIP="10.96.0.1"))
    env.put(svc(name="b", clusterIP="10.96.0.2"))
    env.put(eps([ep("10.1.0.1"), ep("10.1.0.2")], name="a-1", service="a"))
    env.put(eps([ep("10.1.0.2")], name="b-1", service="b"))
    env.table.sync()
    env.put(eps([], name="a-1", service="a"))
    result = env.table.sync()
    assert [(b.ip, b.port) for b in result.removed_backends] == [("10.1.0.1", 8080)]
    env.services.delete("default/b")
    result = env.table.sync()
    assert [(b.ip, b.port) for b in result.removed_backends] == [("10.1.0.2", 8080)]


def test_backends_offered_again_are_reported_so_their_drain_is_called_off():
    env = Env()
    env.put(svc())
    env.put(eps([ep("10.1.0.1"), ep("10.1.0.2")]))
    first = env.table.sync()
    assert first.removed_backends == [] and len(first.added_backends) == 2
    env.put(eps([ep("10.1.0.2")]))
    assert [b.ip for b in env.table.sync().removed_backends] == ["10.1.0.1"]
    env.put(eps([ep("10.1.0.1", ready=False), ep("10.1.0.2")]))
    assert env.table.sync().added_backends == []  # not ready: still not offered
    env.put(eps([ep("10.1.0.1"), ep("10.1.0.2")]))
    result = env.table.sync()
    assert [(b.ip, b.port) for b in result.added_backends] == [("10.1.0.1", 8080)]
    assert result.removed_backends == []


def test_external_local_short_circuit_for_node_and_pod_clients():
    env = Env()
    env.table.frontends.local_client = lambda ip: ip.startswith("10.244.")
    env.put(
        svc(
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=31000,
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}},
        )
    )
    env.put(eps([ep("10.1.0.2", node="node-b")]))
    result = env.table.sync()
    assert result.steering == {
        (4, "10.96.0.10", 80): "serve",
        (4, "", 30080): "local",
        (4, "203.0.113.5", 80): "local",
    }
    lb = env.table.lookup("203.0.113.5", 80)
    assert lb is not None
    assert [b.ip for b in lb.candidates("10.244.0.7")] == ["10.1.0.2"]  # a pod: cluster-wide
    assert lb.candidates("198.51.100.1") == []  # from outside: local endpoints only
    env.put(eps([ep("10.1.0.2", node="node-b"), ep("10.1.0.3", node="node-a")]))
    result = env.table.sync()
    assert result.steering == {(4, "", 30080): "serve", (4, "203.0.113.5", 80): "serve"}
    lb = env.table.lookup("203.0.113.5", 80)
    assert lb is not None and [b.ip for b in lb.candidates("198.51.100.1")] == ["10.1.0.3"]
    env.put(eps([]))
    assert env.table.sync().steering == {
        (4, "10.96.0.10", 80): "reject",
        (4, "", 30080): "reject",
        (4, "203.0.113.5", 80): "reject",
    }


def test_without_a_local_client_check_external_local_frontends_without_local_endpoints_drop():
    env = Env()
    env.put(
        svc(
            type="NodePort",
            externalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        )
    )
    env.put(eps([ep("10.1.0.2", node="node-b")]))
    assert env.table.sync().steering[(4, "", 30080)] == "drop"


def test_internal_local_without_local_endpoints_drops_and_only_no_endpoints_at_all_rejects():
    """kube-proxy nftables: no-endpoint-services gets `drop` when endpoints exist on other
    nodes (the client may be retried elsewhere), `reject` only when there are none at all."""
    env = Env()
    env.put(svc(internalTrafficPolicy="Local"))
    env.put(eps([ep("10.1.0.2", node="node-b")]))
    assert env.table.sync().steering == {(4, "10.96.0.10", 80): "drop"}
    env.put(eps([ep("10.1.0.2", node="node-b", ready=False, serving=True, terminating=True)]))
    assert env.table.sync().steering == {}  # serving and terminating elsewhere: still drop
    env.put(eps([ep("10.1.0.2", node="node-b", ready=False)]))
    assert env.table.sync().steering == {(4, "10.96.0.10", 80): "reject"}
    env.put(eps([ep("10.1.0.2", node="node-b"), ep("10.1.0.3", node="node-a")]))
    assert env.table.sync().steering == {(4, "10.96.0.10", 80): "serve"}


def test_external_local_frontends_drop_outsiders_when_only_other_nodes_have_endpoints():
    env = Env()
    env.table.frontends.local_client = lambda ip: ip.startswith("10.244.")
    env.put(
        svc(
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            internalTrafficPolicy="Local",
            externalIPs=["192.0.2.7"],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}},
        )
    )
    env.put(eps([ep("10.1.0.2", node="node-b")]))
    # Both policies Local: the ClusterIP is dropped; node and pod clients of the external
    # frontends still short-circuit to the cluster-wide endpoints (UsesClusterEndpoints).
    assert env.table.sync().steering == {
        (4, "10.96.0.10", 80): "drop",
        (4, "", 30080): "local",
        (4, "192.0.2.7", 80): "local",
        (4, "203.0.113.5", 80): "local",
    }
    lb = env.table.lookup("203.0.113.5", 80)
    assert lb is not None
    assert [b.ip for b in lb.candidates("10.244.0.7")] == ["10.1.0.2"]
    assert lb.candidates("198.51.100.1") == []
    cluster_ip = env.table.lookup("10.96.0.10", 80)
    assert cluster_ip is not None and cluster_ip.candidates("10.244.0.7") == []
    env.table.frontends.local_client = None  # no way to tell node and pod clients: drop them too
    env.put(
        svc(
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            clusterIP="10.96.0.11",
            name="other",
            ports=[{"name": "http", "port": 80, "nodePort": 30081}],
        )
    )
    env.put(eps([ep("10.1.0.4", node="node-b")], name="other-1", service="other"))
    assert env.table.sync().steering == {(4, "10.96.0.11", 80): "serve", (4, "", 30081): "drop"}


def test_local_policies_without_local_endpoints_are_counted():
    env = Env()
    env.put(svc(name="a", clusterIP="10.96.0.1", internalTrafficPolicy="Local"))
    env.put(
        svc(
            name="b",
            clusterIP="10.96.0.2",
            type="NodePort",
            externalTrafficPolicy="Local",
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        )
    )
    env.put(eps([ep("10.1.0.1", node="node-b")], name="a-1", service="a"))
    env.put(eps([ep("10.1.0.2", node="node-b")], name="b-1", service="b"))
    env.table.sync()
    assert env.table.no_local_endpoints == {"internal": 1, "external": 1}
    env.put(eps([ep("10.1.0.1", node="node-a")], name="a-1", service="a"))
    env.services.delete("default/b")
    env.table.sync()
    assert env.table.no_local_endpoints == {"internal": 0, "external": 0}


def test_table_lists_health_check_node_ports_of_local_load_balancers():
    env = Env()
    env.put(
        svc(
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            healthCheckNodePort=31000,
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        )
    )
    env.table.sync()
    assert env.table.health_checks() == {"default/web": (31000, 0)}
    env.put(eps([ep("10.1.0.1", node="node-a")]))
    env.table.sync()
    assert env.table.health_checks() == {"default/web": (31000, 1)}
    env.services.delete("default/web")
    env.table.sync()
    assert env.table.health_checks() == {}
