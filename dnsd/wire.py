"""The hot path's view of DNS messages: parse a query by hand, assemble a response from bytes.

Nothing here imports dnslib. A query is read just far enough to answer it: the 12-byte header,
the one question (name, type, class) and an OPT record if there is one (RFC 1035 §4.1,
RFC 6891 §6). A response is built from a precomputed `Answer` by copying the query's ID, RD and
CD bits and its question bytes, so the client's 0x20 mixed case comes back byte for byte, and the
answer's own names, compressed as pointers into the question, echo that case too.

Rejections follow miekg/dns's default accept function, which CoreDNS uses
(dns-features §3 row 10): QR=1 dropped; opcode other than QUERY -> NOTIMP; QDCOUNT != 1, more
than one record in answer/authority, more than two additional records -> FORMERR; then a
question or OPT that does not parse -> FORMERR, all without a question section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

# RCODEs (RFC 1035 §4.1.1, RFC 6891 §9).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16

# Types and classes the hot path needs by number.
TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
CLASS_IN = 1

UDP_PLAIN_LIMIT = 512  # RFC 1035 §4.2.1: without EDNS a UDP answer is at most 512 bytes
TCP_LIMIT = 65535

_HEADER = struct.Struct("!HBBHHHH")
_COUNTS = struct.Struct("!HHHH")


class Answer(NamedTuple):
    """A response waiting for a question: everything but the ID, the RD/CD bits and the question.

    `heads[i]` is bytes 2..12 of the header (flags and counts) for variant i = RD | CD<<1 |
    OPT<<2: the bits a query can set are pre-applied so the hot path only indexes a tuple.
    `tail` follows the question; `record_ends` are the offsets in `tail` where each record
    (answer, authority, then additional section) ends, so truncation can keep whole records.
    """

    heads: tuple[bytes, ...]
    tail: bytes
    record_ends: tuple[int, ...]
    # `--loadbalance`: the size of each record when the answer is two or more A (or AAAA)
    # records of the question's name and nothing else, all that size; 0 for any other answer.
    turn: int = 0


def turned(answer: Answer, data: bytes) -> Answer:
    """`answer` with its records rotated by the ID of the query `data` modulo their number
    (CoreDNS `loadbalance` shuffles them at random; the ID is random per query, RFC 5452):
    each record comes first as often as any other. Answers without `turn` are returned as
    they are."""
    width = answer.turn
    if not width:
        return answer
    tail = answer.tail
    k = (((data[0] << 8) | data[1]) % (len(tail) // width)) * width
    return answer._replace(tail=tail[k:] + tail[:k]) if k else answer


_heads_cache: dict[tuple[int, int, int, int, int, int], tuple[bytes, ...]] = {}


def make_heads(
    flags: int, rcode: int, ancount: int, nscount: int, arcount: int, qdcount: int = 1
) -> tuple[bytes, ...]:
    """The eight header variants; shared between answers (most have the same counts)."""
    cache_key = (flags, rcode, ancount, nscount, arcount, qdcount)
    heads = _heads_cache.get(cache_key)
    if heads is None:
        out = []
        for variant in range(8):
            rd = variant & 1
            cd = 0x10 if variant & 2 else 0
            extra_opt = (variant >> 2) & 1
            out.append(
                bytes([flags | rd, cd | rcode])
                + _COUNTS.pack(qdcount, ancount, nscount, arcount + extra_opt)
            )
        heads = tuple(out)
        _heads_cache[cache_key] = heads
    return heads


FLAG_QR = 0x80
FLAG_AA = 0x04
FLAG_TC = 0x02


_ends_cache: dict[tuple[int, ...], tuple[int, ...]] = {}


def make_answer(
    rcode: int,
    ancount: int,
    nscount: int,
    arcount: int,
    tail: bytes,
    record_ends: tuple[int, ...],
    turn: int = 0,
) -> Answer:
    """An authoritative (AA=1, RA=0, as CoreDNS answers for its zones) response."""
    # Most answers are one record whose end repeats ((16,) for an A): keep one copy. Only
    # one-record tuples are shared, so the cache stays bounded (ends < 65536) under churn.
    if len(record_ends) == 1:
        record_ends = _ends_cache.setdefault(record_ends, record_ends)
    return Answer(
        make_heads(FLAG_QR | FLAG_AA, rcode, ancount, nscount, arcount), tail, record_ends, turn
    )


@dataclass(slots=True)
class Query:
    """What the hot path learned from a query."""

    data: bytes
    name_key: bytes  # question name, wire form, lower case
    qtype: int
    qclass: int
    question_end: int  # offset just past QTYPE/QCLASS
    edns: bool  # an OPT record was present
    udp_size: int  # the client's EDNS UDP payload size (512 without OPT)
    edns_version: int
    do_bit: bool
    label_offsets: list[int]  # offset of each label within name_key, longest suffix first

    @property
    def question(self) -> bytes:
        return self.data[12 : self.question_end]

    @property
    def variant(self) -> int:
        return (self.data[2] & 1) | ((self.data[3] >> 3) & 2) | (4 if self.edns else 0)


class Reject(Exception):
    """The query must be answered with `rcode` and no question section, or dropped."""

    def __init__(self, rcode: int | None) -> None:
        super().__init__(rcode)
        self.rcode = rcode  # None = drop silently


def parse_query(data: bytes) -> Query:
    """Parse header, question and OPT; raises Reject for what is refused before the question."""
    n = len(data)
    if n < 12:
        # Not even a header: nothing to answer to, and any reply could be used to amplify.
        raise Reject(None)
    _, flags1, _, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags1 & 0x80:
        raise Reject(None)  # a response: never answer one (loops, reflection)
    if (flags1 >> 3) & 0xF != 0:
        raise Reject(NOTIMP)
    if qdcount != 1 or ancount > 1 or nscount > 1 or arcount > 2:
        raise Reject(FORMERR)
    offsets: list[int] = []
    i = 12
    while True:
        if i >= n:
            raise Reject(FORMERR)
        length = data[i]
        if length == 0:
            break
        if length > 63:
            # Compression pointers (0xC0) cannot appear in a question that has nothing before
            # it to point at; 0x40/0x80 label types are obsolete (RFC 6891 §5).
            raise Reject(FORMERR)
        offsets.append(i - 12)
        i += 1 + length
    end = i + 1
    if end - 12 > 255 or end + 4 > n:
        raise Reject(FORMERR)
    qtype = (data[end] << 8) | data[end + 1]
    qclass = (data[end + 2] << 8) | data[end + 3]
    question_end = end + 4
    query = Query(
        data=data,
        name_key=data[12:end].lower(),
        qtype=qtype,
        qclass=qclass,
        question_end=question_end,
        edns=False,
        udp_size=UDP_PLAIN_LIMIT,
        edns_version=0,
        do_bit=False,
        label_offsets=offsets,
    )
    if ancount or nscount or arcount:
        _read_records(query, question_end, ancount + nscount, arcount)
    return query


def _skip_name(data: bytes, i: int) -> int:
    """Offset just past a possibly compressed name; only skipping, so no pointer is followed."""
    n = len(data)
    for _ in range(128):
        if i >= n:
            raise Reject(FORMERR)
        length = data[i]
        if length == 0:
            return i + 1
        if length & 0xC0 == 0xC0:
            if i + 2 > n:
                raise Reject(FORMERR)
            return i + 2
        if length > 63:
            raise Reject(FORMERR)
        i += 1 + length
    raise Reject(FORMERR)


def _read_records(query: Query, i: int, skip: int, additional: int) -> None:
    """Skip answer/authority records and read the additional section for an OPT."""
    data = query.data
    n = len(data)
    seen_opt = False
    for index in range(skip + additional):
        name_start = i
        i = _skip_name(data, i)
        if i + 10 > n:
            raise Reject(FORMERR)
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, i)
        i += 10 + rdlength
        if i > n:
            raise Reject(FORMERR)
        if rtype == TYPE_OPT:
            # RFC 6891 §6.1.1: only in the additional section, only once, owner the root.
            if index < skip or seen_opt or data[name_start] != 0:
                raise Reject(FORMERR)
            seen_opt = True
            query.edns = True
            query.udp_size = max(rclass, UDP_PLAIN_LIMIT)
            query.edns_version = (ttl >> 16) & 0xFF
            query.do_bit = bool(ttl & 0x8000)


# --- assembling responses ----------------------------------------------------------------------


def opt_record(udp_size: int, do_bit: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT: our payload size, version 0, the DO bit copied (RFC 3225 §3), no options."""
    return struct.pack("!BHHBBHH", 0, TYPE_OPT, udp_size, ext_rcode, 0, 0x8000 if do_bit else 0, 0)


