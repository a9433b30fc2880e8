"""The wire side of forwarding: pure functions of bytes, with no sockets and no state.

- `parse_query` splits a client query into what the forwarder needs (`ParsedQuery`: ID, flags,
  question bytes, routing labels, OPT, cache key) without decoding names;
- `check_response` decides whether an upstream's reply answers our query: same ID, QR set, our
  question (case-insensitive), records that can be walked (RFC 5452 section 9.1);
- `build_answer` re-addresses an upstream (or cached) response to the client; `error_answer`
  makes an answer with no records from an rcode alone.

EDNS: the answer carries an OPT exactly when the query did, and it is ours (`minimal_opt`:
payload size, DO echoed, the upstream's extended rcode), never the upstream's: that one's
options (COOKIE, padding, ECS) belong to the exchange that filled the cache, and a client
discards an answer echoing someone else's cookie (RFC 7873 section 5.3). CoreDNS's cache does
the same.

dnsd/forward.py does the I/O around them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dnsd.cache import CacheKey, ResponseLayout, skip_name

# Our advertised UDP payload size in an OPT we add ourselves (DNS flag day 2020).
EDNS_PAYLOAD = 1232


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    """The parts of a client query the forwarder needs, found without decoding names."""

    id: int
    flags: int  # header bytes 2-3
    question: bytes  # qname + qtype + qclass exactly as the client sent them
    labels: tuple[bytes, ...]  # lower-case qname labels, for stub-domain routing
    opt: bytes | None  # the client's OPT record, verbatim
    key: CacheKey

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0x0F


def parse_query(wire: bytes) -> ParsedQuery | None:
    """Split a client query; None if it cannot be answered at all (drop it)."""
    wire = bytes(wire)  # a bytearray or memoryview would make unhashable keys
    if len(wire) < 12:
        return None
    qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHHH", wire)
    if flags & 0x8000 or qdcount != 1:
        return None  # a response, or no single question to echo
    labels: list[bytes] = []
    pos = 12
    while True:  # the first name in a message cannot be compressed
        if pos >= len(wire):
            return None
        length = wire[pos]
        if length == 0:
            break
        if length > 63 or pos + 1 + length > len(wire):
            return None
        labels.append(wire[pos + 1 : pos + 1 + length].lower())
        pos += 1 + length
    name_end = pos + 1
    if name_end - 12 > 255 or name_end + 4 > len(wire):
        return None
    qtype, qclass = struct.unpack_from("!HH", wire, name_end)
    question = wire[12 : name_end + 4]
    opt = None
    do = False
    pos = name_end + 4
    try:
        for index in range(ancount + nscount + arcount):
            start = pos
            pos = skip_name(wire, pos)
            if pos + 10 > len(wire):
                return None
            rtype, _, ttl, rdlength = struct.unpack_from("!HHIH", wire, pos)
            pos += 10 + rdlength
            if pos > len(wire):
                return None
            if rtype == 41 and index >= ancount + nscount and opt is None:
                opt = wire[start:pos]
                do = bool(ttl & 0x8000)
    except ValueError:
        return None
    key = CacheKey(question[:-4].lower(), qtype, qclass, do, bool(flags & 0x0010))
    return ParsedQuery(qid, flags, question, tuple(labels), opt, key)


def minimal_opt(do: bool, extended_rcode: int = 0) -> bytes:
    """An OPT record with our payload size, version 0 and the DO bit echoed (RFC 3225)."""
    ttl = (extended_rcode << 24) | (0x8000 if do else 0)
    return b"\x00" + struct.pack("!HHIH", 41, EDNS_PAYLOAD, ttl, 0)


def error_answer(query: ParsedQuery, rcode: int) -> bytes:
    """An answer with no records: the client's ID, opcode, RD, CD and question, this rcode."""
    flags = 0x8000 | (query.flags & 0x7910) | 0x0080 | rcode
    opt = b"" if query.opt is None else minimal_opt(query.key.do)
    header = struct.pack("!HHHHHH", query.id, flags, 1, 0, 0, 1 if opt else 0)
    return header + query.question + opt


def build_answer(query: ParsedQuery, response: bytes) -> bytes:
    """The upstream (or cached) response re-addressed to this client.

    The client's ID, opcode, RD and CD and its question bytes (0x20 case) replace the upstream's;
    AA, RA, AD and the rcode come from the upstream; TC is clear (a truncated UDP answer was
    retried over TCP). The records are copied byte for byte: the question has the same length as
    the upstream's, so compression pointers into it stay valid and show the client's case. The
    upstream's OPT (always last in practice) is replaced by ours, or dropped for a plain query.
    """
    layout = ResponseLayout.parse(response)
    body = response[layout.question_end : layout.end]
    ancount, nscount, arcount = layout.counts
    extended_rcode = 0
    has_opt = layout.opt is not None
    if layout.opt is not None and layout.opt[1] == layout.end:
        opt_start = layout.opt[0]
        extended_rcode = response[skip_name(response, opt_start) + 4]
        body = body[: opt_start - layout.question_end]
        arcount -= 1
        has_opt = False
    if query.opt is not None and not has_opt:
        body += minimal_opt(query.key.do, extended_rcode)
        arcount += 1
    upstream = struct.unpack_from("!H", response, 2)[0]
    flags = 0x8000 | (query.flags & 0x7910) | (upstream & 0x04AF)
    header = struct.pack("!HHHHHH", query.id, flags, 1, ancount, nscount, arcount)
    return header + query.question + body


def check_response(response: bytes, qid: int, question: bytes) -> bool:
    """True if `response` answers our query: same ID, QR set, one question equal to ours, and
    records that can be walked (a malformed reply is ignored like a spoofed one)."""
    end = 12 + len(question)
    if len(response) < end or struct.unpack_from("!HH", response, 4)[0] != 1:
        return False
    if struct.unpack_from("!H", response)[0] != qid or not response[2] & 0x80:
        return False
    # Only the name is compared case-insensitively: bytes.lower() would fold qtype 65 into 97.
    if (
        response[12 : end - 4].lower() != question[:-4].lower()
        or response[end - 4 : end] != question[-4:]
    ):
        return False
    try:
        ResponseLayout.parse(response)
    except ValueError:
        return False
    return True
