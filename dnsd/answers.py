"""Encode records into precomputed `Answer`s (control path only).

An answer is encoded once with the lower-cased question; the hot path later swaps in the
client's question bytes, which differ only in case, so every compression pointer stays valid.

The zone's records (dnsd.records: A, AAAA, SRV, PTR, CNAME, NS, TXT, SOA) are packed by
`encode_records`, a small writer that compresses names exactly as dnslib does (every name
compressed against the names written before it, SRV targets written in full, RFC 2782), so its
bytes equal dnslib's; a test keeps the two in step. dnslib itself (`encode`) is left for the rare
answers that mix in records from upstream (ExternalName chases).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

from dnslib import RR, DNSHeader, DNSQuestion, DNSRecord

from dnsd import wire
from dnsd.names import to_wire
from dnsd.records import Address, RData, Record, Soa, Srv, Target, Txt, address_rr
from dnsd.wire import Answer

SPEC_VERSION = "1.1.0"  # SPEC §2.2
DNS_VERSION_TTL = 28800  # CoreDNS serves dns-version with this TTL (dns-features 1.1)
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 7200, 1800, 86400  # CoreDNS backend_lookup SOA()


def qtype_bytes(qtype: int) -> bytes:
    return struct.pack("!H", qtype)


_qtype_keys: dict[int, bytes] = {}


def qtype_key(qtype: int) -> bytes:
    """The 2 QTYPE bytes of an answer key (see answer_key)."""
    raw = _qtype_keys.get(qtype)
    if raw is None:
        raw = qtype_bytes(qtype)
        if any(0x41 <= b <= 0x5A for b in raw):
            raise ValueError(f"qtype {qtype} cannot be precomputed")
        _qtype_keys[qtype] = raw
    return raw


def answer_key(name: str, qtype: int) -> bytes:
    """The hot path's lookup key: lower-case wire name followed by the 2-byte QTYPE.

    The fast path lower-cases name and QTYPE in one go, so a QTYPE with a byte in A-Z
    (0x41-0x5A, e.g. HTTPS = 65) must never be stored: it could not be found.
    """
    return to_wire(name.lower()) + qtype_key(qtype)


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
    for _ in range(len(answers) + len(authority) + len(additional)):
        offset = _skip_record(packed, offset)
        ends.append(offset - question_end)
    return wire.make_answer(rcode, len(answers), len(authority), len(additional), tail, tuple(ends))


# --- the packer for the zone's own records ------------------------------------------------------

_RR_FIXED = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH
_SRV_FIXED = struct.Struct("!HHH")
_SOA_TIMES = struct.Struct("!IIIII")
_POINTER_LIMIT = 0x4000  # a compression pointer holds a 14-bit offset (RFC 1035 §4.1.4)
_QUESTION_POINTER = b"\xc0\x0c"


def encode_records(
    name: str,
    qtype: int,
    answers: Sequence[Record],
    additional: Sequence[Record] = (),
    authority: Sequence[Record] = (),
    rcode: int = wire.NOERROR,
    *,
    qname: bytes | None = None,
) -> Answer:
    """The answer to (`name`, `qtype`) holding `answers`, `authority` and `additional`.

    `name` and the records' names are lower case without the trailing dot (dnsd.records);
    `qname` is `name` in wire form when the caller has it already.
    """
    if qname is None:
        qname = to_wire(name)
    if not additional and not authority and len(qname) > 1:
        simple = _encode_addresses(name, answers, rcode)
        if simple is not None:
            return simple
        if len(answers) == 1 and type(answers[0].rdata) is Target and answers[0].rname == name:
            # One PTR/CNAME whose target cannot share a suffix with the question (see _Names):
            # written in full.
            rr = answers[0]
            target = _target_wire(rr.rdata.name)  # type: ignore[union-attr]
            if target[-2:-1] != qname[-2:-1]:
                piece = _QUESTION_POINTER + _RR_FIXED.pack(
                    rr.rtype, wire.CLASS_IN, rr.ttl, len(target)
                )
                piece += target
                return wire.make_answer(rcode, 1, 0, 0, piece, (len(piece),))
    # Suffix (wire bytes) -> offset in the message, for compression. The question (at 12)
    # comes first; its suffixes are added once a name could share one (`_Names`).
    names = _Names(qname)
    start = offset = 12 + len(qname) + 4
    owner_is_question = len(qname) > 1  # the root is written as b"\x00", not as a pointer
    parts: list[bytes] = []
    ends: list[int] = []
    for rrs in (answers, authority, additional):
        for rr in rrs:
            if owner_is_question and rr.rname == name:
                owner = _QUESTION_POINTER
            else:
                owner = _compress(names, to_wire(rr.rname), offset)
            rd = _rdata(names, rr.rdata, offset + len(owner) + 10)
            piece = owner + _RR_FIXED.pack(rr.rtype, wire.CLASS_IN, rr.ttl, len(rd)) + rd
            parts.append(piece)
            offset += len(piece)
            ends.append(offset - start)
    return wire.make_answer(
        rcode, len(answers), len(authority), len(additional), b"".join(parts), tuple(ends)
    )


class _Names(dict[bytes, int]):
    """The names written so far: wire suffix -> offset.

    The question's suffixes are entered lazily, before the first name whose last label could
    be the question's (same last character): a name ending otherwise shares no suffix with
    the question, so (PTR targets under the cluster zone, the question under in-addr.arpa)
    they are often never needed. The result is the same as entering them first, as dnslib
    does: every name written before has no suffix in common with them.
    """

    __slots__ = ("qname",)

    def __init__(self, qname: bytes) -> None:
        super().__init__()
        self.qname = qname if len(qname) > 1 else b""  # the root has no suffix to point at


def _enter_question(names: _Names, wire_name: bytes) -> None:
    """Enter the question's suffixes (at 12) before the first name that could share one
    (same last character; see _Names)."""
    qname = names.qname
    if qname and len(wire_name) > 1 and wire_name[-2] == qname[-2]:
        names.qname = b""
        _compress(names, qname, 12)


def _compress(names: _Names, wire_name: bytes, at: int) -> bytes:
    """`wire_name` as written at offset `at`: its longest suffix written before becomes a
    pointer (RFC 1035 §4.1.4), and its new suffixes are remembered where a pointer reaches."""
    _enter_question(names, wire_name)
    i = 0
    while wire_name[i]:
        suffix = wire_name[i:]
        pointer = names.get(suffix)
        if pointer is not None:
            return wire_name[:i] + (0xC000 | pointer).to_bytes(2, "big")
        if at + i < _POINTER_LIMIT:
            names[suffix] = at + i
        i += wire_name[i] + 1
    return wire_name


def _remember(names: _Names, wire_name: bytes, at: int) -> None:
    """Enter the suffixes of a name written uncompressed at `at`, so later names point at it.

    An SRV target must not be compressed itself (RFC 2782), but nothing forbids pointing at
    it: the targets' address records in the additional section then cost a pointer instead of
    their name, as knot writes them, and five SRV + five A records fit 512 bytes.
    """
    _enter_question(names, wire_name)  # the question's suffixes stay the preferred targets
    i = 0
    while wire_name[i] and at + i < _POINTER_LIMIT:
        names.setdefault(wire_name[i:], at + i)
        i += wire_name[i] + 1


def _rdata(names: _Names, rdata: RData, at: int) -> bytes:
    """The RDATA of one record written at offset `at`; names compressed as dnslib does
    (CNAME, PTR, NS, SOA) or not (SRV, RFC 2782, though later names may point at it)."""
    kind = type(rdata)
    if kind is Address:
        return rdata.packed  # type: ignore[union-attr]
    if kind is Srv:
        srv: Srv = rdata  # type: ignore[assignment]
        srv_target = to_wire(srv.target)
        _remember(names, srv_target, at + _SRV_FIXED.size)
        return _SRV_FIXED.pack(srv.priority, srv.weight, srv.port) + srv_target
    if kind is Target:
        target: Target = rdata  # type: ignore[assignment]
        return _compress(names, _target_wire(target.name), at)
    if kind is Soa:
        soa: Soa = rdata  # type: ignore[assignment]
        mname = _compress(names, to_wire(soa.mname), at)
        rname = _compress(names, to_wire(soa.rname), at + len(mname))
        return mname + rname + _SOA_TIMES.pack(*soa.times)
    if kind is Txt:
        txt: Txt = rdata  # type: ignore[assignment]
        return b"".join(bytes((len(s),)) + s for s in txt.strings)
    raise TypeError(f"cannot pack {rdata!r}")


def _target_wire(name: str) -> bytes:
    """A CNAME/PTR/NS target in wire form. An ExternalName may name anything: a non-ASCII
    target is IDNA-encoded (RFC 3490) as dnslib did, rather than refused."""
    try:
        return to_wire(name)
    except UnicodeEncodeError:
        return to_wire(name.encode("idna").decode("ascii"))


def _encode_addresses(name: str, answers: Sequence[Record], rcode: int) -> Answer | None:
    """The common case without a name to compress: A/AAAA records owned by the question
    name (their owner is a pointer to the question); None for anything else."""
    parts = []
    ends = []
    offset = 0
    for rr in answers:
        rdata = rr.rdata
        if type(rdata) is not Address or rr.rname != name:
            return None
        packed = rdata.packed
        piece = _QUESTION_POINTER + _RR_FIXED.pack(rr.rtype, wire.CLASS_IN, rr.ttl, len(packed))
        piece += packed
        parts.append(piece)
        offset += len(piece)
        ends.append(offset)
    # Address records of one name and type are all the same size: `--loadbalance` rotates them.
    turn = ends[0] if len(ends) > 1 and rcode == wire.NOERROR else 0
    return wire.make_answer(rcode, len(answers), 0, 0, b"".join(parts), tuple(ends), turn)


def _skip_record(packed: bytes, offset: int) -> int:
    offset = wire._skip_name(packed, offset)
    rdlength = (packed[offset + 8] << 8) | packed[offset + 9]
    return offset + 10 + rdlength


def decode_answer_records(name: str, qtype: int, answer: Answer) -> list[RR]:
    """The answer-section records of a precomputed answer (to chase in-cluster CNAMEs)."""
    packet = b"\x00\x00" + answer.heads[0] + to_wire(name) + struct.pack("!HH", qtype, 1)
    return list(DNSRecord.parse(packet + answer.tail).rr)


# --- the apex and negative answers -------------------------------------------------------------


def soa_rr(zone: str, primary_zone: str, ttl: int, serial: int) -> Record:
    """CoreDNS SOA: ns.dns.<zone> hostmaster.<zone>, minimum = the record TTL (RFC 2308 §4),
    the SOA's own TTL capped at 300 (dns-features 3.2)."""
    return Record(
        zone,
        wire.TYPE_SOA,
        min(ttl, 300),
        Soa(
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
    soa = soa_wire(zone, primary_zone, ttl, serial)
    return wire.make_answer(rcode, 0, 1, 0, soa, (len(soa),))


def serial_now() -> int:
    """CoreDNS uses the time of the last change as the SOA serial."""
    return int(time.time())


def apex_rrsets(
    zone: str, primary_zone: str, ttl: int, serial: int, ns_ips: list[str]
) -> tuple[dict[tuple[str, int], list[Record]], dict[tuple[str, int], list[Record]]]:
    """Answers and additionals at the apex: SOA, NS (+glue), dns-version TXT, ns.dns A/AAAA."""
    ns_name = f"ns.dns.{zone}"
    version = f"dns-version.{zone}"
    answers: dict[tuple[str, int], list[Record]] = {
        (zone, wire.TYPE_SOA): [soa_rr(zone, primary_zone, ttl, serial)],
        (zone, wire.TYPE_NS): [Record(zone, wire.TYPE_NS, ttl, Target(ns_name))],
        (version, wire.TYPE_TXT): [
            Record(version, wire.TYPE_TXT, DNS_VERSION_TTL, Txt((SPEC_VERSION.encode(),)))
        ],
    }
    glue: list[Record] = []
    for ip in ns_ips:
        qtype, rr = address_rr(ns_name, ip, ttl)
        answers.setdefault((ns_name, qtype), []).append(rr)
        glue.append(rr)
    additional = {(zone, wire.TYPE_NS): glue}
    return answers, additional
