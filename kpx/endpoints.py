"""Which endpoints serve a Service port on this node: pure functions of the EndpointSlices.

They follow kube-proxy's pkg/proxy:
- endpointslicecache.go: slices are joined to a Service port by port *name and protocol*, per
  slice (a named targetPort may resolve to different numbers in different slices); only the
  first address of an endpoint is used; `ready`/`serving` absent mean true, `terminating`
  absent means false; endpoints are deduplicated on ip:port, a local copy winning; null ports
  and FQDN slices are ignored, and so are slices labelled with
  `service.kubernetes.io/service-proxy-name` or `service.kubernetes.io/headless`;
- topology.go (CategorizeEndpoints): ready endpoints, else serving+terminating ones
  (cluster-wide for Cluster policy, per node for Local); zone hints are used only when every
  ready endpoint has one and one of them names this node's zone.

kpx/rules.py turns the result into frontends and backend lists (`compute_service`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kpx.backends import Backend

if TYPE_CHECKING:
    from kwatch.models import EndpointSlice

SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"


def family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the table needs to know about the node kpx runs on (locality, zone hints)."""

    name: str
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One endpoint address:port of a Service port, with what categorizing it needs."""

    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    local: bool
    zone_hints: frozenset[str]
    node_name: str | None
    zone: str | None

    def backend(self) -> Backend:
        return Backend(self.ip, self.port, self.node_name, self.zone)


def _slice_usable(sl: EndpointSlice) -> bool:
    labels = sl.metadata.labels
    if SERVICE_PROXY_NAME_LABEL in labels or HEADLESS_LABEL in labels:
        return False  # kube-proxy's informer never sees these
    return sl.address_type in ("IPv4", "IPv6") and sl.service_name is not None


def endpoints_for_port(
    slices: Iterable[EndpointSlice], port_name: str, node_name: str, protocol: str = "TCP"
) -> dict[int, list[EndpointInfo]]:
    """Endpoints per family for Service port `port_name` of `protocol`, deduplicated on
    ip:port."""
    found: dict[tuple[str, int], EndpointInfo] = {}
    for sl in slices:
        if not _slice_usable(sl):
            continue
        slice_family = 4 if sl.address_type == "IPv4" else 6
        for sp in sl.ports:
            if sp.name != port_name or sp.protocol != protocol or sp.port is None:
                continue
            for ep in sl.endpoints:
                ip = ep.addresses[0]
                if family_of(ip) != slice_family:
                    continue
                cond = ep.conditions
                local = ep.node_name is not None and ep.node_name == node_name
                hints = ep.hints.for_zones if ep.hints is not None else []
                info = EndpointInfo(
                    ip=ip,
                    port=sp.port,
                    ready=cond.ready is not False,
                    # kube-proxy reads an absent `serving` as true (endpointslicecache.go),
                    # not as "same as ready".
                    serving=cond.serving is not False,
                    terminating=cond.terminating is True,
                    local=local,
                    zone_hints=frozenset(z.name for z in hints),
                    node_name=ep.node_name,
                    zone=ep.zone,
                )
                if (ip, sp.port) not in found or local:
                    found[(ip, sp.port)] = info
    per_family: dict[int, list[EndpointInfo]] = {4: [], 6: []}
    for info in found.values():
        per_family[family_of(info.ip)].append(info)
    return per_family


def _use_zone_hints(endpoints: list[EndpointInfo], zone: str | None) -> bool:
    """topology.go topologyModeFromHints, zone part (kwatch does not model forNodes hints)."""
    if not zone:
        return False
    has_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.zone_hints:
            return False
        if zone in ep.zone_hints:
            has_zone = True
    return has_zone


def categorize_endpoints(
    endpoints: list[EndpointInfo], node: NodeInfo, uses_cluster: bool, uses_local: bool
) -> tuple[list[EndpointInfo], list[EndpointInfo]]:
    """(cluster endpoints, local endpoints) as topology.go CategorizeEndpoints computes them."""
    cluster: list[EndpointInfo] = []
    if uses_cluster:
        zonal = _use_zone_hints(endpoints, node.zone)
        cluster = [ep for ep in endpoints if ep.ready and (not zonal or node.zone in ep.zone_hints)]
        if not cluster:
            # No ready endpoint anywhere (a topology filter never empties the list: hints
            # are only used when one matches this zone), so fall back to terminating ones.
            cluster = [ep for ep in endpoints if ep.serving and ep.terminating]
    local: list[EndpointInfo] = []
    if uses_local:
        local = [ep for ep in endpoints if ep.local and ep.ready]
        if not local:
            local = [ep for ep in endpoints if ep.local and ep.serving and ep.terminating]
    return cluster, local


def local_ready_endpoint_ips(slices: Iterable[EndpointSlice], node_name: str) -> int:
    """Unique ready endpoint IPs on `node_name` (kube-proxy's LocalReadyEndpoints)."""
    ips: set[str] = set()
    for sl in slices:
        if not _slice_usable(sl) or not any(p.port is not None for p in sl.ports):
            continue
        for ep in sl.endpoints:
            if ep.node_name == node_name and ep.conditions.ready is not False:
                ips.add(ep.addresses[0])
    return len(ips)


def any_usable(endpoints: list[EndpointInfo]) -> bool:
    """Whether any endpoint is ready, or serving and terminating (kube-proxy's hasEndpoints)."""
    return any(ep.ready or (ep.serving and ep.terminating) for ep in endpoints)
