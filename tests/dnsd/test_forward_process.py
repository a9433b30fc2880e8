"""--forward-process: forwarded names answered by a child process from dnsd's own socket,
every other answer unchanged, the child's metrics in the parent's /metrics, and the child
restarted (forwarding never lost) when it dies."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from dnsd import forward_channel as channel
from dnsd import forward_process
from dnsd.forward_process import PROCESS_RESTARTS
from tests.dnsd.conftest import Running
from tests.dnsd.helpers import (
    endpoint,
    endpoint_slice,
    free_udp_tcp_port,
    namespace,
    service,
    write_manifest,
)

Z = "cluster.local"

CLUSTER = [
    namespace("default"),
    service("web", ips=["10.96.0.5", "fd00::5"], ports=[{"name": "http", "port": 80}]),
    service("db", headless=True, ports=[{"name": "pg", "port": 5432}]),
    endpoint_slice("db-1", "db", [endpoint("10.1.0.1", hostname="db-0")]),
    service("ext", external_name="www.example.org"),
]


def make(name: str, rdtype: str = "A", **edns: object) -> bytes:
    """A query's wire form, ID fixed so two servers' answers compare byte for byte."""
    query = dns.message.make_query(name, rdtype, **edns)  # type: ignore[arg-type]
    query.id = 0x4242
    return query.to_wire()


def exchange(port: int, packet: bytes, timeout: float = 1.0) -> tuple[bytes, object] | None:
    """One datagram to 127.0.0.1:port; the answer and the address it came from (None: no
    answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, ("127.0.0.1", port))
        try:
            return sock.recvfrom(65535)
        except TimeoutError:
            return None


def comparable(answer: bytes) -> str:
    """An answer as text with every SOA serial 0 (bytes when dnspython cannot read it)."""
    try:
        message = dns.message.from_wire(answer)
    except dns.exception.DNSException:
        return answer.hex()
    for section in (message.answer, message.authority):
        for rrset in section:
            if rrset.rdtype == dns.rdatatype.SOA:
                soa = [rdata.replace(serial=0) for rdata in rrset]
                rrset.clear()
                for rdata in soa:
                    rrset.add(rdata)
    return message.to_text()


def raw(wire_name: bytes, qtype: int = 1, qclass: int = 1, opt: bytes | None = None) -> bytes:
    """A query for a wire name as given (labels dnspython would escape or refuse), with an
    OPT record's bytes after the question if `opt`."""
    header = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0 if opt is None else 1)
    return header + wire_name + struct.pack("!HH", qtype, qclass) + (opt or b"")


def opt(version: int = 0, options: bytes = b"", size: int = 1232) -> bytes:
    return b"\x00" + struct.pack("!HHBBHH", 41, size, 0, version, 0, len(options)) + options


