"""Forwarder against fake upstream DNS servers on 127.0.0.x / ::1, real UDP and TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dnslib
import pytest
import structlog
from prometheus_client import REGISTRY

from dnsd import forward as forward_module
from dnsd.cache import DnsCache
from dnsd.forward import Forwarder, read_resolv_conf
from dnsd.forward_wire import EDNS_PAYLOAD

Handler = Callable[[dnslib.DNSRecord, str], Awaitable[list[bytes] | None]]
COOKIE = 10  # EDNS option code (RFC 7873)


@dataclass
class Seen:
    """One query a fake upstream received."""

    proto: str  # "udp" or "tcp"
    raw: bytes
    record: dnslib.DNSRecord
    port: int  # the client's source port


class FakeUpstream:
    """A DNS server on host:port (same port for UDP and TCP) answering through `handler`."""

    def __init__(self, host: str, handler: Handler) -> None:
        self.host = host
        self.handler = handler
        self.silent = False  # True: receive but never answer (a dead upstream)
        self.seen: list[Seen] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def questions(self, proto: str | None = None, qtype: int | None = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if (proto is None or s.proto == proto) and (qtype is None or s.record.q.qtype == qtype)
        ]

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # find a port free for both UDP and TCP
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return self
        raise RuntimeError("no free port")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def answer(self, raw: bytes, proto: str, port: int) -> list[bytes] | None:
        record = dnslib.DNSRecord.parse(raw)
        self.seen.append(Seen(proto, raw, record, port))
        if self.silent:
            return None
        return await self.handler(record, proto)

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("peername")[1]
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                replies = await self.answer(await reader.readexactly(length), "tcp", port)
                for reply in replies or []:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        async def reply() -> None:
            for datagram in await self.upstream.answer(data, "udp", addr[1]) or []:
                assert self.transport is not None
                self.transport.sendto(datagram, addr)

        self.upstream.spawn(reply())


# --- upstream behaviours ---------------------------------------------------------------------


def reply_to(request: dnslib.DNSRecord, rcode: int = 0) -> dnslib.DNSRecord:
    reply = request.reply()
    reply.header.rcode = rcode
    opt = [rr for rr in request.ar if rr.rtype == dnslib.QTYPE.OPT]
    if opt:  # echo EDNS like a real server: its own payload size, the DO bit, a server cookie
        cookie = [o for o in opt[0].rdata if o.code == COOKIE]
        server_cookie = [dnslib.EDNSOption(COOKIE, cookie[0].data[:8] + b"S" * 8)] if cookie else []
        reply.add_ar(
            dnslib.EDNS0(udp_len=4096, flags="do" if opt[0].edns_do else "", opts=server_cookie)
        )
    return reply


def answering(ip: str = "192.0.2.10", ttl: int = 300, count: int = 1) -> Handler:
    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes]:
        reply = reply_to(request)
        if request.q.qtype == dnslib.QTYPE.A:
            for i in range(count):
                address = ip if count == 1 else f"10.1.{i // 250}.{i % 250 + 1}"
                reply.add_answer(dnslib.RR(request.q.qname, rdata=dnslib.A(address), ttl=ttl))
        return [reply.pack()]

    return handle


def dead() -> Handler:
    async def handle(request: dnslib.DNSRecord, proto: str) -> None:
        return None

    return handle


def slow(delay: float, inner: Handler) -> Handler:
    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes] | None:
        await asyncio.sleep(delay)
        return await inner(request, proto)

    return handle


def truncating_over_udp(count: int = 40) -> Handler:
    full = answering(count=count)

    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes] | None:
        if proto == "udp":
            reply = reply_to(request)
            reply.header.tc = 1
            return [reply.pack()]
        return await full(request, proto)

    return handle


def nxdomain(soa_ttl: int = 300, minimum: int = 60) -> Handler:
    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes]:
        reply = reply_to(request, dnslib.RCODE.NXDOMAIN)
        times = (2026112201, 7200, 900, 86400, minimum)
        soa = dnslib.SOA("ns1.example.org.", "admin.example.org.", times)
        reply.add_auth(dnslib.RR("example.org.", dnslib.QTYPE.SOA, rdata=soa, ttl=soa_ttl))
        return [reply.pack()]

    return handle


def rcode(code: int) -> Handler:
    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes]:
        return [reply_to(request, code).pack()]

    return handle


def lowercasing(inner: Handler) -> Handler:
    """Answers with the question in lower case (servers may; the client must still get its own)."""

    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes] | None:
        replies = await inner(request, proto)
        out = []
        for wire in replies or []:
            record = dnslib.DNSRecord.parse(wire)
            record.questions = [dnslib.DNSQuestion(str(record.q.qname).lower(), record.q.qtype)]
            out.append(record.pack())
        return out

    return handle


def spoofed_first(inner: Handler, genuine: bool = True) -> Handler:
    """Sends a reply with the wrong ID and one for another question before (or instead of) ours."""

    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes]:
        wrong_id = reply_to(request)
        wrong_id.header.id = (request.header.id + 1) % 65536
        wrong_id.add_answer(dnslib.RR(request.q.qname, rdata=dnslib.A("203.0.113.66")))
        wrong_question = reply_to(request)
        # same length and type as ours, so only the name comparison can tell them apart
        first, *rest = request.q.qname.label
        other = dnslib.DNSLabel([b"z" * len(first), *rest])
        wrong_question.questions = [dnslib.DNSQuestion(other, request.q.qtype)]
        wrong_question.add_answer(dnslib.RR(other, rdata=dnslib.A("203.0.113.66")))
        spoofed = [wrong_id.pack(), wrong_question.pack()]
        return spoofed + ((await inner(request, proto)) or []) if genuine else spoofed

    return handle


# --- fixtures and helpers ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    started: list[FakeUpstream] = []

    async def start(handler: Handler, host: str = "127.0.0.2") -> FakeUpstream:
        fake = await FakeUpstream(host, handler).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.close()


@pytest.fixture
async def forwarder() -> AsyncIterator[Callable[..., Forwarder]]:
    made: list[Forwarder] = []

    def make(*upstreams: FakeUpstream, **kwargs: object) -> Forwarder:
        kwargs.setdefault("timeout", 0.25)
        kwargs.setdefault("policy", "sequential")
        fwd = Forwarder([u.address for u in upstreams], **kwargs)  # type: ignore[arg-type]
        made.append(fwd)
        return fwd

    yield make
    for fwd in made:
        await fwd.close()


def query(
    name: str = "www.example.com",
    rdtype: str = "A",
    qid: int = 0x1234,
    rd: bool = True,
    **edns: object,
) -> bytes:
    msg = dns.message.make_query(name, rdtype, id=qid, **edns)  # type: ignore[arg-type]
    if not rd:
        msg.flags &= ~dns.flags.RD
    return msg.to_wire()


def parse(answer: bytes | None) -> dns.message.Message:
    assert answer is not None
    return dns.message.from_wire(answer)


def addresses(answer: bytes | None) -> list[str]:
    return [rd.address for rrset in parse(answer).answer for rd in rrset]


def question_bytes(wire: bytes) -> bytes:
    end = 12
    while wire[end]:
        end += 1 + wire[end]
    return wire[12 : end + 5]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def to(fake: FakeUpstream) -> str:
    return f"{fake.host}:{fake.port}"


# --- answers ---------------------------------------------------------------------------------


async def test_answer_echoes_client_id_rd_and_question(upstream, forwarder):
    good = await upstream(answering("192.0.2.10"))
    fwd = forwarder(good)
    q = query("www.example.com", qid=0xBEEF)
    answer = await fwd.forward(q)
    msg = parse(answer)
    assert msg.id == 0xBEEF
    assert msg.flags & dns.flags.QR and msg.flags & dns.flags.RD
    assert not msg.flags & dns.flags.TC
    assert msg.rcode() == dns.rcode.NOERROR
    assert question_bytes(answer) == question_bytes(q)
    assert addresses(answer) == ["192.0.2.10"]


async def test_rd_clear_in_the_query_is_clear_in_the_answer(upstream, forwarder):
    fwd = forwarder(await upstream(answering()))
    msg = parse(await fwd.forward(query(rd=False)))
    assert not msg.flags & dns.flags.RD
    assert msg.flags & dns.flags.QR


async def test_mixed_case_question_is_echoed_byte_for_byte(upstream, forwarder):
    good = await upstream(lowercasing(answering("192.0.2.20")))
    fwd = forwarder(good)
    q = query("wWw.ExAmPle.CoM")
    answer = await fwd.forward(q)
    assert question_bytes(answer) == question_bytes(q)
    assert b"wWw\x07ExAmPle\x03CoM" in answer
    assert addresses(answer) == ["192.0.2.20"]
    # the upstream was asked our question; its lower-cased echo was still accepted
    assert str(good.seen[0].record.q.qname) == "wWw.ExAmPle.CoM."


async def test_upstream_query_uses_a_random_id_and_a_fresh_source_port(upstream, forwarder):
    good = await upstream(answering())
    fwd = forwarder(good)
    for i in range(8):
        await fwd.forward(query(f"n{i}.example.com", qid=0x1234))
    ids = {s.record.header.id for s in good.seen}
    ports = {s.port for s in good.seen}
    assert len(good.seen) == 8
    assert len(ids) > 1 and len(ports) > 1


async def test_unparseable_queries_are_dropped(forwarder, upstream):
    good = await upstream(answering())
    fwd = forwarder(good)
    valid = query()
    no_question = valid[:4] + b"\x00\x00" + valid[6:12]
    a_response = valid[:2] + bytes([valid[2] | 0x80]) + valid[3:]
    long_label = valid[:12] + b"\x50" + b"a" * 80 + b"\x00\x00\x01\x00\x01"
    for junk in (b"", valid[:11], valid[:-3], no_question, a_response, long_label):
        assert await fwd.forward(junk) is None
    assert good.seen == []


async def test_unknown_opcode_is_notimp(upstream, forwarder):
    good = await upstream(answering())
    fwd = forwarder(good)
    q = bytearray(query(qid=77))
    q[2] |= 2 << 3  # opcode STATUS
    msg = parse(await fwd.forward(bytes(q)))
    assert msg.id == 77 and msg.rcode() == dns.rcode.NOTIMP
    assert good.seen == []


# --- upstream failures ---------------------------------------------------------------------


async def test_dead_upstream_times_out_and_the_next_answers(upstream, forwarder):
    silent = await upstream(dead(), "127.0.0.3")
    good = await upstream(answering("192.0.2.30"), "127.0.0.4")
    fwd = forwarder(silent, good, timeout=0.2)
    timeouts = metric("dnsd_forward_errors_total", to=to(silent), reason="timeout")
    started = time.monotonic()
    answer = await fwd.forward(query())
    assert 0.2 <= time.monotonic() - started < 1.0
    assert addresses(answer) == ["192.0.2.30"]
    assert len(silent.seen) == 1 and len(good.seen) == 1
    assert metric("dnsd_forward_errors_total", to=to(silent), reason="timeout") == timeouts + 1


async def test_closed_port_fails_fast_and_the_next_answers(upstream, forwarder):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.5", 0))
        closed_port = probe.getsockname()[1]
    good = await upstream(answering("192.0.2.31"))
    fwd = Forwarder([("127.0.0.5", closed_port), good.address], timeout=2.0, policy="sequential")
    try:
        started = time.monotonic()
        answer = await fwd.forward(query())
        assert time.monotonic() - started < 1.0  # ICMP port unreachable, not the 2 s timeout
        assert addresses(answer) == ["192.0.2.31"]
        assert metric("dnsd_forward_errors_total", to=f"127.0.0.5:{closed_port}", reason="refused")
    finally:
        await fwd.close()


async def test_slow_upstream_within_the_timeout_is_waited_for(upstream, forwarder):
    sluggish = await upstream(slow(0.1, answering("192.0.2.40")), "127.0.0.3")
    other = await upstream(answering("192.0.2.41"), "127.0.0.4")
    fwd = forwarder(sluggish, other, timeout=1.0)
    assert addresses(await fwd.forward(query())) == ["192.0.2.40"]
    assert other.seen == []


async def test_slow_upstream_beyond_the_timeout_is_skipped(upstream, forwarder):
    sluggish = await upstream(slow(0.6, answering("192.0.2.40")), "127.0.0.3")
    other = await upstream(answering("192.0.2.41"), "127.0.0.4")
    fwd = forwarder(sluggish, other, timeout=0.2)
    started = time.monotonic()
    assert addresses(await fwd.forward(query())) == ["192.0.2.41"]
    assert time.monotonic() - started < 0.6


@pytest.mark.parametrize("code", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
async def test_servfail_or_refused_from_one_upstream_tries_the_next(upstream, forwarder, code):
    failing = await upstream(rcode(code), "127.0.0.3")
    good = await upstream(answering("192.0.2.50"), "127.0.0.4")
    fwd = forwarder(failing, good)
    answer = await fwd.forward(query())
    assert parse(answer).rcode() == dns.rcode.NOERROR
    assert addresses(answer) == ["192.0.2.50"]
    assert len(failing.seen) == 1


async def test_nxdomain_from_an_upstream_is_final(upstream, forwarder):
    negative = await upstream(nxdomain(), "127.0.0.3")
    good = await upstream(answering(), "127.0.0.4")
    fwd = forwarder(negative, good)
    assert parse(await fwd.forward(query())).rcode() == dns.rcode.NXDOMAIN
    assert good.seen == []


async def test_servfail_only_when_every_upstream_failed(upstream, forwarder):
    failing = await upstream(rcode(dns.rcode.SERVFAIL), "127.0.0.3")
    silent = await upstream(dead(), "127.0.0.4")
    refusing = await upstream(rcode(dns.rcode.REFUSED), "127.0.0.5")
    fwd = forwarder(failing, silent, refusing, timeout=0.2)
    q = query("Down.Example.com", qid=999)
    answer = await fwd.forward(q)
    msg = parse(answer)
    assert msg.id == 999 and msg.rcode() == dns.rcode.SERVFAIL
    assert question_bytes(answer) == question_bytes(q)
    assert [len(u.seen) for u in (failing, silent, refusing)] == [1, 1, 1]


async def test_servfail_is_cached_for_servfail_ttl(upstream, forwarder):
    clock = Clock()
    silent = await upstream(dead())
    fwd = forwarder(silent, timeout=0.2, cache=DnsCache(servfail_ttl=5, clock=clock))
    assert parse(await fwd.forward(query())).rcode() == dns.rcode.SERVFAIL
    started = time.monotonic()
    assert parse(await fwd.forward(query(qid=2))).rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 0.1
    assert len(silent.seen) == 1
    clock.now += 5
    assert parse(await fwd.forward(query(qid=3))).rcode() == dns.rcode.SERVFAIL
    assert len(silent.seen) == 2


async def test_no_upstreams_at_all_is_servfail(forwarder):
    fwd = forwarder()
    assert parse(await fwd.forward(query())).rcode() == dns.rcode.SERVFAIL


async def test_attempts_stop_at_the_overall_deadline(upstream, forwarder, monkeypatch):
    monkeypatch.setattr(forward_module, "FORWARD_DEADLINE", 0.3)
    silent = [await upstream(dead(), f"127.0.0.{i}") for i in (3, 4, 5)]
    fwd = forwarder(*silent, timeout=0.2)
    assert parse(await fwd.forward(query())).rcode() == dns.rcode.SERVFAIL
    assert [len(u.seen) for u in silent] == [1, 1, 0]


# --- anti-spoofing -----------------------------------------------------------------------------


async def test_replies_with_wrong_id_or_question_are_ignored(upstream, forwarder):
    spoofer = await upstream(spoofed_first(answering("192.0.2.60")))
    fwd = forwarder(spoofer)
    ignored = metric("dnsd_forward_mismatched_responses_total", to=to(spoofer))
    answer = await fwd.forward(query())
    assert addresses(answer) == ["192.0.2.60"]
    assert metric("dnsd_forward_mismatched_responses_total", to=to(spoofer)) == ignored + 2


async def test_only_spoofed_replies_end_in_timeout_and_servfail(upstream, forwarder):
    spoofer = await upstream(spoofed_first(answering(), genuine=False))
    fwd = forwarder(spoofer, timeout=0.2)
    msg = parse(await fwd.forward(query()))
    assert msg.rcode() == dns.rcode.SERVFAIL and not msg.answer


async def test_malformed_reply_is_ignored_like_a_spoofed_one(upstream, forwarder):
    async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes]:
        (genuine,) = await answering("192.0.2.61")(request, proto)
        return [genuine[:-2], genuine]  # the first one's last record is cut short

    mangler = await upstream(handle)
    fwd = forwarder(mangler)
    assert addresses(await fwd.forward(query())) == ["192.0.2.61"]


# --- TCP fallback --------------------------------------------------------------------------


async def test_truncated_udp_answer_is_asked_again_over_tcp(upstream, forwarder):
    big = await upstream(truncating_over_udp(count=60))
    fwd = forwarder(big)
    answer = await fwd.forward(query("big.example.com", qid=4321))
    msg = parse(answer)
    assert msg.id == 4321 and not msg.flags & dns.flags.TC
    assert len(addresses(answer)) == 60
    assert len(answer) > 512  # the whole answer; the server decides about TC for its client
    assert [s.proto for s in big.seen] == ["udp", "tcp"]
    assert str(big.seen[1].record.q.qname) == "big.example.com."


# --- routing ---------------------------------------------------------------------------------


async def test_stub_domains_route_by_longest_suffix(upstream, forwarder):
    default = await upstream(answering("192.0.2.1"), "127.0.0.3")
    corp = await upstream(answering("192.0.2.2"), "127.0.0.4")
    dev = await upstream(answering("192.0.2.3"), "127.0.0.5")
    fwd = forwarder(
        default,
        stub_domains={"corp.example.": [corp.address], "Dev.Corp.Example": [dev.address]},
    )
    expected = {
        "a.dev.corp.example": "192.0.2.3",
        "DEV.corp.EXAMPLE": "192.0.2.3",
        "b.corp.example": "192.0.2.2",
        "corp.example": "192.0.2.2",
        "notcorp.example": "192.0.2.1",  # a suffix match is on whole labels
        "www.example.org": "192.0.2.1",
    }
    for name, ip in expected.items():
        assert addresses(await fwd.forward(query(name))) == [ip], name


async def orders_tried(upstream, forwarder, policy: str, queries: int) -> list[str]:
    """Three upstreams a, b, c that all answer SERVFAIL, so every query tries each of them in
    the policy's order: that order per query, as "abc"."""
    tried: list[str] = []

    def logging(name: str) -> Handler:
        async def handle(request: dnslib.DNSRecord, proto: str) -> list[bytes]:
            tried.append(name)
            return [reply_to(request, dnslib.RCODE.SERVFAIL).pack()]

        return handle

    fakes = [await upstream(logging(n), f"127.0.0.{i + 3}") for i, n in enumerate("abc")]
    fwd = forwarder(*fakes, policy=policy)
    orders = []
    for i in range(queries):  # a new name each time: a cached SERVFAIL would ask nobody
        answer = await fwd.forward(query(f"q{i}.example.com"))
        assert parse(answer).rcode() == dns.rcode.SERVFAIL
        orders.append("".join(tried))
        tried.clear()
    return orders


