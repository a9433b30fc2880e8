"""Bad input: random and mutated packets, as a property of Handler and as a flood over UDP."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsd import wire
from dnsd.handler import PodMode
from tests.dnsd.helpers import (
    endpoint,
    endpoint_slice,
    free_udp_tcp_port,
    namespace,
    service,
    write_manifest,
)
from tests.dnsd.test_handler import BASIC, Cluster

Z = "cluster.local"
NAMES = [
    f"web.default.svc.{Z}",
    f"db.default.svc.{Z}",
    f"_pg._tcp.db.default.svc.{Z}",
    f"nope.default.svc.{Z}",
    f"ext.default.svc.{Z}",
    "5.0.96.10.in-addr.arpa",
    f"DB-0.db.Default.svc.{Z}",
    f"dns-version.{Z}",
    Z,
]
TYPES = ["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "MX", "ANY"]


def corpus(rng: random.Random) -> list[bytes]:
    out = []
    for name in NAMES:
        for rdtype in TYPES:
            edns = rng.choice([None, 0, 0, 1])
            q = dns.message.make_query(
                name,
                rdtype,
                use_edns=edns if edns is not None else False,
                payload=rng.choice([512, 1232, 4096, 65535]),
            )
            out.append(q.to_wire())
    return out


def mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    kind = rng.randrange(7)
    if kind == 0:  # flip a few bytes anywhere
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data)) :]
    elif kind == 2:  # garbage appended
        data += os.urandom(rng.randint(1, 40))
    elif kind == 3:  # random header counts and flags
        struct.pack_into(
            "!HHHHH",
            data,
            2,
            rng.randrange(65536),
            rng.randrange(4),
            rng.randrange(4),
            rng.randrange(4),
            rng.randrange(4),
        )
    elif kind == 4:  # a compression pointer (loop or forward) inside the question
        pos = rng.randrange(12, max(13, len(data) - 2))
        data[pos : pos + 2] = struct.pack("!H", 0xC000 | rng.choice([12, pos, pos + 2, 0x3FFF]))
    elif kind == 5:  # a label length pointing past the end
        data[12] = rng.randrange(64, 256)
    else:  # pure noise
        return os.urandom(rng.randint(0, 600))
    return bytes(data)


# --- property: whatever arrives, Handler answers with a sane message or drops it ----------------

_CLUSTER = None
_LOOP = None
_CORPUS = corpus(random.Random(1))


def answer(data: bytes, tcp: bool) -> bytes | None:
    """Handler.handle, running a forwarded/chased query to completion on a private loop."""
    return finish(lambda: cluster().handler.handle(data, tcp))


def finish(handle: Callable[[], Any]) -> bytes | None:
    """Call the handler on a private loop (a forwarded name's future needs one) and run a
    forwarded / chased query to completion."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()

    async def run() -> bytes | None:
        result = handle()
        return result if result is None or isinstance(result, bytes) else await result

    return cast(bytes | None, _LOOP.run_until_complete(run()))


def cluster() -> Cluster:
    global _CLUSTER
    if _CLUSTER is None:
        _CLUSTER = Cluster(BASIC)
    return _CLUSTER


def check_response(query: bytes, response: bytes | None, tcp: bool) -> None:
    if response is None:
        return
    assert response[:2] == query[:2]  # ID echoed
    assert response[2] & 0x80  # QR set
    assert len(response) <= (65535 if tcp else 1232)
    msg = dns.message.from_wire(response, ignore_trailing=False)
    if not (query[2] & 0x80):
        assert msg.rcode() in (
            dns.rcode.NOERROR,
            dns.rcode.NXDOMAIN,
            dns.rcode.FORMERR,
            dns.rcode.NOTIMP,
            dns.rcode.REFUSED,
            dns.rcode.SERVFAIL,
            dns.rcode.BADVERS,
        )


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=0, max_size=700), st.booleans())
def test_random_bytes_never_break_the_handler(data, tcp):
    result = answer(data, tcp)
    if len(data) < 12:
        assert result is None
    else:
        check_response(data, result, tcp)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_mutated_queries_get_a_valid_answer_or_none(seed):
    rng = random.Random(seed)
    packet = mutate(rng, rng.choice(_CORPUS))
    tcp = rng.random() < 0.2
    result = answer(packet, tcp)
    if len(packet) >= 12:
        check_response(packet, result, tcp)


def test_udp_answers_never_exceed_the_clients_limit():
    big = [
        namespace("default"),
        service("big", headless=True),
        endpoint_slice("b", "big", [endpoint(f"10.3.0.{i}") for i in range(1, 201)]),
    ]
    c = Cluster(big)
    for payload in (None, 512, 700, 1232, 4096):
        q = dns.message.make_query(
            f"big.default.svc.{Z}",
            "A",
            use_edns=False if payload is None else 0,
            payload=payload or 512,
        )
        out = c.handler.handle(q.to_wire(), False)
        assert isinstance(out, bytes)
        assert len(out) <= min(payload or 512, 1232)
        assert dns.message.from_wire(out).flags & dns.flags.TC


