"""DnsCache: TTL-honouring positive/negative cache (RFC 1035 7.4, RFC 2308), pure and clocked."""

import gc
import struct
import tracemalloc

import dnslib
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from dnsd.cache import CacheKey, DnsCache, ResponseLayout
from dnsd.forward import SERVFAIL
from dnsd.forward_wire import parse_query

NAME = "www.example.com."
KEY = CacheKey.of(NAME, dnslib.QTYPE.A)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def response(
    *ttls: int,
    rcode: int = dnslib.RCODE.NOERROR,
    soa: tuple[int, int] | None = None,
    edns_do: bool | None = None,
    name: str = NAME,
) -> bytes:
    """An upstream answer: one A record per TTL, an optional SOA (TTL, MINIMUM) in authority."""
    msg = dnslib.DNSRecord(
        dnslib.DNSHeader(id=4242, qr=1, rd=1, ra=1, rcode=rcode),
        q=dnslib.DNSQuestion(name, dnslib.QTYPE.A),
    )
    for i, ttl in enumerate(ttls):
        msg.add_answer(dnslib.RR(name, dnslib.QTYPE.A, rdata=dnslib.A(f"192.0.2.{i + 1}"), ttl=ttl))
    if soa is not None:
        soa_ttl, minimum = soa
        rdata = dnslib.SOA("ns1.example.com.", "admin.example.com.", (1, 7200, 900, 86400, minimum))
        msg.add_auth(dnslib.RR("example.com.", dnslib.QTYPE.SOA, rdata=rdata, ttl=soa_ttl))
    if edns_do is not None:
        msg.add_ar(dnslib.EDNS0(udp_len=1232, flags="do" if edns_do else ""))
    return msg.pack()


def ttls_of(wire: bytes) -> list[int]:
    msg = dnslib.DNSRecord.parse(wire)
    return [rr.ttl for rr in [*msg.rr, *msg.auth]]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_positive_answer_lives_for_its_smallest_ttl_counted_down_in_whole_seconds():
    clock = Clock()
    cache = DnsCache(clock=clock)
    assert cache.put(KEY, response(300, 60))
    assert ttls_of(cache.get(KEY)) == [60, 60]  # capped at the entry's lifetime
    clock.now += 10.9
    assert ttls_of(cache.get(KEY)) == [50, 50]
    clock.now += 49.0  # age 59.9
    assert ttls_of(cache.get(KEY)) == [1, 1]
    clock.now += 0.1  # age 60: gone
    assert cache.get(KEY) is None
    assert len(cache) == 0


def test_records_keep_their_own_smaller_ttl_when_counted_down():
    clock = Clock()
    cache = DnsCache(clock=clock)
    assert cache.put(KEY, response(30, 10))
    clock.now += 4
    assert ttls_of(cache.get(KEY)) == [6, 6]


def test_hit_returns_the_stored_records_and_rcode():
    cache = DnsCache(clock=Clock())
    cache.put(KEY, response(120))
    msg = dnslib.DNSRecord.parse(cache.get(KEY))
    assert msg.header.rcode == dnslib.RCODE.NOERROR
    assert [str(rr.rdata) for rr in msg.rr] == ["192.0.2.1"]


def test_max_ttl_caps_lifetime_and_served_ttl():
    clock = Clock()
    cache = DnsCache(max_ttl=100, clock=clock)
    cache.put(KEY, response(86400))
    assert ttls_of(cache.get(KEY)) == [100]
    clock.now += 100
    assert cache.get(KEY) is None


def test_min_ttl_keeps_short_lived_answers_longer():
    clock = Clock()
    cache = DnsCache(min_ttl=5, clock=clock)
    cache.put(KEY, response(1))
    clock.now += 3
    assert ttls_of(cache.get(KEY)) == [0]  # the record's own TTL ran out, never negative
    clock.now += 2
    assert cache.get(KEY) is None


def test_zero_ttl_answer_is_not_cached():
    cache = DnsCache(clock=Clock())
    assert not cache.put(KEY, response(0, 300))
    assert cache.get(KEY) is None


def test_ttl_with_high_bit_set_counts_as_zero():
    # RFC 2181 section 8
    cache = DnsCache(clock=Clock())
    assert not cache.put(KEY, response(0x80000000))


