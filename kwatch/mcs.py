"""Multi-Cluster Services API objects (KEP-1645, `multicluster.x-k8s.io/v1alpha1`): only the
fields dnsd's `--multicluster` reads, validated like kwatch.models' (a bad one is rejected
whole and the last good state kept).

The endpoints of an imported Service are ordinary EndpointSlices (the EndpointSlice store
holds them) labelled with the ServiceImport's name and the cluster they come from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from kwatch.models import CONFIG, IP, InternedStr, ObjectMeta, PortNumber, Protocol

MCS_SERVICE_NAME_LABEL = "multicluster.kubernetes.io/service-name"
MCS_SOURCE_CLUSTER_LABEL = "multicluster.kubernetes.io/source-cluster"


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ServiceImportPort:
    name: InternedStr = ""
    protocol: Protocol = "TCP"
    port: PortNumber
    app_protocol: str | None = Field(default=None, alias="appProtocol")


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ServiceImportSpec:
    type: Literal["ClusterSetIP", "Headless"]
    ips: list[IP] = Field(default_factory=list)  # the clusterset IPs (ClusterSetIP only)
    ports: list[ServiceImportPort] = Field(default_factory=list)


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class ServiceImport:
    metadata: ObjectMeta
    spec: ServiceImportSpec

    @property
    def key(self) -> str:
        return self.metadata.key

    @property
    def is_headless(self) -> bool:
        return self.spec.type == "Headless"
