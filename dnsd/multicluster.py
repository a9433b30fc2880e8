"""`--multicluster ZONE`: the Multi-Cluster Services API's names, as CoreDNS's `multicluster`.

A ServiceImport (`multicluster.x-k8s.io/v1alpha1`) `<name>` in `<ns>` answers in each
multicluster zone (`clusterset.local`), per the MCS DNS specification (KEP-1645
specification.md) and CoreDNS's findMultiClusterServices:
- ClusterSetIP: `<name>.<ns>.svc.<zone>` A/AAAA of `spec.ips`, whether or not it has
  endpoints; `_<port>._<proto>.<name>.<ns>.svc.<zone>` SRV per named port and the bare name
  SRV for every port, target the Service name, its addresses as glue.
- Headless: from the EndpointSlices labelled `multicluster.kubernetes.io/service-name: <name>`
  in `<ns>`, the ready endpoints: `<name>.<ns>.svc.<zone>` A/AAAA of all of them;
  `<hostname>.<clusterid>.<name>.<ns>.svc.<zone>` A/AAAA per endpoint, the cluster ID being the
  slice's `multicluster.kubernetes.io/source-cluster` label, the hostname as in the cluster
  zone (hostname, pod name with --endpoint-pod-names, dashed IP); SRV per named slice port
  with those names as targets, and at the import's name for every slice port. No ready
  endpoint: NXDOMAIN (SPEC §2.4.1).
The multicluster zones are served like the cluster zones (SOA, NS, `<ns>.svc.<zone>`), but
hold no Service, pod, endpoint or zonal names of the local cluster.

Each ServiceImport is one zone source (`mcs:<ns>/<name>`), encoded ahead and replaced when it or
one of its slices changes, like a Service (dnsd.controller applies it in the same batches).
"""

from __future__ import annotations

from collections.abc import Callable

from dnsd.records import (
    Record,
    RecordOptions,
    ServiceRecords,
    SrvSet,
    _endpoint_hostname,
    add_endpoint_srvs,
    add_srv_sets,
    address_of,
    service_srv_sets,
    slice_ports,
)
from kwatch.mcs import MCS_SERVICE_NAME_LABEL, MCS_SOURCE_CLUSTER_LABEL, ServiceImport
from kwatch.models import EndpointSlice
from kwatch.store import EventType, Store, StoreEvent

SOURCE_PREFIX = "mcs:"


def import_key(eps: EndpointSlice) -> str | None:
    """`ns/name` of the ServiceImport an EndpointSlice serves, if it is a multicluster one."""
    name = eps.metadata.labels.get(MCS_SERVICE_NAME_LABEL)
    return f"{eps.metadata.namespace}/{name}" if name else None


