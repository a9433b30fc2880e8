"""The zone index: every precomputed answer of the cluster zones, updated one source at a time.

A *source* is a Service (`ns/name`), a namespace (`namespace:<name>`) or the apex (`apex`). Each
contributes answers keyed by (name, qtype), names that exist, PTR owners and ExternalName
aliases; replacing a source removes exactly what it contributed before and encodes only its new
records (DESIGN: "Rebuild only the service that changed"). Names several sources share
(`<ns>.svc.<zone>`, a reverse name selected by two Services) are reference counted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, RR

from dnsd import answers as enc
from dnsd import wire
from dnsd.names import to_wire
from dnsd.records import ServiceRecords, cname_rr, ptr_rr
from dnsd.wire import Answer

REVERSE_ZONES = ("in-addr.arpa", "ip6.arpa")
MAX_CNAME_CHAIN = 8


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

    keys: list[bytes]
    names: list[str]
    ptrs: list[str]
    aliases: list[bytes]


class ZoneIndex:
    def __init__(self, zones: list[str], ttl: int) -> None:
        self.zones = [z.lower().strip(".") for z in zones]
        self.primary = self.zones[0]
        self.ttl = ttl
        # Cluster zones first, then the reverse zones (which we only partly own: names nobody
        # owns there are forwarded, CoreDNS `fallthrough in-addr.arpa ip6.arpa`).
        self.soa_zones = self.zones + list(REVERSE_ZONES)
        self.zone_ids: dict[bytes, int] = {to_wire(z): i for i, z in enumerate(self.zones)}
        self.reverse_ids: dict[bytes, int] = {
            to_wire(z): len(self.zones) + i for i, z in enumerate(REVERSE_ZONES)
        }
        self.answers: dict[bytes, Answer] = {}
        self.existing: dict[bytes, int] = {}  # name -> soa zone id, for NODATA
        self.aliases: dict[bytes, Alias] = {}
        self.serial = enc.serial_now()
        self.nxdomain: list[Answer] = []
        self.nodata: list[Answer] = []
        self.ready = False  # the stores synced and the first full build is in
        self.last_change = time.monotonic()
        self._sources: dict[str, Applied] = {}
        self._name_refs: Counter[str] = Counter()
        self._ptr_owners: dict[str, dict[str, list[str]]] = {}
        self._touched: set[bytes] = set()  # names whose answers changed in this batch
        # What each stored answer was encoded from (a hash of its records), so an unchanged
        # RRset of a changed source is not encoded again.
        self._fingerprints: dict[bytes, int] = {}
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

        Everything that can fail (encoding; names dnslib refuses) runs before the index is
        touched, so a failure leaves the source's previous records in place.
        """
        encoded: dict[bytes, tuple[Answer, int]] = {}
        new_aliases: dict[bytes, Alias] = {}
        if records is not None:
            for (name, qtype), rrs in records.answers.items():
                extra = records.additional.get((name, qtype), ())
                key = enc.answer_key(name, qtype)
                fingerprint = _fingerprint(rrs, extra)
                current = self.answers.get(key)
                if current is not None and self._fingerprints.get(key) == fingerprint:
                    # Same records as now (an unchanged endpoint of a changed Service):
                    # keep the encoded answer, only what changed is re-encoded.
                    encoded[key] = (current, fingerprint)
                else:
                    encoded[key] = (enc.encode(name, qtype, rrs, extra), fingerprint)
            for owner, target in records.aliases.items():
                new_aliases[to_wire(owner)] = self._alias(owner, target)
            for name in (*records.names, *records.ptrs):
                to_wire(name)
        old = self._sources.pop(source, None)
        dirty_ptrs: set[str] = set()
        if old is not None:
            for key in old.keys:
                if key not in encoded:
                    self.answers.pop(key, None)
                    self._fingerprints.pop(key, None)
                    self._touched.add(key[:-2])
            for name in old.names:
                self._unref(name)
            for rev in old.ptrs:
                owners = self._ptr_owners.get(rev)
                if owners is not None:
                    owners.pop(source, None)
                    if not owners:
                        del self._ptr_owners[rev]
                dirty_ptrs.add(rev)
            for alias_key in old.aliases:
                self.aliases.pop(alias_key, None)
                # The chased A/AAAA answers are written by finish_batch, not listed in keys.
                self.answers.pop(alias_key + b"\x00\x01", None)
                self.answers.pop(alias_key + b"\x00\x1c", None)
        if records is not None:
            applied = Applied([], [], [], [])
            for key, (answer, fingerprint) in encoded.items():
                if self.answers.get(key) is not answer:
                    self.answers[key] = answer
                    self._fingerprints[key] = fingerprint
                    self._touched.add(key[:-2])
                applied.keys.append(key)
            for name in records.names:
                self._ref(name)
                applied.names.append(name)
            for rev, targets in records.ptrs.items():
                self._ptr_owners.setdefault(rev, {})[source] = targets
                applied.ptrs.append(rev)
                dirty_ptrs.add(rev)
            for alias_key, alias in new_aliases.items():
                self.aliases[alias_key] = alias
                applied.aliases.append(alias_key)
                self._touched.add(alias_key)
            self._sources[source] = applied
        for rev in dirty_ptrs:
            self._encode_ptr(rev)

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
        for i, zone in enumerate(self.soa_zones):
            if name == zone or name.endswith("." + zone):
                return i
        return None

    def _ref(self, name: str) -> None:
        self._name_refs[name] += 1
        if self._name_refs[name] == 1:
            zid = self._soa_zone_id(name)
            if zid is not None:
                self.existing[to_wire(name)] = zid

    def _unref(self, name: str) -> None:
        self._name_refs[name] -= 1
        if self._name_refs[name] <= 0:
            del self._name_refs[name]
            self.existing.pop(to_wire(name), None)

    def _encode_ptr(self, rev: str) -> None:
        key = enc.answer_key(rev, QTYPE.PTR)
        owners = self._ptr_owners.get(rev)
        if not owners:
            if self.answers.pop(key, None) is not None:
                self._fingerprints.pop(key, None)
                self._unref(rev)
            return
        targets: dict[str, None] = {}
        for names in owners.values():
            targets.update(dict.fromkeys(names))
        fingerprint = hash(tuple(targets))
        if key not in self.answers:
            self._ref(rev)
        elif self._fingerprints.get(key) == fingerprint:
            return  # same targets as before: keep the encoded answer
        rrs = [ptr_rr(rev, t, self.ttl) for t in targets]
        self.answers[key] = enc.encode(rev, QTYPE.PTR, rrs)
        self._fingerprints[key] = fingerprint

    def _refresh_negatives(self) -> None:
        self.nxdomain = [
            enc.negative(z, self.primary, self.ttl, self.serial, wire.NXDOMAIN)
            for z in self.soa_zones
        ]
        self.nodata = [
            enc.negative(z, self.primary, self.ttl, self.serial, wire.NOERROR)
            for z in self.soa_zones
        ]

    def _alias(self, owner: str, target: str) -> Alias:
        cname = cname_rr(owner, target, self.ttl)
        return Alias(
            owner=owner,
            target=target,
            cname=cname,
            cname_only=enc.encode(owner, QTYPE.CNAME, [cname]),
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


def _fingerprint(answers: list[RR], additional: Sequence[RR]) -> int:
    # rname.label is dnslib's tuple of raw labels: hashing it avoids decoding the name.
    def describe(rrs: Sequence[RR]) -> tuple[tuple[Any, int, int, str], ...]:
        return tuple((rr.rname.label, rr.rtype, rr.ttl, repr(rr.rdata)) for rr in rrs)

    return hash((describe(answers), describe(additional)))


def _valid_name(name: str) -> bool:
    try:
        to_wire(name.lower())
    except (ValueError, UnicodeEncodeError):
        return False
    return True
