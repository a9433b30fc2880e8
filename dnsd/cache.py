"""The answer cache in front of the upstreams, as CoreDNS's `cache` plugin keeps it.

- Positive answers live for the smallest TTL of their records, capped at `max_ttl` and raised to
  `min_ttl`; a TTL of 0 is not cached.
- Negative answers (NXDOMAIN, and NOERROR without answers = NODATA) live for
  min(SOA TTL, SOA MINIMUM) of the SOA in the authority section (RFC 2308 section 5), capped at
  `max_negative_ttl`; a negative answer without SOA is not cached (RFC 2308 section 5: SHOULD NOT).
- SERVFAIL lives for `servfail_ttl` (CoreDNS `servfail 5s`, RFC 2308 section 7.1 allows up to 5
  minutes). Truncated answers and other error rcodes are never cached.
- A hit returns the stored wire message with every TTL decreased by the whole seconds it spent
  in the cache (RFC 1035 section 7.4), so clients never keep it beyond the upstream's intent.
- The key is (qname, qtype, qclass, DO, CD), the qname compared case-insensitively; CD is in it
  because an answer fetched with checking disabled must not reach a client that wants it checked.
- At `max_entries` the least recently used entry is evicted (CoreDNS evicts at random; LRU keeps
  the popular names).
- Prefetch (CoreDNS `cache { prefetch AMOUNT DURATION PERCENTAGE% }`): an entry asked `amount`
  times with no gap of `prefetch_duration` or more, hit when at most `prefetch_percentage` % of
  its TTL is left (ceil, so at least its last second), is due for a refresh; the forwarder
  refreshes it in the background and the new entry keeps the count.
- Serve stale (RFC 8767): with `stale_for` > 0 an expired entry is kept that much longer; when
  every upstream failed to refresh it, it is served with every TTL set to `STALE_TTL` (RFC 8767
  section 4: 30 s), and for the next `STALE_TTL` seconds it is served at once without asking the
  upstreams again (the "failure recheck timer", section 5).

The module is pure: wire bytes in, wire bytes out, time from an injectable clock. It also holds
the small wire walker (`ResponseLayout`) the forwarder needs to splice answers.
"""

from __future__ import annotations

import math
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from prometheus_client import Counter, Gauge

RCODE_NOERROR = 0
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
TYPE_SOA = 6
TYPE_OPT = 41
# RFC 2181 section 8: a TTL with the most significant bit set is treated as zero.
MAX_WIRE_TTL = 0x7FFFFFFF

CACHE_HITS = Counter(
    "dnsd_cache_hits_total", "Forwarded questions answered from the cache", ["type"]
)
CACHE_MISSES = Counter("dnsd_cache_misses_total", "Forwarded questions not found in the cache")
CACHE_ENTRIES = Gauge("dnsd_cache_entries", "Answers held in the cache", ["type"])
CACHE_EVICTIONS = Counter(
    "dnsd_cache_evictions_total", "Live entries evicted to make room (max_entries)", ["type"]
)

CACHE_PREFETCHES = Counter(
    "dnsd_cache_prefetch_total", "Popular entries refreshed before they expired (--prefetch)"
)
CACHE_SERVED_STALE = Counter(
    "dnsd_cache_served_stale_total",
    "Answers served from expired entries because every upstream failed (--serve-stale)",
)
# RFC 8767 section 4: the TTL of a stale answer (and section 5: how long a failed refresh is
# not tried again).
STALE_TTL = 30

# Entry kinds, also the `type` label of the metrics (CoreDNS: success / denial).
SUCCESS = "success"
DENIAL = "denial"


_KEY_TAIL = struct.Struct("!HHB")  # qtype, qclass, DO | CD << 1


