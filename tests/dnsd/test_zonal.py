"""--zonal over real UDP/TCP (dnspython as the client): the cases of CoreDNS's
plugin/kubernetes/zonal_test.go, plus what dnsd adds (IPv6, several cluster zones, changes)."""

from __future__ import annotations

from typing import Any

import dns.flags
import dns.rcode

from tests.dnsd.helpers import ask, endpoint, endpoint_slice, namespace, rdatas, records, service

Z = "cluster.local"
HDLS = f"hdls.testns.svc.{Z}"


def zoned(ip: str, zone: str | None, **kwargs: Any) -> dict[str, Any]:
    ep = endpoint(ip, **kwargs)
    if zone is not None:
        ep["zone"] = zone
    return ep


CLUSTER = [
    namespace("testns"),
    service("hdls", "testns", headless=True),
    endpoint_slice(
        "hdls-slice",
        "hdls",
        [
            zoned("172.0.0.1", "us-west-2a"),
            zoned("172.0.0.2", "us-west-2b"),
            zoned("172.0.0.3", "us-west-2b"),
            zoned("172.0.0.4", "us-west-2a", ready=False),
            zoned("172.0.0.5", "corp.example.com"),
            zoned("172.0.0.6", None),
        ],
        ns="testns",
        ports=[{"name": "http", "protocol": "TCP", "port": 80}],
    ),
    endpoint_slice(
        "hdls-v6", "hdls", [zoned("fd00::7", "us-west-2b")], ns="testns", address_type="IPv6"
    ),
    service("clstr", "testns", ips=["10.0.0.10"], ports=[{"name": "http", "port": 80}]),
    endpoint_slice("clstr-1", "clstr", [zoned("172.0.1.1", "us-west-2a")], ns="testns"),
    service("empty", "testns", headless=True),
]
ALL_V4 = ["172.0.0.1", "172.0.0.2", "172.0.0.3", "172.0.0.5", "172.0.0.6"]


async def nodata(port: int, name: str, rdtype: str = "A") -> bool:
    msg = await ask(port, name, rdtype)
    return (
        msg.rcode() == dns.rcode.NOERROR
        and not msg.answer
        and bool(msg.flags & dns.flags.AA)
        and [r.name.to_text() for r in msg.authority] == [f"{Z}."]
    )


async def nxdomain(port: int, name: str, rdtype: str = "A") -> bool:
    msg = await ask(port, name, rdtype)
    return msg.rcode() == dns.rcode.NXDOMAIN and msg.authority[0].name.to_text() == f"{Z}."


async def test_pin_narrows_to_the_zone(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--zonal")
    msg = await ask(dnsd.port, f"us-west-2a.pin._zone.{HDLS}")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert records(msg) == [(f"us-west-2a.pin._zone.{HDLS}", "A", "172.0.0.1")]
    b = f"us-west-2b.pin._zone.{HDLS}"
    assert rdatas(await ask(dnsd.port, b, tcp=True)) == ["172.0.0.2", "172.0.0.3"]
    assert rdatas(await ask(dnsd.port, b, "AAAA", edns=0)) == ["fd00::7"]
    # A zone value with dots spans labels; zones compare case-insensitively.
    assert rdatas(await ask(dnsd.port, f"Corp.Example.COM.pin._zone.{HDLS}")) == ["172.0.0.5"]


async def test_pin_without_endpoints_in_the_zone_is_nodata_for_every_type(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--zonal")
    for rdtype in ("A", "AAAA", "SRV", "TXT"):
        assert await nodata(dnsd.port, f"us-west-2c.pin._zone.{HDLS}", rdtype), rdtype
    # A zone with IPv4 endpoints only: AAAA is NODATA, not a fallback.
    assert await nodata(dnsd.port, f"us-west-2a.pin._zone.{HDLS}", "AAAA")
    assert await nodata(dnsd.port, f"us-west-2a.prefer._zone.{HDLS}", "AAAA")


async def test_prefer_narrows_or_falls_back_to_all(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--zonal")
    assert rdatas(await ask(dnsd.port, f"us-west-2a.prefer._zone.{HDLS}")) == ["172.0.0.1"]
    assert rdatas(await ask(dnsd.port, f"us-west-2c.prefer._zone.{HDLS}")) == ALL_V4
    assert await nodata(dnsd.port, f"us-west-2c.prefer._zone.{HDLS}", "TXT")


async def test_srv_is_filtered_and_weighted_over_the_zone(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--zonal")
    msg = await ask(dnsd.port, f"us-west-2b.pin._zone.{HDLS}", "SRV", edns=0)
    # CoreDNS zonal_test.go answers 50 for its two endpoints; here fd00::7 (zone b, in a
    # slice without ports) adds its port -1 sentinel to SRV()'s count: 100 / 3.
    assert rdatas(msg) == [f"0 33 80 172-0-0-2.{HDLS}.", f"0 33 80 172-0-0-3.{HDLS}."]
    assert sorted(r for _, _, r in records(msg, "additional") if r[0].isdigit()) == [
        "172.0.0.2",
        "172.0.0.3",
    ]
    fallback = await ask(dnsd.port, f"us-west-2c.prefer._zone.{HDLS}", "SRV", tcp=True)
    assert len(rdatas(fallback)) == len(ALL_V4)
    assert all(r.startswith("0 16 80 ") for r in rdatas(fallback))  # 5 addresses + fd00::7


async def test_names_that_are_not_zonal_stay_nxdomain(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--zonal")
    for name in (
        f"us-west-2a.pin._zone.ghost.testns.svc.{Z}",  # no such Service
        f"us-west-2a.florp._zone.{HDLS}",  # unknown directive
        f"us-west-2a.pin._zone.clstr.testns.svc.{Z}",  # headless Services only
        f"us-west-2a.pin._zone.empty.testns.svc.{Z}",  # no ready endpoints
        f"us-west-2a.pin._zone.hdls.nons.svc.{Z}",
    ):
        assert await nxdomain(dnsd.port, name), name


async def test_without_the_option_zonal_names_are_nxdomain(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    assert await nxdomain(dnsd.port, f"us-west-2a.pin._zone.{HDLS}")
    assert await nxdomain(dnsd.port, f"us-west-2a.prefer._zone.{HDLS}", "SRV")


async def test_every_cluster_zone_and_changes(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--zonal", "--zone", Z, "--zone", "corp.internal")
    other = "us-west-2a.pin._zone.hdls.testns.svc.corp.internal"
    assert rdatas(await ask(dnsd.port, other)) == ["172.0.0.1"]
    srv = await ask(dnsd.port, other, "SRV")
    assert rdatas(srv) == ["0 100 80 172-0-0-1.hdls.testns.svc.corp.internal."]
    name = f"us-west-2a.pin._zone.{HDLS}"
    assert rdatas(await ask(dnsd.port, name)) == ["172.0.0.1"]
    moved = [o for o in CLUSTER if o["metadata"]["name"] != "hdls-slice"] + [
        endpoint_slice("hdls-slice", "hdls", [zoned("172.0.0.9", "us-west-2a")], ns="testns")
    ]
    await dnsd.replace(moved)
    assert rdatas(await ask(dnsd.port, name)) == ["172.0.0.9"]
    assert await nodata(dnsd.port, f"us-west-2b.pin._zone.{HDLS}")  # fd00::7 only: no A