async def test_sequential_policy_tries_the_upstreams_as_listed(upstream, forwarder):
    assert await orders_tried(upstream, forwarder, "sequential", 4) == ["abc"] * 4


async def test_round_robin_policy_puts_the_next_upstream_first_like_coredns(upstream, forwarder):
    # CoreDNS policy.go: the k-th query (k from 1) starts at upstream k mod n, then the others
    # in their listed order (not a rotation: after c comes a, b).
    orders = await orders_tried(upstream, forwarder, "round_robin", 7)
    assert orders == ["bac", "cab", "abc", "bac", "cab", "abc", "bac"]


async def test_random_policy_tries_every_upstream_in_a_fresh_shuffle(upstream, forwarder):
    orders = await orders_tried(upstream, forwarder, "random", 120)
    assert all(sorted(order) == ["a", "b", "c"] for order in orders)
    # 120 uniform shuffles of three: each of the six orders is missing with p = (5/6)^120 < 1e-9.
    assert set(orders) == {"abc", "acb", "bac", "bca", "cab", "cba"}


async def test_round_robin_counts_each_route_on_its_own(upstream, forwarder):
    one = await upstream(answering("192.0.2.1"), "127.0.0.3")
    two = await upstream(answering("192.0.2.2"), "127.0.0.4")
    stub_one = await upstream(answering("192.0.2.11"), "127.0.0.5")
    stub_two = await upstream(answering("192.0.2.12"), "127.0.0.6")
    fwd = forwarder(
        one, two, policy="round_robin", stub_domains={"corp": [stub_one.address, stub_two.address]}
    )
    firsts = [
        addresses(await fwd.forward(query(name)))
        for name in ("a.example.com", "a.corp", "b.corp", "b.example.com", "c.example.com")
    ]
    # Each route starts at its second upstream and alternates, whatever the other route asked.
    assert firsts == [["192.0.2.2"], ["192.0.2.12"], ["192.0.2.11"], ["192.0.2.1"], ["192.0.2.2"]]


