"""Zone transfer (`--transfer-to`) over real TCP: dnspython's xfr and inbound_xfr, and dig."""

from __future__ import annotations

import asyncio
import shutil

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.xfr
import dns.zone
import pytest
from prometheus_client import REGISTRY

from tests.dnsd.helpers import ask, endpoint, endpoint_slice, namespace, service

Z = "cluster.local"

CLUSTER = [
    namespace("default"),
    namespace("kube-system"),
    service("kube-dns", "kube-system", ips=["10.96.0.10"]),
    service("web", ips=["10.96.0.5", "fd00::5"], ports=[{"name": "http", "port": 80}]),
    service("db", headless=True, ports=[{"name": "pg", "port": 5432}]),
    endpoint_slice(
        "db-1",
        "db",
        [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2")],
        ports=[{"name": "pg", "port": 15432}],
    ),
    service("ext", external_name="www.example.org"),
]


def xfr_records(
    port: int, source: str = "127.0.0.1", **kwargs: object
) -> list[dns.message.Message]:
    return list(
        dns.query.xfr(
            "127.0.0.1", Z, port=port, source=source, lifetime=5, relativize=False, **kwargs
        )  # type: ignore[arg-type]
    )


def texts(messages: list[dns.message.Message]) -> list[tuple[str, str, str]]:
    out = []
    for message in messages:
        for rrset in message.answer:
            for rdata in rrset:
                out.append(
                    (
                        rrset.name.to_text().rstrip("."),
                        dns.rdatatype.to_text(rrset.rdtype),
                        rdata.to_text(),
                    )
                )
    return out


async def test_axfr_to_an_allowed_client_has_soa_first_and_last_and_every_record(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1/32")
    messages = await asyncio.to_thread(xfr_records, run.port)
    records = texts(messages)
    assert records[0][1] == "SOA" and records[-1][1] == "SOA"
    assert records[0] == records[-1]
    assert [r for r in records if r[1] == "SOA"] == [records[0], records[-1]]
    # The apex NS and its glue come right after the SOA (CoreDNS Transfer()).
    assert records[1] == (Z, "NS", f"ns.dns.{Z}.")
    assert records[2] == (f"ns.dns.{Z}", "A", "10.96.0.10")
    body = set(records)
    for expected in [
        (f"web.default.svc.{Z}", "A", "10.96.0.5"),
        (f"web.default.svc.{Z}", "AAAA", "fd00::5"),
        # dnsd transfers its answers: dual-stack, weight 100 / 2 as a CoreDNS query answer.
        (f"_http._tcp.web.default.svc.{Z}", "SRV", f"0 50 80 web.default.svc.{Z}."),
        (f"db.default.svc.{Z}", "A", "10.1.0.1"),
        (f"db.default.svc.{Z}", "A", "10.1.0.2"),
        (f"db-0.db.default.svc.{Z}", "A", "10.1.0.1"),
        (f"10-1-0-2.db.default.svc.{Z}", "A", "10.1.0.2"),
        (f"ext.default.svc.{Z}", "CNAME", "www.example.org."),
        (f"kube-dns.kube-system.svc.{Z}", "A", "10.96.0.10"),
    ]:
        assert expected in body, expected
    assert len(records) - 1 == len(body)  # every record once (the SOA twice)
    # Nothing outside the zone: no reverse names.
    assert all(name == Z or name.endswith("." + Z) for name, _, _ in records)
    # The serial is the zone's, as the SOA query answers it.
    soa = await ask(run.port, Z, "SOA")
    assert soa.answer[0][0].serial == messages[0].answer[0][0].serial
    # The whole transfer makes a valid zone for dnspython.
    zone = dns.zone.Zone(Z)
    await asyncio.to_thread(dns.query.inbound_xfr, "127.0.0.1", zone, port=run.port, lifetime=5)
    assert zone.get_rdataset(f"web.default.svc.{Z}.", "A") is not None


async def test_a_large_zone_is_sent_in_several_messages_of_at_most_500_records(start_dnsd):
    big = [namespace("default")]
    big += [service(f"s{i}", ips=[f"10.96.{i // 250}.{i % 250 + 1}"]) for i in range(1200)]
    run = await start_dnsd(big, "--transfer-to", "127.0.0.0/8")
    messages = await asyncio.to_thread(xfr_records, run.port)
    assert len(messages) >= 3
    assert all(len(texts([m])) <= 501 for m in messages)
    records = texts(messages)
    assert len([r for r in records if r[1] == "A"]) == 1200
    # Queries are answered while a transfer is under way and after it.
    reply = await ask(run.port, f"s7.default.svc.{Z}")
    assert reply.answer[0][0].address == "10.96.0.8"


async def test_clients_outside_transfer_to_are_refused(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1/32")
    before = REGISTRY.get_sample_value("dnsd_zone_transfers_total", {"result": "refused"}) or 0
    with pytest.raises(dns.xfr.TransferError) as refused:
        await asyncio.to_thread(xfr_records, run.port, "127.0.0.2")
    assert refused.value.rcode == dns.rcode.REFUSED
    after = REGISTRY.get_sample_value("dnsd_zone_transfers_total", {"result": "refused"})
    assert after == before + 1


async def test_without_transfer_to_everyone_is_refused(start_dnsd):
    run = await start_dnsd(CLUSTER)
    with pytest.raises(dns.xfr.TransferError) as refused:
        await asyncio.to_thread(xfr_records, run.port)
    assert refused.value.rcode == dns.rcode.REFUSED


async def test_axfr_over_udp_is_refused_even_to_an_allowed_client(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1/32")
    reply = await ask(run.port, Z, "AXFR")
    assert reply.rcode() == dns.rcode.REFUSED


async def test_axfr_of_a_name_below_the_apex_is_refused(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1/32")
    reply = await ask(run.port, f"default.svc.{Z}", "AXFR", tcp=True)
    assert reply.rcode() == dns.rcode.REFUSED


async def test_ixfr_with_a_current_serial_is_the_soa_alone(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1/32")
    serial = (await ask(run.port, Z, "SOA")).answer[0][0].serial
    messages = await asyncio.to_thread(
        xfr_records, run.port, rdtype=dns.rdatatype.IXFR, serial=serial
    )
    assert texts(messages) == [texts(messages)[0]]
    assert texts(messages)[0][1] == "SOA"


async def test_ixfr_with_an_old_serial_is_answered_with_the_whole_zone(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1/32")
    # dnspython accepts an IXFR answered in AXFR form (RFC 1995 section 4): SOA, all, SOA.
    messages = await asyncio.to_thread(xfr_records, run.port, rdtype=dns.rdatatype.IXFR, serial=1)
    records = texts(messages)
    assert records[0][1] == records[-1][1] == "SOA"
    assert (f"web.default.svc.{Z}", "A", "10.96.0.5") in records


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
async def test_dig_axfr(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1")
    proc = await asyncio.create_subprocess_exec(
        "dig",
        "+tries=1",
        "+time=3",
        "-p",
        str(run.port),
        "@127.0.0.1",
        Z,
        "AXFR",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    assert "Transfer failed" not in text
    lines = [line.split() for line in text.splitlines() if line and not line.startswith(";")]
    assert lines[0][3] == "SOA" and lines[-1][3] == "SOA"
    assert [f"web.default.svc.{Z}.", "5", "IN", "A", "10.96.0.5"] in lines


async def test_an_external_zone_is_not_transferred(start_dnsd):
    run = await start_dnsd(CLUSTER, "--transfer-to", "127.0.0.1/32", "--external-zone", "ex.net")
    reply = await ask(run.port, "ex.net", "AXFR", tcp=True)
    assert reply.rcode() == dns.rcode.REFUSED
