"""dnsd over real UDP/TCP sockets on 127.0.0.1, fed from a manifest, dnspython as the client."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import time

import aiohttp
import dns.flags
import dns.message
import dns.rcode
import pytest

from dnsd import server as server_mod
from tests.dnsd.helpers import (
    ask,
    endpoint,
    endpoint_slice,
    namespace,
    raw_udp,
    rdatas,
    records,
    service,
)

Z = "cluster.local"

CLUSTER = [
    namespace("default"),
    service("web", ips=["10.96.0.5", "fd00::5"], ports=[{"name": "http", "port": 80}]),
    service("db", headless=True, ports=[{"name": "pg", "port": 5432}]),
    endpoint_slice(
        "db-1",
        "db",
        [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2")],
        ports=[{"name": "pg", "port": 15432}],
    ),
    endpoint_slice(
        "db-2",
        "db",
        [endpoint("fd00::1:2")],
        address_type="IPv6",
        ports=[{"name": "pg", "port": 15432}],
    ),
    service("big", headless=True),
    endpoint_slice(
        "big-1", "big", [endpoint(f"10.2.{i // 200}.{i % 200 + 1}") for i in range(100)]
    ),
    service("ext", external_name="www.example.org"),
]


@pytest.fixture
async def dnsd(start_dnsd):
    return await start_dnsd(CLUSTER, "--tcp-idle-timeout", "0.5", "--tcp-max-connections", "4")


async def test_clusterip_a_and_aaaa_over_udp(dnsd):
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}", "A")) == ["10.96.0.5"]
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}", "AAAA")) == ["fd00::5"]


async def test_clusterip_srv_with_glue(dnsd):
    msg = await ask(dnsd.port, f"_http._tcp.web.default.svc.{Z}", "SRV")
    # Dual-stack: CoreDNS's SRV() counts both ClusterIPs' records and answers one: 100 / 2.
    assert rdatas(msg) == [f"0 50 80 web.default.svc.{Z}."]
    assert sorted(r for _, _, r in records(msg, "additional")) == ["10.96.0.5", "fd00::5"]


async def test_headless_a_aaaa_endpoint_names_and_srv(dnsd):
    assert rdatas(await ask(dnsd.port, f"db.default.svc.{Z}")) == ["10.1.0.1", "10.1.0.2"]
    assert rdatas(await ask(dnsd.port, f"db.default.svc.{Z}", "AAAA")) == ["fd00::1:2"]
    assert rdatas(await ask(dnsd.port, f"db-0.db.default.svc.{Z}")) == ["10.1.0.1"]
    assert rdatas(await ask(dnsd.port, f"fd00--1-2.db.default.svc.{Z}", "AAAA")) == ["fd00::1:2"]
    srv = await ask(dnsd.port, f"_pg._tcp.db.default.svc.{Z}", "SRV")
    assert rdatas(srv) == [
        f"0 33 15432 10-1-0-2.db.default.svc.{Z}.",
        f"0 33 15432 db-0.db.default.svc.{Z}.",
        f"0 33 15432 fd00--1-2.db.default.svc.{Z}.",
    ]
    assert len(records(srv, "additional")) == 3


async def test_ptr_for_ipv4_and_ipv6_cluster_ips_and_endpoints(dnsd):
    assert rdatas(await ask(dnsd.port, "5.0.96.10.in-addr.arpa", "PTR")) == [
        f"web.default.svc.{Z}."
    ]
    v6 = "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa"
    assert rdatas(await ask(dnsd.port, v6, "PTR")) == [f"web.default.svc.{Z}."]
    assert rdatas(await ask(dnsd.port, "1.0.1.10.in-addr.arpa", "PTR")) == [
        f"db-0.db.default.svc.{Z}."
    ]


async def test_external_name_chases_the_target_through_the_real_forwarder(dnsd):
    msg = await ask(dnsd.port, f"ext.default.svc.{Z}")
    assert records(msg) == [
        (f"ext.default.svc.{Z}", "CNAME", "www.example.org."),
        ("www.example.org", "A", "192.0.2.80"),
    ]


async def test_other_names_are_forwarded_upstream(dnsd):
    assert rdatas(await ask(dnsd.port, "db.example.org")) == ["192.0.2.5"]
    assert (await ask(dnsd.port, "nothing.example.org")).rcode() == dns.rcode.NXDOMAIN


async def test_nxdomain_and_nodata_carry_the_soa(dnsd):
    nx = await ask(dnsd.port, f"nope.default.svc.{Z}")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority[0][0].minimum == 5
    nodata = await ask(dnsd.port, f"web.default.svc.{Z}", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority


async def test_mixed_case_question_is_echoed_byte_for_byte(dnsd):
    query = dns.message.make_query(f"wEb.DeFaUlT.SvC.{Z}", "A")
    answer = await asyncio.to_thread(raw_udp, dnsd.port, query.to_wire())
    assert answer is not None
    end = len(query.to_wire())
    assert answer[12:end] == query.to_wire()[12:end]


async def test_large_headless_answer_is_truncated_over_udp_and_whole_over_tcp(dnsd):
    plain = await ask(dnsd.port, f"big.default.svc.{Z}")
    assert plain.flags & dns.flags.TC and len(plain.to_wire()) <= 512
    edns = await ask(dnsd.port, f"big.default.svc.{Z}", edns=0, payload=1232)
    assert edns.flags & dns.flags.TC and edns.edns == 0
    full = await ask(dnsd.port, f"big.default.svc.{Z}", tcp=True)
    assert len(rdatas(full)) == 100 and not full.flags & dns.flags.TC


async def test_edns_payload_size_larger_answers_fit_without_tc(dnsd):
    msg = await ask(dnsd.port, f"_pg._tcp.db.default.svc.{Z}", "SRV", edns=0, payload=1232)
    assert not msg.flags & dns.flags.TC and msg.edns == 0 and len(msg.answer[0]) == 3


async def _tcp_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _read_message(reader: asyncio.StreamReader) -> dns.message.Message:
    length = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2))[0]
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), 2))


async def test_tcp_answers_pipelined_queries_on_one_connection(dnsd):
    reader, writer = await _tcp_connect(dnsd.port)
    names = [f"web.default.svc.{Z}", f"db.default.svc.{Z}", f"nope.default.svc.{Z}"]
    queries = [dns.message.make_query(n, "A") for n in names]
    writer.write(b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries)))
    answers = {}
    for _ in queries:
        msg = await _read_message(reader)
        answers[msg.id] = msg
    assert answers[queries[0].id].answer and answers[queries[1].id].answer
    assert answers[queries[2].id].rcode() == dns.rcode.NXDOMAIN
    writer.close()


async def test_tcp_giant_length_prefix_closes_the_connection(dnsd):
    reader, writer = await _tcp_connect(dnsd.port)
    writer.write(b"\xff\xff" + b"\x00" * 20)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}", tcp=True)) == ["10.96.0.5"]


async def test_idle_tcp_clients_are_disconnected(dnsd):
    reader, writer = await _tcp_connect(dnsd.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    assert 0.3 < loop.time() - started < 2.5
    writer.close()


async def test_slow_tcp_client_trickling_bytes_is_disconnected(dnsd):
    reader, writer = await _tcp_connect(dnsd.port)
    query = dns.message.make_query(f"web.default.svc.{Z}", "A").to_wire()
    framed = struct.pack("!H", len(query)) + query
    closed = False
    for byte in framed[:-1]:
        writer.write(bytes([byte]))
        await asyncio.sleep(0.1)
        if reader.at_eof():
            closed = True
            break
    if not closed:
        assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_tcp_connections_beyond_the_limit_are_closed(dnsd):
    held = [await _tcp_connect(dnsd.port) for _ in range(4)]
    await asyncio.sleep(0.05)
    reader, writer = await _tcp_connect(dnsd.port)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    for _, w in held:
        w.close()
    writer.close()
    await asyncio.sleep(0.1)
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}", tcp=True)) == ["10.96.0.5"]


async def test_malformed_udp_packets_get_formerr_or_silence(dnsd):
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 0, 0, 0, 0)
    formerr = await asyncio.to_thread(raw_udp, dnsd.port, header)
    assert formerr is not None and formerr[:2] == b"\xbe\xef" and formerr[3] & 0xF == 1
    assert await asyncio.to_thread(raw_udp, dnsd.port, b"\x01\x02\x03", timeout=0.3) is None
    response_bit = struct.pack("!HHHHHH", 1, 0x8100, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01"
    assert await asyncio.to_thread(raw_udp, dnsd.port, response_bit, timeout=0.3) is None
    notimp = await asyncio.to_thread(
        raw_udp, dnsd.port, struct.pack("!HHHHHH", 2, 0x2800, 1, 0, 0, 0) + b"\x00\x00\x01"
    )
    assert notimp is not None and notimp[3] & 0xF == 4
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}")) == ["10.96.0.5"]


async def test_manifest_change_is_visible_in_the_next_answer(dnsd):
    changed = [o for o in CLUSTER if o["metadata"]["name"] != "web"]
    await dnsd.replace(
        [*changed, service("web", ips=["10.96.0.9"]), service("new", ips=["10.96.0.7"])]
    )
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}")) == ["10.96.0.9"]
    assert rdatas(await ask(dnsd.port, f"new.default.svc.{Z}")) == ["10.96.0.7"]
    await dnsd.replace([o for o in changed if o["metadata"]["name"] != "db-1"])
    assert (await ask(dnsd.port, f"new.default.svc.{Z}")).rcode() == dns.rcode.NXDOMAIN
    assert rdatas(await ask(dnsd.port, f"db.default.svc.{Z}", "AAAA")) == ["fd00::1:2"]
    assert (await ask(dnsd.port, f"db-0.db.default.svc.{Z}")).rcode() == dns.rcode.NXDOMAIN


async def test_readyz_and_metrics(dnsd):
    await ask(dnsd.port, f"web.default.svc.{Z}")
    await ask(dnsd.port, f"nope.default.svc.{Z}")
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{dnsd.http_port}"
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    assert 'dnsd_dns_requests_total{proto="udp",type="A"}' in text
    assert 'dnsd_dns_responses_total{proto="udp",rcode="NXDOMAIN"}' in text
    assert "dnsd_dns_request_duration_seconds_bucket" in text
    assert "dnsd_zone_answers" in text


async def test_before_the_first_sync_cluster_names_are_servfail_and_not_ready(start_dnsd):
    run = await start_dnsd(None, wait=False)
    assert run.daemon.readiness()[0] is False
    msg = await ask(run.port, f"web.default.svc.{Z}")
    assert msg.rcode() == dns.rcode.SERVFAIL
    assert rdatas(await ask(run.port, "db.example.org")) == ["192.0.2.5"]  # forwarding works
    await run.replace(CLUSTER)
    assert run.daemon.readiness()[0] is True
    assert rdatas(await ask(run.port, f"web.default.svc.{Z}")) == ["10.96.0.5"]


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
async def test_dig_sees_an_authoritative_answer_and_tcp_fallback(dnsd):
    def dig(*args: str) -> str:
        return subprocess.run(
            ["dig", "-p", str(dnsd.port), "@127.0.0.1", "+time=2", "+tries=1", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout

    out = await asyncio.to_thread(dig, f"web.default.svc.{Z}", "A")
    assert "status: NOERROR" in out and "flags: qr aa rd" in out and "10.96.0.5" in out
    out = await asyncio.to_thread(dig, "+noedns", "+ignore", f"big.default.svc.{Z}")
    assert " tc" in out.split("flags:")[1].split(";")[0]
    out = await asyncio.to_thread(dig, "+noedns", f"big.default.svc.{Z}")  # retries over TCP
    assert "Truncated, retrying in TCP mode" in out and "ANSWER: 100," in out
    out = await asyncio.to_thread(dig, "-x", "10.96.0.5")
    assert f"web.default.svc.{Z}." in out


async def test_ipv6_listener(start_dnsd):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    run = await start_dnsd(CLUSTER, "--listen", "[::1]:0")
    bound = dict(run.daemon.server.bound)
    port6 = bound["::1"]
    msg = await ask(port6, f"web.default.svc.{Z}", host="::1")
    assert rdatas(msg) == ["10.96.0.5"]


async def test_sampled_query_log_names_the_query(start_dnsd):
    from structlog.testing import capture_logs

    run = await start_dnsd(CLUSTER, "--query-log-sample", "1")
    with capture_logs() as logs:
        await ask(run.port, f"web.default.svc.{Z}", "AAAA")
    entries = [e for e in logs if e["event"] == "query"]
    assert entries and entries[0]["name"] == f"web.default.svc.{Z}"
    assert entries[0]["type"] == 28 and entries[0]["rcode"] == 0 and entries[0]["proto"] == "udp"


async def test_record_options_reach_the_zone(start_dnsd):
    objs = [
        *CLUSTER,
        namespace("hidden"),
        service("web", "hidden", ips=["10.96.1.1"]),
        service("lonely", ips=["10.96.0.77"]),
        service("named", headless=True),
        endpoint_slice("named-1", "named", [endpoint("10.4.0.1", pod="named-pod-0")]),
    ]
    run = await start_dnsd(
        objs,
        "--ignore-empty-service",
        "--endpoint-pod-names",
        "--pods",
        "insecure",
        "--zone",
        Z,
        "--zone",
        "example.internal",
        "--ttl",
        "30",
        "--namespaces",
        "default",
    )
    port = run.port
    assert (await ask(port, f"lonely.default.svc.{Z}")).rcode() == dns.rcode.NXDOMAIN
    assert (await ask(port, f"web.hidden.svc.{Z}")).rcode() == dns.rcode.NXDOMAIN
    assert rdatas(await ask(port, f"named-pod-0.named.default.svc.{Z}")) == ["10.4.0.1"]
    assert rdatas(await ask(port, "10-9-9-9.default.pod.example.internal")) == ["10.9.9.9"]
    msg = await ask(port, "db.default.svc.example.internal")
    assert rdatas(msg) == ["10.1.0.1", "10.1.0.2"] and msg.answer[0].ttl == 30


def _burst(port: int, packets: list[bytes]) -> list[bytes]:
    """Send every packet before reading anything, then collect the answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.settimeout(2.0)
        for packet in packets:
            sock.sendto(packet, ("127.0.0.1", port))
        answers = []
        try:
            while len(answers) < len(packets):
                answers.append(sock.recv(65535))
        except TimeoutError:
            pass
        return answers