def test_nxdomain_lives_for_min_of_soa_ttl_and_soa_minimum():
    clock = Clock()
    cache = DnsCache(clock=clock)
    assert cache.put(KEY, response(rcode=dnslib.RCODE.NXDOMAIN, soa=(300, 60)))
    assert ttls_of(cache.get(KEY)) == [60]  # the SOA's TTL is the negative TTL (RFC 2308 3)
    clock.now += 59
    msg = dnslib.DNSRecord.parse(cache.get(KEY))
    assert msg.header.rcode == dnslib.RCODE.NXDOMAIN
    assert [rr.ttl for rr in msg.auth] == [1]
    clock.now += 1
    assert cache.get(KEY) is None


def test_soa_ttl_below_minimum_bounds_the_negative_ttl():
    cache = DnsCache(clock=Clock())
    cache.put(KEY, response(rcode=dnslib.RCODE.NXDOMAIN, soa=(20, 3600)))
    assert ttls_of(cache.get(KEY)) == [20]


def test_nodata_is_a_negative_answer():
    clock = Clock()
    cache = DnsCache(max_negative_ttl=30, clock=clock)
    assert cache.put(KEY, response(soa=(3600, 600)))
    assert ttls_of(cache.get(KEY)) == [30]  # capped at max_negative_ttl
    clock.now += 30
    assert cache.get(KEY) is None


def test_negative_answer_without_soa_is_not_cached():
    # RFC 2308 section 5: SHOULD NOT be cached
    cache = DnsCache(clock=Clock())
    assert not cache.put(KEY, response(rcode=dnslib.RCODE.NXDOMAIN))
    assert not cache.put(KEY, response())


def test_servfail_lives_for_servfail_ttl():
    clock = Clock()
    cache = DnsCache(servfail_ttl=5, clock=clock)
    assert cache.put(KEY, response(rcode=dnslib.RCODE.SERVFAIL))
    assert dnslib.DNSRecord.parse(cache.get(KEY)).header.rcode == dnslib.RCODE.SERVFAIL
    clock.now += 5
    assert cache.get(KEY) is None
    assert not DnsCache(servfail_ttl=0).put(KEY, response(rcode=dnslib.RCODE.SERVFAIL))


def test_refused_formerr_and_truncated_answers_are_not_cached():
    cache = DnsCache(clock=Clock())
    assert not cache.put(KEY, response(300, rcode=dnslib.RCODE.REFUSED))
    assert not cache.put(KEY, response(300, rcode=dnslib.RCODE.FORMERR))
    truncated = bytearray(response(300))
    truncated[2] |= 0x02
    assert not cache.put(KEY, bytes(truncated))
    assert len(cache) == 0


def test_garbage_is_not_cached():
    cache = DnsCache(clock=Clock())
    assert not cache.put(KEY, b"\x00" * 5)
    assert not cache.put(KEY, response(300)[:-3])  # rdata cut short


def test_key_ignores_qname_case_but_not_do_bit_or_type():
    assert CacheKey.of("WWW.Example.COM", 1) == CacheKey.of("www.example.com.", 1)
    assert CacheKey.of("www.example.com", 1).name == b"\x03www\x07example\x03com\x00"
    cache = DnsCache(clock=Clock())
    cache.put(CacheKey.of("WwW.eXample.com", 1), response(300))
    assert cache.get(KEY) is not None
    assert cache.get(CacheKey.of(NAME, dnslib.QTYPE.A, do=True)) is None
    assert cache.get(CacheKey.of(NAME, dnslib.QTYPE.AAAA)) is None


def test_opt_flags_are_not_mistaken_for_a_ttl():
    clock = Clock()
    cache = DnsCache(clock=clock)
    cache.put(CacheKey.of(NAME, dnslib.QTYPE.A, do=True), response(300, edns_do=True))
    clock.now += 7
    msg = dnslib.DNSRecord.parse(cache.get(CacheKey.of(NAME, dnslib.QTYPE.A, do=True)))
    assert [rr.ttl for rr in msg.rr] == [293]
    (opt,) = msg.ar
    assert opt.rtype == dnslib.QTYPE.OPT and opt.edns_do == 1 and opt.ttl == 0x8000


def test_least_recently_used_entry_is_evicted_at_max_entries():
    cache = DnsCache(max_entries=2, clock=Clock())
    keys = [CacheKey.of(f"n{i}.example.com", 1) for i in range(3)]
    before = metric("dnsd_cache_evictions_total", type="success")
    cache.put(keys[0], response(300))
    cache.put(keys[1], response(300))
    assert cache.get(keys[0]) is not None  # keys[1] is now the least recently used
    cache.put(keys[2], response(300))
    assert len(cache) == 2
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert metric("dnsd_cache_evictions_total", type="success") == before + 1