class CacheKey(bytes):
    """What a cached answer answers: the qname in lower-case wire form, type, class, DO, CD,
    packed in one bytes object (the qname, then 5 bytes): a cache entry's key costs 38 bytes
    more than its name, where a tuple of the five took 88 more."""

    __slots__ = ()

    def __new__(
        cls, name: bytes, qtype: int, qclass: int = 1, do: bool = False, cd: bool = False
    ) -> CacheKey:
        return super().__new__(cls, name + _KEY_TAIL.pack(qtype, qclass, do | (cd << 1)))

    @property
    def name(self) -> bytes:
        return bytes(self[:-5])

    @property
    def qtype(self) -> int:
        return (self[-5] << 8) | self[-4]

    @property
    def qclass(self) -> int:
        return (self[-3] << 8) | self[-2]

    @property
    def do(self) -> bool:
        return bool(self[-1] & 1)

    @property
    def cd(self) -> bool:
        return bool(self[-1] & 2)

    def __repr__(self) -> str:
        return (
            f"CacheKey(name={self.name!r}, qtype={self.qtype}, qclass={self.qclass},"
            f" do={self.do}, cd={self.cd})"
        )

    @classmethod
    def of(
        cls, qname: str, qtype: int, qclass: int = 1, *, do: bool = False, cd: bool = False
    ) -> CacheKey:
        """The key for a presentation-form name (`Example.COM.`), for callers without wire bytes."""
        labels = [label for label in qname.rstrip(".").split(".") if label]
        wire = b"".join(bytes([len(b)]) + b for b in (label.encode() for label in labels))
        return cls((wire + b"\x00").lower(), qtype, qclass, do, cd)


def skip_name(wire: bytes, pos: int) -> int:
    """The offset just past the (possibly compressed) name at `pos`; ValueError if malformed."""
    end = len(wire)
    while pos < end:
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:  # a pointer ends the name
            if pos + 2 > end:
                break
            return pos + 2
        if length & 0xC0:  # 0x40 / 0x80: obsolete extended label types (RFC 6891 section 5)
            raise ValueError("unsupported label type")
        pos += 1 + length
    raise ValueError("name runs past the message")


@dataclass(frozen=True, slots=True)
class ResponseLayout:
    """Where things are in a DNS message, found by walking it once without decoding names."""

    rcode: int  # header RCODE (the low 4 bits; an OPT extended rcode is not folded in)
    truncated: bool  # the TC flag
    question_end: int  # offset of the first answer record
    counts: tuple[int, int, int]  # ANCOUNT, NSCOUNT, ARCOUNT
    end: int  # offset just past the last record (trailing bytes are ignored)
    ttl_offsets: tuple[int, ...]  # offset of the TTL field of every record except OPT
    ttls: tuple[int, ...]  # those TTLs as sent (RFC 2181: high bit set -> 0)
    opt: tuple[int, int] | None  # (start, end) of the OPT record, if any
    soa: tuple[int, int] | None  # (TTL, MINIMUM) of the first SOA in the authority section

    @classmethod
    def parse(cls, wire: bytes) -> ResponseLayout:
        if len(wire) < 12:
            raise ValueError("shorter than a header")
        qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHH", wire, 4)
        pos = 12
        for _ in range(qdcount):
            pos = skip_name(wire, pos) + 4
        if pos > len(wire):
            raise ValueError("question runs past the message")
        question_end = pos
        ttl_offsets: list[int] = []
        ttls: list[int] = []
        opt: tuple[int, int] | None = None
        soa: tuple[int, int] | None = None
        for index in range(ancount + nscount + arcount):
            start = pos
            pos = skip_name(wire, pos)
            if pos + 10 > len(wire):
                raise ValueError("record header runs past the message")
            rtype, _rclass, ttl, rdlength = struct.unpack_from("!HHIH", wire, pos)
            rdata = pos + 10
            pos = rdata + rdlength
            if pos > len(wire):
                raise ValueError("rdata runs past the message")
            if rtype == TYPE_OPT:  # its "TTL" is the extended rcode and flags, not a TTL
                opt = (start, pos)
                continue
            ttl = 0 if ttl > MAX_WIRE_TTL else ttl
            ttl_offsets.append(rdata - 6)
            ttls.append(ttl)
            in_authority = ancount <= index < ancount + nscount
            if rtype == TYPE_SOA and in_authority and soa is None and rdlength >= 22:
                # MINIMUM is the last of the five 32-bit fields ending the SOA rdata.
                (minimum,) = struct.unpack_from("!I", wire, pos - 4)
                soa = (ttl, 0 if minimum > MAX_WIRE_TTL else minimum)
        return cls(
            rcode=wire[3] & 0x0F,
            truncated=bool(wire[2] & 0x02),
            question_end=question_end,
            counts=(ancount, nscount, arcount),
            end=pos,
            ttl_offsets=tuple(ttl_offsets),
            ttls=tuple(ttls),
            opt=opt,
            soa=soa,
        )