# --- the flood: >= 100,000 packets at a dnsd process over real UDP ------------------------------

FLOOD_PACKETS = 100_000


def query_once(port: int, name: str, rdtype: str, timeout: float = 1.0) -> dns.message.Message:
    import dns.query

    return dns.query.udp(
        dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=timeout
    )


@pytest.fixture
def dnsd_process(tmp_path: Path):
    manifest = write_manifest(
        tmp_path / "m.yaml",
        [
            namespace("default"),
            service("web", ips=["10.96.0.5"], ports=[{"name": "http", "port": 80}]),
            service("db", headless=True, ports=[{"name": "pg", "port": 5432}]),
            endpoint_slice(
                "db-1",
                "db",
                [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2")],
                ports=[{"name": "pg", "port": 1}],
            ),
            service("ext", external_name="www.example.org"),
        ],
    )
    port = free_udp_tcp_port()
    dead = free_udp_tcp_port()  # nothing listens: forwarded names fail fast (ICMP)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dnsd.main",
            "--manifests",
            str(manifest),
            "--listen",
            f"127.0.0.1:{port}",
            "--http-listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{dead}",
            "--forward-timeout",
            "0.2",
            "--log-level",
            "error",
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if query_once(port, f"web.default.svc.{Z}", "A", 0.2).answer:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "dnsd did not come up"
            time.sleep(0.1)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_flood_of_random_and_mutated_packets_leaves_correct_answers(dnsd_process):
    proc, port = dnsd_process
    rng = random.Random(20261122)
    base = corpus(rng)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    sent = received = 0
    bad: list[str] = []
    started = time.monotonic()

    def drain() -> None:
        nonlocal received
        while True:
            try:
                response = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                return
            received += 1
            if not response[2] & 0x80 or len(response) > 1232:
                bad.append(response[:16].hex())
            else:
                try:
                    dns.message.from_wire(response)
                except Exception as err:  # pragma: no cover - reported below
                    bad.append(f"{err!r}: {response[:32].hex()}")

    while sent < FLOOD_PACKETS:
        for _ in range(250):
            packet = mutate(rng, rng.choice(base)) if rng.random() < 0.9 else rng.choice(base)
            try:
                sock.send(packet)
            except (BlockingIOError, ConnectionRefusedError):
                pass
            sent += 1
        time.sleep(0.004)  # let dnsd keep up (we are measuring robustness, not speed)
        drain()
        assert time.monotonic() - started < 60, f"flood too slow: {sent} sent"
    time.sleep(0.3)
    drain()
    sock.close()
    assert proc.poll() is None, "dnsd died under the flood"
    assert not bad, bad[:5]
    assert received > FLOOD_PACKETS // 4  # most got an answer (the rest: drops by design)
    # Correct answers still come back.
    assert [r.to_text() for r in query_once(port, f"web.default.svc.{Z}", "A").answer[0]] == [
        "10.96.0.5"
    ]
    srv = query_once(port, f"_pg._tcp.db.default.svc.{Z}", "SRV")
    assert len(srv.answer[0]) == 2
    assert query_once(port, f"nope.default.svc.{Z}", "A").rcode() == dns.rcode.NXDOMAIN
    assert wire.UDP_PLAIN_LIMIT == 512


# --- the fast path answers exactly like the full path -------------------------------------------

_POD_CLUSTER = None

LABELS = [
    "web",
    "db",
    "db-0",
    "10-1-0-1",
    "ext",
    "alias",
    "default",
    "empty",
    "nosuch",
    "svc",
    "pod",
    "_pg",
    "_tcp",
    "_http",
    "cluster",
    "local",
    "dns-version",
    "ns",
    "dns",
    "10-2-0-7",
    "fd00-10--1",
    "in-addr",
    "arpa",
    "5",
    "0",
    "96",
    "10",
    "x",
    "WeB",
    "POD",
]
QTYPES = [1, 2, 5, 6, 12, 16, 28, 33, 65, 99, 251, 252, 255]


def pod_cluster() -> Cluster:
    global _POD_CLUSTER
    if _POD_CLUSTER is None:
        _POD_CLUSTER = Cluster(BASIC, pods=PodMode.INSECURE)
    return _POD_CLUSTER


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.sampled_from(LABELS), min_size=0, max_size=5),
    st.sampled_from(["cluster.local", "CLUSTER.local", "example.org", "in-addr.arpa", ""]),
    st.sampled_from(QTYPES),
    st.sampled_from([None, 0]),
    st.booleans(),
    st.booleans(),
)
def test_fast_path_and_full_path_give_the_same_answer(labels, suffix, qtype, edns, tcp, pods):
    name = ".".join([*labels, suffix]).strip(".") or "."
    query = dns.message.make_query(name, qtype, use_edns=False if edns is None else edns)
    data = query.to_wire()
    handler = (pod_cluster() if pods else cluster()).handler
    fast = finish(lambda: handler.handle(data, tcp))
    full = finish(lambda: handler.full(data, tcp))
    assert fast == full, name