async def test_ipv6_upstream(upstream, forwarder):
    good = await upstream(answering("192.0.2.66"), "::1")
    fwd = forwarder(good)
    assert addresses(await fwd.forward(query())) == ["192.0.2.66"]
    assert metric("dnsd_forward_requests_total", to=f"[::1]:{good.port}") >= 1


# --- cache ---------------------------------------------------------------------------------


async def test_cached_answer_counts_ttl_down_and_expires(upstream, forwarder):
    clock = Clock()
    good = await upstream(answering("192.0.2.70", ttl=30))
    fwd = forwarder(good, cache=DnsCache(clock=clock))
    await fwd.forward(query())
    clock.now += 12.5
    answer = await fwd.forward(query("WWW.example.COM", qid=5))
    assert len(good.seen) == 1
    msg = parse(answer)
    assert msg.id == 5 and msg.answer[0].ttl == 18
    assert b"\x03WWW\x07example\x03COM" in answer  # cached answer, this client's case
    clock.now += 17.5
    await fwd.forward(query())
    assert len(good.seen) == 2


async def test_nxdomain_is_cached_for_the_soa_minimum(upstream, forwarder):
    clock = Clock()
    negative = await upstream(nxdomain(soa_ttl=300, minimum=60))
    fwd = forwarder(negative, cache=DnsCache(clock=clock))
    assert parse(await fwd.forward(query("nope.example.org"))).rcode() == dns.rcode.NXDOMAIN
    clock.now += 45
    msg = parse(await fwd.forward(query("nope.example.org")))
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.authority[0].rdtype == dns.rdatatype.SOA and msg.authority[0].ttl == 15
    assert len(negative.seen) == 1
    clock.now += 15
    await fwd.forward(query("nope.example.org"))
    assert len(negative.seen) == 2


