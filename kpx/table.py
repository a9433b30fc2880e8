"""The service table: every frontend of one protocol this node serves and its backends.

kpx keeps one table per protocol it proxies (TCP, UDP): the same Service yields TCP frontends
in one and UDP frontends in the other, so removing one protocol's port touches only that
table. SCTP ports are in neither: the TCP table counts and logs them (kpx never opens an SCTP
socket nor writes an SCTP rule, so the kernel never loads the sctp module for kpx).

`compute_service` is a pure function of one Service, its EndpointSlices and this node; it
follows kube-proxy's pkg/proxy:
- servicechangetracker.go / util.ShouldSkipService: headless, ExternalName and
  `service.kubernetes.io/service-proxy-name`-labelled Services have no frontend; a family is
  served only when the Service has a ClusterIP of that family; externalIPs and LB ingress IPs
  of other families are dropped, and so are ingress IPs with `ipMode: Proxy` (util.IsVIPMode);
- which endpoints serve each port (endpointslicecache.go, topology.go) is decided in
  kpx/endpoints.py;
- nftables proxier.go: each frontend's steering verdict (`frontend_steer`).

`ServiceTable` keeps one result per Service, recomputes only Services whose objects changed
(store events mark them dirty; `sync()` does the work), and serves `lookup(ip, port)` to the
proxy as the `FrontendMap`.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import structlog

from kpx import metrics
from kpx.backends import Backend, Picker
from kpx.balancer import Balancer, ListKey, LocalTrafficPicker, RoundRobinPicker
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
from kwatch.models import EndpointSlice, Node, Service
from kwatch.store import EventType, Store, StoreEvent

log = structlog.get_logger("kpx.table")

TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"
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


# --- pure computation ---------------------------------------------------------------------------


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


def parse_trigger_time(value: str | None) -> float | None:
    """`endpoints.kubernetes.io/last-change-trigger-time` (RFC 3339) as epoch seconds."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _unique_backends(rules: ServiceRules | None) -> set[Backend]:
    """Every backend of a Service (any port, any list), once, without node/zone."""
    if rules is None:
        return set()
    out: set[Backend] = set()
    for port in rules.ports:
        out.update(Backend(b.ip, b.port, None, None) for lst in port.backends.values() for b in lst)
    return out


FrontendPicker = RoundRobinPicker | LocalTrafficPicker
# What one Service port claims for a steering key: its picker, steering, masquerade class and
# firewall (loadBalancerSourceRanges of this family; None: no firewall).
_Owner = tuple[FrontendPicker, Steer, FrontendClass, tuple[str, ...] | None]


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


# --- the incremental table ----------------------------------------------------------------------


@dataclass(slots=True)
class SyncResult:
    """What one `ServiceTable.sync()` changed."""

    services: int = 0  # Services recomputed
    # Steering changes (None = no longer a frontend). Endpoint changes that keep a
    # frontend's steering as it was are absent: they never reach the kernel.
    steering: dict[SteerKey, Steer | None] = field(default_factory=dict)
    # Trigger times (epoch seconds) of the EndpointSlice changes this sync applied.
    trigger_times: list[float] = field(default_factory=list)
    # Backends no frontend offers any more: the proxy drains their open connections.
    removed_backends: list[Backend] = field(default_factory=list)
    # Backends offered again after none offered them (or for the first time): a drain still
    # running for them is called off.
    added_backends: list[Backend] = field(default_factory=list)
    full: bool = False

    def merge(self, later: SyncResult) -> None:
        """Fold a later chunk's result into this one: a backend removed by one chunk and
        offered again by the next (or the reverse) never left."""
        self.services += later.services
        self.steering.update(later.steering)
        self.trigger_times.extend(later.trigger_times)
        self.full = self.full or later.full
        for backend in later.added_backends:
            if backend in self.removed_backends:
                self.removed_backends.remove(backend)
            else:
                self.added_backends.append(backend)
        for backend in later.removed_backends:
            if backend in self.added_backends:
                self.added_backends.remove(backend)
            else:
                self.removed_backends.append(backend)


