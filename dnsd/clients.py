"""Which namespace a client is in: an index from pod IP to pod, fed by the Pod watch.

`--autopath` and `--namespace-isolation` decide per client, and all they need to know of a
client is the namespace of the pod that has its address. CoreDNS keeps every Pod object for
this (`pods verified`, about three times the memory of its Service cache); this index keeps one
dict entry per pod IP: the packed address (4 or 16 bytes, what the UDP thread reads from the
kernel without making a string) to the pod's store key `namespace/name`, a string the store
already holds.

Pods counted: those with an IP that are neither host-network (their IP is the node's: a node is
no pod client) nor finished (Succeeded/Failed: the IP may already be another pod's). When two
pods claim one IP (a reused IP while the old pod terminates), the newest event wins, and a
pod's deletion removes the IP only if it is still that pod's.
"""

from __future__ import annotations

import socket

from kwatch.models import Pod
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


def _client_ips(pod: Pod) -> list[bytes]:
    if pod.spec.host_network or pod.status.phase in _FINISHED:
        return []
    packed = (pack_ip(ip) for ip in pod.ips)
    return [p for p in packed if p is not None]


class PodClients:
    """Pod IP -> `namespace/name` of the pod that has it."""

    def __init__(self) -> None:
        self._by_ip: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._by_ip)

    def on_pod(self, event: StoreEvent[Pod]) -> None:
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