async def test_do_bit_is_part_of_the_cache_key(upstream, forwarder):
    good = await upstream(answering())
    fwd = forwarder(good, cache=DnsCache())
    await fwd.forward(query(use_edns=0))
    await fwd.forward(query(use_edns=0, want_dnssec=True))
    await fwd.forward(query(use_edns=0, want_dnssec=True))
    assert len(good.seen) == 2
    assert parse(await fwd.forward(query(want_dnssec=True, qid=9))).ednsflags & dns.flags.DO


# --- EDNS ----------------------------------------------------------------------------------


async def test_client_opt_is_forwarded_verbatim(upstream, forwarder):
    good = await upstream(answering())
    fwd = forwarder(good)
    option = dns.edns.GenericOption(65001, b"kpx")
    q = query(use_edns=0, payload=1400, options=[option])
    answer = await fwd.forward(q)
    opt_rr = q[12 + len(question_bytes(q)) :]
    upstream_raw = good.seen[0].raw
    assert upstream_raw[12 + len(question_bytes(upstream_raw)) :] == opt_rr
    assert parse(answer).edns == 0


async def test_answer_has_opt_exactly_when_the_query_had_one(upstream, forwarder):
    good = await upstream(answering())
    fwd = forwarder(good, cache=DnsCache())
    # the cached answer came with the upstream's OPT; a plain query must not get it
    assert parse(await fwd.forward(query(use_edns=0))).edns == 0
    plain = parse(await fwd.forward(query()))
    assert plain.edns == -1 and len(good.seen) == 1
    # the other way round: cached without OPT, an EDNS client gets one (ours)
    fwd = forwarder(good, cache=DnsCache())
    await fwd.forward(query("other.example.com"))
    msg = parse(await fwd.forward(query("other.example.com", use_edns=0)))
    assert msg.edns == 0 and msg.payload == EDNS_PAYLOAD
    assert len(good.seen) == 2


