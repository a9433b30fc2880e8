"""Encode records into precomputed `Answer`s (control path; the only place dnslib packs).

An answer is encoded once with the lower-cased question; the hot path later swaps in the
client's question bytes, which differ only in case, so every compression pointer stays valid.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

from dnslib import NS, QTYPE, RR, SOA, TXT, DNSHeader, DNSQuestion, DNSRecord

from dnsd import wire
from dnsd.names import to_wire
from dnsd.records import address_rr
from dnsd.wire import Answer

SPEC_VERSION = "1.1.0"  # SPEC §2.2
DNS_VERSION_TTL = 28800  # CoreDNS serves dns-version with this TTL (dns-features 1.1)
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 7200, 1800, 86400  # CoreDNS backend_lookup SOA()


def qtype_bytes(qtype: int) -> bytes:
    return struct.pack("!H", qtype)


def answer_key(name: str, qtype: int) -> bytes:
    """The hot path's lookup key: lower-case wire name followed by the 2-byte QTYPE.

    The fast path lower-cases name and QTYPE in one go, so a QTYPE with a byte in A-Z
    (0x41-0x5A, e.g. HTTPS = 65) must never be stored: it could not be found.
    """
    raw = qtype_bytes(qtype)
    if any(0x41 <= b <= 0x5A for b in raw):
        raise ValueError(f"qtype {qtype} cannot be precomputed")
    return to_wire(name.lower()) + raw


def encode(
    name: str,
    qtype: int,
    answers: Sequence[RR],
    additional: Sequence[RR] = (),
    authority: Sequence[RR] = (),
    rcode: int = wire.NOERROR,
) -> Answer:
    record = DNSRecord(DNSHeader(id=0, qr=1, aa=1, rd=0, ra=0), q=DNSQuestion(name, qtype))
    for rr in answers:
        record.add_answer(rr)
    for rr in authority:
        record.add_auth(rr)
    for rr in additional:
        record.add_ar(rr)
    packed = record.pack()
    question_end = 12 + len(to_wire(name)) + 4
    tail = packed[question_end:]
    ends = []
    offset = question_end
    for _ in answers:
        offset = _skip_record(packed, offset)
        ends.append(offset - question_end)
    return wire.make_answer(rcode, len(answers), len(authority), len(additional), tail, tuple(ends))


def _skip_record(packed: bytes, offset: int) -> int:
    offset = wire._skip_name(packed, offset)
    rdlength = (packed[offset + 8] << 8) | packed[offset + 9]
    return offset + 10 + rdlength


def decode_answer_records(name: str, qtype: int, answer: Answer) -> list[RR]:
    """The answer-section records of a precomputed answer (to chase in-cluster CNAMEs)."""
    packet = b"\x00\x00" + answer.heads[0] + to_wire(name) + struct.pack("!HH", qtype, 1)
    return list(DNSRecord.parse(packet + answer.tail).rr)


# --- the apex and negative answers -------------------------------------------------------------


def soa_rr(zone: str, primary_zone: str, ttl: int, serial: int) -> RR:
    """CoreDNS SOA: ns.dns.<zone> hostmaster.<zone>, minimum = the record TTL (RFC 2308 §4),
    the SOA's own TTL capped at 300 (dns-features 3.2)."""
    return RR(
        zone,
        QTYPE.SOA,
        ttl=min(ttl, 300),
        rdata=SOA(
            f"ns.dns.{primary_zone}",
            f"hostmaster.{primary_zone}",
            (serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, ttl),
        ),
    )


def soa_wire(zone: str, primary_zone: str, ttl: int, serial: int) -> bytes:
    """The SOA record uncompressed, so it can follow any question (negative answers)."""
    rdata = (
        to_wire(f"ns.dns.{primary_zone}")
        + to_wire(f"hostmaster.{primary_zone}")
        + struct.pack("!IIIII", serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, ttl)
    )
    return (
        to_wire(zone)
        + struct.pack("!HHIH", wire.TYPE_SOA, wire.CLASS_IN, min(ttl, 300), len(rdata))
        + rdata
    )


def negative(zone: str, primary_zone: str, ttl: int, serial: int, rcode: int) -> Answer:
    """NXDOMAIN or NODATA: empty answer, the zone SOA in authority (RFC 2308 §2, §3)."""
    return wire.make_answer(rcode, 0, 1, 0, soa_wire(zone, primary_zone, ttl, serial), ())


def serial_now() -> int:
    """CoreDNS uses the time of the last change as the SOA serial."""
    return int(time.time())


def apex_rrsets(
    zone: str, primary_zone: str, ttl: int, serial: int, ns_ips: list[str]
) -> tuple[dict[tuple[str, int], list[RR]], dict[tuple[str, int], list[RR]]]:
    """Answers and additionals at the apex: SOA, NS (+glue), dns-version TXT, ns.dns A/AAAA."""
    ns_name = f"ns.dns.{zone}"
    answers: dict[tuple[str, int], list[RR]] = {
        (zone, QTYPE.SOA): [soa_rr(zone, primary_zone, ttl, serial)],
        (zone, QTYPE.NS): [RR(zone, QTYPE.NS, ttl=ttl, rdata=NS(ns_name))],
        (f"dns-version.{zone}", QTYPE.TXT): [
            RR(f"dns-version.{zone}", QTYPE.TXT, ttl=DNS_VERSION_TTL, rdata=TXT(SPEC_VERSION))
        ],
    }
    glue: list[RR] = []
    for ip in ns_ips:
        qtype, rr = address_rr(ns_name, ip, ttl)
        answers.setdefault((ns_name, qtype), []).append(rr)
        glue.append(rr)
    additional = {(zone, QTYPE.NS): glue}
    return answers, additional
