"""Reverse names in the zone index (SPEC §2.3.3, §2.4.3; CoreDNS k8s/reverse.go where silent):
who owns a reverse name, what a shared one answers, and that changing or removing one owner
leaves exactly the others' PTRs. Pure code: ServiceRecords in, stored answers out."""

from __future__ import annotations

from typing import Any

from dnsd import answers as enc
from dnsd import wire
from dnsd.names import reverse_name
from dnsd.records import RecordOptions, service_records
from dnsd.zone import ZoneIndex
from kwatch.resources import ENDPOINTSLICES, SERVICES
from tests.dnsd.helpers import endpoint, endpoint_slice, service

Z = "cluster.local"
POD = "10.1.0.1"
POD_REV = reverse_name(POD)
OPTS = RecordOptions(endpoint_ptrs=True)  # --endpoint-ptrs


def clusterip_with_endpoint(name: str, ip: str = POD, **ep: Any) -> list[dict[str, Any]]:
    return [
        service(name, ips=[f"10.96.0.{sum(map(ord, name)) % 250 + 1}"]),  # one per name
        endpoint_slice(f"{name}-1", name, [endpoint(ip, **ep)]),
    ]


def headless_with_endpoint(name: str, ip: str = POD, **ep: Any) -> list[dict[str, Any]]:
    return [
        service(name, headless=True),
        endpoint_slice(f"{name}-1", name, [endpoint(ip, **ep)]),
    ]


class Zone:
    """A ZoneIndex fed Service by Service, as the controller does."""

    def __init__(self) -> None:
        self.index = ZoneIndex([Z], 5)

    def set(self, objects: list[dict[str, Any]]) -> None:
        svc = SERVICES.parse(objects[0])
        slices = [ENDPOINTSLICES.parse(o) for o in objects[1:]]
        self.index.set_source(svc.key, service_records(svc, slices, OPTS))

    def delete(self, key: str) -> None:
        self.index.set_source(key, None)

    def ptr(self, rev: str = POD_REV) -> list[str] | None:
        """The PTR targets stored for `rev`, in answer order; None when it has no answer."""
        answer = self.index.lookup(rev, wire.TYPE_PTR)
        if answer is None:
            return None
        return [str(rr.rdata) for rr in enc.decode_answer_records(rev, wire.TYPE_PTR, answer)]


def test_ready_endpoint_of_a_clusterip_service_has_a_ptr_v4_and_v6():
    zone = Zone()
    zone.set(
        [
            service("web", ips=["10.96.0.5", "fd00::5"]),
            endpoint_slice("web-1", "web", [endpoint(POD)]),
            endpoint_slice("web-2", "web", [endpoint("fd00::1:2")], address_type="IPv6"),
        ]
    )
    assert zone.ptr() == [f"10-1-0-1.web.default.svc.{Z}."]
    assert zone.ptr(reverse_name("fd00::1:2")) == [f"fd00--1-2.web.default.svc.{Z}."]
    assert zone.ptr(reverse_name("10.96.0.5")) == [f"web.default.svc.{Z}."]
    assert zone.index.exists(POD_REV)  # another type at the name is NODATA, not forwarded


def test_not_ready_endpoint_of_a_clusterip_service_has_no_ptr():
    zone = Zone()
    zone.set(clusterip_with_endpoint("web", ready=False))
    assert zone.ptr() is None and not zone.index.exists(POD_REV)


def test_endpoint_turning_not_ready_loses_its_ptr_and_regains_it():
    zone = Zone()
    zone.set(clusterip_with_endpoint("web"))
    zone.set(clusterip_with_endpoint("web", ready=False))
    assert zone.ptr() is None and not zone.index.exists(POD_REV)
    zone.set(clusterip_with_endpoint("web"))
    assert zone.ptr() == [f"10-1-0-1.web.default.svc.{Z}."]