async def test_answer_opt_is_ours_not_the_upstreams(upstream, forwarder):
    good = await upstream(answering())
    fwd = forwarder(good, cache=DnsCache())
    first = dns.edns.GenericOption(COOKIE, b"client-A")
    second = dns.edns.GenericOption(COOKIE, b"client-B")
    mine = parse(await fwd.forward(query(use_edns=0, options=[first])))
    # the upstream did send a server cookie for client A ...
    assert dnslib.DNSRecord.parse(good.seen[0].raw).ar[0].rdata[0].data == b"client-A"
    # ... but no client gets an upstream's options, from the exchange or from the cache
    cached = parse(await fwd.forward(query(use_edns=0, want_dnssec=False, options=[second])))
    for msg in (mine, cached):
        assert msg.edns == 0 and msg.options == ()
        assert msg.payload == EDNS_PAYLOAD
    assert len(good.seen) == 1


async def test_error_answers_carry_opt_when_the_query_did(upstream, forwarder):
    silent = await upstream(dead())
    fwd = forwarder(silent, timeout=0.1)
    assert parse(await fwd.forward(query(use_edns=0))).edns == 0
    assert parse(await fwd.forward(query("x.example"))).edns == -1


# --- concurrency -----------------------------------------------------------------------------


async def test_queries_over_max_inflight_are_refused(upstream, forwarder):
    sluggish = await upstream(slow(0.3, answering()))
    fwd = forwarder(sluggish, max_inflight=2, timeout=1.0)
    rejects = metric("dnsd_forward_max_concurrent_rejects_total")
    answers = await asyncio.gather(
        *(fwd.forward(query(f"q{i}.example.com", qid=i)) for i in range(3))
    )
    rcodes = [parse(a).rcode() for a in answers]
    assert rcodes == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.REFUSED]
    assert parse(answers[2]).id == 2
    assert metric("dnsd_forward_max_concurrent_rejects_total") == rejects + 1
    assert len(sluggish.seen) == 2
    # the slots are free again
    assert parse(await fwd.forward(query("after.example.com"))).rcode() == dns.rcode.NOERROR


