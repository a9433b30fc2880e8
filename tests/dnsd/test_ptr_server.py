"""PTR of endpoint IPs over real UDP/TCP packets (dnspython as the client), dnsd fed from a
manifest: with --endpoint-ptrs the ready endpoints of ClusterIP Services answer as CoreDNS
k8s/reverse.go does; without it (the default) only the spec's PTRs are dnsd's own."""

from __future__ import annotations

import dns.flags
import dns.rcode

from dnsd.names import reverse_name
from tests.dnsd.conftest import Running
from tests.dnsd.helpers import ask, endpoint, endpoint_slice, namespace, rdatas, service

Z = "cluster.local"

CLUSTER = [
    namespace("default"),
    service("web", ips=["10.96.0.5", "fd00::5"], ports=[{"name": "http", "port": 80}]),
    endpoint_slice(
        "web-1",
        "web",
        [
            endpoint("10.1.0.1"),
            endpoint("10.1.0.2", hostname="web-b"),
            endpoint("10.1.0.3", ready=False),
        ],
        ports=[{"name": "http", "port": 8080}],
    ),
    endpoint_slice("web-2", "web", [endpoint("fd00::1:2")], address_type="IPv6"),
    # One pod behind its headless Service and a second (ClusterIP) Service.
    service("sts", headless=True),
    endpoint_slice("sts-1", "sts", [endpoint("10.1.0.9", hostname="sts-0")]),
    service("lb", ips=["10.96.0.9"]),
    endpoint_slice("lb-1", "lb", [endpoint("10.1.0.9")]),
]


async def ptr(port: int, ip: str, *, tcp: bool = False) -> list[str]:
    """The PTR targets dnsd answers for `ip` itself (authoritative), in answer order."""
    msg = await ask(port, reverse_name(ip), "PTR", tcp=tcp)
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    return [rdata.to_text() for rrset in msg.answer for rdata in rrset]


async def forwarded(dnsd: Running, ip: str) -> bool:
    """Asked for the PTR of `ip`, dnsd has no answer of its own and asks upstream
    (kubeadm's `fallthrough in-addr.arpa ip6.arpa`); the fake upstream says NXDOMAIN."""
    msg = await ask(dnsd.port, reverse_name(ip), "PTR")
    return msg.rcode() == dns.rcode.NXDOMAIN and (reverse_name(ip), "PTR") in (
        dnsd.upstream.queries
    )


async def test_ready_endpoint_of_a_clusterip_service_answers_ptr_v4_and_v6(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--endpoint-ptrs")
    assert await ptr(dnsd.port, "10.1.0.1") == [f"10-1-0-1.web.default.svc.{Z}."]
    assert await ptr(dnsd.port, "10.1.0.2", tcp=True) == [f"web-b.web.default.svc.{Z}."]
    assert await ptr(dnsd.port, "fd00::1:2") == [f"fd00--1-2.web.default.svc.{Z}."]
    assert await ptr(dnsd.port, "10.96.0.5") == [f"web.default.svc.{Z}."]  # SPEC §2.3.3


async def test_not_ready_endpoint_of_a_clusterip_service_is_not_answered_here(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--endpoint-ptrs")
    assert await forwarded(dnsd, "10.1.0.3")


async def test_endpoint_ip_shared_by_two_services_answers_both_spec_name_first(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--endpoint-ptrs")
    assert await ptr(dnsd.port, "10.1.0.9") == [
        f"sts-0.sts.default.svc.{Z}.",
        f"10-1-0-9.lb.default.svc.{Z}.",
    ]


async def test_deleting_a_service_drops_its_ptr_and_keeps_the_other_owners(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--endpoint-ptrs")
    without_sts = [o for o in CLUSTER if o["metadata"]["name"] not in ("sts", "sts-1")]
    await dnsd.replace(without_sts)
    assert await ptr(dnsd.port, "10.1.0.9") == [f"10-1-0-9.lb.default.svc.{Z}."]
    assert await ptr(dnsd.port, "10.1.0.1") == [f"10-1-0-1.web.default.svc.{Z}."]
    await dnsd.replace([o for o in without_sts if o["metadata"]["name"] not in ("lb", "lb-1")])
    assert await forwarded(dnsd, "10.1.0.9")
    assert await ptr(dnsd.port, "10.1.0.1") == [f"10-1-0-1.web.default.svc.{Z}."]


async def test_endpoint_ptr_follows_readiness_and_pod_names(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--endpoint-ptrs", "--endpoint-pod-names")
    changed = [o for o in CLUSTER if o["metadata"]["name"] != "web-1"]
    await dnsd.replace(
        [
            *changed,
            endpoint_slice(
                "web-1", "web", [endpoint("10.1.0.1", ready=False), endpoint("10.1.0.3", pod="p")]
            ),
        ]
    )
    assert rdatas(await ask(dnsd.port, reverse_name("10.1.0.3"), "PTR")) == [
        f"p.web.default.svc.{Z}."
    ]
    assert await forwarded(dnsd, "10.1.0.1")


async def test_without_endpoint_ptrs_only_the_spec_ptrs_are_answered(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    assert await forwarded(dnsd, "10.1.0.1")
    assert await ptr(dnsd.port, "10.96.0.5") == [f"web.default.svc.{Z}."]  # SPEC §2.3.3
    assert await ptr(dnsd.port, "10.1.0.9") == [f"sts-0.sts.default.svc.{Z}."]  # SPEC §2.4.3
