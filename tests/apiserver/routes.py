"""URL -> (resource, namespace, name) and request -> verb, following kube-apiserver's layout."""

from __future__ import annotations

from dataclasses import dataclass

from .resources import BY_RESOURCE, ResourceType


@dataclass(frozen=True, slots=True)
class Route:
    rtype: ResourceType
    namespace: str | None  # None: all namespaces (or a cluster-scoped resource)
    name: str | None  # None: the collection


def _api_root(parts: list[str]) -> tuple[str, str, list[str]] | None:
    """Split ("api", "v1", ...) or ("apis", group, version, ...) into group, version, rest."""
    if len(parts) >= 2 and parts[0] == "api":
        return "", parts[1], parts[2:]
    if len(parts) >= 3 and parts[0] == "apis":
        return parts[1], parts[2], parts[3:]
    return None


def _resolve(rest: list[str]) -> tuple[str, str | None, str | None] | None:
    """(resource, namespace, name) from the path below the group/version."""
    if len(rest) in (3, 4) and rest[0] == "namespaces":
        return rest[2], rest[1], rest[3] if len(rest) == 4 else None
    if len(rest) == 1:
        return rest[0], None, None
    if len(rest) == 2:
        return rest[0], None, rest[1]
    return None


def parse_path(path: str) -> Route | None:
    """The resource route for `path`, or None when it names no served resource."""
    parts = [p for p in path.split("/") if p]
    root = _api_root(parts)
    if root is None:
        return None
    group, version, rest = root
    resolved = _resolve(rest)
    if resolved is None:
        return None
    resource, namespace, name = resolved
    rtype = BY_RESOURCE.get(resource)
    if rtype is None or rtype.group != group or rtype.version != version:
        return None
    if namespace is not None and not rtype.namespaced:
        return None
    if name is not None and namespace is None and rtype.namespaced:
        return None  # /api/v1/services/foo is not a valid object path
    return Route(rtype, namespace, name)


def verb_for(method: str, route: Route, query: dict[str, str]) -> str | None:
    """The Kubernetes verb of a request; None for a method the fake does not serve."""
    if method == "GET":
        if route.name is not None:
            return "get"
        return "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
    if method == "POST" and route.name is None:
        return "create"
    if method == "PUT" and route.name is not None:
        return "update"
    if method == "DELETE" and route.name is not None:
        return "delete"
    return None
