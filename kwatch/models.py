"""Slim typed views of the Kubernetes objects the daemons read.

Only the fields dnsd and kpx use are modelled; everything else in the API JSON is ignored, so
memory per object stays small at 10,000 Services / 100,000 endpoints. Values the daemons act on
(IP addresses, ports, enum-like strings) are validated here, once, on the control path: an object
that fails is rejected as a whole by `parse_object` and the caller keeps its last good state.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)
from pydantic.dataclasses import dataclass


def _canonical_ip(value: str) -> str:
    """Return the IP in canonical text form (IPv6 compressed), or raise ValueError.

    IPv4 goes through inet_pton, which is strict (no leading zeros, exactly four octets) and
    about ten times cheaper than ipaddress for the 100,000 endpoint addresses of a big cluster.
    """
    try:
        socket.inet_pton(socket.AF_INET, value)
        return value
    except OSError:
        pass
    if ":" in value:
        try:
            return ipaddress.IPv6Address(value).compressed
        except ValueError:
            pass
    raise ValueError(f"invalid IP address {value!r}")


def _cluster_ip(value: str) -> str:
    """spec.clusterIP(s): an IP, "None" (headless) or "" (ExternalName / not yet allocated)."""
    if value in ("", "None"):
        return value
    return _canonical_ip(value)


def _interned_or_empty(value: Any) -> Any:
    # Namespaces, node names, zones and port names repeat across thousands of objects. One
    # call before validation (None read as ""), not two: 460,000 strings at 10,000 Services.
    if value is None:
        return ""
    return sys.intern(value) if type(value) is str else value


IP = Annotated[str, AfterValidator(_canonical_ip)]
ClusterIP = Annotated[str, AfterValidator(_cluster_ip)]
PortNumber = Annotated[int, Field(ge=1, le=65535)]
Protocol = Literal["TCP", "UDP", "SCTP"]
InternedStr = Annotated[str, BeforeValidator(_interned_or_empty)]

# Annotations and labels the daemons read; every other one is dropped at parse time: kubectl's
# last-applied blobs can be kilobytes, and the half-dozen `app.kubernetes.io/*` and Helm labels
# a real cluster puts on each object cost about 10 MB at 10,000 Services (issue 15). A feature
# that reads another label or annotation adds it here.
KEPT_ANNOTATIONS = frozenset({"endpoints.kubernetes.io/last-change-trigger-time"})
KEPT_LABELS = frozenset(
    {
        "kubernetes.io/service-name",  # EndpointSlice -> Service
        "multicluster.kubernetes.io/service-name",  # EndpointSlice -> ServiceImport (MCS API)
        "multicluster.kubernetes.io/source-cluster",  # MCS: the cluster an endpoint lives in
        "service.kubernetes.io/service-proxy-name",  # kpx: Services another proxy handles
        "service.kubernetes.io/headless",  # kpx: slices of headless Services
        "topology.kubernetes.io/zone",  # Node zone (topology hints)
    }
)
# One shared empty mapping for the many objects left with no kept label or annotation.
_EMPTY: dict[str, str] = {}


def _keep(kept: frozenset[str]) -> Any:
    def keep(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k in kept}
        return value

    return keep


def _share_empty(value: dict[str, str]) -> dict[str, str]:
    return value or _EMPTY


KeptLabels = Annotated[
    dict[str, str], BeforeValidator(_keep(KEPT_LABELS)), AfterValidator(_share_empty)
]
KeptAnnotations = Annotated[
    dict[str, str], BeforeValidator(_keep(KEPT_ANNOTATIONS)), AfterValidator(_share_empty)
]


# Frozen, slotted pydantic dataclasses: validated like BaseModels but about a tenth of the memory
# (no per-instance __dict__ / fields-set), which is what keeps 100,000 endpoints near 40 MB.
CONFIG = ConfigDict(extra="ignore", populate_by_name=True)


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ObjectMeta:
    name: InternedStr
    namespace: InternedStr = ""
    resource_version: str = Field(default="", alias="resourceVersion")
    labels: KeptLabels = Field(default_factory=lambda: _EMPTY)
    annotations: KeptAnnotations = Field(default_factory=lambda: _EMPTY)
    # Set once deletion was requested (RFC 3339 text, kept as sent): kpx's /healthz reports a
    # Node being deleted as not eligible, as kube-proxy does.
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


# --- Service -----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ServicePort:
    name: InternedStr = ""
    protocol: Protocol = "TCP"
    port: PortNumber
    # An int port number or an IANA port name looked up in the EndpointSlice ports.
    target_port: int | str | None = Field(default=None, alias="targetPort")
    node_port: Annotated[int, Field(ge=0, le=65535)] | None = Field(default=None, alias="nodePort")
    app_protocol: str | None = Field(default=None, alias="appProtocol")


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ClientIPConfig:
    timeout_seconds: Annotated[int, Field(ge=1, le=86400)] = Field(
        default=10800, alias="timeoutSeconds"
    )


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class SessionAffinityConfig:
    client_ip: ClientIPConfig | None = Field(default=None, alias="clientIP")


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ServiceSpec:
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: ClusterIP = Field(default="", alias="clusterIP")
    cluster_ips: list[ClusterIP] = Field(default_factory=list, alias="clusterIPs")
    ports: list[ServicePort] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    external_name: str | None = Field(default=None, alias="externalName")
    external_ips: list[IP] = Field(default_factory=list, alias="externalIPs")
    session_affinity: Literal["None", "ClientIP"] = Field(default="None", alias="sessionAffinity")
    session_affinity_config: SessionAffinityConfig | None = Field(
        default=None, alias="sessionAffinityConfig"
    )
    external_traffic_policy: Literal["Cluster", "Local"] = Field(
        default="Cluster", alias="externalTrafficPolicy"
    )
    internal_traffic_policy: Literal["Cluster", "Local"] = Field(
        default="Cluster", alias="internalTrafficPolicy"
    )
    health_check_node_port: Annotated[int, Field(ge=0, le=65535)] | None = Field(
        default=None, alias="healthCheckNodePort"
    )
    publish_not_ready_addresses: bool = Field(default=False, alias="publishNotReadyAddresses")
    traffic_distribution: str | None = Field(default=None, alias="trafficDistribution")
    # Plain strings: one malformed CIDR must not make the whole Service unreadable (kpx skips
    # it when it builds its firewall).
    load_balancer_source_ranges: list[str] = Field(
        default_factory=list, alias="loadBalancerSourceRanges"
    )


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class LoadBalancerIngress:
    ip: IP | None = None
    hostname: str | None = None
    # "Proxy": the load balancer sends traffic to the nodes with its own address as destination,
    # so kube-proxy does not capture this IP in-cluster (KEP-1860); "VIP" or absent: it does.
    ip_mode: Literal["VIP", "Proxy"] | None = Field(default=None, alias="ipMode")


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class LoadBalancerStatus:
    ingress: list[LoadBalancerIngress] = Field(default_factory=list)


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ServiceStatus:
    load_balancer: LoadBalancerStatus = Field(
        default_factory=lambda: LoadBalancerStatus(), alias="loadBalancer"
    )


_NO_STATUS = ServiceStatus()


def _shared_status(value: ServiceStatus) -> ServiceStatus:
    # Nearly every Service has an empty `status: {loadBalancer: {}}`: one object for all.
    return value if value.load_balancer.ingress else _NO_STATUS


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class Service:
    metadata: ObjectMeta
    spec: ServiceSpec = Field(default_factory=lambda: ServiceSpec())
    status: Annotated[ServiceStatus, AfterValidator(_shared_status)] = Field(
        default_factory=lambda: _NO_STATUS
    )

    @property
    def key(self) -> str:
        return self.metadata.key

    @property
    def is_headless(self) -> bool:
        return self.spec.cluster_ip == "None"

    @property
    def is_external_name(self) -> bool:
        return self.spec.type == "ExternalName"

    @property
    def cluster_ips(self) -> list[str]:
        """Every allocated ClusterIP (dual-stack aware); empty for headless/ExternalName."""
        ips = self.spec.cluster_ips or ([self.spec.cluster_ip] if self.spec.cluster_ip else [])
        return [ip for ip in ips if ip not in ("", "None")]


# --- EndpointSlice (discovery.k8s.io/v1) ---------------------------------------------------------

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class EndpointConditions:
    # None means "unknown"; consumers read it as ready / serving per the API docs.
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


# Keyed by the three values: tuples of bools compare in C, where the dataclass's own
# __eq__/__hash__ are Python calls (100,000 endpoints, one lookup each).
_conditions: dict[tuple[bool | None, bool | None, bool | None], EndpointConditions] = {}


def _shared_conditions(value: EndpointConditions) -> EndpointConditions:
    # 27 possible values, one object each, instead of one object per endpoint.
    key = (value.ready, value.serving, value.terminating)
    shared = _conditions.get(key)
    if shared is None:
        shared = _conditions[key] = value
    return shared


SharedConditions = Annotated[EndpointConditions, AfterValidator(_shared_conditions)]


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ForZone:
    name: InternedStr


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class EndpointHints:
    for_zones: list[ForZone] = Field(default_factory=list, alias="forZones")


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ObjectReference:
    # kind and namespace repeat on every endpoint (a Pod of the slice's own namespace).
    kind: InternedStr = ""
    name: str = ""
    namespace: InternedStr = ""


# Whether endpoints keep the name of their targetRef (the Pod). Only dnsd's
# --endpoint-pod-names reads it, and 100,000 pod names with their references cost about 12 MB;
# without it every endpoint shares one reference per (kind, namespace), name left empty.
_reference_names = [True]
_nameless: dict[tuple[str, str], ObjectReference] = {}


def keep_reference_names(keep: bool) -> None:
    """Set once at start, before anything is parsed, by a daemon that knows whether it reads
    endpoint targetRef names (dnsd with --endpoint-pod-names); kept by default."""
    _reference_names[0] = keep


def _target_ref(value: ObjectReference | None) -> ObjectReference | None:
    # After validation (a before-validator would make pydantic build every raw targetRef as
    # Python values when validating from JSON).
    if value is None or _reference_names[0]:
        return value
    key = (value.kind, value.namespace)
    shared = _nameless.get(key)
    if shared is None:
        shared = _nameless[key] = ObjectReference(kind=value.kind, namespace=value.namespace)
    return shared


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class Endpoint:
    # A tuple: 100,000 endpoints of one address each hold 100,000 of these (a one-item list
    # costs about 40 bytes more).
    addresses: Annotated[tuple[IP, ...], Field(min_length=1)]
    conditions: SharedConditions = EndpointConditions()
    hostname: str | None = None
    node_name: InternedStr | None = Field(default=None, alias="nodeName")
    zone: InternedStr | None = None
    hints: EndpointHints | None = None
    target_ref: Annotated[ObjectReference | None, AfterValidator(_target_ref)] = Field(
        default=None, alias="targetRef"
    )

    @property
    def is_ready(self) -> bool:
        return self.conditions.ready is not False

    @property
    def is_serving(self) -> bool:
        # Absent means serving, as kube-proxy's endpointslicecache reads it (nil -> true).
        return self.conditions.serving is not False

    @property
    def is_terminating(self) -> bool:
        return self.conditions.terminating is True


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class EndpointPort:
    name: InternedStr = ""
    # null means "all ports" in the API; consumers ignore such ports.
    port: PortNumber | None = None
    protocol: Protocol = "TCP"
    app_protocol: str | None = Field(default=None, alias="appProtocol")


def drop_fqdn_endpoints(value: Any) -> Any:
    """FQDN slices hold hostnames, not IPs; neither daemon uses them, so they are kept as
    empty slices instead of failing IP validation. Applied to the raw object before the model
    (kwatch.resources): as a model validator it would make pydantic build the whole raw
    object, managedFields included, for every slice of a list decoded from JSON."""
    if isinstance(value, dict) and value.get("addressType") == "FQDN":
        return {**value, "endpoints": []}
    return value


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class EndpointSlice:
    metadata: ObjectMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"] = Field(alias="addressType")
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)

    @property
    def key(self) -> str:
        return self.metadata.key

    @property
    def service_name(self) -> str | None:
        return self.metadata.labels.get(SERVICE_NAME_LABEL)


# --- Pod, Namespace, Node ----------------------------------------------------------------------


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class PodIP:
    ip: IP


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class PodSpec:
    node_name: InternedStr = Field(default="", alias="nodeName")
    hostname: str = ""
    subdomain: str = ""
    host_network: bool = Field(default=False, alias="hostNetwork")  # its IP is the node's


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class PodStatus:
    phase: str = ""
    pod_ip: IP | None = Field(default=None, alias="podIP")
    pod_ips: list[PodIP] = Field(default_factory=list, alias="podIPs")


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class Pod:
    metadata: ObjectMeta
    spec: PodSpec = Field(default_factory=lambda: PodSpec())
    status: PodStatus = Field(default_factory=lambda: PodStatus())

    @property
    def key(self) -> str:
        return self.metadata.key

    @property
    def ips(self) -> list[str]:
        ips = [p.ip for p in self.status.pod_ips]
        if not ips and self.status.pod_ip:
            ips = [self.status.pod_ip]
        return ips


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class Namespace:
    metadata: ObjectMeta

    @property
    def key(self) -> str:
        return self.metadata.key


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class NodeAddress:
    type: str
    address: str


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class NodeStatus:
    addresses: list[NodeAddress] = Field(default_factory=list)


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class Taint:
    key: str
    value: str = ""
    # Plain text, not an enum: a taint effect added by a later API version must not make the
    # whole Node unreadable.
    effect: str = ""


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class NodeSpec:
    # kpx's /healthz reads the cluster autoscaler's ToBeDeletedByClusterAutoscaler taint.
    taints: list[Taint] = Field(default_factory=list)


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class Node:
    metadata: ObjectMeta
    spec: NodeSpec = Field(default_factory=lambda: NodeSpec())
    status: NodeStatus = Field(default_factory=lambda: NodeStatus())

    @property
    def key(self) -> str:
        return self.metadata.key

    @property
    def zone(self) -> str | None:
        return self.metadata.labels.get("topology.kubernetes.io/zone")


def object_key(obj: dict[str, Any]) -> str | None:
    """ns/name (or name) read from raw JSON, without full validation; None if absent."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if isinstance(ns, str) and ns else meta["name"]


def describe_error(err: ValidationError) -> str:
    """First validation problem as `field.path: message`, for one-line logs."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {first['msg']}"
