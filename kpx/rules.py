"""The rules of one Service on this node: its frontends, their backends and their steering.

`compute_service` is a pure function of one Service, its EndpointSlices and this node (one
protocol at a time: the TCP and the UDP table each compute their own); it follows kube-proxy's
pkg/proxy:
- servicechangetracker.go / util.ShouldSkipService: headless, ExternalName and
  `service.kubernetes.io/service-proxy-name`-labelled Services have no frontend; a family is
  served only when the Service has a ClusterIP of that family; externalIPs and LB ingress IPs
  of other families are dropped, and so are ingress IPs with `ipMode: Proxy` (util.IsVIPMode);
- which endpoints serve each port (endpointslicecache.go, topology.go) is decided in
  kpx/endpoints.py;
- nftables proxier.go: each frontend's steering verdict (`frontend_steer`).

SCTP ports are in no table: the TCP table counts and logs them (`sctp_ports`; kpx never opens
an SCTP socket nor writes an SCTP rule, so the kernel never loads the sctp module for kpx).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from kpx.backends import Backend
from kpx.balancer import ListKey
from kpx.endpoints import (
    SERVICE_PROXY_NAME_LABEL,
    NodeInfo,
    any_usable,
    categorize_endpoints,
    endpoints_for_port,
    family_of,
    local_ready_endpoint_ips,
)
from kpx.source import FrontendClass

if TYPE_CHECKING:
    from kwatch.models import EndpointSlice, Service

log = structlog.get_logger("kpx.rules")

DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds; the API server's default for ClientIP affinity

FrontendKind = Literal["cluster_ip", "node_port", "external_ip", "load_balancer"]
Scope = Literal["internal", "external"]
Protocol = Literal["TCP", "UDP"]
# (family, ip, port) as steered by nftables; ip is "" for a NodePort (any node address).
SteerKey = tuple[int, str, int]
# What the kernel does with a frontend's new connections (kube-proxy's nftables mode,
# proxier.go: service-ips vs no-endpoint-services verdicts):
# - "serve": redirect them to kpx;
# - "reject": reset them; the Service has no usable endpoint anywhere;
# - "drop": drop them; a Local traffic policy finds no endpoint on this node although there
#   are some elsewhere (internalTrafficPolicy Local ClusterIP; externalTrafficPolicy Local
#   external frontend without the short-circuit);
# - "local": externalTrafficPolicy Local, no endpoint here: redirect those from this node and
#   the cluster CIDRs (the short-circuit to the cluster-wide endpoints), drop the rest.
Steer = Literal["serve", "local", "drop", "reject"]


@dataclass(frozen=True, slots=True)
class Frontend:
    kind: FrontendKind
    family: int
    ip: str  # "" for node_port
    port: int

    @property
    def scope(self) -> Scope:
        # ClusterIP traffic follows internalTrafficPolicy; NodePort, externalIPs and LB IPs
        # follow externalTrafficPolicy (kube-proxy's "internal" vs "external" destinations).
        return "internal" if self.kind == "cluster_ip" else "external"

    @property
    def steer_key(self) -> SteerKey:
        return (self.family, self.ip, self.port)

    def source_class(self, external_local: bool) -> FrontendClass:
        """kube-proxy's masquerade class of this frontend (kpx/source.py)."""
        if self.scope == "internal":
            return "internal"
        return "external_local" if external_local else "external_cluster"


@dataclass(frozen=True, slots=True)
class PortRules:
    """One Service port of the table's protocol: its frontends and the backend list per
    (scope, family)."""

    port_id: str  # "namespace/name:portname"
    frontends: tuple[Frontend, ...]
    backends: Mapping[ListKey, tuple[Backend, ...]]
    affinity_timeout: float | None  # seconds; None without ClientIP affinity
    external_local: bool = False  # externalTrafficPolicy Local applies to external frontends
    # Families with a usable (ready, or serving and terminating) endpoint on any node:
    # kube-proxy's hasEndpoints, which decides between "drop" and "reject".
    usable_families: frozenset[int] = frozenset()
    # loadBalancerSourceRanges of a LoadBalancer Service (collapsed CIDRs, both families);
    # None: no firewall. Only the LB IPs are filtered, as kube-proxy does.
    source_ranges: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ServiceRules:
    key: str
    ports: tuple[PortRules, ...]
    # Set for LoadBalancer Services with externalTrafficPolicy Local (kube-proxy's
    # NeedsHealthCheck); the count is unique local ready endpoint IPs (LocalReadyEndpoints).
    health_check_node_port: int | None = None
    local_ready_endpoints: int = 0
    # Ports (per family) whose Local policy finds no endpoint on this node although the
    # Service has usable ones elsewhere: kube-proxy's
    # sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"|"external"}.
    no_local_internal: int = 0
    no_local_external: int = 0


