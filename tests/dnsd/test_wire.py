"""The hot path's hand-written parser and response assembly, without sockets."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import pytest
from dnslib import QTYPE, RR, A

from dnsd import answers as enc
from dnsd import wire
from dnsd.wire import Reject, parse_query, respond


def query_bytes(name: str = "web.default.svc.cluster.local", rdtype: str = "A", **kw) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def header(
    qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0
) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x03web\x00\x00\x01\x00\x01"


def test_question_name_is_lowercased_for_the_key_and_offsets_mark_labels():
    q = parse_query(query_bytes("WeB.Default.SVC.cluster.local"))
    assert q.name_key == b"\x03web\x07default\x03svc\x07cluster\x05local\x00"
    assert q.label_offsets == [0, 4, 12, 16, 24]
    assert q.qtype == 1 and q.qclass == 1 and not q.edns


def test_opt_record_gives_the_clients_udp_size_version_and_do_bit():
    q = parse_query(query_bytes(use_edns=0, payload=4000, want_dnssec=True))
    assert q.edns and q.udp_size == 4000 and q.edns_version == 0 and q.do_bit
    small = parse_query(query_bytes(use_edns=0, payload=100))
    assert small.udp_size == 512  # RFC 6891 §6.2.5: values below 512 are treated as 512


def test_packets_shorter_than_a_header_are_dropped():
    with pytest.raises(Reject) as err:
        parse_query(b"\x12\x34\x01")
    assert err.value.rcode is None


def test_responses_qr_set_are_dropped():
    with pytest.raises(Reject) as err:
        parse_query(header(flags=0x8100) + QUESTION)
    assert err.value.rcode is None


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 15])
def test_opcodes_other_than_query_are_notimp(opcode):
    with pytest.raises(Reject) as err:
        parse_query(header(flags=opcode << 11) + QUESTION)
    assert err.value.rcode == wire.NOTIMP


@pytest.mark.parametrize(
    "qd,an,ns,ar", [(0, 0, 0, 0), (2, 0, 0, 0), (1, 2, 0, 0), (1, 0, 2, 0), (1, 0, 0, 3)]
)
def test_section_counts_outside_the_accept_rules_are_formerr(qd, an, ns, ar):
    with pytest.raises(Reject) as err:
        parse_query(header(qd=qd, an=an, ns=ns, ar=ar) + QUESTION)
    assert err.value.rcode == wire.FORMERR


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no question at all
        b"\x03we",  # label cut short
        b"\x03web",  # no root label
        b"\x03web\x00\x00\x01",  # no class
        b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer to itself (a loop)
        b"\x03web\xc0\x0c\x00\x01\x00\x01",  # pointer back into the question
        b"\x40abc\x00\x00\x01\x00\x01",  # extended label type
        (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",  # name over 255 bytes
    ],
)
def test_malformed_questions_are_formerr(body):
    with pytest.raises(Reject) as err:
        parse_query(header() + body)
    assert err.value.rcode == wire.FORMERR


def test_two_opt_records_are_formerr():
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    with pytest.raises(Reject) as err:
        parse_query(header(ar=2) + QUESTION + opt + opt)
    assert err.value.rcode == wire.FORMERR


def test_opt_with_a_non_root_owner_is_formerr():
    opt = b"\x01a\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    with pytest.raises(Reject):
        parse_query(header(ar=1) + QUESTION + opt)


def test_additional_record_overrunning_the_packet_is_formerr():
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x10"  # rdlength 16, no data
    with pytest.raises(Reject):
        parse_query(header(ar=1) + QUESTION + opt)


def _answer(name: str = "web.default.svc.cluster.local", count: int = 1):
    rrs = [
        RR(name, QTYPE.A, ttl=5, rdata=A(f"10.0.{i // 250}.{i % 250 + 1}")) for i in range(count)
    ]
    return enc.encode(name, QTYPE.A, rrs)


def test_response_copies_id_rd_cd_and_the_question_bytes_in_their_case():
    query = dns.message.make_query("WEB.default.Svc.cluster.local", "A")
    query.flags |= dns.flags.CD
    q = parse_query(query.to_wire())
    out = respond(q, _answer(), 512, 1232)
    msg = dns.message.from_wire(out)
    assert msg.id == query.id
    assert msg.flags & dns.flags.RD and msg.flags & dns.flags.CD and msg.flags & dns.flags.AA
    assert not msg.flags & dns.flags.RA
    assert out[12 : q.question_end] == query.to_wire()[12 : q.question_end]
    # The owner is a pointer to the question, so it comes back in the query's case.
    assert msg.answer[0].name.to_text() == "WEB.default.Svc.cluster.local."


def test_rd_clear_stays_clear():
    query = dns.message.make_query("web.default.svc.cluster.local", "A")
    query.flags &= ~dns.flags.RD
    msg = dns.message.from_wire(respond(parse_query(query.to_wire()), _answer(), 512, 1232))
    assert not msg.flags & dns.flags.RD


def test_opt_is_added_only_when_the_query_had_one_and_echoes_do():
    plain = dns.message.from_wire(respond(parse_query(query_bytes()), _answer(), 512, 1232))
    assert plain.edns == -1
    q = parse_query(query_bytes(use_edns=0, payload=1232, want_dnssec=True))
    msg = dns.message.from_wire(respond(q, _answer(), 1232, 1232))
    assert msg.edns == 0 and msg.payload == 1232 and msg.ednsflags & dns.flags.DO


def test_answer_over_the_limit_keeps_whole_records_and_sets_tc():
    answer = _answer(count=40)  # 40 A records: about 600 bytes
    q = parse_query(query_bytes())
    out = respond(q, answer, 512, 1232)
    assert len(out) <= 512
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.TC
    assert 0 < len(msg.answer[0]) < 40
    full = dns.message.from_wire(respond(q, answer, wire.TCP_LIMIT, 1232))
    assert len(full.answer[0]) == 40 and not full.flags & dns.flags.TC


def test_truncated_answer_with_edns_still_carries_the_opt():
    answer = _answer(count=200)
    q = parse_query(query_bytes(use_edns=0, payload=1232))
    out = respond(q, answer, 1232, 1232)
    assert len(out) <= 1232
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.TC and msg.edns == 0


def test_badvers_puts_the_high_bits_in_the_opt():
    q = parse_query(query_bytes(use_edns=1))
    msg = dns.message.from_wire(wire.rcode_with_question(q, wire.BADVERS, 1232))
    assert msg.rcode() == dns.rcode.BADVERS
    assert msg.edns == 0


def test_formerr_and_notimp_carry_no_question():
    data = header(flags=(2 << 11) | 0x0100) + QUESTION
    out = wire.rcode_without_question(data, wire.NOTIMP)
    assert out[:2] == data[:2] and out[3] & 0xF == wire.NOTIMP
    assert (out[2] >> 3) & 0xF == 2  # opcode echoed
    assert out[4:12] == b"\x00" * 8


def test_foreign_answer_too_big_for_udp_is_cut_to_the_question_with_tc():
    q = parse_query(query_bytes())
    big = respond(q, _answer(count=100), wire.TCP_LIMIT, 1232)
    out = wire.truncate_foreign(q, big, 512, 1232)
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.TC and not msg.answer and len(out) <= 512
    assert wire.truncate_foreign(q, b"x" * 100, 512, 1232) == b"x" * 100


def test_glue_that_does_not_fit_is_left_out_without_tc():
    name = "_http._tcp.web.default.svc.cluster.local"
    from dnslib import SRV

    srvs = [
        RR(name, QTYPE.SRV, ttl=5, rdata=SRV(0, 10, 80, f"h{i}.web.default.svc.cluster.local"))
        for i in range(8)
    ]
    glue = [
        RR(f"h{i}.web.default.svc.cluster.local", QTYPE.A, ttl=5, rdata=A(f"10.0.0.{i}"))
        for i in range(8)
    ]
    answer = enc.encode(name, QTYPE.SRV, srvs, glue)
    q = parse_query(query_bytes(name, "SRV"))
    out = respond(q, answer, 512, 1232)
    msg = dns.message.from_wire(out)
    assert len(out) <= 512 and len(msg.answer[0]) == 8
    assert not msg.flags & dns.flags.TC
    # As many whole address records as fit, in order (knot does the same); one more would
    # not have fitted.
    kept = [rrset.name.to_text() for rrset in msg.additional]
    assert kept == [f"h{i}.web.default.svc.cluster.local." for i in range(len(kept))]
    assert 0 < len(kept) < 8
    assert len(out) + 16 > 512  # an A glue record with a compressed owner is 16 bytes
