"""Forwarding-loop detection (dnsd/forward_loop.py): an upstream that sends dnsd's queries
back to dnsd is found by its probe name, logged, counted and no longer forwarded to."""

from __future__ import annotations

import asyncio
import json
import struct
import urllib.request

import dns.message
import dns.query
import pytest

from dnsd.build import build_forwarder
from dnsd.forward import Forwarder
from dnsd.forward_loop import probe_labels, probe_question
from tests.dnsd.helpers import free_udp_tcp_port, namespace, service, write_manifest
from tests.dnsd.test_e2e import Z, run_dnsd  # noqa: F401 - the fixture

CLUSTER = [namespace("default"), service("web", ips=["10.96.0.5"])]


def query(labels: tuple[bytes, ...], qtype: int = 13) -> bytes:
    question = probe_question(labels)[:-4] + struct.pack("!HH", qtype, 1)
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + question


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_probe_that_comes_back_marks_its_upstream_and_is_not_sent_round_again():
    found: list[str] = []
    forwarder = Forwarder(
        [("127.0.0.1", 5301), ("127.0.0.1", 5302)], loop_seed=77, on_loop=found.append
    )
    first, second = forwarder.upstreams
    assert forwarder.answer_at_once(query((b"77", b"5"))) is None  # no probe of ours
    answer = forwarder.answer_at_once(query(probe_labels(77, 1)))
    assert answer is not None and answer[3] & 0x0F == 2  # SERVFAIL, never forwarded
    assert (first.looping, second.looping) == (False, True) and found == ["127.0.0.1:5302"]
    assert forwarder._order(forwarder.upstreams) == [first]
    forwarder.answer_at_once(query(probe_labels(77, 1), qtype=1))  # any type: once only
    assert found == ["127.0.0.1:5302"]
    # With every upstream looping, nothing is left to ask (the client gets SERVFAIL at once).
    forwarder.mark_looping("127.0.0.1:5301")
    assert forwarder._order(forwarder.upstreams) == []


def test_without_a_seed_nothing_is_probed_and_a_new_child_starts_with_the_known_loops():
    assert Forwarder([("127.0.0.1", 5301)]).loop_probes == {}
    options = {
        "upstreams": [["127.0.0.1", 5301], ["127.0.0.1", 5302]],
        "stub_domains": {"corp": [["127.0.0.1", 5303]]},
        "cache": None,
        "timeout": 1.0,
        "max_inflight": 10,
        "policy": "random",
        "loop_seed": 5,
        "looping": ["127.0.0.1:5302"],
    }
    forwarder = build_forwarder(options)
    assert [up.looping for up in forwarder._by_address.values()] == [False, True, False]
    assert len(forwarder.loop_probes) == 3  # the stub domain's upstream is probed too


@pytest.mark.parametrize("forward_process", ["--forward-process", "--no-forward-process"])
def test_dnsd_forwarding_to_itself_finds_the_loop_and_stops_forwarding_there(
    run_dnsd,  # noqa: F811
    tmp_path,
    forward_process,
):
    manifest = write_manifest(tmp_path / "m.yaml", CLUSTER)
    port = free_udp_tcp_port()
    dnsd = run_dnsd(
        "--manifests", str(manifest), forward_process, port=port, upstream=f"127.0.0.1:{port}"
    )
    dnsd.wait_for(lambda: dnsd.answers(f"web.default.svc.{Z}") == ["10.96.0.5"])
    dnsd.wait_for(lambda: b"forwarding_loop_detected" in dnsd.log.read_bytes())
    lines = [json.loads(line) for line in dnsd.log.read_text().splitlines() if "{" in line]
    http = next(line["port"] for line in lines if line.get("event") == "http_listening")
    found = [line for line in lines if line.get("event") == "forwarding_loop_detected"]
    assert [line["to"] for line in found] == [f"127.0.0.1:{port}"]

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    label = f'{{to="127.0.0.1:{port}"}}'
    dnsd.wait_for(lambda: metric(scrape(), "dnsd_forward_loops_detected_total" + label) == 1)
    sent = metric(scrape(), "dnsd_forward_requests_total" + label)
    for i in range(5):  # forwarded names: SERVFAIL, and not one more query to the loop
        reply = dns.query.udp(
            dns.message.make_query(f"n{i}.example.org", "A"), "127.0.0.1", port=port, timeout=2
        )
        assert reply.rcode() == 2
    assert metric(scrape(), "dnsd_forward_requests_total" + label) == sent
    assert dnsd.answers(f"web.default.svc.{Z}") == ["10.96.0.5"]  # cluster names as ever
    assert dnsd.stop() == 0


async def test_an_upstream_that_answers_the_probe_stays_in_use(start_dnsd):
    run = await start_dnsd(CLUSTER)
    deadline = asyncio.get_running_loop().time() + 10
    while not any(qtype == "HINFO" for _, qtype in run.upstream.queries):
        assert asyncio.get_running_loop().time() < deadline, "no loop probe was sent"
        await asyncio.sleep(0.05)
    (probe,) = [name for name, qtype in run.upstream.queries if qtype == "HINFO"]
    assert len(probe.split(".")) == 2  # <seed>.<index>, straight to the upstream
    await asyncio.sleep(0.3)
    assert not any(up.looping for up in run.daemon.forwarder.upstreams)
    reply = await asyncio.to_thread(
        dns.query.udp,
        dns.message.make_query("www.example.org", "A"),
        "127.0.0.1",
        port=run.port,
        timeout=2,
    )
    assert reply.rcode() == 0 and reply.answer
