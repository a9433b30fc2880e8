"""The little API-server-side defaulting the daemons can observe.

kube-apiserver fills in fields clients rely on (a Service's clusterIP, port protocols,
a Namespace's phase); objects created through the fake get the same so tests can
create minimal manifests and still see realistic objects on the wire.
"""

from __future__ import annotations

import ipaddress
from typing import Any

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")


class ClusterIPAllocator:
    """Hands out Service cluster IPs from SERVICE_CIDR, skipping ones already in use."""

    def __init__(self, cidr: ipaddress.IPv4Network = SERVICE_CIDR) -> None:
        self._base = int(cidr.network_address)
        self._size = cidr.num_addresses
        self._next = 1  # .0 is the network address; kube-apiserver starts at .1
        self._used: set[str] = set()

    def reserve(self, ip: str) -> None:
        self._used.add(ip)

    def release(self, ip: str) -> None:
        self._used.discard(ip)

    def allocate(self) -> str:
        # Bounded scan: at most one pass over the range.
        for _ in range(self._size - 2):
            candidate = str(ipaddress.IPv4Address(self._base + self._next))
            self._next = self._next + 1 if self._next < self._size - 2 else 1
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate
        raise RuntimeError("service IP range exhausted")


def _default_ports(ports: list[dict[str, Any]], *, target_port: bool) -> None:
    for port in ports:
        port.setdefault("protocol", "TCP")
        if target_port and "port" in port:
            port.setdefault("targetPort", port["port"])


def default_service(
    obj: dict[str, Any], allocator: ClusterIPAllocator, keep_ip: str | None
) -> None:
    """Fill spec defaults; keep_ip is the IP of the object being replaced (it is immutable)."""
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    _default_ports(spec.get("ports") or [], target_port=True)
    if spec["type"] == "ExternalName":
        return
    if not spec.get("clusterIP"):
        spec["clusterIP"] = keep_ip or allocator.allocate()
    elif spec["clusterIP"] != "None":
        allocator.reserve(spec["clusterIP"])
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    if spec["clusterIP"] != "None":
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    obj.setdefault("status", {"loadBalancer": {}})


def default_endpointslice(obj: dict[str, Any]) -> None:
    _default_ports(obj.get("ports") or [], target_port=False)


def default_namespace(obj: dict[str, Any]) -> None:
    name = obj["metadata"]["name"]
    labels = obj["metadata"].get("labels") or {}
    # Added by the NamespaceDefaultLabelName admission since Kubernetes 1.21.
    obj["metadata"]["labels"] = {**labels, "kubernetes.io/metadata.name": name}
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    obj.setdefault("status", {}).setdefault("phase", "Active")


def default_pod(obj: dict[str, Any]) -> None:
    obj.setdefault("status", {}).setdefault("phase", "Pending")


def apply_defaults(
    resource: str,
    obj: dict[str, Any],
    allocator: ClusterIPAllocator,
    previous: dict[str, Any] | None,
) -> None:
    """Default `obj` in place (it is a private copy by the time this runs)."""
    if resource == "services":
        keep = (previous or {}).get("spec", {}).get("clusterIP")
        default_service(obj, allocator, keep if keep and keep != "None" else None)
    elif resource == "endpointslices":
        default_endpointslice(obj)
    elif resource == "namespaces":
        default_namespace(obj)
    elif resource == "pods":
        default_pod(obj)


def service_ip(obj: dict[str, Any]) -> str | None:
    ip = obj.get("spec", {}).get("clusterIP")
    return ip if ip and ip != "None" else None
