"""Just enough of Kubernetes RBAC to decide what a ClusterRole allows (rbac/v1 PolicyRule
matching, as in k8s.io/kubernetes/pkg/apis/rbac/v1/evaluation_helpers.go)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from tests.apiserver import RequestRecord

# Granted to every authenticated user by the default system:discovery and
# system:public-info-viewer ClusterRoleBindings: no role of ours needs to grant them.
DEFAULT_NON_RESOURCE_URLS = (
    "/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/",
    "/healthz", "/livez", "/readyz",
)  # fmt: skip


@dataclass(frozen=True, order=True)
class Access:
    """One resource request as RBAC sees it."""

    group: str
    resource: str
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}.{self.group or 'core'}"


def access_of(record: RequestRecord) -> Access | None:
    """The RBAC attributes of a recorded request; None for a non-resource URL."""
    if record.verb is None or record.resource is None:
        return None
    parts = record.path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    return Access(group, record.resource, record.verb)


def _has(values: list[str], value: str) -> bool:
    return "*" in values or value in values


def allows(rules: list[dict[str, Any]], access: Access) -> bool:
    """Whether any rule grants `access` on the whole collection (a rule limited to
    resourceNames never covers a list or a watch of the collection)."""
    return any(
        _has(rule.get("apiGroups", []), access.group)
        and _has(rule.get("resources", []), access.resource)
        and _has(rule.get("verbs", []), access.verb)
        and not rule.get("resourceNames")
        for rule in rules
    )


def granted(rules: list[dict[str, Any]]) -> set[Access]:
    """Every (group, resource, verb) the rules name. Wildcards and nonResourceURLs are refused
    outright: no daemon needs them, and they could not be checked against requests."""
    out: set[Access] = set()
    for rule in rules:
        fields = [rule.get("apiGroups", []), rule.get("resources", []), rule.get("verbs", [])]
        if any("*" in values for values in fields) or rule.get("nonResourceURLs"):
            raise AssertionError(f"rule too broad to be least privilege: {rule}")
        for group in fields[0]:
            for resource in fields[1]:
                for verb in fields[2]:
                    out.add(Access(group, resource, verb))
    return out


def default_non_resource(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in DEFAULT_NON_RESOURCE_URLS)
