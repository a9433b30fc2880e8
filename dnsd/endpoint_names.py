"""`<hostname or dashed-ip>.<svc>.<ns>.svc.<zone>` of ClusterIP Services, answered when asked.

CoreDNS answers these A/AAAA names for the ready endpoints of every Service (k8s/kubernetes.go
findServices, the endpoint branch; kubernetes.io "DNS for Services and Pods"); the spec defines
them for headless Services only, whose names dnsd encodes ahead like all its records. Encoded
ahead for ClusterIP Services they would cost what `--endpoint-ptrs` costs (+26 MB RSS for the
90,000 ClusterIP endpoints of bench/dns.py's 10,000-Service cluster) for names rarely asked, so
they are looked up on the control path instead, like pod names: the asked Service's ready
addresses by label, kept for the CACHE Services asked last and dropped as soon as the Service
or one of its EndpointSlices changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from dnsd import answers as enc
from dnsd.names import from_wire
from dnsd.records import RecordOptions, address_rr, ready_addresses
from dnsd.wire import Answer
from kwatch.models import EndpointSlice, Service
from kwatch.store import Store, StoreEvent

CACHE = 1024  # Services whose endpoint labels are kept (a few KB each at most)
_SVC_LABEL = b"\x03svc"

Labels = dict[str, list[str]]  # endpoint label -> its ready IPs


class EndpointNames:
    """Answers endpoint names of ClusterIP Services from the stores (see the module doc)."""

    def __init__(
        self,
        services: Store[Service],
        slices: Store[EndpointSlice],
        options: RecordOptions,
        exposed: Callable[[str], bool],
    ) -> None:
        self.services = services
        self.slices = slices
        self.options = options
        self.exposed = exposed  # namespace -> served (`--namespaces`)
        self._cache: OrderedDict[str, Labels] = OrderedDict()
        services.subscribe(self._on_service)
        slices.subscribe(self._on_slice)

    # --- the handler's side (dnsd.handler.LazyNames) --------------------------------------

    def claims(self, name_key: bytes, offsets: list[int], zone_offset: int) -> bool:
        """The name has the shape `<label>.<svc>.<ns>.svc.<zone>`."""
        return (
            len(offsets) > 4
            and offsets[4] == zone_offset
            and name_key[offsets[3] : offsets[4]] == _SVC_LABEL
        )

    def answer(
        self, name_key: bytes, offsets: list[int], zone_offset: int, qtype: int, nodata: Answer
    ) -> Answer | None:
        """The A/AAAA answer, NODATA for a name that exists without records of `qtype`, or
        None: no such name."""
        label = name_key[1 : offsets[1]].decode("latin-1")
        service = name_key[offsets[1] + 1 : offsets[2]].decode("latin-1")
        namespace = name_key[offsets[2] + 1 : offsets[3]].decode("latin-1")
        ips = self.labels(f"{namespace}/{service}").get(label)
        if not ips:
            return None
        name = from_wire(name_key)
        rrs = []
        for ip in ips:
            rtype, rr = address_rr(name, ip, self.options.ttl)
            if rtype == qtype:
                rrs.append(rr)
        if not rrs:
            return nodata
        return enc.encode_records(name, qtype, rrs, qname=name_key)

    # --- the index ------------------------------------------------------------------------

    def labels(self, key: str) -> Labels:
        """Endpoint label -> ready IPs of the ClusterIP Service `key` (empty for any other)."""
        cache = self._cache
        found = cache.get(key)
        if found is not None:
            cache.move_to_end(key)
            return found
        found = self._build(key)
        cache[key] = found
        if len(cache) > CACHE:
            cache.popitem(last=False)
        return found

    def _build(self, key: str) -> Labels:
        service = self.services.get(key)
        if (
            service is None
            or service.is_headless  # encoded ahead with its records (dnsd.records)
            or service.is_external_name  # names below an ExternalName do not exist
            or not self.exposed(service.metadata.namespace)
        ):
            return {}
        slices = self.slices.by_index("service", key)
        out: Labels = {}
        for address in ready_addresses(service, slices, self.options.endpoint_pod_names):
            out.setdefault(address.hostname, []).append(address.ip)
        return out

    def _on_service(self, event: StoreEvent[Service]) -> None:
        self._cache.pop(event.key, None)

    def _on_slice(self, event: StoreEvent[EndpointSlice]) -> None:
        for obj in (event.obj, event.old):
            if obj is not None and obj.service_name:
                self._cache.pop(f"{obj.metadata.namespace}/{obj.service_name}", None)