async def test_a_burst_is_answered_in_full(dnsd):
    count = 529
    packets = [
        dns.message.make_query(f"web.default.svc.{Z}", "A", id=i).to_wire() for i in range(count)
    ]
    answers = await asyncio.to_thread(_burst, dnsd.port, packets)
    assert sorted(struct.unpack("!H", a[:2])[0] for a in answers) == list(range(count))
    assert all(a[3] & 0xF == 0 for a in answers)


async def test_udp_answers_wait_for_a_full_send_buffer():
    """An answer that meets EAGAIN is queued and sent once the socket is writable."""
    from dnsd.handler import Handler
    from dnsd.server import UdpListener
    from dnsd.zone import ZoneIndex

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(2.0)
    listener = UdpListener(server, Handler(ZoneIndex([Z], 5)), 0.0)
    listener.start(asyncio.get_running_loop())
    try:
        addr = client.getsockname()
        listener._queue(b"first", addr)
        listener._queue(b"second", addr)
        assert await asyncio.to_thread(client.recv, 100) == b"first"
        assert await asyncio.to_thread(client.recv, 100) == b"second"
        assert not listener._backlog
    finally:
        listener.close()
        client.close()


@pytest.mark.parametrize("batch", [0, 64], ids=["recvfrom", "recvmmsg"])
async def test_a_mixed_burst_is_answered_on_either_udp_path(dnsd, batch):
    """Precomputed answers (the UDP thread), a forwarded name and a malformed message (both
    handed to the event loop) interleaved in one burst: each gets its own answer."""
    from dnsd.server import UdpListener

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    listener = UdpListener(sock, dnsd.daemon.handler, 0.0, batch=batch)
    listener.start(asyncio.get_running_loop())
    try:
        fast = [
            dns.message.make_query(f"wEb.default.svc.{Z}", "A", id=i).to_wire() for i in range(150)
        ]
        forwarded = dns.message.make_query("www.example.org", "A", id=1000).to_wire()
        malformed = b"\x03\xe9" + b"\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00"  # 2 questions, none
        packets = [*fast[:70], forwarded, malformed, *fast[70:]]
        port = sock.getsockname()[1]
        answers = {a[:2]: a for a in await asyncio.to_thread(_burst, port, packets)}
        assert len(answers) == 152
        for packet in fast:
            msg = dns.message.from_wire(answers[packet[:2]])
            assert msg.question[0].name.to_text() == f"wEb.default.svc.{Z}."  # 0x20 kept
            assert rdatas(msg) == ["10.96.0.5"]
        assert rdatas(dns.message.from_wire(answers[forwarded[:2]])) == ["192.0.2.80"]
        assert answers[malformed[:2]][3] & 0xF == dns.rcode.FORMERR
    finally:
        listener.close()


