"""Endpoint names of ClusterIP Services over real UDP/TCP (dnspython as the client):
`<hostname or dashed IP>.<svc>.<ns>.svc.<zone>` A/AAAA for the ready endpoints, as CoreDNS's
findServices answers them; with --endpoint-ptrs the PTR targets then resolve forward."""

from __future__ import annotations

import dns.flags
import dns.rcode

from dnsd.names import reverse_name
from tests.dnsd.helpers import ask, endpoint, endpoint_slice, namespace, rdatas, service

Z = "cluster.local"

CLUSTER = [
    namespace("default"),
    namespace("other"),
    service("web", ips=["10.96.0.5", "fd00::5"], ports=[{"name": "http", "port": 80}]),
    endpoint_slice(
        "web-1",
        "web",
        [
            endpoint("10.1.0.1"),
            endpoint("10.1.0.2", hostname="web-b"),
            endpoint("10.1.0.3", ready=False),
            endpoint("10.1.0.4", hostname="twin"),
            endpoint("10.1.0.5", hostname="twin"),
        ],
        ports=[{"name": "http", "port": 8080}],
    ),
    endpoint_slice("web-2", "web", [endpoint("fd00::1:2")], address_type="IPv6"),
    service("ext", external_name="www.example.org"),
    service("quiet", ns="other", ips=["10.96.0.7"]),
    endpoint_slice("quiet-1", "quiet", [endpoint("10.1.0.7", pod="quiet-0")], ns="other"),
]


async def test_dashed_ip_and_hostname_names_answer_a_and_aaaa(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    msg = await ask(dnsd.port, f"10-1-0-1.web.default.svc.{Z}")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert rdatas(msg) == ["10.1.0.1"]
    assert rdatas(await ask(dnsd.port, f"web-b.web.default.svc.{Z}", tcp=True)) == ["10.1.0.2"]
    assert rdatas(await ask(dnsd.port, f"fd00--1-2.web.default.svc.{Z}", "AAAA")) == ["fd00::1:2"]
    # Several endpoints with one hostname: every IP (SPEC §2.4.1 for headless, CoreDNS here).
    assert rdatas(await ask(dnsd.port, f"twin.web.default.svc.{Z}", edns=0)) == [
        "10.1.0.4",
        "10.1.0.5",
    ]


async def test_query_case_is_echoed(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    msg = await ask(dnsd.port, "WEB-B.Web.Default.SVC.Cluster.Local")
    assert msg.answer[0].name.to_text() == "WEB-B.Web.Default.SVC.Cluster.Local."
    assert rdatas(msg) == ["10.1.0.2"]


async def test_other_type_is_nodata_unknown_label_and_not_ready_are_nxdomain(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    nodata = await ask(dnsd.port, f"web-b.web.default.svc.{Z}", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].name.to_text() == f"{Z}."
    for name in (
        f"10-1-0-3.web.default.svc.{Z}",  # not ready
        f"nobody.web.default.svc.{Z}",
        f"10-1-0-1.ghost.default.svc.{Z}",
        f"10-1-0-1.web.nons.svc.{Z}",
        f"x.ext.default.svc.{Z}",  # below an ExternalName
    ):
        msg = await ask(dnsd.port, name)
        assert msg.rcode() == dns.rcode.NXDOMAIN, name
        msg = await ask(dnsd.port, name, edns=0)  # the fast path's negative answer too
        assert msg.rcode() == dns.rcode.NXDOMAIN, name


async def test_changes_are_seen_at_once(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    assert rdatas(await ask(dnsd.port, f"10-1-0-1.web.default.svc.{Z}")) == ["10.1.0.1"]
    changed = [o for o in CLUSTER if o["metadata"]["name"] != "web-1"] + [
        endpoint_slice("web-1", "web", [endpoint("10.1.0.9")])
    ]
    await dnsd.replace(changed)
    gone = await ask(dnsd.port, f"10-1-0-1.web.default.svc.{Z}")
    assert gone.rcode() == dns.rcode.NXDOMAIN
    assert rdatas(await ask(dnsd.port, f"10-1-0-9.web.default.svc.{Z}")) == ["10.1.0.9"]


async def test_ptr_targets_resolve_forward_with_endpoint_ptrs(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--endpoint-ptrs", "--zone", Z, "--zone", "corp.internal")
    for ip in ("10.1.0.1", "10.1.0.2", "fd00::1:2"):
        ptr = await ask(dnsd.port, reverse_name(ip), "PTR")
        (target,) = rdatas(ptr)
        forward = await ask(dnsd.port, target, "AAAA" if ":" in ip else "A")
        assert rdatas(forward) == [ip], target
    # Every cluster zone has the names, as every other record.
    secondary = await ask(dnsd.port, "web-b.web.default.svc.corp.internal")
    assert rdatas(secondary) == ["10.1.0.2"]


async def test_pod_names_and_namespaces_options_apply(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--endpoint-pod-names", "--namespaces", "other")
    assert rdatas(await ask(dnsd.port, f"quiet-0.quiet.other.svc.{Z}")) == ["10.1.0.7"]
    hidden = await ask(dnsd.port, f"10-1-0-1.web.default.svc.{Z}")
    assert hidden.rcode() == dns.rcode.NXDOMAIN


async def test_no_endpoint_names_keeps_them_nxdomain(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--no-endpoint-names")
    assert dnsd.daemon.handler.lazy == ()
    msg = await ask(dnsd.port, f"10-1-0-1.web.default.svc.{Z}")
    assert msg.rcode() == dns.rcode.NXDOMAIN