async def test_above_max_inflight_refused_at_once_without_a_task(upstream, forwarder):
    """A flood above max-concurrent is shed synchronously: answer_at_once refuses it (counted)
    and neither waits nor asks an upstream; below the limit it leaves the query to forward."""
    sluggish = await upstream(slow(0.3, answering()))
    fwd = forwarder(sluggish, max_inflight=1, timeout=1.0)
    assert fwd.answer_at_once(query("first.example.com")) is None  # room: must be forwarded
    first = asyncio.ensure_future(fwd.forward(query("first.example.com")))
    await asyncio.sleep(0.05)  # now waiting upstream: the one slot is taken
    rejects = metric("dnsd_forward_max_concurrent_rejects_total")
    refused = fwd.answer_at_once(query("flood.example.com", qid=77))
    assert parse(refused).rcode() == dns.rcode.REFUSED and parse(refused).id == 77
    assert metric("dnsd_forward_max_concurrent_rejects_total") == rejects + 1
    assert [s.record.q.qname for s in sluggish.seen] == [dnslib.DNSLabel("first.example.com")]
    assert parse(await first).rcode() == dns.rcode.NOERROR


async def test_cached_answers_come_at_once(upstream, forwarder):
    fake = await upstream(answering())
    fwd = forwarder(fake, cache=DnsCache())
    assert fwd.answer_at_once(query(qid=1)) is None  # not cached yet
    await fwd.forward(query(qid=1))
    assert addresses(fwd.answer_at_once(query(qid=2))) == addresses(await fwd.forward(query()))
    assert parse(fwd.answer_at_once(query(qid=2))).id == 2
    assert len(fake.seen) == 1
    assert fwd.answer_at_once(b"\x00\x01junk") is None  # unparseable: forward() drops it