def test_replacing_an_entry_does_not_evict_another():
    cache = DnsCache(max_entries=2, clock=Clock())
    other = CacheKey.of("other.example.com", 1)
    cache.put(other, response(300))
    cache.put(KEY, response(300))
    cache.put(KEY, response(100))
    assert len(cache) == 2 and cache.get(other) is not None
    assert ttls_of(cache.get(KEY)) == [100]


def test_entries_gauge_and_hit_miss_counters():
    cache = DnsCache(clock=Clock())
    hits = metric("dnsd_cache_hits_total", type="denial")
    misses = metric("dnsd_cache_misses_total")
    cache.put(KEY, response(rcode=dnslib.RCODE.NXDOMAIN, soa=(60, 60)))
    assert metric("dnsd_cache_entries", type="denial") == 1
    cache.get(KEY)
    cache.get(CacheKey.of(NAME, 28))
    assert metric("dnsd_cache_hits_total", type="denial") == hits + 1
    assert metric("dnsd_cache_misses_total") == misses + 1
    cache.clear()
    assert metric("dnsd_cache_entries", type="denial") == 0


def test_layout_walks_compressed_names_and_finds_soa_and_opt():
    wire = response(rcode=dnslib.RCODE.NXDOMAIN, soa=(300, 60), edns_do=False)
    layout = ResponseLayout.parse(wire)
    assert layout.rcode == dnslib.RCODE.NXDOMAIN
    assert layout.counts == (0, 1, 1)
    assert layout.soa == (300, 60)
    assert layout.opt is not None and layout.opt[1] == layout.end == len(wire)
    assert layout.question_end == 12 + len(b"\x03www\x07example\x03com\x00") + 4
    assert [struct.unpack_from("!I", wire, o)[0] for o in layout.ttl_offsets] == [300]


@given(st.binary(max_size=300))
def test_put_never_raises_on_arbitrary_bytes(data):
    cache = DnsCache(clock=Clock())
    cache.put(KEY, data)
    cache.put(KEY, response(300)[:12] + data)


@given(
    st.lists(st.integers(min_value=1, max_value=100_000), min_size=1, max_size=5),
    st.floats(min_value=0, max_value=4000),
)
def test_served_ttls_are_the_capped_ttls_minus_whole_seconds_spent(ttls, age):
    clock = Clock()
    cache = DnsCache(max_ttl=3600, clock=clock)
    cache.put(KEY, response(*ttls))
    clock.now += age
    age = clock.now - 1000.0  # what the cache sees, float rounding included
    lifetime = min(min(ttls), 3600)
    served = cache.get(KEY)
    if age >= lifetime:
        assert served is None
    else:
        assert ttls_of(served) == [min(t, lifetime) - int(age) for t in ttls]
        assert all(t >= 1 for t in ttls_of(served))


def test_a_flood_of_servfail_entries_costs_little_memory_each():
    """A flood of forwarded names to a silent upstream fills the cache with SERVFAIL entries
    (--cache-size of them, 9,984 by default): each one costs its key, its entry and the
    LRU's slot, no message of its own (415 bytes each before the key was packed and the
    message shared, about 275 now; tracemalloc, CPython 3.11)."""
    count = 2000
    queries = [
        struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0)
        + CacheKey.of(f"f{i}.flood.example.org", 1).name
        + struct.pack("!HH", 1, 1)
        for i in range(count)
    ]
    cache = DnsCache(max_entries=count)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for data in queries:
            parsed = parse_query(data)
            assert parsed is not None
            assert cache.put(parsed.key, SERVFAIL)
        del parsed
        gc.collect()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert len(cache) == count
    assert per_entry < 330, per_entry


def test_cached_entries_add_nothing_to_what_a_garbage_collection_walks():
    """A full collection holds the GIL the UDP threads need for every answer, for a time that
    grows with the objects it walks: a full cache adds none (plain tuples and bytes, which
    the collector untracks)."""
    cache = DnsCache(max_entries=1000)
    keys = [CacheKey.of(f"n{i}.example.com", 1) for i in range(1000)]
    gc.collect()
    before = len(gc.get_objects())
    for key in keys:
        cache.put(key, response(300))
        cache.get(key)
    gc.collect()
    assert len(cache) == 1000
    assert len(gc.get_objects()) - before < 50
