"""Namespace isolation: a pod sees the cluster names of its own namespace and the shared ones.

With `--namespace-isolation`, a query from a pod (its address is a known pod IP) for a name of
another namespace is answered as if the name did not exist: NXDOMAIN with the zone's SOA, for
every type. A name's namespace is the label before `svc.<zone>` or `pod.<zone>`
(`web.shop.svc.<zone>`, `_http._tcp.web.shop.svc.<zone>`, `shop.svc.<zone>` itself,
`10-0-0-1.shop.pod.<zone>`, the --multicluster zones alike), or before an --external-zone
(`web.shop.<external zone>`); names without one (the apex, `svc.<zone>`, `ns.dns.<zone>`,
`dns-version.<zone>`) and names outside the cluster zones are answered as to anyone. A reverse
name of the cluster (PTR of a ClusterIP or endpoint) keeps only the targets the pod may see; with
none left it is NXDOMAIN with the reverse zone's SOA. Clients that are no pod (nodes, host-network
pods, other addresses) are answered as without the option.

Nothing in CoreDNS does this (kubernetes/kubernetes#81137, the Kubernetes security audit's
TOB-K8S-032: any pod can list every Service by DNS). It hides names, not traffic: a pod that
knows an IP still reaches it unless a NetworkPolicy says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable

from dnsd import answers as enc
from dnsd import wire
from dnsd.names import from_wire, label_offsets, to_wire
from dnsd.records import ptr_rr
from dnsd.wire import Answer, Query
from dnsd.zone import REVERSE_ZONES, ZoneIndex

_SVC = b"\x03svc"
_POD = b"\x03pod"
_PTR = enc.qtype_key(wire.TYPE_PTR)


def namespace_label(index: ZoneIndex, name_key: bytes, offsets: list[int]) -> bytes | None:
    """The namespace label (wire form, with its length byte) of a cluster name, or None."""
    found = index.zone_of(name_key, offsets)
    if found is None:
        return None
    zid, zone_offset = found
    k = offsets.index(zone_offset)
    if zid >= len(index.zones):
        # An --external-zone: `<svc>.<ns>.<zone>`, `<ns>.<zone>`, `<ep>.<svc>.<ns>.<zone>`.
        return name_key[offsets[k - 1] : zone_offset] if k >= 1 else None
    if k >= 2 and name_key[offsets[k - 1] : zone_offset] in (_SVC, _POD):
        return name_key[offsets[k - 2] : offsets[k - 1]]
    return None


class NamespaceIsolation:
    def __init__(self, index: ZoneIndex, shared: Iterable[str] = ()) -> None:
        self.index = index
        self.shared = frozenset(_label(ns) for ns in shared)
        self._labels: dict[str, bytes] = {}
        self._reverse_suffixes = tuple(index.reverse_ids)  # wire names

    def client_label(self, namespace: str) -> bytes:
        """The wire label of a client's namespace (cached: there are few namespaces)."""
        label = self._labels.get(namespace)
        if label is None:
            label = _label(namespace)
            if len(self._labels) < 100_000:
                self._labels[namespace] = label
        return label

    def sees(self, label: bytes | None, client: bytes) -> bool:
        return label is None or label == client or label in self.shared

    def fast_allows(self, data: bytes, client: bytes) -> bool:
        """For the hot path: True only when the question surely is a name `client` may see
        (or no cluster name at all); False hands the query to the full path, which decides."""
        n = len(data)
        offsets = []
        i = 12
        while i < n:
            length = data[i]
            if length == 0:
                break
            if length > 63:
                return False
            offsets.append(i - 12)
            i += 1 + length
        else:
            return False
        name_key = data[12 : i + 1].lower()
        if name_key.endswith(self._reverse_suffixes):
            return False  # PTR targets are checked on the full path
        return self.sees(namespace_label(self.index, name_key, offsets), client)

    def hidden(self, query: Query, client: bytes) -> Answer | None:
        """What the pod of namespace label `client` gets instead of the real answer, or None
        when it may see the real one."""
        index = self.index
        key = query.name_key
        found = index.zone_of(key, query.label_offsets)
        if found is not None:
            label = namespace_label(index, key, query.label_offsets)
            return None if self.sees(label, client) else index.nxdomain[found[0]]
        zid = index.existing.get(key)
        if zid is None or not len(index.zones) <= zid < len(index.zones) + len(REVERSE_ZONES):
            return None  # outside every zone: forwarded as for anyone
        ptr = index.answers.get(key + _PTR)
        if ptr is None:
            return None
        rev = from_wire(key)
        records = enc.decode_answer_records(rev, wire.TYPE_PTR, ptr)
        targets = [str(rr.rdata).rstrip(".") for rr in records]
        allowed = [t for t in targets if self.sees(self._target_label(t), client)]
        if len(allowed) == len(targets):
            return None
        if not allowed:
            return index.nxdomain[zid]
        if query.qtype != wire.TYPE_PTR:
            return None  # NODATA, as it is for a name the pod may see
        return enc.encode_records(
            rev, wire.TYPE_PTR, [ptr_rr(rev, t, index.ttl) for t in allowed], qname=key
        )

    def _target_label(self, target: str) -> bytes | None:
        try:
            target_key = to_wire(target.lower())
        except (ValueError, UnicodeEncodeError):
            return None
        return namespace_label(self.index, target_key, label_offsets(target_key))


def _label(namespace: str) -> bytes:
    raw = namespace.lower().encode()
    return bytes([len(raw)]) + raw