class ServiceTable:
    """Per-Service rules kept current from the stores; the proxy's `FrontendMap`."""

    def __init__(
        self,
        services: Store[Any],
        slices: Store[Any],
        nodes: Store[Any] | None,
        node_name: str,
        balancer: Balancer,
        on_change: Callable[[], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        local_client: Callable[[str], bool] | None = None,
        protocol: Protocol = "TCP",
    ) -> None:
        self.protocol = protocol
        self._services = services
        self._slices = slices
        self._nodes = nodes
        self.node_name = node_name
        self.balancer = balancer
        self.on_change = on_change
        # Whether a client IP is on this node or in the cluster CIDRs; None disables the
        # externalTrafficPolicy Local short-circuit (external frontends: local endpoints only).
        self._local_client = local_client
        self._started = wall_clock()
        self._results: dict[str, ServiceRules] = {}
        # Per steering key, per Service port claiming it: its picker and its steering.
        self._owners: dict[SteerKey, dict[str, _Owner]] = {}
        self._by_address: dict[tuple[str, int], Picker] = {}
        self._by_node_port: dict[tuple[int, int], Picker] = {}
        # Keyed like the two maps above ((ip, port) or (family, port)): transparent mode's
        # per-connection question "whose address may the backend see" (kpx/source.py).
        self._classes: dict[Any, FrontendClass] = {}
        self.steering: dict[SteerKey, Steer] = {}
        # LB frontends with loadBalancerSourceRanges -> the ranges allowed (kpx/nft.py's
        # firewall sets); read whole by the nftables writer, which applies the difference.
        self.firewall: dict[SteerKey, tuple[str, ...]] = {}
        self._dirty: set[str] = set()
        self._all_dirty = True
        self._triggers: dict[str, list[float]] = {}
        self._zone: str | None = None
        # How many Services offer each backend (ip, port); absent means it left everywhere.
        self._backend_refs: dict[tuple[str, int], int] = {}
        # Sums of ServiceRules.no_local_internal / no_local_external over all Services.
        self.no_local_endpoints = {"internal": 0, "external": 0}
        # Kept incrementally so a sync costs O(changed Services), not O(all Services).
        self._health_checks: dict[str, tuple[int, int]] = {}
        # SCTP ports per Service (counted by the TCP table only, logged once per Service).
        self._sctp: dict[str, int] = {}
        services.subscribe(self._on_service)
        slices.subscribe(self._on_slice)
        if nodes is not None:
            nodes.subscribe(self._on_node)

    # --- FrontendMap (hot path) ---------------------------------------------------------------

    def lookup(self, ip: str, port: int) -> Picker | None:
        picker = self._by_address.get((ip, port))
        if picker is not None:
            return picker
        if ip.startswith("::ffff:") and "." in ip:  # IPv4-mapped, from a dual-stack socket
            return self.lookup(ip[7:], port)
        return self._by_node_port.get((6 if ":" in ip else 4, port))

    def frontend_class(self, ip: str, port: int) -> FrontendClass | None:
        """The masquerade class of the frontend `lookup(ip, port)` finds (kpx/source.py)."""
        found = self._classes.get((ip, port))
        if found is not None:
            return found
        if ip.startswith("::ffff:") and "." in ip:
            return self.frontend_class(ip[7:], port)
        return self._classes.get((6 if ":" in ip else 4, port))

    # --- reading ------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return self._all_dirty or bool(self._dirty)

    def rules(self, key: str) -> ServiceRules | None:
        return self._results.get(key)

    def all_rules(self) -> list[ServiceRules]:
        return list(self._results.values())

    def health_checks(self) -> dict[str, tuple[int, int]]:
        """Service key -> (healthCheckNodePort, local ready endpoints) for eTP Local LBs."""
        return dict(self._health_checks)

    # --- store events (record only; the work happens in sync) ---------------------------------

    def _mark(self, key: str) -> None:
        self._dirty.add(key)
        if self.on_change is not None:
            self.on_change()

    def _on_service(self, event: StoreEvent[Any]) -> None:
        metrics.SERVICE_CHANGES.inc()
        self._mark(event.key)

    def _on_slice(self, event: StoreEvent[Any]) -> None:
        metrics.ENDPOINT_CHANGES.inc()
        keys = set()
        for sl in (event.obj, event.old):
            if sl is not None and sl.service_name:
                keys.add(f"{sl.metadata.namespace}/{sl.service_name}")
        # Deletions carry the time of the last update, not of the deletion: kube-proxy
        # ignores them, and changes from before it started (endpointschangetracker.go).
        if event.type != EventType.DELETED:
            when = parse_trigger_time(event.obj.metadata.annotations.get(TRIGGER_TIME_ANNOTATION))
            if when is not None and when > self._started:
                for key in keys:
                    self._triggers.setdefault(key, []).append(when)
        for key in keys:
            self._mark(key)

    def _on_node(self, event: StoreEvent[Any]) -> None:
        if event.key != self.node_name:
            return
        node: Node | None = None if event.type == EventType.DELETED else event.obj
        zone = node.zone if node is not None else None
        if zone != self._zone:
            # kube-proxy resyncs everything when its node's topology labels change.
            self._all_dirty = True
            if self.on_change is not None:
                self.on_change()

    # --- applying -----------------------------------------------------------------------------

    def _node_info(self) -> NodeInfo:
        node = self._nodes.get(self.node_name) if self._nodes is not None else None
        self._zone = node.zone if node is not None else None
        return NodeInfo(self.node_name, self._zone)

    def sync(self, max_services: int | None = None, result: SyncResult | None = None) -> SyncResult:
        """Recompute dirty Services, at most `max_services` of them (`pending` stays true for
        the rest); returns what changed for the kernel and metrics (written into `result`
        when given, so that a caller still learns what was applied when this raises).

        A Service leaves the dirty set only once its rules are applied: an exception half-way
        leaves the rest (and the one that failed) for the next call. A Service whose rules
        cannot be computed keeps its last good rules (logged, counted)."""
        if result is None:
            result = SyncResult()
        result.full = self._all_dirty
        node = self._node_info()
        if self._all_dirty:
            self._dirty |= set(self._results) | set(self._services.keys())
            self._all_dirty = False
        keys = sorted(self._dirty)
        if max_services is not None:
            keys = keys[:max_services]
        touched: set[SteerKey] = set()
        released: dict[tuple[str, int], Backend] = {}
        added: dict[tuple[str, int], Backend] = {}
        try:
            for key in keys:
                rules = self._compute(key, node)
                old = self._results.get(key)
                touched |= self._apply(key, rules)  # raises before changing anything
                for backend in _unique_backends(old):
                    self._release(backend, released)
                for backend in _unique_backends(rules):
                    addr = (backend.ip, backend.port)
                    count = self._backend_refs.get(addr, 0)
                    if count == 0:
                        added[addr] = backend
                    self._backend_refs[addr] = count + 1
                self._dirty.discard(key)
                result.trigger_times.extend(self._triggers.pop(key, ()))
                result.services += 1
        finally:
            # Whatever was applied is resolved, even when a later Service raised.
            result.removed_backends = [
                b for addr, b in released.items() if addr not in self._backend_refs
            ]
            # Released by one Service and taken up by another in this same sync: never left.
            result.added_backends = [b for addr, b in added.items() if addr not in released]
            for steer_key in touched:
                self._resolve(steer_key, result.steering)
        return result

    def _compute(self, key: str, node: NodeInfo) -> ServiceRules | None:
        svc = self._services.get(key)
        if self.protocol == "TCP":
            self._note_sctp(key, svc)
        if svc is None:
            return None
        try:
            slices = self._slices.by_index("service", key)
            return compute_service(svc, slices, node, self.protocol)
        except Exception as err:
            # A Service kpx cannot make sense of keeps what it had; the others go on.
            metrics.SERVICE_COMPUTE_FAILURES.inc()
            log.warning("service_rules_kept", key=key, problem=f"{type(err).__name__}: {err}")
            return self._results.get(key)

    def _note_sctp(self, key: str, svc: Service | None) -> None:
        count = sctp_ports(svc) if svc is not None and not should_skip_service(svc) else 0
        old = self._sctp.pop(key, 0)
        if count:
            self._sctp[key] = count
            if not old:
                log.info("sctp_ports_ignored", service=key, ports=count)
        if count != old:
            metrics.SCTP_PORTS_IGNORED.inc(count - old)

    def _release(self, backend: Backend, released: dict[tuple[str, int], Backend]) -> None:
        addr = (backend.ip, backend.port)
        count = self._backend_refs.get(addr, 0) - 1
        if count <= 0:
            self._backend_refs.pop(addr, None)
            released[addr] = backend
        else:
            self._backend_refs[addr] = count

    def _apply(self, key: str, new: ServiceRules | None) -> set[SteerKey]:
        """Make `new` the applied rules of `key`. What can fail (the balancer, the pickers)
        runs before the table changes, so a failure leaves `key` as it was (still dirty)."""
        planned: list[tuple[SteerKey, str, _Owner]] = []
        if new is not None:
            short_circuit = self._local_client is not None
            for port in new.ports:
                pickers = self.balancer.update(port.port_id, port.backends, port.affinity_timeout)
                for fe in port.frontends:
                    plain = pickers[(fe.scope, fe.family)]
                    picker: FrontendPicker = plain
                    if fe.scope == "external" and port.external_local and self._local_client:
                        inside = pickers[short_circuit_list(port, fe.family)]
                        picker = LocalTrafficPicker(plain, inside, self._local_client)
                    steer = frontend_steer(port, fe, short_circuit)
                    owner = (
                        picker,
                        steer,
                        fe.source_class(port.external_local),
                        frontend_firewall(port, fe),
                    )
                    planned.append((fe.steer_key, port.port_id, owner))
        touched: set[SteerKey] = set()
        old = self._results.pop(key, None)
        for rules, sign in ((old, -1), (new, 1)):
            if rules is not None:
                self.no_local_endpoints["internal"] += sign * rules.no_local_internal
                self.no_local_endpoints["external"] += sign * rules.no_local_external
        self._health_checks.pop(key, None)
        if new is not None and new.health_check_node_port:
            self._health_checks[key] = (new.health_check_node_port, new.local_ready_endpoints)
        new_ids = {p.port_id for p in new.ports} if new is not None else set()
        if old is not None:
            for port in old.ports:
                for fe in port.frontends:
                    self._owners.get(fe.steer_key, {}).pop(port.port_id, None)
                    touched.add(fe.steer_key)
                if port.port_id not in new_ids:
                    self.balancer.remove(port.port_id)
        for steer_key, port_id, owner in planned:
            self._owners.setdefault(steer_key, {})[port_id] = owner
            touched.add(steer_key)
        if new is not None:
            self._results[key] = new
        return touched

    def _resolve(self, steer_key: SteerKey, changes: dict[SteerKey, Steer | None]) -> None:
        """Point the lookup maps at the owner of `steer_key`; record steering changes."""
        family, ip, port = steer_key
        owners = self._owners.get(steer_key)
        picker: FrontendPicker | None = None
        state: Steer | None = None
        source_class: FrontendClass = "internal"
        firewall: tuple[str, ...] | None = None
        if owners:
            # Two Services claiming one address:port is a user error; the lowest port id wins
            # deterministically, and the other takes over if the winner goes away.
            picker, state, source_class, firewall = owners[min(owners)]
        else:
            self._owners.pop(steer_key, None)
        if firewall is None:
            self.firewall.pop(steer_key, None)
        else:
            self.firewall[steer_key] = firewall
        target = self._by_address if ip else self._by_node_port
        lookup_key: Any = (ip, port) if ip else (family, port)
        if picker is None:
            target.pop(lookup_key, None)
            self._classes.pop(lookup_key, None)
        else:
            target[lookup_key] = picker
            self._classes[lookup_key] = source_class
        if self.steering.get(steer_key) != state:
            if state is None:
                self.steering.pop(steer_key, None)
            else:
                self.steering[steer_key] = state
            changes[steer_key] = state