COOKIE = dns.edns.GenericOption(10, bytes(range(8)))
# Every kind of question whose answer must not change with the option (name, raw query).
CASES = {
    "forwarded": make("www.example.org"),
    "forwarded_mixed_case": make("WwW.ExAmPlE.oRg", "AAAA"),
    "forwarded_edns": make("db.example.org", use_edns=0, payload=1232),
    "forwarded_edns_cookie": make("www.example.org", use_edns=0, options=[COOKIE]),
    "forwarded_do_bit": make("www.example.org", use_edns=0, want_dnssec=True),
    "forwarded_nxdomain": make("nope.example.org"),
    "forwarded_truncated_plain": make("many.example.org"),
    "forwarded_truncated_edns_512": make("many.example.org", use_edns=0, payload=512),
    "forwarded_whole_edns_4096": make("many.example.org", use_edns=0, payload=4096),
    "forwarded_reverse_not_ours": make("9.9.168.192.in-addr.arpa", "PTR"),
    "forwarded_zone_bytes_inside_a_label": raw(b"\x0aab\x07cluster\x05local\x00"),
    "forwarded_zone_then_more_labels": make(f"{Z}.example.org", use_edns=0, options=[COOKIE]),
    "cluster_a": make(f"web.default.svc.{Z}"),
    "cluster_upper_case_cookie": make(f"WEB.default.SVC.{Z.upper()}", use_edns=0, options=[COOKIE]),
    "cluster_apex_upper_case_soa": make(Z.upper(), "SOA", use_edns=0, options=[COOKIE]),
    "reverse_cluster_ip_upper_case_cookie": make(
        "5.0.96.10.IN-ADDR.ARPA", "PTR", use_edns=0, options=[COOKIE]
    ),
    "cluster_edns_cookie": make(f"web.default.svc.{Z}", use_edns=0, options=[COOKIE]),
    "cluster_nxdomain": make(f"nope.default.svc.{Z}"),
    "cluster_nxdomain_cookie": make(f"nope.default.svc.{Z}", use_edns=0, options=[COOKIE]),
    "cluster_axfr_over_udp": make(Z, "AXFR"),
    "cluster_endpoint_name": make(f"10-1-0-1.web.default.svc.{Z}"),
    "cluster_srv": make(f"_http._tcp.web.default.svc.{Z}", "SRV"),
    "headless_endpoint": make(f"db-0.db.default.svc.{Z}"),
    "reverse_cluster_ip": make("5.0.96.10.in-addr.arpa", "PTR"),
    "reverse_cluster_ip_other_type": make("5.0.96.10.in-addr.arpa", "A"),
    "external_name_chase": make(f"ext.default.svc.{Z}"),
    "edns_version_1": make("www.example.org", use_edns=1),
    "class_chaos": make("www.example.org")[:-1] + b"\x03",
    "two_questions": struct.pack("!HHHHHH", 7, 0x0100, 2, 0, 0, 0)
    + b"\x03www\x07example\x03org\x00\x00\x01\x00\x01" * 2,
    "header_only": struct.pack("!HHHHHH", 0xBEEF, 0x0100, 0, 0, 0, 0),
    "notimp_opcode": struct.pack("!HHHHHH", 2, 0x2800, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01",
    "junk": b"\x01\x02\x03",
    "a_response": struct.pack("!HHHHHH", 1, 0x8100, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01",
}
FORWARDED = [name for name in CASES if name.startswith("forwarded")]


async def child_up(run: Running, within: float = 20.0) -> int:
    """Wait until the child answers forwarded names; its pid."""
    process = run.daemon.forward_process
    assert process is not None
    deadline = time.monotonic() + within
    while not any(listener.forwarding for listener in run.daemon.server._udp):
        assert time.monotonic() < deadline, "the forward process did not come up"
        await asyncio.sleep(0.05)
    assert process.pid is not None
    return process.pid


async def metrics(run: Running) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{run.http_port}/metrics") as resp,
    ):
        return await resp.text()


def value(text: str, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def counted(run: Running, sample: str, at_least: float, within: float = 5.0) -> str:
    """/metrics once `sample` reached `at_least` (the child reports every second)."""
    for _ in range(int(within / 0.1)):
        text = await metrics(run)
        if value(text, sample) >= at_least:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"{sample} stayed below {at_least}: {text}")


async def test_every_answer_is_the_same_with_and_without_the_forward_process(start_dnsd):
    # One at a time: one process has one /metrics.
    plain = await start_dnsd(CLUSTER, "--no-forward-process")
    wanted = {
        name: await asyncio.to_thread(exchange, plain.port, packet, 0.5)
        for name, packet in CASES.items()
    }
    plain_requests = dict(plain.daemon.stats.requests)
    await plain.daemon.stop()
    forked = await start_dnsd(CLUSTER, "--forward-process")
    await child_up(forked)
    for name, packet in CASES.items():
        want = wanted[name]
        got = await asyncio.to_thread(exchange, forked.port, packet, 0.5)
        if want is None:
            assert got is None, name
            continue
        assert got is not None, name
        if name in FORWARDED:
            assert got[0] == want[0], name  # byte for byte: ID, flags (TC), records, OPT
        else:  # the same but for the SOA serial: the time each zone was built
            assert comparable(got[0]) == comparable(want[0]), name
        assert got[1] == ("127.0.0.1", forked.port), name  # from dnsd's own address and port
    # The forwarded ones were the child's: the parent's own loop counted all but those.
    parent_counted = sum(forked.daemon.stats.requests.values())
    assert sum(plain_requests.values()) - parent_counted == len(FORWARDED)


async def test_forwarded_names_are_classified_exactly(start_dnsd):
    run = await start_dnsd(CLUSTER)
    forwards = run.daemon.handler.forwards
    assert [name for name, packet in CASES.items() if forwards(packet)] == FORWARDED


COOKIE_OPTION = struct.pack("!HH", 10, 8) + bytes(range(8))
# Names the UDP thread's label walk and bytes.endswith must classify as the parser does: a
# zone's bytes inside a label or not at a label boundary, upper case, apexes, reverse names.
TRICKY = {
    "zone_bytes_inside_a_label": b"\x0aab\x07cluster\x05local\x00",
    "zone_bytes_a_whole_label": b"\x0e\x07cluster\x05local\x00",
    "zone_then_more_labels": b"\x07cluster\x05local\x07example\x03org\x00",
    "zone_name_glued": b"\x0bevilcluster\x05local\x00",
    "zone_label_only": b"\x05local\x00",
    "apex": b"\x07cluster\x05local\x00",
    "apex_upper": b"\x07CLUSTER\x05LOCAL\x00",
    "service_upper": b"\x03WEB\x07DeFaUlT\x03SVC\x07CLUSTER\x05local\x00",
    "nxdomain_upper": b"\x04NOPE\x07default\x03svc\x07Cluster\x05Local\x00",
    "external_name": b"\x03ext\x07default\x03svc\x07cluster\x05local\x00",
    "reverse_owned": b"\x015\x010\x0296\x0210\x07in-addr\x04arpa\x00",
    "reverse_owned_upper": b"\x015\x010\x0296\x0210\x07IN-ADDR\x04ARPA\x00",
    "reverse_not_owned": b"\x019\x019\x03168\x03192\x07in-addr\x04arpa\x00",
    "reverse_apex": b"\x07in-addr\x04arpa\x00",
    "reverse_v6_not_owned": b"\x011" * 32 + b"\x03ip6\x04arpa\x00",
    "outside": b"\x03www\x07example\x03org\x00",
    "outside_upper": b"\x03WWW\x07EXAMPLE\x03ORG\x00",
    "root": b"\x00",
    "longest_name": (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00",
}
SHAPES = {
    "plain": lambda name, qtype: raw(name, qtype),
    "edns": lambda name, qtype: raw(name, qtype, opt=opt()),
    "cookie": lambda name, qtype: raw(name, qtype, opt=opt(options=COOKIE_OPTION)),
    "edns_version_1": lambda name, qtype: raw(name, qtype, opt=opt(1, COOKIE_OPTION)),
    "chaos": lambda name, qtype: raw(name, qtype, qclass=3),
    "trailing_byte": lambda name, qtype: raw(name, qtype) + b"\x00",
    "opt_trailing_byte": lambda name, qtype: raw(name, qtype, opt=opt()) + b"\x00",
    "opt_cut_short": lambda name, qtype: raw(name, qtype, opt=opt(options=COOKIE_OPTION))[:-1],
}


def _forwarded_by_full(cluster, packet: bytes) -> bool:
    """Did `Handler.full` answer `packet` by forwarding it (the ground truth)?"""

    async def ask() -> None:
        result = cluster.handler.full(packet)
        if not isinstance(result, bytes | None):
            await result

    before = len(cluster.upstream.forwarded)
    asyncio.run(ask())
    return len(cluster.upstream.forwarded) > before and not cluster.upstream.resolved


def test_the_cheap_classifier_agrees_with_the_parser_and_with_full_on_tricky_names():
    from tests.dnsd.test_handler import Cluster

    cluster = Cluster(CLUSTER)
    handler = cluster.handler
    assert handler.index.zone_suffixes == (b"\x07cluster\x05local\x00",)
    wrong = []
    for name, wire_name in TRICKY.items():
        for qtype in (1, 12, 28, 6, 252):
            for shape, build in SHAPES.items():
                packet = build(wire_name, qtype)
                cheap, parsed = handler.forwards(packet), handler._forwards_parsed(packet)
                cluster.upstream.resolved.clear()
                truth = _forwarded_by_full(cluster, packet)
                if not cheap == parsed == truth:
                    wrong.append((name, qtype, shape, cheap, parsed, truth))
    assert wrong == []
    # The cases above cover both answers, in the zone and out of it.
    cookie = SHAPES["cookie"]
    assert handler.forwards(cookie(TRICKY["zone_bytes_inside_a_label"], 1))
    assert handler.forwards(cookie(TRICKY["reverse_not_owned"], 12))
    for name in ("apex_upper", "service_upper", "nxdomain_upper", "reverse_owned_upper"):
        assert not handler.forwards(cookie(TRICKY[name], 12 if "reverse" in name else 1)), name


def test_the_cheap_classifier_agrees_with_the_parser_on_damaged_packets():
    from tests.dnsd.test_handler import Cluster

    handler = Cluster(CLUSTER).handler
    rng = random.Random(5)
    seeds = [build(wire_name, 1) for wire_name in TRICKY.values() for build in SHAPES.values()]
    seeds += [packet for packet in CASES.values()]
    for _ in range(20_000):
        packet = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(packet) or 1)
            action = rng.random()
            if not packet:
                packet.append(rng.randrange(256))
            elif action < 0.6:
                packet[at] = rng.choice((0, 1, 3, 7, 41, 63, 64, 0xC0, rng.randrange(256)))
            elif action < 0.8:
                del packet[at:]
            else:
                packet[at:at] = bytes((rng.randrange(256),))
        data = bytes(packet)
        assert handler.forwards(data) == handler._forwards_parsed(data), data.hex()


async def test_the_childs_counts_are_in_the_parents_metrics(start_dnsd):
    run = await start_dnsd(CLUSTER, "--forward-process")
    await child_up(run)
    for i in range(5):  # distinct names: five upstream exchanges
        answer = await asyncio.to_thread(exchange, run.port, make(f"n{i}.example.org"))
        assert answer is not None and answer[0][3] & 0x0F == dns.rcode.NXDOMAIN
    assert not run.daemon.stats.requests  # not the parent's
    upstream = f'dnsd_forward_requests_total{{to="127.0.0.1:{run.upstream.port}"}}'
    text = await counted(run, upstream, 5)
    assert value(text, 'dnsd_dns_requests_total{proto="udp",type="A"}') >= 5
    assert value(text, 'dnsd_dns_responses_total{proto="udp",rcode="NXDOMAIN"}') >= 5
    assert value(text, "dnsd_cache_misses_total") >= 5
    assert value(text, "dnsd_forward_process_up") == 1
    # Each family once, however many processes fed it.
    families = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(families) == len(set(families))


async def test_a_killed_child_is_replaced_and_forwarding_goes_on_meanwhile(start_dnsd):
    run = await start_dnsd(CLUSTER, "--forward-process")
    first = await child_up(run)
    restarts = PROCESS_RESTARTS._value.get()
    for i in range(3):
        assert await asyncio.to_thread(exchange, run.port, make(f"c{i}.example.org"))
    sample = 'dnsd_dns_requests_total{proto="udp",type="A"}'
    await counted(run, sample, 3)  # the child's next snapshot
    os.kill(first, signal.SIGKILL)
    # (Queries the child had taken but not answered die with it, as in any crashed server.)
    assert await asyncio.to_thread(_gone, first)
    # Answered all along: by the parent's loop while no child is up.
    for i in range(20):
        answer = await asyncio.to_thread(exchange, run.port, make(f"k{i}.example.org"))
        assert answer is not None and answer[1] == ("127.0.0.1", run.port), i
        await asyncio.sleep(0.05)
    second = await child_up(run)
    assert second != first
    assert PROCESS_RESTARTS._value.get() == restarts + 1
    assert run.daemon.liveness() == (True, "ok")
    # What the first child counted stays counted: 3 by it, 20 by the parent meanwhile.
    await counted(run, sample, 23)  # (the second child reports every second)
    answer = await asyncio.to_thread(exchange, run.port, make("www.example.org"))
    assert answer is not None and answer[0][3] & 0x0F == dns.rcode.NOERROR


async def test_healthz_fails_while_no_child_comes_up_and_forwarding_goes_on(
    start_dnsd, monkeypatch
):
    monkeypatch.setattr(forward_process, "START_TIMEOUT", 0.5)
    monkeypatch.setattr(forward_process.sys, "executable", "/bin/false")  # exits at once
    run = await start_dnsd(CLUSTER, "--forward-process")
    assert run.daemon.liveness() == (True, "ok")  # a restart is due, not overdue
    for _ in range(100):
        if not run.daemon.liveness()[0]:
            break
        await asyncio.sleep(0.05)
    assert run.daemon.liveness() == (False, "forward process is not running")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{run.http_port}/healthz") as resp,
    ):
        assert resp.status == 503
    answer = await asyncio.to_thread(exchange, run.port, make("www.example.org"))
    assert answer is not None and answer[0][3] & 0x0F == dns.rcode.NOERROR
    assert forward_process.PROCESS_UP._value.get() == 0