def test_ip_shared_by_two_services_lists_both_whatever_order_they_came_in():
    one, two = Zone(), Zone()
    one.set(clusterip_with_endpoint("a"))
    one.set(clusterip_with_endpoint("b"))
    two.set(clusterip_with_endpoint("b"))
    two.set(clusterip_with_endpoint("a"))
    expected = [f"10-1-0-1.a.default.svc.{Z}.", f"10-1-0-1.b.default.svc.{Z}."]
    assert one.ptr() == two.ptr() == expected
    answer = one.index.lookup(POD_REV, wire.TYPE_PTR)
    assert answer == two.index.lookup(POD_REV, wire.TYPE_PTR)
    one.set(clusterip_with_endpoint("a"))  # an update that changes nothing here
    assert one.index.lookup(POD_REV, wire.TYPE_PTR) is answer  # not re-encoded, same order


def test_the_spec_ptr_of_a_headless_endpoint_comes_before_the_extension_ptr():
    # A StatefulSet pod behind its headless Service and a ClusterIP/LoadBalancer Service: both
    # names, as CoreDNS; the hostname one first, so getnameinfo (first answer) is stable.
    sts = headless_with_endpoint("sts", hostname="sts-0")
    lb = clusterip_with_endpoint("lb")
    for order in ((lb, sts), (sts, lb)):
        zone = Zone()
        for objects in order:
            zone.set(objects)
        assert zone.ptr() == [f"sts-0.sts.default.svc.{Z}.", f"10-1-0-1.lb.default.svc.{Z}."]


def test_deleting_one_owner_falls_back_to_the_other_and_the_last_removes_the_name():
    zone = Zone()
    zone.set(clusterip_with_endpoint("a"))
    zone.set(clusterip_with_endpoint("b"))
    zone.delete("default/a")
    assert zone.ptr() == [f"10-1-0-1.b.default.svc.{Z}."]
    zone.set(clusterip_with_endpoint("a"))
    zone.set(clusterip_with_endpoint("b", ip="10.1.0.2"))  # b's pod moved: a keeps the old IP
    assert zone.ptr() == [f"10-1-0-1.a.default.svc.{Z}."]
    assert zone.ptr(reverse_name("10.1.0.2")) == [f"10-1-0-2.b.default.svc.{Z}."]
    zone.delete("default/a")
    assert zone.ptr() is None and not zone.index.exists(POD_REV)
    assert zone.ptr(reverse_name("10.1.0.2")) == [f"10-1-0-2.b.default.svc.{Z}."]


def test_a_cluster_ip_hides_the_extension_ptr_of_an_endpoint_with_the_same_ip():
    # CoreDNS serviceRecordForIP: a ClusterIP match answers alone; endpoints are searched only
    # when no Service has the IP as its ClusterIP.
    zone = Zone()
    vip = "10.96.0.50"
    zone.set(clusterip_with_endpoint("alias", ip=vip))  # a selectorless Service -> a ClusterIP
    assert zone.ptr(reverse_name(vip)) == [f"10-96-0-50.alias.default.svc.{Z}."]
    zone.set([service("real", ips=[vip])])
    assert zone.ptr(reverse_name(vip)) == [f"real.default.svc.{Z}."]
    zone.delete("default/real")
    assert zone.ptr(reverse_name(vip)) == [f"10-96-0-50.alias.default.svc.{Z}."]


def test_a_cluster_ip_does_not_hide_a_headless_endpoint_ptr_the_spec_requires():
    zone = Zone()
    vip = "10.96.0.50"
    zone.set(headless_with_endpoint("db", ip=vip, hostname="db-0"))
    zone.set([service("real", ips=[vip])])
    assert zone.ptr(reverse_name(vip)) == [
        f"real.default.svc.{Z}.",
        f"db-0.db.default.svc.{Z}.",
    ]


def test_the_same_target_from_two_slices_is_answered_once():
    zone = Zone()
    zone.set(
        [
            service("web"),
            endpoint_slice("web-1", "web", [endpoint(POD)]),
            endpoint_slice("web-2", "web", [endpoint(POD)]),  # EndpointSlice skew
        ]
    )
    assert zone.ptr() == [f"10-1-0-1.web.default.svc.{Z}."]