async def test_a_miss_left_by_answer_at_once_is_asked_upstream_and_counted_once(
    upstream, forwarder
):
    fake = await upstream(answering("192.0.2.11"))
    fwd = forwarder(fake, cache=DnsCache())
    misses = metric("dnsd_cache_misses_total")
    q = query("once.example.com", qid=5)
    assert fwd.answer_at_once(q) is None
    answer = await fwd.ask(q)
    assert addresses(answer) == ["192.0.2.11"] and parse(answer).id == 5
    assert metric("dnsd_cache_misses_total") == misses + 1
    assert len(fake.seen) == 1
    assert await fwd.ask(b"\x00\x01junk") is None  # unparseable: dropped


async def test_identical_concurrent_queries_share_one_upstream_query(upstream, forwarder):
    sluggish = await upstream(slow(0.2, answering("192.0.2.80")))
    fwd = forwarder(sluggish, timeout=1.0)
    names = ["same.example.com", "SAME.example.com", "sAmE.ExAmPlE.cOm"]
    queries = [query(names[i % 3], qid=1000 + i) for i in range(20)]
    answers = await asyncio.gather(*(fwd.forward(q) for q in queries))
    assert len(sluggish.seen) == 1
    for q, answer in zip(queries, answers, strict=True):
        assert answer[:2] == q[:2]
        assert question_bytes(answer) == question_bytes(q)
        assert addresses(answer) == ["192.0.2.80"]


async def test_a_client_going_away_does_not_cancel_the_shared_exchange(upstream, forwarder):
    sluggish = await upstream(slow(0.2, answering("192.0.2.81")))
    fwd = forwarder(sluggish, timeout=1.0)
    impatient = asyncio.ensure_future(fwd.forward(query(qid=1)))
    patient = asyncio.ensure_future(fwd.forward(query(qid=2)))
    await asyncio.sleep(0.05)
    impatient.cancel()
    assert addresses(await patient) == ["192.0.2.81"]
    assert len(sluggish.seen) == 1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_every_upstream_socket_is_closed_whether_answered_timed_out_or_abandoned(
    upstream, forwarder
):
    good = await upstream(answering("192.0.2.82"), "127.0.0.3")
    silent = await upstream(dead(), "127.0.0.4")
    before = open_fds()
    answered = forwarder(good)
    for i in range(20):
        assert addresses(await answered.forward(query(f"a{i}.example.com"))) == ["192.0.2.82"]
    timed_out = forwarder(silent, timeout=0.05)
    for i in range(5):
        assert parse(await timed_out.forward(query(f"t{i}.example.com"))).rcode() == 2
    abandoned = forwarder(silent, timeout=5.0)
    waiting = [
        asyncio.ensure_future(abandoned.forward(query(f"w{i}.example.com"))) for i in range(20)
    ]
    await asyncio.sleep(0.05)
    assert open_fds() >= before + 20  # a socket per question waiting upstream
    await abandoned.close()  # shutting down cancels the exchanges
    for task in waiting:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert open_fds() <= before + 1  # + the health probe's, at most


# --- health ----------------------------------------------------------------------------------


async def test_upstream_going_bad_and_recovering_is_logged_once_each(upstream, forwarder):
    flaky = await upstream(answering("192.0.2.90"), "127.0.0.3")
    good = await upstream(answering("192.0.2.91"), "127.0.0.4")
    flaky.silent = True
    fwd = forwarder(flaky, good, timeout=0.15)
    with structlog.testing.capture_logs() as logs:
        for i in range(6):
            assert addresses(await fwd.forward(query(f"h{i}.example.com"))) == ["192.0.2.91"]
        # two timeouts made it unhealthy; after that it is asked last, so not at all here
        assert len(flaky.questions(qtype=dnslib.QTYPE.A)) == 2
        flaky.silent = False
        for _ in range(40):  # the 0.5 s health probe notices the recovery
            if fwd.upstreams[0].healthy:
                break
            await asyncio.sleep(0.1)
        assert fwd.upstreams[0].healthy
        assert addresses(await fwd.forward(query("back.example.com"))) == ["192.0.2.90"]
    events = [(e["event"], e.get("upstream")) for e in logs]
    assert events.count(("upstream_unhealthy", to(flaky))) == 1
    assert events.count(("upstream_healthy", to(flaky))) == 1
    assert flaky.questions(qtype=dnslib.QTYPE.NS)  # the probe is `. IN NS`
    assert metric("dnsd_forward_upstream_healthy", to=to(flaky)) == 1