class MulticlusterRecords:
    """ServiceImports as zone sources; one of dnsd.controller's extra sources."""

    def __init__(
        self,
        imports: Store[ServiceImport],
        slices: Store[EndpointSlice],
        options: RecordOptions,
        zones: tuple[str, ...],
        exposed: Callable[[str], bool],
    ) -> None:
        self.imports = imports
        self.slices = slices
        self.options = options
        self.zones = zones
        self.exposed = exposed
        self.stores = [imports]  # synced before the first build (the slices are anyway)
        self._slices_of: dict[str, set[str]] = {}  # import key -> its slices' keys
        self._dirty: set[str] = set()
        self._built = False
        self._wake: Callable[[], None] = lambda: None
        imports.subscribe(self._on_import)
        slices.subscribe(self._on_slice)

    # --- dnsd.controller's side -----------------------------------------------------------

    def on_change(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def take_dirty(self) -> set[str]:
        """Sources to encode again: everything the first time, then what changed."""
        if not self._built:
            self._built = True
            self._dirty |= set(self.imports.keys())
        dirty, self._dirty = self._dirty, set()
        return {SOURCE_PREFIX + key for key in dirty}

    def records(self, source: str) -> ServiceRecords | None:
        key = source.removeprefix(SOURCE_PREFIX)
        imported = self.imports.get(key)
        if imported is None or not self.exposed(imported.metadata.namespace):
            return None
        records = ServiceRecords()
        name, ns = imported.metadata.name, imported.metadata.namespace
        if imported.is_headless:
            slices = [
                eps
                for eps in (self.slices.get(k) for k in sorted(self._slices_of.get(key, ())))
                if eps is not None
            ]
            for zone in self.zones:
                self._headless(records, slices, f"{name}.{ns}.svc.{zone}".lower(), zone)
        else:
            for zone in self.zones:
                self._clusterset_ip(records, imported, f"{name}.{ns}.svc.{zone}".lower(), zone)
        return records

    # --- records --------------------------------------------------------------------------

    def _clusterset_ip(
        self, records: ServiceRecords, imported: ServiceImport, base: str, zone: str
    ) -> None:
        ttl = self.options.ttl
        glue = []
        for ip in imported.spec.ips:  # MCS spec §2.3.1, dual-stack
            qtype, rdata = address_of(ip)
            rr = Record(base, qtype, ttl, rdata)
            records.add(base, qtype, rr, ip)
            glue.append(rr)
        if not glue:
            return  # no clusterset IP yet: nothing to answer
        # §2.3.2 and the bare name's SRV, weighed as CoreDNS's multicluster findServices
        # and SRV() do: over the matching ports x clusterset IPs.
        srv_sets = service_srv_sets(imported.spec.ports, base, len(glue))
        add_srv_sets(records, srv_sets, {base: glue}, ttl, base, zone)

    def _headless(
        self, records: ServiceRecords, slices: list[EndpointSlice], base: str, zone: str
    ) -> None:
        ttl = self.options.ttl
        glue: dict[str, list[Record]] = {}
        srv_sets: dict[str, SrvSet] = {base: SrvSet()}
        for eps in slices:
            if eps.address_type == "FQDN":
                continue
            cluster = eps.metadata.labels.get(MCS_SOURCE_CLUSTER_LABEL, "").lower()
            ports = slice_ports(eps, base)
            for endpoint in eps.endpoints:
                if not endpoint.is_ready:
                    continue
                for ip in endpoint.addresses:
                    qtype, rdata = address_of(ip)
                    records.add(base, qtype, Record(base, qtype, ttl, rdata), ip)  # §2.4.1
                    if not cluster:
                        continue  # no cluster ID: no name of its own (§2.4.1 needs one)
                    label = _endpoint_hostname(
                        endpoint.hostname, endpoint.target_ref, ip, self.options.endpoint_pod_names
                    ).lower()
                    owner = f"{label}.{cluster}.{base}"
                    rr = Record(owner, qtype, ttl, rdata)
                    records.add(owner, qtype, rr, ip)
                    glue.setdefault(owner, []).append(rr)
                    add_endpoint_srvs(srv_sets, ports, owner)  # §2.4.2
        add_srv_sets(records, srv_sets, glue, ttl, base, zone)

    # --- store callbacks (cheap: note and wake) -------------------------------------------

    def _on_import(self, event: StoreEvent[ServiceImport]) -> None:
        self._dirty.add(event.key)
        self._wake()

    def _on_slice(self, event: StoreEvent[EndpointSlice]) -> None:
        keys = {import_key(obj) for obj in (event.old, event.obj) if obj is not None}
        keys.discard(None)
        if not keys:
            return  # not a multicluster slice (the usual case)
        for key in keys:
            assert key is not None
            slices = self._slices_of.get(key)
            if slices is not None:
                slices.discard(event.key)
                if not slices:
                    del self._slices_of[key]
            self._dirty.add(key)
        new_key = import_key(event.obj)
        if new_key is not None and event.type is not EventType.DELETED:
            self._slices_of.setdefault(new_key, set()).add(event.key)
        self._wake()