def respond(query: Query, answer: Answer, limit: int, advertised_size: int) -> bytes:
    """Assemble the response to `query` from `answer`, truncated (TC) to `limit` bytes."""
    data = query.data
    head = answer.heads[query.variant]
    tail = answer.tail
    if query.edns:
        tail = tail + opt_record(advertised_size, query.do_bit)
    out = data[:2] + head + data[12 : query.question_end] + tail
    if len(out) <= limit:
        return out
    return truncate(query, answer, limit, advertised_size)


def truncate(query: Query, answer: Answer, limit: int, advertised_size: int) -> bytes:
    """Fit `answer` into `limit` bytes (see truncate_raw)."""
    opt = opt_record(advertised_size, query.do_bit) if query.edns else b""
    return truncate_raw(query.data, query.question_end, query.variant, opt, answer, limit)


def truncate_raw(
    data: bytes, question_end: int, variant: int, opt: bytes, answer: Answer, limit: int
) -> bytes:
    """`answer` to the question in `data[12:question_end]`, cut to `limit` bytes.

    Whole records are kept in order: answer, authority, then as many additional records
    (SRV targets' addresses) as fit. TC is set only when an answer or authority record had
    to go (RFC 2181 §9: the client then retries over TCP); leaving out additional records
    alone does not set it, as knot does. Pointers only ever point backwards, so cutting at a
    record boundary keeps the message valid.
    """
    base = question_end + len(opt)
    kept = 0
    for end in answer.record_ends:
        if base + end > limit:
            break
        kept += 1
    cut = answer.record_ends[kept - 1] if kept else 0
    head = answer.heads[variant]
    ancount = (head[4] << 8) | head[5]
    nscount = (head[6] << 8) | head[7]
    needed = ancount + nscount
    flags = bytes([head[0] if kept >= needed else head[0] | FLAG_TC, head[1]])
    counts = _COUNTS.pack(
        1,
        min(kept, ancount),
        min(max(kept - ancount, 0), nscount),
        max(kept - needed, 0) + (1 if opt else 0),
    )
    return data[:2] + flags + counts + data[12:question_end] + answer.tail[:cut] + opt