_TTL = struct.Struct("!I")
_OFFSET = struct.Struct("=H")


# One entry, a plain tuple of bytes and numbers, under a plain bytes key: the collector
# untracks such tuples, so a full cache adds nothing to the objects a full garbage collection
# walks while holding the GIL (an object with slots, or a bytes subclass, stays tracked: 10,000
# entries made a full collection 12-16 ms longer here). Fields, by index:
_WIRE: Final = 0  # the answer as served at age 0, every record's TTL already capped at TTL; an
#            answer with no records to age (a SERVFAIL, NODATA without SOA) is the upstream's
_OFFSETS: Final = 1  # where each record's TTL is in the wire, packed (_OFFSET each)
_STORED_AT: Final = 2
_LIFETIME: Final = 3  # seconds the entry lives
_KIND: Final = 4  # SUCCESS or DENIAL
_HITS: Final = 5  # hits with no gap of prefetch_duration or more (prefetch only)
_LAST_HIT: Final = 6
_STALE_UNTIL: Final = 7  # serve stale without asking upstream until then (a failed refresh)
_Entry = tuple[bytes, bytes, float, int, str, int, float, float]


class DnsCache:
    """TTL-honouring positive and negative cache of upstream answers (wire messages)."""

    def __init__(
        self,
        max_entries: int = 9984,
        max_ttl: int = 3600,
        max_negative_ttl: int = 1800,
        min_ttl: int = 0,
        servfail_ttl: int = 5,
        clock: Callable[[], float] = time.monotonic,
        *,
        prefetch: int = 0,
        prefetch_duration: float = 60.0,
        prefetch_percentage: int = 10,
        stale_for: float = 0.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.prefetch = prefetch  # hits that make an entry popular; 0: no prefetch
        self.prefetch_duration = prefetch_duration
        self.prefetch_percentage = prefetch_percentage
        self.stale_for = stale_for  # seconds an expired entry may still be served; 0: never
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.min_ttl = min_ttl
        self.servfail_ttl = servfail_ttl
        self.clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._counts = {SUCCESS: 0, DENIAL: 0}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> bytes | None:
        """The stored answer with its TTLs counted down, or None if absent or expired.

        The ID and question are those of the query that filled the entry; the caller replaces
        them. A record's TTL never goes below 0 (it can only reach 0 when `min_ttl` keeps an
        entry longer than that record's own TTL).
        """
        plain = bytes(key)
        entry = self._entries.get(plain)
        if entry is None:
            CACHE_MISSES.inc()
            return None
        now = self.clock()
        age = max(now - entry[_STORED_AT], 0.0)
        if age >= entry[_LIFETIME]:
            if age >= entry[_LIFETIME] + self.stale_for:
                self._remove(plain, entry)
            CACHE_MISSES.inc()
            return None
        self._entries.move_to_end(plain)
        CACHE_HITS.labels(entry[_KIND]).inc()
        if self.prefetch:
            hits = 0 if now - entry[_LAST_HIT] >= self.prefetch_duration else entry[_HITS]
            self._entries[plain] = (*entry[:_HITS], hits + 1, now, entry[_STALE_UNTIL])
        return self._aged(entry, int(age))

    def prefetch_due(self, key: CacheKey) -> bool:
        """True when `key` is popular and close to expiring (after a hit from `get`)."""
        entry = self._entries.get(bytes(key))
        if entry is None or not self.prefetch or entry[_HITS] < self.prefetch:
            return False
        left = entry[_LIFETIME] - (self.clock() - entry[_STORED_AT])
        threshold = math.ceil(self.prefetch_percentage / 100 * entry[_LIFETIME])
        return 0 < left <= threshold

    def stale(self, key: CacheKey, *, failed: bool = False) -> bytes | None:
        """An expired entry within `stale_for`, every TTL `STALE_TTL`; None if there is none.

        Without `failed` only an entry whose refresh failed less than STALE_TTL ago (RFC 8767
        section 5: do not ask again at once); with `failed` (the upstreams just failed) any
        expired entry, and that failure starts the recheck timer.
        """
        if not self.stale_for:
            return None
        plain = bytes(key)
        entry = self._entries.get(plain)
        if entry is None:
            return None
        now = self.clock()
        age = now - entry[_STORED_AT]
        if age < entry[_LIFETIME] or age >= entry[_LIFETIME] + self.stale_for:
            return None
        if failed:
            self._entries[plain] = (*entry[:_STALE_UNTIL], now + STALE_TTL)
        elif now >= entry[_STALE_UNTIL]:
            return None
        CACHE_SERVED_STALE.inc()
        wire = bytearray(entry[_WIRE])
        for (offset,) in _OFFSET.iter_unpack(entry[_OFFSETS]):
            _TTL.pack_into(wire, offset, STALE_TTL)
        return bytes(wire)

    def _aged(self, entry: _Entry, elapsed: int) -> bytes:
        """The stored answer with its TTLs counted down by `elapsed` seconds."""
        if elapsed == 0 or not entry[_OFFSETS]:
            return entry[_WIRE]
        wire = bytearray(entry[_WIRE])
        for (offset,) in _OFFSET.iter_unpack(entry[_OFFSETS]):
            (ttl,) = _TTL.unpack_from(wire, offset)
            _TTL.pack_into(wire, offset, max(ttl - elapsed, 0))
        return bytes(wire)

    def put(self, key: CacheKey, response: bytes) -> bool:
        """Store an upstream answer if it is cacheable; True if it was stored."""
        try:
            layout = ResponseLayout.parse(response)
        except ValueError:
            return False
        lifetime = self.lifetime(layout)
        if lifetime is None:
            return False
        ttl, kind = lifetime
        plain = bytes(key)
        old = self._entries.pop(plain, None)
        if old is not None:
            self._counts[old[_KIND]] -= 1
        while len(self._entries) >= self.max_entries:
            _, evicted = self._entries.popitem(last=False)
            self._counts[evicted[_KIND]] -= 1
            CACHE_EVICTIONS.labels(evicted[_KIND]).inc()
        if layout.ttl_offsets or layout.end != len(response):
            wire = bytearray(response[: layout.end])
            for offset, record_ttl in zip(layout.ttl_offsets, layout.ttls, strict=True):
                # Served as stored at age 0 too: capped at `ttl`.
                _TTL.pack_into(wire, offset, min(record_ttl, ttl))
            stored = bytes(wire)
        else:
            stored = response  # nothing to age or trim: shared, not copied
        offsets = b"".join(_OFFSET.pack(offset) for offset in layout.ttl_offsets)
        # A refresh (prefetch) keeps how popular the name is.
        hits, last_hit = (0, 0.0) if old is None else (old[_HITS], old[_LAST_HIT])
        self._entries[plain] = (stored, offsets, self.clock(), ttl, kind, hits, last_hit, 0.0)
        self._counts[kind] += 1
        self._publish()
        return True

    def lifetime(self, layout: ResponseLayout) -> tuple[int, str] | None:
        """How long (seconds) and as what kind an answer is cached; None = not cacheable."""
        if layout.truncated:
            return None
        if layout.rcode == RCODE_SERVFAIL:
            return (self.servfail_ttl, DENIAL) if self.servfail_ttl > 0 else None
        negative = layout.rcode == RCODE_NXDOMAIN or (
            layout.rcode == RCODE_NOERROR and layout.counts[0] == 0
        )
        if negative:
            if layout.soa is None:
                return None
            ttl = min(*layout.soa, self.max_negative_ttl)
            kind = DENIAL
        elif layout.rcode == RCODE_NOERROR:
            ttl = min(min(layout.ttls, default=0), self.max_ttl)
            kind = SUCCESS
        else:  # REFUSED, FORMERR, NOTIMP, ...: about this exchange, not about the name
            return None
        ttl = max(ttl, self.min_ttl)
        return (ttl, kind) if ttl > 0 else None

    def clear(self) -> None:
        self._entries.clear()
        self._counts = {SUCCESS: 0, DENIAL: 0}
        self._publish()

    def _remove(self, key: bytes, entry: _Entry) -> None:
        del self._entries[key]
        self._counts[entry[_KIND]] -= 1
        self._publish()

    def _publish(self) -> None:
        for kind, count in self._counts.items():
            CACHE_ENTRIES.labels(kind).set(count)