async def test_a_child_that_cannot_keep_up_sheds_and_counts(start_dnsd):
    run = await start_dnsd(CLUSTER, "--forward-process")
    pid = await child_up(run)
    os.kill(pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(4000):
                sock.sendto(make(f"s{i}.example.org"), ("127.0.0.1", run.port))
                if i % 200 == 0:
                    await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        # Cluster names are still answered by the parent's threads.
        answer = await asyncio.to_thread(exchange, run.port, make(f"web.default.svc.{Z}"))
        assert answer is not None and answer[0][3] & 0x0F == dns.rcode.NOERROR
        text = await metrics(run)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert value(text, 'dnsd_dns_dropped_total{reason="forward_queue_full"}') > 0


def test_merge_adds_counters_and_keeps_each_family_once():
    from prometheus_client.metrics_core import Metric

    own = Metric("dnsd_forward_requests", "Queries", "counter")
    own.add_sample("dnsd_forward_requests_total", {"to": "a"}, 2.0)
    own.add_sample("dnsd_forward_requests_created", {"to": "a"}, 100.0)
    healthy = Metric("dnsd_forward_upstream_healthy", "1 if healthy", "gauge")
    healthy.add_sample("dnsd_forward_upstream_healthy", {"to": "a"}, 1.0)
    child: list[channel.Family] = [
        (
            "dnsd_forward_requests",
            "counter",
            "Queries",
            [
                ("dnsd_forward_requests_total", {"to": "a"}, 5.0),
                ("dnsd_forward_requests_created", {"to": "a"}, 50.0),
                ("dnsd_forward_requests_total", {"to": "b"}, 1.0),
            ],
        ),
        ("dnsd_forward_upstream_healthy", "gauge", "1 if healthy", [
            ("dnsd_forward_upstream_healthy", {"to": "a"}, 0.0)]),
        ("dnsd_cache_entries", "gauge", "held", [("dnsd_cache_entries", {}, 3.0)]),
    ]  # fmt: skip
    ended = channel.retire([], child)
    assert [f[0] for f in ended] == ["dnsd_forward_requests"]  # gauges do not outlive it
    merged = {
        m.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in m.samples}
        for m in channel.merge([own, healthy], child, ended)
    }
    requests = merged["dnsd_forward_requests"]
    assert requests[("dnsd_forward_requests_total", (("to", "a"),))] == 2 + 5 + 5
    assert requests[("dnsd_forward_requests_total", (("to", "b"),))] == 2
    assert requests[("dnsd_forward_requests_created", (("to", "a"),))] == 50
    assert merged["dnsd_forward_upstream_healthy"] == {
        ("dnsd_forward_upstream_healthy", (("to", "a"),)): 0
    }
    assert merged["dnsd_cache_entries"] == {("dnsd_cache_entries", ()): 3}
    message = channel.metrics_message(child)
    assert channel.read_metrics(message) == child


