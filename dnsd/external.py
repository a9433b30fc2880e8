"""Services' outside addresses in outside zones: `--external-zone`, CoreDNS's k8s_external.

`<svc>.<ns>.<zone>` answers the Service's `spec.externalIPs` and LoadBalancer ingress IPs (A /
AAAA, duplicates once), `_<port>._<proto>.<svc>.<ns>.<zone>` SRV per named port and the bare
name SRV for every port, with the Service name as target and its addresses as glue (CoreDNS
kubernetes/external.go + k8s_external/msg_to_dns.go, weights as its srv(): floor(100 / the
address x port pairs asked)). A LoadBalancer with a hostname ingress and no IP is a CNAME to
it. With `--external-headless`, a headless Service without external IPs answers its ready
endpoints as in the cluster zone (`<endpoint>.<svc>.<ns>.<zone>`, SRV targets those names).
The zone's apex has its own SOA (`ns1.dns.<zone>. hostmaster.dns.<zone>.`) and NS
`ns1.dns.<zone>`, whose addresses are the DNS Service's external addresses (its ClusterIPs if it
has none). Everything is encoded ahead like the cluster zone's records: only Services with
external addresses (and headless ones with `--external-headless`) have any.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from dnsd import answers as enc
from dnsd import wire
from dnsd.names import to_wire
from dnsd.records import (
    Record,
    RecordOptions,
    ServiceRecords,
    Soa,
    Srv,
    Target,
    _headless,
    add_name,
    address_of,
    address_rr,
    cname_rr,
    ready_addresses,
)
from dnsd.wire import TYPE_SRV, Answer

if TYPE_CHECKING:
    from kwatch.models import EndpointSlice, Service

APEX = "dns"  # CoreDNS k8s_external `apex` default: the label the nameserver lives under
NS_LABEL = "ns1"


def outside_addresses(service: Service) -> tuple[list[str], list[str]]:
    """(IPs, hostnames): spec.externalIPs then LoadBalancer ingress IPs, each once; the
    ingress hostnames of ingress entries without an IP."""
    ips = list(service.spec.external_ips)
    hostnames = []
    for ingress in service.status.load_balancer.ingress:
        if ingress.ip:
            ips.append(ingress.ip)
        elif ingress.hostname:
            hostnames.append(ingress.hostname.rstrip(".").lower())
    return list(dict.fromkeys(ips)), hostnames


def add_service(
    records: ServiceRecords,
    service: Service,
    slices: list[EndpointSlice],
    options: RecordOptions,
) -> None:
    """`service`'s records in every external zone, added to `records`."""
    if service.is_external_name:
        return
    ips, hostnames = outside_addresses(service)
    name, ns = service.metadata.name, service.metadata.namespace
    for zone in options.external_zones:
        base = f"{name}.{ns}.{zone}".lower()
        if ips:
            _addresses(records, service, ips, base, options.ttl)
        elif hostnames:
            # CoreDNS answers a CNAME per hostname; one owner can hold only one (RFC 1034
            # §3.6.2): the first. Its addresses are chased like an ExternalName's.
            records.add(base, wire.TYPE_CNAME, cname_rr(base, hostnames[0], options.ttl))
            records.aliases[base] = hostnames[0]
        elif options.external_headless and service.is_headless:
            ready = ready_addresses(service, slices, options.endpoint_pod_names)
            if ready:
                publish_all = service.spec.publish_not_ready_addresses
                _headless(records, slices, ready, base, zone, options, False, publish_all)
                continue  # _headless entered its names
        for key in list(records.answers):
            if key[0].endswith(base):
                add_name(records.names, key[0], zone)


def _addresses(
    records: ServiceRecords, service: Service, ips: list[str], base: str, ttl: int
) -> None:
    rdatas = [address_of(ip) for ip in ips]
    glue = [Record(base, qtype, ttl, rdata) for qtype, rdata in rdatas]
    for rr, ip in zip(glue, ips, strict=True):
        records.add(base, rr.rtype, rr, ip)
    ports = service.spec.ports
    for port in ports:
        if not port.name:
            continue  # SPEC §2.3.2 as in the cluster zone: unnamed ports have no SRV name
        owner = f"_{port.name}._{port.protocol}.{base}".lower()
        asked = [p for p in ports if p.name == port.name and p.protocol == port.protocol]
        srv = Srv(0, _weight(len(ips) * len(asked)), port.port, base)
        records.add(owner, TYPE_SRV, Record(owner, TYPE_SRV, ttl, srv), repr(srv))
        records.additional[(owner, TYPE_SRV)] = glue
    if ports:
        weight = _weight(len(ips) * len(ports))
        for port in ports:
            srv = Srv(0, weight, port.port, base)
            records.add(base, TYPE_SRV, Record(base, TYPE_SRV, ttl, srv), repr(srv))
        records.additional[(base, TYPE_SRV)] = glue


def _weight(pairs: int) -> int:
    """k8s_external srv(): every (address, port) pair weighs 100 of the total, floor, >= 1."""
    return max(1, 100 // pairs) if pairs else 100


def apex_records(zone: str, ttl: int, serial: int, ns_ips: list[str]) -> ServiceRecords:
    """SOA and NS at the apex, `ns1.dns.<zone>` A/AAAA (k8s_external apex.go)."""
    records = ServiceRecords()
    ns_name = f"{NS_LABEL}.{APEX}.{zone}"
    records.answers[(zone, wire.TYPE_SOA)] = [soa_rr(zone, ttl, serial)]
    records.answers[(zone, wire.TYPE_NS)] = [Record(zone, wire.TYPE_NS, ttl, Target(ns_name))]
    glue = []
    for ip in ns_ips:
        qtype, rr = address_rr(ns_name, ip, ttl)
        records.answers.setdefault((ns_name, qtype), []).append(rr)
        glue.append(rr)
    records.additional[(zone, wire.TYPE_NS)] = glue
    records.names.update((zone, f"{APEX}.{zone}", ns_name))
    return records


def soa_rr(zone: str, ttl: int, serial: int) -> Record:
    mname, rname = f"{NS_LABEL}.{APEX}.{zone}", f"hostmaster.{APEX}.{zone}"
    times = (serial, enc.SOA_REFRESH, enc.SOA_RETRY, enc.SOA_EXPIRE, ttl)
    return Record(zone, wire.TYPE_SOA, ttl, Soa(mname, rname, times))


def negative(zone: str, ttl: int, serial: int, rcode: int) -> Answer:
    """NXDOMAIN / NODATA with the external zone's own SOA (uncompressed: any question)."""
    rdata = (
        to_wire(f"{NS_LABEL}.{APEX}.{zone}")
        + to_wire(f"hostmaster.{APEX}.{zone}")
        + struct.pack("!IIIII", serial, enc.SOA_REFRESH, enc.SOA_RETRY, enc.SOA_EXPIRE, ttl)
    )
    soa = to_wire(zone) + struct.pack("!HHIH", wire.TYPE_SOA, wire.CLASS_IN, ttl, len(rdata))
    soa += rdata
    return wire.make_answer(rcode, 0, 1, 0, soa, (len(soa),))
