"""--external-zone over real UDP/TCP (dnspython as the client): Services' externalIPs and
LoadBalancer ingress answered in an outside zone with its own SOA and NS, as CoreDNS's
k8s_external (plugin/k8s_external/external_test.go, apex_test.go)."""

from __future__ import annotations

from typing import Any

import dns.flags
import dns.rcode
import pytest

from dnsd.settings import load
from tests.dnsd.helpers import ask, endpoint, endpoint_slice, namespace, rdatas, records, service

EZ = "example.net"


def with_outside(
    obj: dict[str, Any], external_ips: list[str], ingress: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    obj["spec"]["externalIPs"] = external_ips
    if ingress is not None:
        obj["spec"]["type"] = "LoadBalancer"
        obj["status"] = {"loadBalancer": {"ingress": ingress}}
    return obj


CLUSTER = [
    namespace("default"),
    namespace("kube-system"),
    with_outside(
        service(
            "web",
            ips=["10.96.0.5"],
            ports=[{"name": "http", "port": 80}, {"port": 443}],
        ),
        ["192.0.2.10"],
        [{"ip": "198.51.100.7"}, {"ip": "192.0.2.10"}, {"ip": "2001:db8::7"}],
    ),
    with_outside(service("lbhost", ips=["10.96.0.6"]), [], [{"hostname": "db.example.org"}]),
    service("inside", ips=["10.96.0.8"]),
    service("sts", headless=True, ports=[{"name": "peer", "port": 7000}]),
    endpoint_slice(
        "sts-1",
        "sts",
        [endpoint("10.1.0.1", hostname="sts-0"), endpoint("10.1.0.2", hostname="sts-1")],
        ports=[{"name": "peer", "port": 7000}],
    ),
    with_outside(service("kube-dns", "kube-system", ips=["10.96.0.10"]), ["203.0.113.53"]),
]


async def test_outside_addresses_answer_a_aaaa_and_srv(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--external-zone", EZ)
    msg = await ask(dnsd.port, f"web.default.{EZ}")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert rdatas(msg) == ["192.0.2.10", "198.51.100.7"]  # an IP in both lists: once
    assert rdatas(await ask(dnsd.port, f"web.default.{EZ}", "AAAA", tcp=True)) == ["2001:db8::7"]
    srv = await ask(dnsd.port, f"_http._tcp.web.default.{EZ}", "SRV", edns=0)
    assert rdatas(srv) == [f"0 33 80 web.default.{EZ}."]  # 3 addresses x 1 port
    assert sorted(r for _, _, r in records(srv, "additional") if ":" in r or r[0] == "1") == [
        "192.0.2.10",
        "198.51.100.7",
        "2001:db8::7",
    ]
    bare = await ask(dnsd.port, f"web.default.{EZ}", "SRV", edns=0)
    assert rdatas(bare) == [f"0 16 443 web.default.{EZ}.", f"0 16 80 web.default.{EZ}."]


async def test_apex_has_its_own_soa_and_ns(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--external-zone", EZ, "--ttl", "30")
    soa = await ask(dnsd.port, EZ, "SOA")
    (text,) = rdatas(soa)
    mname, rname, _serial, *times = text.split()
    assert (mname, rname, times) == (
        f"ns1.dns.{EZ}.",
        f"hostmaster.dns.{EZ}.",
        ["7200", "1800", "86400", "30"],
    )
    ns = await ask(dnsd.port, EZ, "NS")
    assert rdatas(ns) == [f"ns1.dns.{EZ}."]
    # The DNS Service's external address, not its ClusterIP.
    assert [r for _, t, r in records(ns, "additional") if t == "A"] == ["203.0.113.53"]
    assert rdatas(await ask(dnsd.port, f"ns1.dns.{EZ}")) == ["203.0.113.53"]


async def test_negative_answers_carry_the_external_soa(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--external-zone", EZ, "--pods", "insecure")
    for name in (
        f"inside.default.{EZ}",  # no outside address
        f"ghost.default.{EZ}",
        f"x.web.default.{EZ}",
        f"sts.default.{EZ}",  # headless without --external-headless
        f"1-2-3-4.default.pod.{EZ}",  # no pod names out there
        f"a.b.default.svc.{EZ}",  # nor endpoint names of the cluster zone
        f"ns2.dns.{EZ}",
    ):
        for edns in (None, 0):  # the fast path and the full one
            msg = await ask(dnsd.port, name, edns=edns)
            assert msg.rcode() == dns.rcode.NXDOMAIN, name
            assert [r.to_text().split()[4] for r in msg.authority] == [f"ns1.dns.{EZ}."], name
    for name, rdtype in (
        (f"web.default.{EZ}", "TXT"),
        (f"default.{EZ}", "A"),
        (f"dns.{EZ}", "A"),
        (EZ, "A"),
    ):
        msg = await ask(dnsd.port, name, rdtype)
        assert msg.rcode() == dns.rcode.NOERROR and not msg.answer, name
        assert msg.authority[0].name.to_text() == f"{EZ}.", name


async def test_loadbalancer_hostname_is_a_cname_chased_upstream(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--external-zone", EZ)
    msg = await ask(dnsd.port, f"lbhost.default.{EZ}")
    assert records(msg) == [
        (f"lbhost.default.{EZ}", "CNAME", "db.example.org."),
        ("db.example.org", "A", "192.0.2.5"),
    ]


async def test_external_headless_answers_endpoints(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--external-zone", EZ, "--external-headless")
    assert rdatas(await ask(dnsd.port, f"sts.default.{EZ}")) == ["10.1.0.1", "10.1.0.2"]
    assert rdatas(await ask(dnsd.port, f"sts-1.sts.default.{EZ}")) == ["10.1.0.2"]
    srv = await ask(dnsd.port, f"_peer._tcp.sts.default.{EZ}", "SRV")
    assert rdatas(srv) == [
        f"0 50 7000 sts-0.sts.default.{EZ}.",
        f"0 50 7000 sts-1.sts.default.{EZ}.",
    ]
    # The cluster zone is unchanged, and a Service with outside addresses keeps them.
    assert rdatas(await ask(dnsd.port, "sts-0.sts.default.svc.cluster.local")) == ["10.1.0.1"]
    assert rdatas(await ask(dnsd.port, f"web.default.{EZ}")) == ["192.0.2.10", "198.51.100.7"]


async def test_several_zones_and_changes(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--external-zone", EZ, "--external-zone", "lb.corp")
    assert rdatas(await ask(dnsd.port, "web.default.lb.corp", "AAAA")) == ["2001:db8::7"]
    changed = [o for o in CLUSTER if o["metadata"]["name"] != "inside"] + [
        with_outside(service("inside", ips=["10.96.0.8"]), ["192.0.2.99"])
    ]
    await dnsd.replace(changed)
    assert rdatas(await ask(dnsd.port, f"inside.default.{EZ}")) == ["192.0.2.99"]
    assert rdatas(await ask(dnsd.port, "inside.default.lb.corp")) == ["192.0.2.99"]


async def test_without_the_option_the_zone_is_forwarded(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    msg = await ask(dnsd.port, f"web.default.{EZ}")
    assert msg.rcode() == dns.rcode.NXDOMAIN  # the fake upstream's answer
    assert (f"web.default.{EZ}", "A") in dnsd.upstream.queries


@pytest.mark.parametrize("zone", ["cluster.local", "svc.cluster.local", "local", "in-addr.arpa"])
def test_an_external_zone_overlapping_another_is_refused(zone, capsys):
    with pytest.raises(SystemExit) as exited:
        load(["--external-zone", zone], environ={})
    assert exited.value.code == 2
    assert "overlaps" in capsys.readouterr().err


def test_external_zone_from_environment():
    settings = load([], environ={"DNSD_EXTERNAL_ZONE": "Example.NET.,lb.corp"})
    assert settings.external_zone == ["example.net", "lb.corp"]