def test_query_messages_round_trip_split_by_size_and_refuse_garbage():
    v4, v6 = bytes(range(16)), bytes(range(28))
    queries = [(v4, b"q" * 100), (v6, b"r" * 300), (v4, b"")]
    ((message, count),) = channel.query_messages(3, queries)
    assert count == 3 and channel.read_queries(message) == (3, queries)
    split = channel.query_messages(1, queries * 10, limit=1000)
    assert len(split) > 1 and all(len(m) <= 1000 for m, _ in split)
    assert sum(count for _, count in split) == 30
    assert [q for m, _ in split for q in channel.read_queries(m)[1]] == queries * 10
    for garbage in (b"Q\x00\x10short", message[:-1], b"M{}", b""):
        with pytest.raises(ValueError):
            channel.read_queries(garbage)


# --- the dnsd command -------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "zombie" in status.read_text():
            return True
        time.sleep(0.05)
    return False


def _forward_children(pid: int) -> list[int]:
    return [
        p
        for p in _children(pid)
        if b"dnsd.forward_child" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]


def test_each_worker_has_its_own_child_and_none_outlives_dnsd(tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", CLUSTER)
    log = (tmp_path / "dnsd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dnsd.main", "--manifests", str(manifest),
         "--listen", f"127.0.0.1:{free_udp_tcp_port()}", "--http-listen", "127.0.0.1:0",
         "--upstream", f"127.0.0.1:{free_udp_tcp_port()}", "--log-format", "json",
         "--forward-process", "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            workers = _children(proc.pid)
            children = [c for p in [proc.pid, *workers] for c in _forward_children(p)]
            if len(children) == 2:
                break
            assert proc.poll() is None and time.monotonic() < deadline, children
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert all(_gone(pid) for pid in [*children, *workers])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_no_child_outlives_dnsd(tmp_path, stop):
    manifest = write_manifest(tmp_path / "m.yaml", CLUSTER)
    port = free_udp_tcp_port()
    log = (tmp_path / "dnsd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dnsd.main", "--manifests", str(manifest),
         "--listen", f"127.0.0.1:{port}", "--http-listen", "127.0.0.1:0",
         "--upstream", f"127.0.0.1:{free_udp_tcp_port()}", "--forward-timeout", "0.2",
         "--log-format", "json", "--forward-process", "--forward-nice", "5"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (children := _children(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        (child,) = children
        while b"forward_process_started" not in (tmp_path / "dnsd.log").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, child) == 5
        assert os.sched_getscheduler(child) == os.SCHED_IDLE  # --forward-idle, the default
        proc.send_signal(stop)
        proc.wait(10)
        assert _gone(child), (tmp_path / "dnsd.log").read_text()[-3000:]
        if stop == signal.SIGTERM:
            assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_the_child_imports_neither_the_settings_model_nor_the_api_models():
    """It is started on every node by default: what it imports is memory it holds (the whole
    settings model made it as large as dnsd itself, 57 MB, where it is now about 33)."""
    heavy = ["pydantic", "kwatch.models", "kwatch.settings", "dnsd.settings", "aiohttp", "yaml"]
    code = (
        f"import sys, dnsd.forward_child; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