def truncate_foreign(query: Query, response: bytes, limit: int, advertised_size: int) -> bytes:
    """Cut an upstream's response that does not fit the client's UDP size to header+question.

    Used for forwarded answers, whose record boundaries we do not track; TC sends the client to
    TCP where the whole answer fits.
    """
    if len(response) <= limit:
        return response
    opt = opt_record(advertised_size, query.do_bit) if query.edns else b""
    flags = bytes([response[2] | FLAG_TC, response[3]])
    counts = _COUNTS.pack(1, 0, 0, 1 if opt else 0)
    return query.data[:2] + flags + counts + query.data[12 : query.question_end] + opt


def rcode_with_question(query: Query, rcode: int, advertised_size: int) -> bytes:
    """SERVFAIL / REFUSED / BADVERS with the question echoed (RA=0, AA=0)."""
    ext = 0
    if rcode > 15:
        # Extended RCODE: high 8 bits live in the OPT TTL, low 4 in the header (RFC 6891 §6.1.3).
        ext = rcode >> 4
        rcode &= 0xF
    data = query.data
    opt = opt_record(advertised_size, query.do_bit, ext) if query.edns or ext else b""
    flags = bytes([FLAG_QR | (data[2] & 1), (data[3] & 0x10) | rcode])
    counts = _COUNTS.pack(1, 0, 0, 1 if opt else 0)
    return data[:2] + flags + counts + data[12 : query.question_end] + opt


def rcode_without_question(data: bytes, rcode: int) -> bytes:
    """FORMERR / NOTIMP for a query we could not (or would not) read: header only.

    The opcode is echoed for NOTIMP as miekg does, so the client sees what was not implemented.
    """
    opcode_bits = data[2] & 0x78 if rcode == NOTIMP else 0
    flags = bytes([FLAG_QR | opcode_bits | (data[2] & 1), rcode])
    return data[:2] + flags + b"\x00\x00\x00\x00\x00\x00\x00\x00"