async def test_a_probe_that_hits_a_bug_keeps_probing_and_counts_it(upstream, forwarder):
    """An unexpected exception inside the probe (not an upstream failure) must not end it: the
    upstream would then come back only through a lucky client query."""
    flaky = await upstream(answering("192.0.2.92"))
    flaky.silent = True
    fwd = forwarder(flaky, timeout=0.1)
    real = fwd._udp_question
    broken = 2

    def failing_probe(up, template, question, budget):
        nonlocal broken
        if template == forward_module.HEALTH_PROBE and broken:
            broken -= 1
            raise RuntimeError("injected")
        return real(up, template, question, budget)

    fwd._udp_question = failing_probe
    restarts = metric("kwatch_task_restarts_total", task="forward-probe")
    with structlog.testing.capture_logs() as logs:
        for i in range(2):
            await fwd.forward(query(f"p{i}.example.com"))
        assert not fwd.upstreams[0].healthy
        flaky.silent = False
        for _ in range(50):  # two broken probes at 0.5 s each, then a real one
            if fwd.upstreams[0].healthy:
                break
            await asyncio.sleep(0.1)
    assert fwd.upstreams[0].healthy
    assert broken == 0
    assert metric("kwatch_task_restarts_total", task="forward-probe") == restarts + 2
    events = [e["event"] for e in logs]
    assert events.count("forward_probe_failed") == 1  # with its traceback, once
    assert events.count("forward_probe_failed_again") == 1
    await fwd.close()


async def test_close_stops_health_probes(upstream, forwarder):
    silent = await upstream(dead())
    fwd = forwarder(silent, timeout=0.1)
    for i in range(2):
        await fwd.forward(query(f"c{i}.example.com"))
    probe = fwd.upstreams[0].probe
    assert probe is not None and not probe.done()
    await fwd.close()
    assert probe.done()


# --- resolve (ExternalName targets) --------------------------------------------------------


async def test_resolve_returns_answer_records_and_uses_the_cache(upstream, forwarder):
    good = await upstream(answering("192.0.2.100", ttl=60))
    fwd = forwarder(good, cache=DnsCache())
    records = await fwd.resolve("target.example.net", dnslib.QTYPE.A)
    assert [(str(rr.rname), str(rr.rdata)) for rr in records] == [
        ("target.example.net.", "192.0.2.100")
    ]
    assert await fwd.resolve("TARGET.example.net.", dnslib.QTYPE.A)
    assert len(good.seen) == 1


async def test_resolve_is_empty_on_nxdomain_and_on_failure(upstream, forwarder):
    negative = await upstream(nxdomain(), "127.0.0.3")
    silent = await upstream(dead(), "127.0.0.4")
    assert await forwarder(negative).resolve("gone.example.org", dnslib.QTYPE.A) == []
    assert await forwarder(silent, timeout=0.1).resolve("x.example.org", dnslib.QTYPE.A) == []


async def test_resolve_follows_stub_domains(upstream, forwarder):
    default = await upstream(answering("192.0.2.1"), "127.0.0.3")
    corp = await upstream(answering("192.0.2.2"), "127.0.0.4")
    fwd = forwarder(default, stub_domains={"corp.example": [corp.address]})
    records = await fwd.resolve("db.corp.example", dnslib.QTYPE.A)
    assert [str(rr.rdata) for rr in records] == ["192.0.2.2"]


# --- resolv.conf ---------------------------------------------------------------------------


def test_read_resolv_conf_takes_nameserver_lines(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated\n"
        "search default.svc.cluster.local svc.cluster.local\n"
        "nameserver 10.96.0.10\n"
        "nameserver fd00::a\n"
        "; nameserver 10.0.0.1\n"
        "nameserver not-an-address\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n"
    )
    assert read_resolv_conf(str(path)) == [("10.96.0.10", 53), ("fd00::a", 53)]


def test_read_resolv_conf_without_nameservers_or_file_is_empty(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("search example.com\n")
    assert read_resolv_conf(str(path)) == []
    assert read_resolv_conf(str(tmp_path / "missing")) == []
