"""The resource types the fake API server knows: kind <-> resource <-> URL group/version."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One served resource, e.g. core/v1 services."""

    resource: str  # plural, as in URLs: "services"
    kind: str  # "Service"
    group: str  # "" for the core group
    version: str  # "v1"
    namespaced: bool
    # Field selector labels kube-apiserver accepts for this resource besides metadata.*.
    fields: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def url_prefix(self) -> str:
        """The API root this resource is served under (no trailing slash)."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


_POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
)

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("services", "Service", "", "v1", namespaced=True),
    ResourceType("pods", "Pod", "", "v1", namespaced=True, fields=_POD_FIELDS),
    ResourceType("namespaces", "Namespace", "", "v1", namespaced=False, fields=("status.phase",)),
    ResourceType("nodes", "Node", "", "v1", namespaced=False, fields=("spec.unschedulable",)),
    ResourceType("endpointslices", "EndpointSlice", "discovery.k8s.io", "v1", namespaced=True),
    # Multi-Cluster Services API (KEP-1645), a CRD in real clusters.
    ResourceType(
        "serviceimports", "ServiceImport", "multicluster.x-k8s.io", "v1alpha1", namespaced=True
    ),
)

BY_RESOURCE: dict[str, ResourceType] = {r.resource: r for r in RESOURCES}
BY_KIND: dict[str, ResourceType] = {r.kind: r for r in RESOURCES}


def resource_type(resource: str) -> ResourceType:
    """Look a resource up by its plural name; KeyError if the fake does not serve it."""
    try:
        return BY_RESOURCE[resource]
    except KeyError:
        raise KeyError(f"unknown resource {resource!r}") from None


def type_for_object(obj: dict[str, object]) -> ResourceType:
    """Infer the resource from an object's kind (and check its apiVersion if given)."""
    kind = obj.get("kind")
    rtype = BY_KIND.get(kind) if isinstance(kind, str) else None
    if rtype is None:
        raise ValueError(f"unsupported kind {kind!r}")
    api_version = obj.get("apiVersion")
    if api_version not in (None, rtype.api_version):
        raise ValueError(f"kind {kind} is served as {rtype.api_version}, not {api_version}")
    return rtype
