"""Minimal discovery documents (/version, /api, /apis, resource lists)."""

from __future__ import annotations

from typing import Any

from .resources import RESOURCES, ResourceType

_VERBS = ["create", "delete", "get", "list", "update", "watch"]

VERSION_INFO: dict[str, str] = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0-fake",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2024-01-01T00:00:00Z",
    "goVersion": "go1.22.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _group_versions() -> dict[str, list[ResourceType]]:
    by_gv: dict[str, list[ResourceType]] = {}
    for rtype in RESOURCES:
        by_gv.setdefault(rtype.api_version, []).append(rtype)
    return by_gv


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _api_group(group: str, version: str) -> dict[str, Any]:
    gv = {"groupVersion": f"{group}/{version}", "version": version}
    return {"name": group, "versions": [gv], "preferredVersion": gv}


def api_group_list() -> dict[str, Any]:
    groups = sorted({(r.group, r.version) for r in RESOURCES if r.group})
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_api_group(g, v) for g, v in groups],
    }


def api_group(group: str) -> dict[str, Any] | None:
    versions = sorted({r.version for r in RESOURCES if r.group == group and group})
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group, versions[0])}


def resource_list(group_version: str) -> dict[str, Any] | None:
    rtypes = _group_versions().get(group_version)
    if rtypes is None:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {
                "name": r.resource,
                "singularName": r.kind.lower(),
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": _VERBS,
            }
            for r in rtypes
        ],
    }


def document_for(path: str, server_address: str) -> dict[str, Any] | None:
    """The discovery document served at `path`, or None if it is not a discovery path."""
    parts = [p for p in path.split("/") if p]
    if parts == ["version"]:
        return dict(VERSION_INFO)
    if parts == ["api"]:
        return api_versions(server_address)
    if parts == ["apis"]:
        return api_group_list()
    if len(parts) == 2 and parts[0] == "api":
        return resource_list(parts[1])
    if len(parts) == 2 and parts[0] == "apis":
        return api_group(parts[1])
    if len(parts) == 3 and parts[0] == "apis":
        return resource_list(f"{parts[1]}/{parts[2]}")
    return None
