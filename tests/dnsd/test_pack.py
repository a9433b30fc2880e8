"""The hand-written packer (answers.encode_records) against dnslib, the reference it replaced."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.rdatatype
import dnslib
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsd import answers as enc
from dnsd import wire
from dnsd.records import Address, Record, Soa, Srv, Target, Txt
from dnsd.wire import parse_query, respond

LABELS = ["a", "b", "web", "db-0", "svc", "default", "cluster", "local", "in-addr", "arpa", "_tcp"]
ZONE_TYPES = {wire.TYPE_CNAME: dnslib.CNAME, wire.TYPE_PTR: dnslib.PTR, wire.TYPE_NS: dnslib.NS}

names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=6).map(".".join)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16)))
ttls = st.integers(0, 2**31 - 1)


def _address(owner: str, ttl: int, ip: str) -> Record:
    v6 = ":" in ip
    packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, ip)
    return Record(owner, wire.TYPE_AAAA if v6 else wire.TYPE_A, ttl, Address(ip, packed))


addresses = st.builds(_address, names, ttls, ipv4 | ipv6)
srvs = st.builds(
    lambda owner, ttl, p, w, port, target: Record(
        owner, wire.TYPE_SRV, ttl, Srv(p, w, port, target)
    ),
    names,
    ttls,
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.integers(0, 65535),
    names,
)
targets = st.builds(
    lambda owner, ttl, rtype, target: Record(owner, rtype, ttl, Target(target)),
    names,
    ttls,
    st.sampled_from(sorted(ZONE_TYPES)),
    names,
)
txts = st.builds(
    lambda owner, ttl, strings: Record(owner, wire.TYPE_TXT, ttl, Txt(tuple(strings))),
    names,
    ttls,
    st.lists(st.binary(max_size=40), min_size=1, max_size=3),
)
soas = st.builds(
    lambda owner, ttl, mname, rname, times: Record(
        owner, wire.TYPE_SOA, ttl, Soa(mname, rname, tuple(times))
    ),
    names,
    ttls,
    names,
    names,
    st.lists(st.integers(0, 2**32 - 1), min_size=5, max_size=5),
)
records = st.one_of(addresses, srvs, targets, txts, soas)
sections = st.lists(records, max_size=6)


def to_dnslib(rr: Record) -> dnslib.RR:
    rdata = rr.rdata
    rd: dnslib.RD
    if isinstance(rdata, Address):
        # From the bytes: dnslib's own parser rejects some valid IPv6 forms (`::1.2.3.4`).
        raw = tuple(rdata.packed)
        rd = dnslib.AAAA(raw) if rr.rtype == wire.TYPE_AAAA else dnslib.A(raw)
    elif isinstance(rdata, Srv):
        rd = dnslib.SRV(rdata.priority, rdata.weight, rdata.port, rdata.target)
    elif isinstance(rdata, Target):
        rd = ZONE_TYPES[rr.rtype](rdata.name)
    elif isinstance(rdata, Txt):
        rd = dnslib.TXT(list(rdata.strings))
    else:
        rd = dnslib.SOA(rdata.mname, rdata.rname, rdata.times)
    return dnslib.RR(rr.rname, rr.rtype, ttl=rr.ttl, rdata=rd)


def parsed(name: str, qtype: int, answer: wire.Answer) -> dns.message.Message:
    query = dns.message.make_query(name, qtype, use_edns=False)
    out = respond(parse_query(query.to_wire()), answer, wire.TCP_LIMIT, 1232)
    return dns.message.from_wire(out)


def sections_text(msg: dns.message.Message) -> list[list[str]]:
    return [
        sorted(rrset.to_text() for rrset in section)
        for section in (msg.answer, msg.authority, msg.additional)
    ]


@settings(max_examples=400, deadline=None)
@given(
    name=names,
    qtype=st.sampled_from([1, 2, 5, 6, 12, 16, 28, 33]),
    answers=sections,
    authority=sections,
    additional=sections,
    rcode=st.sampled_from([wire.NOERROR, wire.NXDOMAIN]),
)
def test_packer_output_matches_dnslib(name, qtype, answers, authority, additional, rcode):
    """Byte for byte, except that names after an SRV target may point into it (dnslib never
    points there): then the same records, and never longer."""
    ours = enc.encode_records(name, qtype, answers, additional, authority, rcode)
    reference = enc.encode(
        name,
        qtype,
        [to_dnslib(rr) for rr in answers],
        [to_dnslib(rr) for rr in additional],
        [to_dnslib(rr) for rr in authority],
        rcode,
    )
    assert sections_text(parsed(name, qtype, ours)) == sections_text(parsed(name, qtype, reference))
    if any(type(rr.rdata) is Srv for rr in (*answers, *authority, *additional)):
        assert len(ours.tail) <= len(reference.tail)
        assert ours.heads == reference.heads
    else:
        assert ours == reference


def test_srv_targets_are_pointed_at_so_five_targets_and_their_addresses_fit_512_bytes():
    """knot's layout: the SRV target is written in full (RFC 2782), each address record in
    the additional section names its owner with a pointer into it. Without EDNS all five
    A records fit, as they do from knot."""
    base = "svc9190.ns90.svc.cluster.local"
    qname = f"_http._tcp.{base}"
    srvs = [
        Record(qname, wire.TYPE_SRV, 5, Srv(0, 20, 8080, f"10-64-17-{i}.{base}"))
        for i in range(243, 248)
    ]
    glue = [
        Record(f"10-64-17-{i}.{base}", 1, 5, Address(f"10.64.17.{i}", bytes([10, 64, 17, i])))
        for i in range(243, 248)
    ]
    answer = enc.encode_records(qname, wire.TYPE_SRV, srvs, glue)
    query = dns.message.make_query(qname, "SRV", use_edns=False)
    out = respond(parse_query(query.to_wire()), answer, wire.UDP_PLAIN_LIMIT, 512)
    assert len(out) <= 512
    msg = dns.message.from_wire(out)
    assert not msg.flags & dns.flags.TC
    assert sum(len(rrset) for rrset in msg.answer) == 5
    assert sum(len(rrset) for rrset in msg.additional) == 5


def test_a_big_answer_points_only_where_a_pointer_reaches():
    """Beyond 16 KiB a compression pointer cannot reach (14 bits): names written there are not
    pointed at, so every name still decodes (dnspython checks each pointer)."""
    base = "big.default.svc.cluster.local"
    count = 1500
    srvs = [
        Record(f"_http._tcp.{base}", wire.TYPE_SRV, 5, Srv(0, 1, 8080, f"h{i}.{base}"))
        for i in range(count)
    ]
    glue = []
    for i in range(count):
        for ip in (f"10.1.{i // 250}.{i % 250}", f"10.2.{i // 250}.{i % 250}"):
            glue.append(_address(f"h{i}.{base}", 5, ip))
    answer = enc.encode_records(f"_http._tcp.{base}", wire.TYPE_SRV, srvs, glue)
    assert len(answer.tail) > 0x4000
    packet = b"\x00\x00" + answer.heads[0] + enc.answer_key(f"_http._tcp.{base}", 33) + b"\x00\x01"
    msg = dns.message.from_wire(packet + answer.tail)
    (srv_set,) = msg.answer
    assert len(srv_set) == count
    owners = {rrset.name.to_text(): len(rrset) for rrset in msg.additional}
    assert owners == {f"h{i}.{base}.": 2 for i in range(count)}


@settings(max_examples=200, deadline=None)
@given(
    name=names,
    rtype=st.sampled_from(sorted(ZONE_TYPES)),
    target=names | st.just(""),
    ttl=ttls,
)
def test_one_target_at_the_question_name_matches_dnslib(name, rtype, target, ttl):
    """The packer's shortcut for a lone PTR/CNAME (names sharing a suffix with the question
    or not, the root as target)."""
    rr = Record(name, rtype, ttl, Target(target))
    ours = enc.encode_records(name, rtype, [rr])
    assert ours == enc.encode(name, rtype, [to_dnslib(rr)])


def test_zone_answers_match_the_dnslib_encoding_of_the_same_records():
    """Every answer a Service's records produce, through the index, equals dnslib's (SRV:
    the same records, shorter)."""
    from dnsd.records import RecordOptions, service_records
    from dnsd.zone import ZoneIndex
    from kwatch.resources import ENDPOINTSLICES, SERVICES
    from tests.dnsd.helpers import endpoint, endpoint_slice, service

    svc = service("db", headless=True, ports=[{"name": "pg", "port": 5432}])
    eps = [endpoint(f"10.1.0.{i}", hostname=f"db-{i % 3}") for i in range(1, 7)]
    eps.append(endpoint("fd00::1"))
    slices = [endpoint_slice("db-1", "db", eps, ports=[{"name": "pg", "port": 15432}])]
    recs = service_records(
        SERVICES.parse(svc), [ENDPOINTSLICES.parse(s) for s in slices], RecordOptions()
    )
    index = ZoneIndex(["cluster.local"], 5)
    index.set_source("default/db", recs)
    assert recs.answers
    for (name, qtype), rrs in recs.answers.items():
        extra = recs.additional.get((name, qtype), ())
        reference = enc.encode(
            name, qtype, [to_dnslib(rr) for rr in rrs], [to_dnslib(rr) for rr in extra]
        )
        ours = index.lookup(name, qtype)
        assert ours is not None
        assert sections_text(parsed(name, qtype, ours)) == sections_text(
            parsed(name, qtype, reference)
        )
        if qtype == wire.TYPE_SRV:  # the glue points into the SRV targets (see above)
            assert len(ours.tail) < len(reference.tail)
        else:
            assert ours[:3] == reference[:3]  # heads, tail, record_ends
            # --loadbalance's record size: several address records of the name, nothing else
            several = qtype in (wire.TYPE_A, wire.TYPE_AAAA) and len(rrs) > 1 and not extra
            assert ours.turn == (ours.record_ends[0] if several else 0), (name, qtype)


def test_a_non_ascii_cname_target_is_idna_encoded_like_dnslib():
    owner = "ext.default.svc.cluster.local"
    rr = Record(owner, wire.TYPE_CNAME, 5, Target("bücher.example"))
    assert enc.encode_records(owner, wire.TYPE_CNAME, [rr]) == enc.encode(
        owner, wire.TYPE_CNAME, [to_dnslib(rr)]
    )
