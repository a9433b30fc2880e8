"""Records one Service owns (SPEC §2.3-§2.5, CoreDNS where silent), pure, without sockets."""

from __future__ import annotations

from dataclasses import replace

from dnslib import QTYPE

from dnsd.names import dashed_ip, ip_from_dashed, reverse_name
from dnsd.records import PtrRank, PtrTargets, RecordOptions, service_records
from kwatch.resources import ENDPOINTSLICES, SERVICES
from tests.dnsd.helpers import endpoint, endpoint_slice, service

BASE = "web.default.svc.cluster.local"
OPTS = RecordOptions()
EXTENDED = RecordOptions(endpoint_ptrs=True)  # --endpoint-ptrs: CoreDNS's endpoint PTRs


def build(svc, slices=(), options=OPTS):
    return service_records(SERVICES.parse(svc), [ENDPOINTSLICES.parse(s) for s in slices], options)


def data(records, name, qtype):
    return sorted(repr(rr.rdata) for rr in records.answers.get((name, qtype), []))


def test_clusterip_service_has_a_and_aaaa_for_every_cluster_ip():
    r = build(service("web", ips=["10.96.0.5", "fd00::5"]))
    assert data(r, BASE, QTYPE.A) == ["10.96.0.5"]
    assert data(r, BASE, QTYPE.AAAA) == ["fd00::5"]


def srvs(records, name):
    return data(records, name, QTYPE.SRV)


def glue(records, name):
    return sorted(repr(rr.rdata) for rr in records.additional[(name, QTYPE.SRV)])


# SRV weights are CoreDNS's: plugin/backend_lookup.go SRV() gives each record
# floor(100 / N), at least 1, N = the records plugin/kubernetes/kubernetes.go findServices
# matched for the question (matchPortAndProtocol; every ClusterIP, or every ready endpoint
# address, times every matching port), counted before SRV() drops duplicate (target, port)
# pairs and port -1.