async def test_an_oversized_datagram_is_dropped_and_counted(dnsd):
    """recvmmsg reads at most 4 KiB per datagram: a bigger one is no DNS query we answer."""
    from dnsd import udpbatch

    if not udpbatch.available():
        pytest.skip("recvmmsg is not available here")
    query = dns.message.make_query(f"web.default.svc.{Z}", "A", id=7).to_wire()
    big = query + b"\x00" * (udpbatch.MAX_QUERY + 100)
    assert await asyncio.to_thread(raw_udp, dnsd.port, big, 0.3) is None
    assert dnsd.daemon.stats.dropped.get("udp_oversized") == 1
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}", "A")) == ["10.96.0.5"]


# --- handing the port to a successor (rolling update with a surge) ---------------------------


def _group_member(kind: int, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    sock.setblocking(False)
    return sock


def _udp_spread(members: list[socket.socket], port: int, count: int = 64) -> list[int]:
    """Datagrams from `count` fresh source ports: how many each member received."""
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"q", ("127.0.0.1", port))
    time.sleep(0.05)
    got = []
    for sock in members:
        n = 0
        while True:
            try:
                sock.recv(16)
            except BlockingIOError:
                break
            n += 1
        got.append(n)
    return got


def test_steering_sends_a_udp_group_to_its_newest_member_for_good():
    old = _group_member(socket.SOCK_DGRAM)
    port = old.getsockname()[1]
    new = _group_member(socket.SOCK_DGRAM, port)
    try:
        spread = _udp_spread([old, new], port)
        assert sum(spread) == 64 and min(spread) > 0, spread  # the kernel's hash: both
        server_mod.steer_to_newest(old)
        assert _udp_spread([old, new], port) == [0, 64]
        old.close()  # the successor alone: the program has no index 1, the hash serves it
        assert _udp_spread([new], port) == [64]
        newest = _group_member(socket.SOCK_DGRAM, port)  # the next rollout's successor
        try:
            assert _udp_spread([new, newest], port) == [0, 64]
        finally:
            newest.close()
    finally:
        old.close()
        new.close()


def test_steering_sends_new_tcp_connections_to_the_newest_listener():
    old = _group_member(socket.SOCK_STREAM)
    port = old.getsockname()[1]
    new = _group_member(socket.SOCK_STREAM, port)
    clients = []
    try:
        server_mod.steer_to_newest(old)
        for _ in range(32):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        time.sleep(0.05)
        accepted = []
        for sock in (old, new):
            n = 0
            while True:
                try:
                    sock.accept()[0].close()
                except BlockingIOError:
                    break
                n += 1
            accepted.append(n)
        assert accepted == [0, 32]
    finally:
        for client in clients:
            client.close()
        old.close()
        new.close()


def test_port_in_use_sees_another_holder_of_the_udp_port():
    holder = _group_member(socket.SOCK_DGRAM)
    try:
        port = holder.getsockname()[1]
        assert server_mod.port_in_use(socket.AF_INET, "127.0.0.1", port)
    finally:
        holder.close()
    assert not server_mod.port_in_use(socket.AF_INET, "127.0.0.1", port)
    assert not server_mod.port_in_use(socket.AF_INET, "127.0.0.1", 0)
