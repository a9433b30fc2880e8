"""The zone index: every precomputed answer of the cluster zones, updated one source at a time.

A *source* is a Service (`ns/name`), a namespace (`namespace:<name>`) or the apex (`apex`). Each
contributes answers keyed by (name, qtype), names that exist, PTR owners and ExternalName
aliases; replacing a source removes exactly what it contributed before and encodes only its new
records (DESIGN: "Rebuild only the service that changed"). Names several sources share
(`<ns>.svc.<zone>`, a reverse name selected by two Services) are reference counted.

A reverse name several Services point at answers every target once, in an order that depends
only on the current objects, not on the order they changed in: by PtrRank (the SPEC's PTRs
before CoreDNS's endpoint extension, so a resolver that keeps the first answer, getnameinfo,
gets the name the spec defines), then by source. As in CoreDNS k8s/reverse.go, an IP that is a
ClusterIP does not answer the extension PTRs of the endpoints that have it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dnslib import CNAME, QTYPE, RR

from dnsd import answers as enc
from dnsd import external, wire
from dnsd.names import from_wire, to_wire
from dnsd.records import PtrRank, ServiceRecords, cname_rr, ptr_rr
from dnsd.wire import Answer

REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")
MAX_CNAME_CHAIN = 8
_QTYPE_KEYS = {
    qtype: enc.qtype_key(qtype)
    for qtype in (wire.TYPE_A, wire.TYPE_AAAA, wire.TYPE_SRV, wire.TYPE_PTR, wire.TYPE_CNAME)
}
_PTR = _QTYPE_KEYS[wire.TYPE_PTR]

# Who points a reverse name where: flat (source, rank, target or targets) triples sorted by
# (rank, source). Flat, and a lone target not in a tuple, as most reverse names have one source
# with one target and there is one of these per endpoint IP.
PtrOwners = tuple[str | int | tuple[str, ...], ...]


@dataclass(slots=True)
class Alias:
    """An ExternalName service name: CNAME to `target` (SPEC §2.5)."""

    owner: str
    target: str
    cname: RR
    cname_only: Answer  # for every query type except A/AAAA with an external target
    internal: bool  # the target is inside a cluster zone: chased on the control path
    # Chased external answers cached as wire answers until their shortest TTL runs out.
    cache: dict[int, tuple[float, Answer]] = field(default_factory=dict)


@dataclass(slots=True)
class Applied:
    """What a source put into the index, so that it can be taken out again."""

    keys: tuple[bytes, ...]  # answer keys
    names: tuple[bytes, ...]  # names that exist, wire form
    ptrs: tuple[bytes, ...]  # PTR answer keys of the reverse names it points
    aliases: tuple[bytes, ...]  # ExternalName owners, wire form


class ZoneIndex:
    def __init__(
        self,
        zones: list[str],
        ttl: int,
        external_zones: Sequence[str] = (),
        multicluster_zones: Sequence[str] = (),
    ) -> None:
        # The cluster zones, then the --multicluster ones (dnsd.multicluster): served alike
        # (SOA, NS, namespaces), but only the first `service_zones` hold the cluster's own
        # Service, pod and endpoint names.
        self.zones = [z.lower().strip(".") for z in (*zones, *multicluster_zones)]
        self.service_zones = len(zones)
        self.primary = self.zones[0]
        self.ttl = ttl
        # Cluster zones first, then the reverse zones (which we only partly own: names nobody
        # owns there are forwarded, CoreDNS `fallthrough in-addr.arpa ip6.arpa`), then the
        # `--external-zone`s (dnsd.external), each with its own SOA.
        self.external_zones = [z.lower().strip(".") for z in external_zones]
        self.soa_zones = self.zones + list(REVERSE_ZONES) + self.external_zones
        self._soa_suffixes = [(z, "." + z) for z in self.soa_zones]
        self.zone_ids: dict[bytes, int] = {to_wire(z): i for i, z in enumerate(self.zones)}
        self.reverse_ids: dict[bytes, int] = {
            to_wire(z): len(self.zones) + i for i, z in enumerate(REVERSE_ZONES)
        }
        first_external = len(self.zones) + len(REVERSE_ZONES)
        for i, zone in enumerate(self.external_zones):
            self.zone_ids[to_wire(zone)] = first_external + i
        # The same wire names as one tuple, for bytes.endswith: a name that does not end in
        # any of them is in none of these zones (zone_of finds no label-aligned suffix), which
        # the UDP threads learn without a label walk (Handler._fast_negative, forwards).
        self.zone_suffixes: tuple[bytes, ...] = tuple(self.zone_ids)
        self.answers: dict[bytes, Answer] = {}
        self.existing: dict[bytes, int] = {}  # name -> soa zone id, for NODATA
        self.aliases: dict[bytes, Alias] = {}
        self.serial = enc.serial_now()
        self.nxdomain: list[Answer] = []
        self.nodata: list[Answer] = []
        self.ready = False  # the stores synced and the first full build is in
        self.last_change = time.monotonic()
        self._sources: dict[str, Applied] = {}
        # Wire name -> number of sources that have it, for names more than one source has
        # (`<ns>.svc.<zone>`); a name in `existing` but not here has exactly one.
        self._shared: dict[bytes, int] = {}
        self._ptr_owners: dict[bytes, PtrOwners] = {}  # PTR answer key -> owners
        self._touched: set[bytes] = set()  # names whose answers changed in this batch
        self._refresh_negatives()

    # --- reading (control path and tests) -------------------------------------------------

    def lookup(self, name: str, qtype: int) -> Answer | None:
        return self.answers.get(enc.answer_key(name, qtype))

    def exists(self, name: str) -> bool:
        return to_wire(name.lower()) in self.existing

    def zone_of(self, name_key: bytes, offsets: list[int]) -> tuple[int, int] | None:
        """(cluster zone id, offset of the zone in the name) or None; longest suffix wins."""
        for off in offsets:
            zid = self.zone_ids.get(name_key[off:])
            if zid is not None:
                return zid, off
        return None

    def in_cluster(self, name: str) -> bool:
        name = name.lower().strip(".")
        return any(name == z or name.endswith("." + z) for z in self.zones)

    # --- writing --------------------------------------------------------------------------

    def set_source(self, source: str, records: ServiceRecords | None) -> None:
        """Replace everything `source` contributed with `records` (None: remove it).

        Everything that can fail (encoding; names the wire form refuses) runs before the index
        is touched, so a failure leaves the source's previous records in place.
        """
        encoded: dict[bytes, Answer] = {}
        new_aliases: dict[bytes, Alias] = {}
        names: list[tuple[str, bytes]] = []
        ptrs: list[tuple[bytes, str, PtrRank, list[str]]] = []
        if records is not None:
            additional = records.additional
            answers = self.answers
            for (name, qtype), rrs in records.answers.items():
                qname = to_wire(name)
                key = qname + (_QTYPE_KEYS.get(qtype) or enc.qtype_key(qtype))
                answer = enc.encode_records(
                    name, qtype, rrs, additional.get((name, qtype), ()), qname=qname
                )
                current = answers.get(key)
                if current is not None and _same(current, answer):
                    # Same bytes as now (an unchanged endpoint of a changed Service): keep
                    # the stored object, so nothing downstream sees a change.
                    answer = current
                encoded[key] = answer
            for owner, target in records.aliases.items():
                new_aliases[to_wire(owner)] = self._alias(owner, target)
            names = [(name, to_wire(name)) for name in records.names]
            ptrs = [
                (to_wire(rev) + _PTR, rev, rank, targets)
                for rev, (rank, targets) in records.ptrs.items()
                if targets
            ]
        old = self._sources.pop(source, None)
        # PTR key -> its owners before this change: only those that end up different are
        # encoded again (a Service's reverse names mostly stay as they were).
        dirty_ptrs: dict[bytes, PtrOwners] = {}
        # Changed names matter only to in-cluster ExternalName chases; none at all, no need.
        touched = self._touched if self.aliases or new_aliases else None
        if old is not None:
            for key in old.keys:
                if key not in encoded:
                    self.answers.pop(key, None)
                    if touched is not None:
                        touched.add(key[:-2])
            for name_key in old.names:
                self._unref(name_key)
            for ptr_key in old.ptrs:
                before = self._ptr_owners.get(ptr_key, ())
                dirty_ptrs.setdefault(ptr_key, before)
                owners = _without(before, source)
                if owners:
                    self._ptr_owners[ptr_key] = owners
                else:
                    self._ptr_owners.pop(ptr_key, None)
            for alias_key in old.aliases:
                self.aliases.pop(alias_key, None)
                # The chased A/AAAA answers are written by finish_batch, not listed in keys.
                self.answers.pop(alias_key + b"\x00\x01", None)
                self.answers.pop(alias_key + b"\x00\x1c", None)
        if records is not None:
            for key, answer in encoded.items():
                if self.answers.get(key) is not answer:
                    self.answers[key] = answer
                    if touched is not None:
                        touched.add(key[:-2])
            for name, name_key in names:
                self._ref(name, name_key)
            for ptr_key, _, rank, targets in ptrs:
                owners = self._ptr_owners.get(ptr_key, ())
                dirty_ptrs.setdefault(ptr_key, owners)
                self._ptr_owners[ptr_key] = _with(
                    owners, source, int(rank), targets[0] if len(targets) == 1 else tuple(targets)
                )
            for alias_key, alias in new_aliases.items():
                self.aliases[alias_key] = alias
                self._touched.add(alias_key)
            # Tuples, not lists: one per source for as long as it lives, so keep them tight.
            self._sources[source] = Applied(
                tuple(encoded),
                tuple(name_key for _, name_key in names),
                tuple(ptr[0] for ptr in ptrs),
                tuple(new_aliases),
            )
        if dirty_ptrs:
            reverse_names = {ptr_key: rev for ptr_key, rev, _, _ in ptrs}
            for ptr_key, before in dirty_ptrs.items():
                if self._ptr_owners.get(ptr_key, ()) != before:
                    self._encode_ptr(ptr_key, reverse_names.get(ptr_key))

    def begin_batch(self) -> int:
        """A new SOA serial for the batch about to be applied (CoreDNS: last change time)."""
        self.serial = max(self.serial + 1, enc.serial_now())
        self.last_change = time.monotonic()
        return self.serial

    def finish_batch(self) -> None:
        """After a batch of set_source calls: negatives with the new serial, CNAME chases."""
        self._refresh_negatives()
        self._chase_internal_aliases()

    def sources(self) -> list[str]:
        return list(self._sources)

    # --- internals ------------------------------------------------------------------------

    def _soa_zone_id(self, name: str) -> int | None:
        for i, (zone, dotted) in enumerate(self._soa_suffixes):
            if name.endswith(dotted) or name == zone:
                return i
        return None

    def _ref(self, name: str, name_key: bytes) -> None:
        """One more source has `name` (`name_key`: its wire form). Most names have one source:
        only the extra ones are counted, in `_shared`."""
        if name_key in self.existing:
            self._shared[name_key] = self._shared.get(name_key, 1) + 1
            return
        zid = self._soa_zone_id(name)
        if zid is not None:  # (a name outside every zone cannot exist: nothing to count)
            self.existing[name_key] = zid

    def _unref(self, name_key: bytes) -> None:
        count = self._shared.pop(name_key, 1)
        if count > 2:
            self._shared[name_key] = count - 1
        elif count == 1:
            self.existing.pop(name_key, None)

    def _encode_ptr(self, key: bytes, rev: str | None = None) -> None:
        """The PTR answer of one reverse name (`rev`, when the caller has it as text): every
        target of every source in owner order, each once (CoreDNS backend_lookup PTR())."""
        owners = self._ptr_owners.get(key)
        name_key = key[:-2]
        if not owners:
            if self.answers.pop(key, None) is not None:
                self._unref(name_key)
            return
        if rev is None:
            rev = from_wire(name_key)
        if len(owners) == 3 and isinstance(owners[2], str):
            rrs = [ptr_rr(rev, owners[2], self.ttl)]  # the usual: one source, one target
        else:
            # A ClusterIP (the lowest rank, so first) hides the endpoints' extension PTRs.
            hidden = PtrRank.SERVICE_ENDPOINT if owners[1] == PtrRank.CLUSTER_IP else None
            targets: dict[str, None] = {}
            for i in range(0, len(owners), 3):
                item = owners[i + 2]
                if owners[i + 1] == hidden:
                    continue
                if isinstance(item, str):
                    targets[item] = None
                elif isinstance(item, tuple):
                    targets.update(dict.fromkeys(item))
            rrs = [ptr_rr(rev, target, self.ttl) for target in targets]
        answer = enc.encode_records(rev, wire.TYPE_PTR, rrs, qname=name_key)
        current = self.answers.get(key)
        if current is None:
            self._ref(rev, name_key)
        elif _same(current, answer):
            return  # same targets as before: keep the stored answer
        self.answers[key] = answer

    def _refresh_negatives(self) -> None:
        self.nxdomain = [
            enc.negative(z, self.primary, self.ttl, self.serial, wire.NXDOMAIN)
            for z in self.soa_zones
        ]
        self.nodata = [
            enc.negative(z, self.primary, self.ttl, self.serial, wire.NOERROR)
            for z in self.soa_zones
        ]
        if self.external_zones:
            cut = len(self.soa_zones) - len(self.external_zones)
            self.nxdomain[cut:] = [
                external.negative(z, self.ttl, self.serial, wire.NXDOMAIN)
                for z in self.external_zones
            ]
            self.nodata[cut:] = [
                external.negative(z, self.ttl, self.serial, wire.NOERROR)
                for z in self.external_zones
            ]

    def _alias(self, owner: str, target: str) -> Alias:
        return Alias(
            owner=owner,
            target=target,
            # dnslib's form: chased answers mix it with records from upstream.
            cname=RR(owner, QTYPE.CNAME, ttl=self.ttl, rdata=CNAME(target)),
            cname_only=enc.encode_records(
                owner, wire.TYPE_CNAME, [cname_rr(owner, target, self.ttl)]
            ),
            internal=self.in_cluster(target) and _valid_name(target),
        )

    def _chase_internal_aliases(self) -> None:
        """A/AAAA of an ExternalName pointing into a cluster zone: CNAME, then the target's
        records, resolved here on the control path (CoreDNS backend_lookup A()). Only aliases
        whose chain touches a name changed in this batch are re-encoded."""
        touched, self._touched = self._touched, set()
        for alias_key, alias in self.aliases.items():
            if not alias.internal:
                continue
            chain = [alias.cname]
            names = [alias_key]
            target = alias.target.lower()
            for _ in range(MAX_CNAME_CHAIN):
                target_key = to_wire(target)
                names.append(target_key)
                nested = self.aliases.get(target_key)
                if nested is None:
                    break
                chain.append(nested.cname)
                target = nested.target.lower()
            if touched.isdisjoint(names):
                continue
            final_is_alias = names[-1] in self.aliases
            for qtype in (QTYPE.A, QTYPE.AAAA):
                records = list(chain)
                found = self.answers.get(enc.answer_key(target, qtype))
                if found is not None and not final_is_alias:
                    records.extend(enc.decode_answer_records(target, qtype, found))
                key = enc.answer_key(alias.owner, qtype)
                self.answers[key] = enc.encode(alias.owner, qtype, records)


def _without(owners: PtrOwners, source: str) -> PtrOwners:
    """`owners` without `source`'s triple."""
    kept: list[str | int | tuple[str, ...]] = []
    for i in range(0, len(owners), 3):
        if owners[i] != source:
            kept += owners[i : i + 3]
    return tuple(kept)


def _with(owners: PtrOwners, source: str, rank: int, targets: str | tuple[str, ...]) -> PtrOwners:
    """`owners` plus `source`'s triple, at its (rank, source) place."""
    at = len(owners)
    for i in range(0, len(owners), 3):
        other_rank = owners[i + 1]
        assert isinstance(other_rank, int)
        if (other_rank, str(owners[i])) > (rank, source):
            at = i
            break
    return (*owners[:at], source, rank, targets, *owners[at:])


def _same(current: Answer, new: Answer) -> bool:
    """Equal bytes (headers are shared objects, see wire.make_heads)."""
    return current.heads is new.heads and current.tail == new.tail


def _valid_name(name: str) -> bool:
    try:
        to_wire(name.lower())
    except (ValueError, UnicodeEncodeError):
        return False
    return True
