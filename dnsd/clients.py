"""Which namespace a client is in: an index from pod IP to pod, fed by the Pod watch.

`--autopath` and `--namespace-isolation` decide per client, and all they need to know of a
client is the namespace of the pod that has its address. CoreDNS keeps every Pod object for
this (`pods verified`, about three times the memory of its Service cache). dnsd watches Pods
through its own slim model, `PodAddress` (name, namespace, resourceVersion and the packed IPs
that count, nothing else: no labels, no node), and keeps one dict entry per pod IP: the packed
address (4 or 16 bytes, what the UDP thread reads from the kernel without making a string) to
the pod's store key `namespace/name`, a string the store already holds. With `--pods verified`
the full Pod watch is there anyway, and the index is fed from it instead (one watch either way).

Pods counted: those with an IP that are neither host-network (their IP is the node's: a node is
no pod client) nor finished (Succeeded/Failed: the IP may already be another pod's). When two
pods claim one IP (a reused IP while the old pod terminates), the newest event wins, and a
pod's deletion removes the IP only if it is still that pod's.
"""

from __future__ import annotations

import socket
from typing import Any

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from kwatch.models import CONFIG, InternedStr, Pod
from kwatch.resources import Resource
from kwatch.store import EventType, StoreEvent

_FINISHED = frozenset({"Succeeded", "Failed"})


def pack_ip(ip: str) -> bytes | None:
    """An address as the 4 or 16 bytes the index is keyed by; None if it is no IP."""
    try:
        if ":" in ip:
            return socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
        return socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        return None


def _counted(host_network: Any, phase: Any) -> bool:
    """A pod whose IP makes a client a pod client (see the module docstring)."""
    return not host_network and phase not in _FINISHED


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class PodMeta:
    name: str
    namespace: InternedStr = ""
    resource_version: str = Field(default="", alias="resourceVersion")

    @property
    def key(self) -> str:  # the store's key, as kwatch.models.ObjectMeta's
        return f"{self.namespace}/{self.name}"


@dataclass(slots=True, frozen=True, kw_only=True, config=CONFIG)
class PodAddress:
    """What the client index needs of a Pod; `ips` are packed, empty for pods not counted."""

    metadata: PodMeta
    ips: tuple[bytes, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _addresses(cls, value: Any) -> Any:
        """A raw Pod (API JSON) -> {metadata, ips}; IPs that do not parse are left out."""
        if not isinstance(value, dict) or "ips" in value:
            return value
        spec = value.get("spec") or {}
        status = value.get("status") or {}
        ips: list[bytes] = []
        if isinstance(spec, dict) and isinstance(status, dict):
            if _counted(spec.get("hostNetwork"), status.get("phase")):
                texts = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)]
                if not texts and status.get("podIP"):
                    texts = [status.get("podIP")]
                packed = (pack_ip(t) for t in texts if isinstance(t, str))
                ips = [p for p in packed if p is not None]
        return {"metadata": value.get("metadata"), "ips": tuple(ips)}


# The Pod watch of --autopath / --namespace-isolation (without --pods verified).
POD_ADDRESSES = Resource("pods", "Pod", "v1", True, PodAddress)


def _client_ips(pod: Pod | PodAddress) -> list[bytes]:
    if isinstance(pod, PodAddress):
        return list(pod.ips)
    if not _counted(pod.spec.host_network, pod.status.phase):
        return []
    packed = (pack_ip(ip) for ip in pod.ips)
    return [p for p in packed if p is not None]


class PodClients:
    """Pod IP -> `namespace/name` of the pod that has it."""

    def __init__(self) -> None:
        self._by_ip: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._by_ip)

    def on_pod(self, event: StoreEvent[Pod] | StoreEvent[PodAddress]) -> None:
        """Store subscriber: keep the index in step with one Pod event."""
        old = _client_ips(event.old) if event.old is not None else []
        new = _client_ips(event.obj) if event.type is not EventType.DELETED else []
        by_ip = self._by_ip
        for packed in old:
            if packed not in new and by_ip.get(packed) == event.key:
                del by_ip[packed]
        for packed in new:
            by_ip[packed] = event.key

    def namespace_of_packed(self, packed: bytes) -> str | None:
        key = self._by_ip.get(packed)
        return None if key is None else key[: key.index("/")]

    def namespace_of(self, ip: str) -> str | None:
        """The namespace of the pod with this address; None for anything else (a node, a
        host-network pod, an address no pod has)."""
        packed = pack_ip(ip)
        return None if packed is None else self.namespace_of_packed(packed)
