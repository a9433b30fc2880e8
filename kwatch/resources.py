"""The API resources the daemons watch: where they live on the API server and how they parse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from kwatch.mcs import ServiceImport
from kwatch.models import EndpointSlice, Namespace, Node, Pod, Service, drop_fqdn_endpoints

# The list envelope: `metadata.resourceVersion`, `metadata.continue`, `items`.
ListMeta = TypedDict("ListMeta", {"resourceVersion": str, "continue": str | None}, total=False)


def _unchanged(value: dict[str, Any]) -> dict[str, Any]:
    return value


@dataclass(frozen=True)
class Resource:
    """One watchable resource type (e.g. services in core/v1)."""

    name: str  # plural, as in the URL and RBAC rules: "services"
    kind: str  # "Service"
    group_version: str  # "v1" or "discovery.k8s.io/v1"
    namespaced: bool
    model: type[Any]
    # Applied to a raw object before validation (EndpointSlice: FQDN slices).
    prepare: Callable[[dict[str, Any]], dict[str, Any]] = _unchanged
    adapter: TypeAdapter[Any] = field(init=False, repr=False, compare=False)
    list_adapter: TypeAdapter[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", TypeAdapter(self.model))
        envelope = TypedDict(  # type: ignore[misc]  # noqa: UP013 (a name built at run time)
            f"{self.kind}List",
            {"metadata": ListMeta, "items": list[self.model] | None},  # type: ignore[name-defined]
            total=False,
        )
        # Only keys go through pydantic's string cache (16,384 strings under 64 bytes, for the
        # whole process), not values: resourceVersions, names and addresses that change with
        # every relist filled it slowly, about 1 MB of dead strings that the soak's RSS after
        # warm-up counted as growth; as fast (10,000 Services: 161 ms, 170 with values).
        # A TypedDict carries no config for the adapter: hence `| None`, which takes one.
        object.__setattr__(
            self,
            "list_adapter",
            TypeAdapter(envelope | None, config=ConfigDict(cache_strings="keys")),
        )

    @property
    def group(self) -> str:
        return self.group_version.split("/")[0] if "/" in self.group_version else ""

    @property
    def base_path(self) -> str:
        if self.group:
            return f"/apis/{self.group_version}"
        return f"/api/{self.group_version}"

    def collection_path(self, namespace: str | None = None) -> str:
        """URL path of the collection, across namespaces unless one is given."""
        if namespace and self.namespaced:
            return f"{self.base_path}/namespaces/{namespace}/{self.name}"
        return f"{self.base_path}/{self.name}"

    def parse(self, raw: dict[str, Any]) -> Any:
        """Validate one raw API object; raises pydantic.ValidationError when invalid.

        JSON `null` in an optional field means "not set" to the API server (Go decodes it
        to the zero value), so an object rejected with nulls in it is tried once more
        without them; objects without nulls pay nothing for this."""
        try:
            return self.adapter.validate_python(self.prepare(raw))
        except ValidationError:
            cleaned = without_nulls(raw)
            if cleaned is raw:
                raise
            return self.adapter.validate_python(self.prepare(cleaned))

    def parse_list(self, body: bytes) -> tuple[list[Any], str, str]:
        """(objects, resourceVersion, continue token) of a list response, validated straight
        from the JSON: the fields the models leave out (managedFields, last-applied
        annotations, ...) are skipped by the parser and never become Python objects. Raises
        pydantic.ValidationError when any item is invalid (or the body is not JSON); the
        caller then parses item by item to keep the valid ones."""
        doc = self.list_adapter.validate_json(body) or {}  # `null`: no resourceVersion
        meta = doc.get("metadata") or {}
        return (
            doc.get("items") or [],
            meta.get("resourceVersion") or "",
            meta.get("continue") or "",
        )


def without_nulls(value: Any) -> Any:
    """`value` with every mapping entry whose value is null removed, at any depth; `value`
    itself (not a copy) when it holds no such entry. Nulls inside lists stay: an address
    list with a null in it is invalid, not shorter."""
    if isinstance(value, dict):
        out: dict[str, Any] | None = None
        for key, item in value.items():
            cleaned = None if item is None else without_nulls(item)
            if cleaned is not item or item is None:
                if out is None:
                    out = dict(value)
                if item is None:
                    del out[key]
                else:
                    out[key] = cleaned
        return value if out is None else out
    if isinstance(value, list):
        items = [without_nulls(item) for item in value]
        if any(new is not old for new, old in zip(items, value, strict=True)):
            return items
        return value
    return value


SERVICES = Resource("services", "Service", "v1", True, Service)
ENDPOINTSLICES = Resource(
    "endpointslices",
    "EndpointSlice",
    "discovery.k8s.io/v1",
    True,
    EndpointSlice,
    prepare=drop_fqdn_endpoints,
)
PODS = Resource("pods", "Pod", "v1", True, Pod)
NAMESPACES = Resource("namespaces", "Namespace", "v1", False, Namespace)
NODES = Resource("nodes", "Node", "v1", False, Node)
# Multi-Cluster Services API (dnsd --multicluster)
SERVICEIMPORTS = Resource(
    "serviceimports", "ServiceImport", "multicluster.x-k8s.io/v1alpha1", True, ServiceImport
)

ALL_RESOURCES = (SERVICES, ENDPOINTSLICES, PODS, NAMESPACES, NODES, SERVICEIMPORTS)
BY_KIND = {r.kind: r for r in ALL_RESOURCES}
BY_NAME = {r.name: r for r in ALL_RESOURCES}