def should_skip_service(svc: Service) -> bool:
    """kube-proxy's ShouldSkipService plus the informer's service-proxy-name label filter."""
    if SERVICE_PROXY_NAME_LABEL in svc.metadata.labels:
        return True
    if svc.is_external_name or svc.is_headless:
        return True
    return not svc.cluster_ips


def externally_accessible(svc: Service) -> bool:
    """kube-proxy's ServicePort.ExternallyAccessible: NodePort, LoadBalancer or externalIPs."""
    return svc.spec.type in ("LoadBalancer", "NodePort") or bool(svc.spec.external_ips)


def external_policy_local(svc: Service) -> bool:
    """apiservice.ExternalPolicyLocal: only meaningful for types with external frontends."""
    return externally_accessible(svc) and svc.spec.external_traffic_policy == "Local"


def needs_health_check(svc: Service) -> bool:
    return svc.spec.type == "LoadBalancer" and external_policy_local(svc)


def _frontends(svc: Service, port: int, node_port: int | None) -> tuple[Frontend, ...]:
    families = {family_of(ip) for ip in svc.cluster_ips}
    out: dict[Frontend, None] = {}
    for ip in svc.cluster_ips:
        out[Frontend("cluster_ip", family_of(ip), ip, port)] = None
    if node_port:
        for fam in sorted(families):
            out[Frontend("node_port", fam, "", node_port)] = None
    for ip in svc.spec.external_ips:
        if family_of(ip) in families:
            out[Frontend("external_ip", family_of(ip), ip, port)] = None
    for ingress in svc.status.load_balancer.ingress:
        if ingress.ip_mode == "Proxy":
            # The load balancer proxies (traffic arrives addressed to the node, not to this
            # IP): kube-proxy leaves the IP alone so in-cluster clients go out through the LB
            # too (util.IsVIPMode, KEP-1860).
            continue
        if ingress.ip and family_of(ingress.ip) in families:
            out[Frontend("load_balancer", family_of(ingress.ip), ingress.ip, port)] = None
    return tuple(out)


def source_ranges(svc: Service) -> tuple[str, ...] | None:
    """A LoadBalancer Service's `loadBalancerSourceRanges`, collapsed per family (nftables
    interval sets refuse overlaps); None without any. Malformed entries are skipped."""
    if svc.spec.type != "LoadBalancer" or not svc.spec.load_balancer_source_ranges:
        return None
    nets: dict[int, list[Any]] = {4: [], 6: []}
    for text in svc.spec.load_balancer_source_ranges:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            log.warning("source_range_invalid", service=svc.key, source_range=text)
            continue
        nets[net.version].append(net)
    return tuple(str(n) for f in (4, 6) for n in ipaddress.collapse_addresses(nets[f]))


def frontend_firewall(port: PortRules, fe: Frontend) -> tuple[str, ...] | None:
    """The source ranges allowed to reach `fe` (its family only); None: everyone."""
    if fe.kind != "load_balancer" or port.source_ranges is None:
        return None
    return tuple(r for r in port.source_ranges if (":" in r) == (fe.family == 6))


def _affinity_timeout(svc: Service) -> float | None:
    if svc.spec.session_affinity != "ClientIP":
        return None
    config = svc.spec.session_affinity_config
    if config is not None and config.client_ip is not None:
        return float(config.client_ip.timeout_seconds)
    return float(DEFAULT_AFFINITY_TIMEOUT)


