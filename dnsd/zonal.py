"""Zone-scoped names of headless Services (`--zonal`, CoreDNS `zonal`, coredns/coredns#8388):
`<topology zone>.pin._zone.<svc>.<ns>.svc.<zone>` and `<topology zone>.prefer._zone...`.

A, AAAA and SRV answer as the Service's own name does, over only the ready endpoints whose
EndpointSlice `zone` is the one named (compared case-insensitively; a zone value with dots
spans several labels). When no ready endpoint carries it, `pin` answers NODATA (for every
type: the name exists) and `prefer` answers as if all endpoints did. Other types: NODATA. A
ClusterIP Service, an unknown Service or one without ready endpoints: NXDOMAIN, as in CoreDNS.

Any label can stand in the zone position, so these names cannot be encoded ahead: each is built
when asked, from the stores, through the same dnsd.records code as the Service's own records,
and kept (encoded) until the Service or one of its EndpointSlices changes.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from dnsd import answers as enc
from dnsd.names import from_wire
from dnsd.records import Record, RecordOptions, service_records
from dnsd.wire import TYPE_A, TYPE_AAAA, TYPE_SRV, Answer
from kwatch.models import EndpointSlice, Service
from kwatch.store import Store, StoreEvent

CACHE_SERVICES = 1024  # Services whose zonal answers are kept
CACHE_ANSWERS = 256  # answers kept per Service (any label can be asked: bounded)
_SVC_LABEL = b"\x03svc"
_ZONE_LABEL = b"\x05_zone"
_PIN = b"\x03pin"
_PREFER = b"\x06prefer"
_TYPES = (TYPE_A, TYPE_AAAA, TYPE_SRV)


class ZonalNames:
    """Answers zone-scoped names (see the module doc); one of the handler's LazyNames."""

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
        self.exposed = exposed
        # Service key -> (name key + qtype) -> answer (None: NODATA, False: NXDOMAIN).
        self._cache: OrderedDict[str, dict[bytes, Answer | Literal[False] | None]] = OrderedDict()
        services.subscribe(self._on_service)
        slices.subscribe(self._on_slice)

    def claims(self, name_key: bytes, offsets: list[int], zone_offset: int) -> bool:
        """`<zone labels>.<pin|prefer>._zone.<svc>.<ns>.svc.<cluster zone>`."""
        if len(offsets) < 7:
            return False
        k = offsets.index(zone_offset)
        return (
            k >= 6
            and name_key[offsets[k - 1] : offsets[k]] == _SVC_LABEL
            and name_key[offsets[k - 4] : offsets[k - 3]] == _ZONE_LABEL
            and name_key[offsets[k - 5] : offsets[k - 4]] in (_PIN, _PREFER)
        )

    def answer(
        self, name_key: bytes, offsets: list[int], zone_offset: int, qtype: int, nodata: Answer
    ) -> Answer | None:
        j = offsets.index(zone_offset)  # then back: `svc`, namespace, Service, `_zone`
        service = name_key[offsets[j - 3] + 1 : offsets[j - 2]].decode("latin-1")
        namespace = name_key[offsets[j - 2] + 1 : offsets[j - 1]].decode("latin-1")
        key = f"{namespace}/{service}"
        answers = self._cache.get(key)
        if answers is None:
            self._cache[key] = answers = {}
            if len(self._cache) > CACHE_SERVICES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        cache_key = name_key + qtype.to_bytes(2, "big")
        if cache_key in answers:
            found = answers[cache_key]
        else:
            found = self._build(key, name_key, offsets, j, qtype)
            if len(answers) >= CACHE_ANSWERS:
                answers.clear()
            answers[cache_key] = found
        if found is False:
            return None  # no such Service with ready endpoints: NXDOMAIN
        return nodata if found is None else found

    def _build(
        self, key: str, name_key: bytes, offsets: list[int], j: int, qtype: int
    ) -> Answer | Literal[False] | None:
        """The answer; None for NODATA; False when the name does not exist."""
        service = self.services.get(key)
        if (
            service is None
            or not service.is_headless
            or not self.exposed(service.metadata.namespace)
        ):
            return False
        cluster_zone = from_wire(name_key[offsets[j] :])
        topology = from_wire(name_key[: offsets[j - 5]] + b"\x00")
        prefer = name_key[offsets[j - 5] : offsets[j - 4]] == _PREFER
        slices = self.slices.by_index("service", key)
        options = dataclasses.replace(self.options, zones=(cluster_zone,), endpoint_ptrs=False)
        everything = service_records(service, slices, options)
        if not everything.answers:
            return False  # SPEC §2.4.1: no ready endpoints, the Service's names do not exist
        in_zone = [_only_zone(eps, topology) for eps in slices]
        records = service_records(service, in_zone, options)
        if not records.answers:
            if not prefer:
                return None  # pin: the name exists, nothing in that zone
            records = everything
        if qtype not in _TYPES:
            return None
        base = f"{service.metadata.name}.{service.metadata.namespace}.svc.{cluster_zone}".lower()
        rrs = records.answers.get((base, qtype))
        if not rrs:
            return None
        name = from_wire(name_key)
        owned = [Record(name, rr.rtype, rr.ttl, rr.rdata) for rr in rrs]
        extra = records.additional.get((base, qtype), ())
        return enc.encode_records(name, qtype, owned, extra, qname=name_key)

    def _on_service(self, event: StoreEvent[Service]) -> None:
        self._cache.pop(event.key, None)

    def _on_slice(self, event: StoreEvent[EndpointSlice]) -> None:
        for obj in (event.obj, event.old):
            if obj is not None and obj.service_name:
                self._cache.pop(f"{obj.metadata.namespace}/{obj.service_name}", None)


def _only_zone(eps: EndpointSlice, zone: str) -> EndpointSlice:
    """`eps` with only the endpoints whose `zone` is `zone` (case-insensitive)."""
    kept = [e for e in eps.endpoints if e.zone is not None and e.zone.lower() == zone]
    if len(kept) == len(eps.endpoints):
        return eps
    return dataclasses.replace(eps, endpoints=kept)
