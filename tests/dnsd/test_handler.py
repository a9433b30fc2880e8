"""Query in, answer out through the zone index and Handler: bytes only, no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dnslib
import pytest

from dnsd.controller import ZoneController
from dnsd.handler import Handler, PodMode
from dnsd.records import RecordOptions
from dnsd.zone import ZoneIndex
from kwatch.cluster import DEFAULT_INDEXERS
from kwatch.resources import ENDPOINTSLICES, NAMESPACES, PODS, SERVICES, Resource
from kwatch.store import Store
from tests.dnsd.helpers import (
    endpoint,
    endpoint_slice,
    headless_pool,
    namespace,
    pod,
    records,
    service,
)

Z = "cluster.local"


class FakeUpstream:
    def __init__(self) -> None:
        self.forwarded: list[bytes] = []
        self.resolved: list[tuple[str, int]] = []
        self.saturated = False  # True: refuse at once, as the forwarder above max-concurrent

    async def forward(self, query: bytes) -> bytes | None:
        return self._reply(query)

    def ask_later(
        self, query: bytes, then: Callable[[bytes], bytes] | None = None
    ) -> asyncio.Future[bytes] | None:
        """Like the forwarder: a future of the answer (passed through `then`); None: drop."""
        response = self._reply(query)
        if response is None:
            return None
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        future.set_result(response if then is None else then(response))
        return future

    def _reply(self, query: bytes) -> bytes | None:
        self.forwarded.append(query)
        try:
            request = dnslib.DNSRecord.parse(query)
        except dnslib.DNSError:
            return None  # like the real forwarder: drop what cannot be parsed
        # Not request.reply(): that copies the query's flag bits (rcode included) verbatim.
        reply = dnslib.DNSRecord(
            dnslib.DNSHeader(id=request.header.id, qr=1, rd=request.header.rd, ra=1),
            q=request.q,
        )
        reply.add_answer(
            dnslib.RR(request.q.qname, dnslib.QTYPE.A, ttl=30, rdata=dnslib.A("192.0.2.1"))
        )
        return reply.pack()

    def answer_at_once(self, query: bytes) -> bytes | None:
        if not self.saturated:
            return None  # nothing cached: every query is forwarded
        request = dnslib.DNSRecord.parse(query)
        header = dnslib.DNSHeader(id=request.header.id, qr=1, rd=request.header.rd, rcode=5)
        return dnslib.DNSRecord(header, q=request.q).pack()

    async def resolve(self, qname: str, qtype: int) -> list[dnslib.RR]:
        self.resolved.append((qname, qtype))
        if qtype != dnslib.QTYPE.A:
            return []
        return [dnslib.RR(qname, qtype, ttl=60, rdata=dnslib.A("192.0.2.80"))]


class Cluster:
    """Stores, controller, index and handler wired like dnsd.main, fed by hand."""

    def __init__(
        self,
        objects: list[dict[str, Any]],
        *,
        zones=(Z,),
        pods=PodMode.DISABLED,
        synced=True,
        **options: Any,
    ) -> None:
        only = options.pop("only_namespaces", frozenset())
        self.stores: dict[Resource, Store[Any]] = {
            r: Store(r.name, DEFAULT_INDEXERS.get(r))
            for r in (SERVICES, ENDPOINTSLICES, NAMESPACES, PODS)
        }
        self.index = ZoneIndex(list(zones), options.get("ttl", 5))
        self.controller = ZoneController(
            self.index,
            RecordOptions(zones=tuple(zones), **options),
            self.stores[SERVICES],
            self.stores[ENDPOINTSLICES],
            self.stores[NAMESPACES],
            pods=self.stores[PODS],
            pod_mode=pods,
            only_namespaces=only,
        )
        self.upstream = FakeUpstream()
        self.handler = Handler(
            self.index, upstream=self.upstream, pod_mode=pods, pod_exists=self.controller.pod_exists
        )
        self.apply(objects)
        if synced:
            for store in self.stores.values():
                store.mark_synced()
            self.controller.apply_pending()

    def apply(self, objects: list[dict[str, Any]]) -> None:
        per: dict[Resource, dict[str, Any]] = {r: {} for r in self.stores}
        for obj in objects:
            resource = {
                "Service": SERVICES,
                "EndpointSlice": ENDPOINTSLICES,
                "Namespace": NAMESPACES,
                "Pod": PODS,
            }[obj["kind"]]
            parsed = resource.parse(obj)
            per[resource][parsed.key] = parsed
        for resource, objs in per.items():
            self.stores[resource].replace(objs)
        if self.index.ready:
            self.controller.apply_pending()

    def ask(
        self, name: str, rdtype: str = "A", *, rdclass: str = "IN", tcp: bool = False, **kw: Any
    ) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, rdclass, **kw)

        async def handle() -> bytes | None:  # a loop running, as in dnsd
            result = self.handler.handle(query.to_wire(), tcp)
            return result if isinstance(result, bytes | None) else await result

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            result = asyncio.run(handle())
        else:  # an async test: only names answered at once
            answered = self.handler.handle(query.to_wire(), tcp)
            assert isinstance(answered, bytes | None), "await the handler in an async test"
            result = answered
        assert result is not None
        return dns.message.from_wire(result)


BASIC = [
    namespace("default"),
    namespace("empty"),
    service("web", ips=["10.96.0.5", "fd00::5"], ports=[{"name": "http", "port": 80}]),
    service("db", headless=True, ports=[{"name": "pg", "port": 5432}]),
    endpoint_slice(
        "db-1",
        "db",
        [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2")],
        ports=[{"name": "pg", "port": 15432}],
    ),
    service("ext", external_name="www.example.org"),
    service("alias", external_name="web.default.svc.cluster.local"),
]


@pytest.fixture
def cluster() -> Cluster:
    return Cluster(BASIC)


def rcode(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())


def soa_minimum(msg: dns.message.Message) -> int:
    (rrset,) = msg.authority
    return int(rrset[0].minimum)


def test_unknown_name_in_the_zone_is_nxdomain_with_the_zone_soa(cluster):
    msg = cluster.ask(f"nope.default.svc.{Z}")
    assert rcode(msg) == "NXDOMAIN" and not msg.answer
    assert msg.authority[0].name.to_text() == f"{Z}."
    assert soa_minimum(msg) == 5 and msg.flags & dns.flags.AA


def test_existing_name_with_another_type_is_nodata_with_the_zone_soa(cluster):
    msg = cluster.ask(f"web.default.svc.{Z}", "TXT")
    assert rcode(msg) == "NOERROR" and not msg.answer and soa_minimum(msg) == 5


@pytest.mark.parametrize(
    "name",
    [f"svc.{Z}", f"pod.{Z}", f"default.svc.{Z}", f"empty.svc.{Z}", f"_tcp.web.default.svc.{Z}", Z],
)
def test_empty_non_terminals_are_nodata(cluster, name):
    msg = cluster.ask(name, "A")
    assert rcode(msg) == "NOERROR" and not msg.answer and msg.authority


def test_unknown_namespace_is_nxdomain(cluster):
    assert rcode(cluster.ask(f"nosuch.svc.{Z}")) == "NXDOMAIN"


def test_negative_ttl_follows_the_ttl_option():
    msg = Cluster(BASIC, ttl=30).ask(f"nope.default.svc.{Z}")
    assert soa_minimum(msg) == 30 and msg.authority[0].ttl == 30


def test_dns_version_txt_and_apex_soa_ns(cluster):
    assert records(cluster.ask(f"dns-version.{Z}", "TXT")) == [
        (f"dns-version.{Z}", "TXT", '"1.1.0"')
    ]
    soa = cluster.ask(Z, "SOA")
    assert records(soa)[0][2].startswith(f"ns.dns.{Z}. hostmaster.{Z}.")
    assert records(cluster.ask(Z, "NS")) == [(Z, "NS", f"ns.dns.{Z}.")]


def test_ns_glue_comes_from_the_kube_dns_service():
    c = Cluster([*BASIC, service("kube-dns", "kube-system", ips=["10.96.0.10"])])
    msg = c.ask(Z, "NS")
    assert records(msg, "additional") == [(f"ns.dns.{Z}", "A", "10.96.0.10")]
    assert records(c.ask(f"ns.dns.{Z}")) == [(f"ns.dns.{Z}", "A", "10.96.0.10")]


def test_query_case_is_echoed_in_question_and_owner(cluster):
    msg = cluster.ask("WeB.DEFAULT.svc.Cluster.Local")
    assert msg.question[0].name.to_text() == "WeB.DEFAULT.svc.Cluster.Local."
    assert records(msg) == [("WeB.DEFAULT.svc.Cluster.Local", "A", "10.96.0.5")]


def test_names_below_an_external_name_do_not_exist(cluster):
    assert rcode(cluster.ask(f"x.ext.default.svc.{Z}")) == "NXDOMAIN"


def test_external_name_to_an_outside_name_chases_through_the_forwarder(cluster):
    msg = cluster.ask(f"ext.default.svc.{Z}")
    assert records(msg) == [
        (f"ext.default.svc.{Z}", "CNAME", "www.example.org."),
        ("www.example.org", "A", "192.0.2.80"),
    ]
    cluster.ask(f"ext.default.svc.{Z}")
    assert cluster.upstream.resolved == [("www.example.org", 1)]  # second answer cached


def test_external_name_other_types_get_the_cname_only(cluster):
    msg = cluster.ask(f"ext.default.svc.{Z}", "MX")
    assert records(msg) == [(f"ext.default.svc.{Z}", "CNAME", "www.example.org.")]


def test_external_name_to_a_cluster_name_is_resolved_internally(cluster):
    msg = cluster.ask(f"alias.default.svc.{Z}")
    assert records(msg) == [
        (f"alias.default.svc.{Z}", "CNAME", f"web.default.svc.{Z}."),
        (f"web.default.svc.{Z}", "A", "10.96.0.5"),
    ]
    assert cluster.upstream.resolved == []


def test_ptr_for_an_unowned_reverse_name_is_forwarded(cluster):
    msg = cluster.ask("9.9.9.10.in-addr.arpa", "PTR")
    assert len(cluster.upstream.forwarded) == 1 and rcode(msg) == "NOERROR"


def test_owned_reverse_name_with_another_type_is_nodata(cluster):
    msg = cluster.ask("5.0.96.10.in-addr.arpa", "A")
    assert rcode(msg) == "NOERROR" and not msg.answer
    assert msg.authority[0].name.to_text() == "in-addr.arpa."
    assert cluster.upstream.forwarded == []


def test_names_outside_the_zones_are_forwarded(cluster):
    msg = cluster.ask("www.example.org")
    assert records(msg) == [("www.example.org", "A", "192.0.2.1")]


def test_what_the_forwarder_answers_at_once_is_answered_without_a_coroutine(cluster):
    """REFUSED above max-concurrent (or a cache hit) comes back as bytes from handle(), so a
    flood of them costs the event loop no task; it is counted like any answer."""
    cluster.upstream.saturated = True
    wire = dns.message.make_query("flood.example.org", "A").to_wire()
    result = cluster.handler.handle(wire)
    assert isinstance(result, bytes)
    assert rcode(dns.message.from_wire(result)) == "REFUSED"
    assert cluster.upstream.forwarded == []
    assert cluster.handler.stats.responses[(False, 5)] == 1


def test_cluster_names_are_servfail_before_the_stores_synced():
    c = Cluster(BASIC, synced=False)
    assert rcode(c.ask(f"web.default.svc.{Z}")) == "SERVFAIL"
    assert rcode(c.ask("www.example.org")) == "NOERROR"  # forwarding works meanwhile


def test_other_classes_are_refused(cluster):
    msg = cluster.ask(f"web.default.svc.{Z}", rdclass="CH")
    assert rcode(msg) == "REFUSED" and msg.question


def test_zone_transfer_is_refused(cluster):
    assert rcode(cluster.ask(Z, "AXFR")) == "REFUSED"


def test_edns_version_other_than_zero_is_badvers(cluster):
    msg = cluster.ask(f"web.default.svc.{Z}", use_edns=1)
    assert msg.rcode() == dns.rcode.BADVERS


@pytest.mark.parametrize("mode", [PodMode.DISABLED, PodMode.INSECURE, PodMode.VERIFIED])
def test_pod_records_per_mode(mode):
    c = Cluster([*BASIC, pod("p1", "10.2.0.7")], pods=mode)
    msg = c.ask(f"10-2-0-7.default.pod.{Z}")
    other = c.ask(f"10-2-0-8.default.pod.{Z}")
    if mode is PodMode.DISABLED:
        assert rcode(msg) == "NXDOMAIN" and rcode(other) == "NXDOMAIN"
        return
    assert records(msg) == [(f"10-2-0-7.default.pod.{Z}", "A", "10.2.0.7")]
    if mode is PodMode.INSECURE:
        assert rcode(other) == "NOERROR" and other.answer
    else:
        assert rcode(other) == "NXDOMAIN"


def test_pod_names_need_an_existing_namespace_and_a_valid_ip():
    c = Cluster(BASIC, pods=PodMode.INSECURE)
    assert rcode(c.ask(f"10-2-0-7.nosuch.pod.{Z}")) == "NXDOMAIN"
    assert rcode(c.ask(f"10-2-0-999.default.pod.{Z}")) == "NXDOMAIN"
    assert rcode(c.ask(f"default.pod.{Z}")) == "NOERROR"


def test_ipv6_pod_names_answer_aaaa_and_nodata_for_a():
    c = Cluster(BASIC, pods=PodMode.INSECURE)
    assert records(c.ask(f"fd00-10--1.default.pod.{Z}", "AAAA")) == [
        (f"fd00-10--1.default.pod.{Z}", "AAAA", "fd00:10::1")
    ]
    msg = c.ask(f"fd00-10--1.default.pod.{Z}", "A")
    assert rcode(msg) == "NOERROR" and not msg.answer


def test_namespaces_option_hides_other_namespaces():
    c = Cluster(
        [*BASIC, namespace("other"), service("web", "other")], only_namespaces=frozenset({"other"})
    )
    assert rcode(c.ask(f"web.default.svc.{Z}")) == "NXDOMAIN"
    assert rcode(c.ask(f"default.svc.{Z}")) == "NXDOMAIN"
    assert rcode(c.ask(f"web.other.svc.{Z}")) == "NOERROR"


def test_every_zone_is_served_and_ptr_targets_use_the_first():
    c = Cluster(BASIC, zones=(Z, "example.internal"))
    assert records(c.ask("web.default.svc.example.internal")) == [
        ("web.default.svc.example.internal", "A", "10.96.0.5")
    ]
    assert records(c.ask("5.0.96.10.in-addr.arpa", "PTR"))[0][2] == f"web.default.svc.{Z}."
    assert rcode(c.ask("nope.example.internal")) == "NXDOMAIN"


def test_only_the_changed_service_is_re_encoded(cluster):
    before = dict(cluster.index.answers)
    changed = [o for o in BASIC if o["metadata"]["name"] != "web"]
    cluster.apply([*changed, service("web", ips=["10.96.0.6"])])
    after = cluster.index.answers
    db_key = next(k for k in after if k.startswith(b"\x02db\x07default"))
    assert after[db_key] is before[db_key]  # untouched object, not re-encoded
    assert records(cluster.ask(f"web.default.svc.{Z}")) == [
        (f"web.default.svc.{Z}", "A", "10.96.0.6")
    ]
    assert rcode(cluster.ask(f"web.default.svc.{Z}", "AAAA")) == "NOERROR"
    cluster.ask("5.0.96.10.in-addr.arpa", "PTR")
    assert len(cluster.upstream.forwarded) == 1  # the old PTR is nobody's now: forwarded


def test_deleting_a_service_removes_every_name_it_owned(cluster):
    cluster.apply([o for o in BASIC if o["metadata"]["name"] != "db"])
    assert rcode(cluster.ask(f"db.default.svc.{Z}")) == "NXDOMAIN"
    assert rcode(cluster.ask(f"db-0.db.default.svc.{Z}")) == "NXDOMAIN"
    assert rcode(cluster.ask(f"_pg._tcp.db.default.svc.{Z}", "SRV")) == "NXDOMAIN"
    assert rcode(cluster.ask(f"default.svc.{Z}")) == "NOERROR"  # still has a namespace


def test_endpoint_turning_not_ready_disappears_from_the_headless_answer(cluster):
    objs = [o for o in BASIC if o["kind"] != "EndpointSlice"]
    slice_ = endpoint_slice(
        "db-1",
        "db",
        [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2", ready=False)],
        ports=[{"name": "pg", "port": 15432}],
    )
    cluster.apply([*objs, slice_])
    assert [r for _, _, r in records(cluster.ask(f"db.default.svc.{Z}"))] == ["10.1.0.1"]
    assert rcode(cluster.ask(f"10-1-0-2.db.default.svc.{Z}")) == "NXDOMAIN"


def test_ptr_shared_by_two_services_lists_both_until_one_goes():
    shared = [
        service("a", headless=True),
        service("b", headless=True),
        endpoint_slice("a-1", "a", [endpoint("10.1.0.1", hostname="x")]),
        endpoint_slice("b-1", "b", [endpoint("10.1.0.1", hostname="y")]),
    ]
    c = Cluster(shared)
    assert sorted(r for _, _, r in records(c.ask("1.0.1.10.in-addr.arpa", "PTR"))) == [
        f"x.a.default.svc.{Z}.",
        f"y.b.default.svc.{Z}.",
    ]
    c.apply([o for o in shared if o["metadata"]["name"] not in ("b", "b-1")])
    assert [r for _, _, r in records(c.ask("1.0.1.10.in-addr.arpa", "PTR"))] == [
        f"x.a.default.svc.{Z}."
    ]


def test_external_name_answer_follows_its_in_cluster_target(cluster):
    alias_key = next(k for k in cluster.index.answers if k.startswith(b"\x05alias"))
    before = cluster.index.answers[alias_key]
    cluster.apply([*BASIC, service("other", ips=["10.96.0.99"])])  # unrelated change
    assert cluster.index.answers[alias_key] is before  # not re-encoded
    changed = [o for o in BASIC if o["metadata"]["name"] != "web"]
    cluster.apply([*changed, service("web", ips=["10.96.0.6"])])
    assert records(cluster.ask(f"alias.default.svc.{Z}"))[1] == (
        f"web.default.svc.{Z}",
        "A",
        "10.96.0.6",
    )


def test_a_service_whose_names_cannot_be_encoded_is_skipped_and_the_rest_served():
    c = Cluster([*BASIC, service("x" * 70)])  # a 70-byte label: over DNS's 63
    assert records(c.ask(f"web.default.svc.{Z}")) == [(f"web.default.svc.{Z}", "A", "10.96.0.5")]
    assert c.index.ready and "default/" + "x" * 70 not in c.index.sources()


def test_alias_chains_inside_the_cluster_are_followed():
    c = Cluster([*BASIC, service("chain", external_name=f"alias.default.svc.{Z}")])
    assert [t for _, t, _ in records(c.ask(f"chain.default.svc.{Z}"))] == ["CNAME", "CNAME", "A"]


def test_programming_latency_is_measured_from_the_slice_trigger_time(cluster):
    from datetime import UTC, datetime, timedelta

    from prometheus_client import REGISTRY

    labels = {"service_kind": "headless"}
    count = REGISTRY.get_sample_value("dnsd_dns_programming_duration_seconds_count", labels) or 0
    total = REGISTRY.get_sample_value("dnsd_dns_programming_duration_seconds_sum", labels) or 0
    trigger = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    slice_ = endpoint_slice("db-1", "db", [endpoint("10.1.0.9")])
    slice_["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": trigger
    }
    cluster.apply([*[o for o in BASIC if o["kind"] != "EndpointSlice"], slice_])
    after = REGISTRY.get_sample_value("dnsd_dns_programming_duration_seconds_count", labels)
    assert after == count + 1
    observed = REGISTRY.get_sample_value("dnsd_dns_programming_duration_seconds_sum", labels)
    assert 1.5 < observed - total < 30


async def test_a_big_batch_is_applied_in_slices_and_ready_only_when_complete():
    objs = [namespace("default")] + [
        service(f"s{i}", ips=[f"10.97.{i // 250}.{i % 250 + 1}"]) for i in range(1200)
    ]
    c = Cluster(objs, synced=False)
    for store in c.stores.values():
        store.mark_synced()
    assert c.controller.apply_pending(max_services=500) is True
    assert not c.index.ready  # 700 services still to go: cluster names stay SERVFAIL
    assert rcode(c.ask(f"s0.default.svc.{Z}")) == "SERVFAIL"
    task = asyncio.get_running_loop().create_task(c.controller.run())
    try:
        for _ in range(200):
            if c.index.ready:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert c.index.ready and len(c.index.sources()) == 1 + 1 + 1200
    assert rcode(c.ask(f"s1199.default.svc.{Z}")) == "NOERROR"


def test_plain_negative_answers_take_the_fast_path(cluster):
    for name, rdtype, code in [
        (f"nope.default.svc.{Z}", "A", 3),
        (f"web.default.svc.{Z}", "MX", 0),
    ]:
        data = dns.message.make_query(name, rdtype).to_wire()
        udp = cluster.handler.stats.fast[0][1]
        before = dict(udp)
        fast = cluster.handler.handle(data)
        counted = {k: v for k, v in udp.items() if before.get(k) != v}
        assert [(k >> 8, k & 0xF) for k in counted] == [(dns.rdatatype.from_text(rdtype), code)]
        assert fast == cluster.handler.full(data, False)


# --- --loadbalance (CoreDNS loadbalance) ------------------------------------------------------

SPREAD = [
    namespace("default"),
    *headless_pool("pool", [f"10.1.0.{i}" for i in range(1, 6)]),
    *headless_pool("one", ["10.2.0.1"]),
]


def _order(cluster: Cluster, qid: int, **kw: Any) -> list[str]:
    query = dns.message.make_query(f"pool.default.svc.{Z}", "A", **kw)
    query.id = qid
    answered = cluster.handler.handle(query.to_wire(), kw.pop("tcp", False))
    assert isinstance(answered, bytes)
    msg = dns.message.from_wire(answered)
    assert msg.id == qid and rcode(msg) == "NOERROR"
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


@pytest.mark.parametrize("edns", [False, True], ids=["plain", "edns"])
def test_loadbalance_puts_each_address_first_as_often_as_any_other(edns):
    cluster = Cluster(SPREAD)
    cluster.handler.loadbalance = True
    kw = {"use_edns": 0} if edns else {}
    orders = [_order(cluster, qid, **kw) for qid in range(1000, 1010)]
    expected = [f"10.1.0.{i}" for i in range(1, 6)]
    for order in orders:
        assert sorted(order) == expected  # every record, once: a rotation
        start = expected.index(order[0])
        assert order == expected[start:] + expected[:start]
    firsts = [order[0] for order in orders]
    assert {first: firsts.count(first) for first in expected} == dict.fromkeys(expected, 2)


def test_loadbalance_off_keeps_one_order_and_leaves_single_records_alone():
    cluster = Cluster(SPREAD)
    assert {tuple(_order(cluster, qid)) for qid in range(20)} == {
        tuple(f"10.1.0.{i}" for i in range(1, 6))
    }
    cluster.handler.loadbalance = True
    assert cluster.ask(f"one.default.svc.{Z}").answer[0][0].to_text() == "10.2.0.1"


def test_loadbalance_through_the_full_path_and_truncation_keeps_whole_records():
    """An EDNS query with an option (a cookie) takes the full path; a 512-byte limit with
    many endpoints cuts the rotated answer at a record boundary with TC."""
    many = [
        namespace("default"),
        *headless_pool("pool", [f"10.3.{i // 250}.{i % 250 + 1}" for i in range(60)]),
    ]
    cluster = Cluster(many)
    cluster.handler.loadbalance = True
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8)
    firsts = set()
    for qid in range(7, 67, 6):
        full = _order(cluster, qid, use_edns=0, payload=4096, options=[cookie])
        assert len(full) == 60
        firsts.add(full[0])
        query = dns.message.make_query(f"pool.default.svc.{Z}", "A")  # 512 bytes, no EDNS
        query.id = qid
        answered = cluster.handler.handle(query.to_wire())
        assert isinstance(answered, bytes) and len(answered) <= 512
        msg = dns.message.from_wire(answered)
        assert msg.flags & dns.flags.TC
        cut = [rd.to_text() for rrset in msg.answer for rd in rrset]
        assert cut and cut == full[: len(cut)]
    assert len(firsts) == 10