def test_a_named_port_weighs_over_its_own_records_not_over_the_services_ports():
    # CoreDNS: `_http._tcp` matches one port x one ClusterIP: N = 1 (handler_test.go svc1).
    ports = [
        {"name": "http", "port": 80, "protocol": "TCP"},
        {"port": 81},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    r = build(service("web", ports=ports))
    assert srvs(r, f"_http._tcp.{BASE}") == [f"0 100 80 {BASE}."]
    assert srvs(r, f"_dns._udp.{BASE}") == [f"0 100 53 {BASE}."]
    assert glue(r, f"_http._tcp.{BASE}") == ["10.96.0.1"]
    # SPEC §2.3.2: an unnamed port has no `_<port>._<proto>` name ...
    assert not [k for k in r.answers if "81" in k[0]]


def test_the_bare_name_srv_has_every_port_named_or_not():
    # ... but CoreDNS's bare-name SRV matches every port (r.port and r.protocol empty):
    # N = 3 ports x 1 ClusterIP.
    ports = [
        {"name": "http", "port": 80, "protocol": "TCP"},
        {"port": 81},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    r = build(service("web", ports=ports))
    assert srvs(r, BASE) == [f"0 33 53 {BASE}.", f"0 33 80 {BASE}.", f"0 33 81 {BASE}."]
    assert glue(r, BASE) == ["10.96.0.1"]
    only_unnamed = build(service("web", ports=[{"port": 81}]))
    assert srvs(only_unnamed, BASE) == [f"0 100 81 {BASE}."]
    assert build(service("web")).answers.get((BASE, QTYPE.SRV)) is None  # no ports: NODATA


def test_a_dual_stack_port_counts_its_a_and_aaaa_backends_as_two_records():
    # CoreDNS: one record per ClusterIP, the second dropped as a duplicate (target, port)
    # after the count: N = 2 (handler_test.go svc-dual-stack SRV: 0 50 80).
    r = build(service("web", ips=["10.96.0.5", "fd00::5"], ports=[{"name": "http", "port": 80}]))
    assert srvs(r, f"_http._tcp.{BASE}") == [f"0 50 80 {BASE}."]
    assert glue(r, f"_http._tcp.{BASE}") == ["10.96.0.5", "fd00::5"]
    assert srvs(r, BASE) == [f"0 50 80 {BASE}."]
    two = build(
        service(
            "web",
            ips=["10.96.0.5", "fd00::5"],
            ports=[{"name": "http", "port": 80}, {"port": 8080}],
        )
    )
    assert srvs(two, f"_http._tcp.{BASE}") == [f"0 50 80 {BASE}."]
    assert srvs(two, BASE) == [f"0 25 80 {BASE}.", f"0 25 8080 {BASE}."]  # 2 ports x 2 IPs


def test_ports_sharing_a_number_are_counted_before_the_duplicate_is_dropped():
    # CoreDNS SRV(): 53/UDP and 53/TCP are two records of the bare name (N = 2) but one
    # (target, port) pair, answered once.
    ports = [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]
    r = build(service("web", ports=ports))
    assert srvs(r, BASE) == [f"0 50 53 {BASE}."]
    assert srvs(r, f"_dns._udp.{BASE}") == [f"0 100 53 {BASE}."]


def test_clusterip_record_exists_without_endpoints_unless_ignore_empty_service():
    assert data(build(service("web")), BASE, QTYPE.A) == ["10.96.0.1"]
    strict = RecordOptions(ignore_empty_service=True)
    assert build(service("web"), options=strict).answers == {}
    ready = [endpoint_slice("web-1", "web", [endpoint("10.1.0.1")])]
    assert data(build(service("web"), ready, strict), BASE, QTYPE.A) == ["10.96.0.1"]


def test_clusterip_ptr_points_at_the_service_in_the_primary_zone():
    options = RecordOptions(zones=("cluster.local", "other.zone"))
    r = build(service("web", ips=["10.96.0.5", "fd00::5"]), options=options)
    assert r.ptrs == {
        "5.0.96.10.in-addr.arpa": PtrTargets(PtrRank.CLUSTER_IP, [BASE]),
        reverse_name("fd00::5"): PtrTargets(PtrRank.CLUSTER_IP, [BASE]),
    }
    assert data(r, "web.default.svc.other.zone", QTYPE.A) == ["10.96.0.5"]


def test_headless_service_answers_every_ready_endpoint_once():
    slices = [
        endpoint_slice("a", "db", [endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False)]),
        endpoint_slice("b", "db", [endpoint("10.1.0.1"), endpoint("10.1.0.3")]),  # skew: dup
    ]
    r = build(service("db", headless=True), slices)
    base = "db.default.svc.cluster.local"
    assert data(r, base, QTYPE.A) == ["10.1.0.1", "10.1.0.3"]
    assert data(r, f"10-1-0-1.{base}", QTYPE.A) == ["10.1.0.1"]
    assert (f"10-1-0-2.{base}", QTYPE.A) not in r.answers


def test_headless_service_without_ready_endpoints_has_no_records():
    slices = [endpoint_slice("a", "db", [endpoint("10.1.0.1", ready=False)])]
    r = build(service("db", headless=True), slices)
    assert r.answers == {} and r.names == set()


def test_publish_not_ready_addresses_serves_not_ready_endpoints():
    slices = [endpoint_slice("a", "db", [endpoint("10.1.0.1", ready=False)])]
    r = build(service("db", headless=True, publish_not_ready=True), slices)
    assert data(r, "db.default.svc.cluster.local", QTYPE.A) == ["10.1.0.1"]


def test_endpoints_sharing_a_hostname_get_one_record_per_ip():
    slices = [
        endpoint_slice(
            "a", "db", [endpoint("10.1.0.1", hostname="x"), endpoint("10.1.0.2", hostname="x")]
        )
    ]
    r = build(service("db", headless=True), slices)
    assert data(r, "x.db.default.svc.cluster.local", QTYPE.A) == ["10.1.0.1", "10.1.0.2"]


def test_headless_srv_per_ready_endpoint_and_named_port_with_the_endpoint_port():
    slices = [
        endpoint_slice(
            "a",
            "db",
            [
                endpoint("10.1.0.1", hostname="db-0"),
                endpoint("10.1.0.2"),
                endpoint("10.1.0.9", ready=False),
            ],
            ports=[{"name": "pg", "port": 15432}, {"port": 9}],
        )
    ]
    r = build(service("db", headless=True, ports=[{"name": "pg", "port": 5432}]), slices)
    base = "db.default.svc.cluster.local"
    assert data(r, f"_pg._tcp.{base}", QTYPE.SRV) == [
        f"0 50 15432 10-1-0-2.{base}.",
        f"0 50 15432 db-0.{base}.",
    ]
    glue = sorted(repr(rr.rdata) for rr in r.additional[(f"_pg._tcp.{base}", QTYPE.SRV)])
    assert glue == ["10.1.0.1", "10.1.0.2"]


HDLS = "hdls1.default.svc.cluster.local"


def test_headless_srv_weighs_over_every_endpoint_address_before_duplicates_are_dropped():
    # CoreDNS handler_test.go "SRV Service (Headless)": six ready addresses, two sharing the
    # hostname dup-name, port http: N = 6, five records of weight 16.
    v4 = [
        endpoint("172.0.0.2"),
        endpoint("172.0.0.3"),
        endpoint("172.0.0.4", hostname="dup-name"),
        endpoint("172.0.0.5", hostname="dup-name"),
    ]
    v6 = [endpoint("5678:abcd::1"), endpoint("5678:abcd::2")]
    http = [{"name": "http", "port": 80, "protocol": "TCP"}]
    slices = [
        endpoint_slice("hdls1-a", "hdls1", v4, ports=http),
        endpoint_slice("hdls1-b", "hdls1", v6, ports=http, address_type="IPv6"),
    ]
    r = build(service("hdls1", headless=True, ports=http), slices)
    targets = ["172-0-0-2", "172-0-0-3", "5678-abcd--1", "5678-abcd--2", "dup-name"]
    assert srvs(r, f"_http._tcp.{HDLS}") == [f"0 16 80 {t}.{HDLS}." for t in targets]
    assert srvs(r, HDLS) == [f"0 16 80 {t}.{HDLS}." for t in targets]
    assert len(glue(r, f"_http._tcp.{HDLS}")) == 6  # both dup-name addresses


def test_headless_endpoint_in_two_slices_counts_twice():
    # EndpointSlice skew: CoreDNS reads each slice as its own subset, so 10.1.0.1 is two of
    # the N = 3 records, answered once.
    pg = [{"name": "pg", "port": 5432}]
    slices = [
        endpoint_slice("a", "db", [endpoint("10.1.0.1")], ports=pg),
        endpoint_slice("b", "db", [endpoint("10.1.0.1"), endpoint("10.1.0.3")], ports=pg),
    ]
    r = build(service("db", headless=True, ports=pg), slices)
    base = "db.default.svc.cluster.local"
    assert srvs(r, f"_pg._tcp.{base}") == [
        f"0 33 5432 10-1-0-1.{base}.",
        f"0 33 5432 10-1-0-3.{base}.",
    ]


def test_headless_bare_name_counts_unnamed_ports_and_portless_slices():
    # CoreDNS findServices, headless branch: the bare name matches every slice port, named or
    # not, and a slice without ports has the sentinel port -1 (object/endpoint.go), counted by
    # SRV() but not answered: N = 2 ports x db-0 + 1 x 10.1.0.2 = 3.
    slices = [
        endpoint_slice(
            "a",
            "db",
            [endpoint("10.1.0.1", hostname="db-0")],
            ports=[{"name": "pg", "port": 5432}, {"port": 9}],
        ),
        endpoint_slice("b", "db", [endpoint("10.1.0.2")]),
    ]
    r = build(service("db", headless=True), slices)
    base = "db.default.svc.cluster.local"
    assert srvs(r, base) == [f"0 33 5432 db-0.{base}.", f"0 33 9 db-0.{base}."]
    assert glue(r, base) == ["10.1.0.1"]
    assert srvs(r, f"_pg._tcp.{base}") == [f"0 100 5432 db-0.{base}."]
    portless = build(service("db", headless=True), slices[1:])
    assert (base, QTYPE.SRV) not in portless.answers  # port -1 only: NODATA
    assert data(portless, base, QTYPE.A) == ["10.1.0.2"]


def test_headless_ptr_points_at_the_endpoint_name():
    slices = [endpoint_slice("a", "db", [endpoint("10.1.0.1", hostname="db-0")])]
    r = build(service("db", headless=True), slices)
    assert r.ptrs == {
        "1.0.1.10.in-addr.arpa": PtrTargets(
            PtrRank.HEADLESS_ENDPOINT, ["db-0.db.default.svc.cluster.local"]
        )
    }


def test_ipv6_endpoints_get_dashed_names_and_nibble_ptrs():
    slices = [endpoint_slice("a", "db", [endpoint("fd00::1")], address_type="IPv6")]
    r = build(service("db", headless=True), slices)
    assert data(r, "fd00--1.db.default.svc.cluster.local", QTYPE.AAAA) == ["fd00::1"]
    assert list(r.ptrs) == ["1." + "0." * 29 + "d.f.ip6.arpa"]


def test_clusterip_service_ready_endpoints_get_ptrs_in_the_primary_zone():
    # CoreDNS k8s/reverse.go: endpoints of every Service, not only headless ones (an extension).
    slices = [
        endpoint_slice(
            "web-1",
            "web",
            [
                endpoint("10.1.0.1"),
                endpoint("10.1.0.2", hostname="h"),
                endpoint("10.1.0.3", ready=False),
            ],
        ),
        endpoint_slice("web-2", "web", [endpoint("fd00::1:2")], address_type="IPv6"),
    ]
    options = RecordOptions(zones=("cluster.local", "other.zone"), endpoint_ptrs=True)
    assert build(
        service("web", ips=["10.96.0.5"]), slices, replace(options, endpoint_ptrs=False)
    ).ptrs.keys() == {"5.0.96.10.in-addr.arpa"}  # off by default
    r = build(service("web", ips=["10.96.0.5"]), slices, options)
    endpoint_ptrs = {
        rev: targets for rev, targets in r.ptrs.items() if targets.rank == PtrRank.SERVICE_ENDPOINT
    }
    assert endpoint_ptrs == {
        "1.0.1.10.in-addr.arpa": PtrTargets(PtrRank.SERVICE_ENDPOINT, [f"10-1-0-1.{BASE}"]),
        "2.0.1.10.in-addr.arpa": PtrTargets(PtrRank.SERVICE_ENDPOINT, [f"h.{BASE}"]),
        reverse_name("fd00::1:2"): PtrTargets(PtrRank.SERVICE_ENDPOINT, [f"fd00--1-2.{BASE}"]),
    }
    # Only the PTR: the endpoint names of a ClusterIP Service are not served (README).
    assert (f"10-1-0-1.{BASE}", QTYPE.A) not in r.answers


def test_clusterip_service_endpoint_ptr_uses_the_pod_name_with_endpoint_pod_names():
    slices = [endpoint_slice("web-1", "web", [endpoint("10.1.0.1", pod="web-abc")])]
    r = build(service("web"), slices, RecordOptions(endpoint_pod_names=True, endpoint_ptrs=True))
    assert r.ptrs["1.0.1.10.in-addr.arpa"].names == [f"web-abc.{BASE}"]


def test_endpoint_ptrs_need_no_cluster_ip_and_skip_not_ready_endpoints():
    slices = [endpoint_slice("web-1", "web", [endpoint("10.1.0.1")])]
    unallocated = service("web")
    unallocated["spec"].pop("clusterIP")
    unallocated["spec"].pop("clusterIPs")
    r = build(unallocated, slices, EXTENDED)
    assert r.answers == {} and list(r.ptrs) == ["1.0.1.10.in-addr.arpa"]
    not_ready = [endpoint_slice("web-1", "web", [endpoint("10.1.0.1", ready=False)])]
    assert list(build(service("web"), not_ready, EXTENDED).ptrs) == ["1.0.96.10.in-addr.arpa"]
    strict = RecordOptions(ignore_empty_service=True, endpoint_ptrs=True)
    assert build(service("web"), not_ready, strict).ptrs == {}


def test_a_cluster_ip_that_is_also_its_own_endpoint_is_answered_as_the_cluster_ip():
    slices = [endpoint_slice("web-1", "web", [endpoint("10.96.0.5")])]
    r = build(service("web", ips=["10.96.0.5"]), slices, EXTENDED)
    assert r.ptrs == {"5.0.96.10.in-addr.arpa": PtrTargets(PtrRank.CLUSTER_IP, [BASE])}


def test_endpoint_pod_names_uses_the_pod_name_when_there_is_no_hostname():
    slices = [
        endpoint_slice(
            "a",
            "db",
            [endpoint("10.1.0.1", pod="db-abc"), endpoint("10.1.0.2", pod="p", hostname="h")],
        )
    ]
    r = build(service("db", headless=True), slices, RecordOptions(endpoint_pod_names=True))
    base = "db.default.svc.cluster.local"
    assert (f"db-abc.{base}", QTYPE.A) in r.answers
    assert (f"h.{base}", QTYPE.A) in r.answers
    assert (f"10-1-0-1.{base}", QTYPE.A) not in r.answers


def test_external_name_is_a_cname_and_an_ipv4_literal_is_not_served():
    r = build(service("ext", external_name="www.example.org."))
    owner = "ext.default.svc.cluster.local"
    assert data(r, owner, QTYPE.CNAME) == ["www.example.org."]
    assert r.aliases == {owner: "www.example.org"}
    assert build(service("ext", external_name="10.0.0.1")).answers == {}


def test_names_include_empty_non_terminals_below_the_service():
    r = build(service("web", ports=[{"name": "http", "port": 80}]))
    assert f"_tcp.{BASE}" in r.names and BASE in r.names
    assert "default.svc.cluster.local" in r.names


def test_dashed_ip_forms_match_coredns():
    assert dashed_ip("10.0.0.1") == "10-0-0-1"
    assert dashed_ip("fd00::1") == "fd00--1"
    assert dashed_ip("fd00::") == "fd00--0"
    assert ip_from_dashed("10-0-0-1") == "10.0.0.1"
    assert ip_from_dashed("fd00-10--1") == "fd00:10::1"
    assert ip_from_dashed("300-0-0-1") is None
    assert ip_from_dashed("nope") is None