def sctp_ports(svc: Service) -> int:
    """How many of the Service's ports are SCTP (kpx proxies none of them)."""
    return sum(1 for sp in svc.spec.ports if sp.protocol == "SCTP")


def compute_service(
    svc: Service, slices: Iterable[EndpointSlice], node: NodeInfo, protocol: Protocol = "TCP"
) -> ServiceRules | None:
    """The rules for one Service's `protocol` ports on `node`; None when kpx leaves the
    Service alone. The health check node port does not depend on the protocol."""
    if should_skip_service(svc):
        return None
    slices = list(slices)
    internal_local = svc.spec.internal_traffic_policy == "Local"
    external_local = external_policy_local(svc)
    # UsesClusterEndpoints: an externally accessible Service needs them even with both
    # policies Local, for the short-circuit of node and pod clients.
    uses_cluster = not internal_local or externally_accessible(svc)
    uses_local = internal_local or external_local
    affinity = _affinity_timeout(svc)
    ranges = source_ranges(svc)
    ports: list[PortRules] = []
    no_local = {"internal": 0, "external": 0}
    for sp in svc.spec.ports:
        if sp.protocol != protocol:
            continue  # another table's, or SCTP (left alone)
        frontends = _frontends(svc, sp.port, sp.node_port)
        per_family = endpoints_for_port(slices, sp.name, node.name, protocol)
        lists: dict[ListKey, tuple[Backend, ...]] = {}
        usable: set[int] = set()
        for fam in sorted({f.family for f in frontends}):
            cluster, local = categorize_endpoints(per_family[fam], node, uses_cluster, uses_local)
            internal = local if internal_local else cluster
            external = local if external_local else cluster
            lists[("internal", fam)] = tuple(ep.backend() for ep in internal)
            has_external = any(f.scope == "external" and f.family == fam for f in frontends)
            if has_external:
                lists[("external", fam)] = tuple(ep.backend() for ep in external)
                if external_local and internal_local:
                    # The short-circuit's list, which "internal" is not here.
                    lists[("cluster", fam)] = tuple(ep.backend() for ep in cluster)
            if any_usable(per_family[fam]):
                usable.add(fam)
                if uses_local and not local:
                    no_local["internal"] += internal_local
                    no_local["external"] += external_local and has_external
        port_id = f"{svc.key}:{sp.name}"
        ports.append(
            PortRules(
                port_id, frontends, lists, affinity, external_local, frozenset(usable), ranges
            )
        )
    hc_port = svc.spec.health_check_node_port if needs_health_check(svc) else None
    return ServiceRules(
        key=svc.key,
        ports=tuple(ports),
        health_check_node_port=hc_port or None,
        local_ready_endpoints=local_ready_endpoint_ips(slices, node.name) if hc_port else 0,
        no_local_internal=no_local["internal"],
        no_local_external=no_local["external"],
    )


def unique_backends(rules: ServiceRules | None) -> set[Backend]:
    """Every backend of a Service (any port, any list), once, without node/zone."""
    if rules is None:
        return set()
    out: set[Backend] = set()
    for port in rules.ports:
        out.update(Backend(b.ip, b.port, None, None) for lst in port.backends.values() for b in lst)
    return out


def short_circuit_list(port: PortRules, family: int) -> ListKey:
    """The list node and pod clients of an externalTrafficPolicy Local frontend get: the
    cluster-wide endpoints (kube-proxy's EXT chain jumps to the cluster policy chain)."""
    key = ("cluster", family)
    return key if key in port.backends else ("internal", family)


def frontend_steer(port: PortRules, fe: Frontend, short_circuit: bool) -> Steer:
    """kube-proxy's verdict for `fe` (nftables proxier.go): its own list has endpoints: serve;
    none anywhere: reject; a Local policy without endpoints here: drop, except that with the
    short-circuit (`short_circuit`: kpx can tell node and pod clients apart) an external
    frontend still serves those clients."""
    if port.backends[(fe.scope, fe.family)]:
        return "serve"
    if fe.family not in port.usable_families:
        return "reject"
    if fe.scope == "external" and port.external_local and short_circuit:
        if port.backends[short_circuit_list(port, fe.family)]:
            return "local"
    return "drop"
