"""What one Service owns in the cluster zones: pure functions from API objects to records.

Implements the Kubernetes DNS-Based Service Discovery specification 1.1.0 §2.3-§2.5 and
CoreDNS's plugin/kubernetes where the spec is silent (dns-features.md §1, §2).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from dnsd.names import dashed_ip, reverse_of_packed
from dnsd.wire import TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_PTR, TYPE_SRV

if TYPE_CHECKING:
    from kwatch.models import EndpointSlice, Service

RRKey = tuple[str, int]  # (owner name, qtype)


# --- records: plain tuples the packer in dnsd.answers reads (no dnslib objects per record) -----
# Names are dotted text, lower case, without the trailing dot; each rdata's repr() is the text
# dnslib prints for it, so records read the same whichever library built them.


class Address(NamedTuple):
    """A / AAAA rdata: the address as text and as the 4 or 16 wire bytes."""

    text: str
    packed: bytes

    def __repr__(self) -> str:
        return self.text


class Srv(NamedTuple):
    """SRV rdata (RFC 2782); the target is written uncompressed, as dnslib does."""

    priority: int
    weight: int
    port: int
    target: str

    def __repr__(self) -> str:
        return f"{self.priority} {self.weight} {self.port} {self.target}."


class Target(NamedTuple):
    """CNAME / PTR / NS rdata: one (compressible) domain name."""

    name: str

    def __repr__(self) -> str:
        return f"{self.name}."


class Txt(NamedTuple):
    """TXT rdata: the character-strings, each at most 255 bytes."""

    strings: tuple[bytes, ...]

    def __repr__(self) -> str:
        return ",".join(f'"{s.decode("latin-1")}"' for s in self.strings)


class Soa(NamedTuple):
    """SOA rdata (RFC 1035 §3.3.13)."""

    mname: str
    rname: str
    times: tuple[int, int, int, int, int]  # serial, refresh, retry, expire, minimum

    def __repr__(self) -> str:
        return f"{self.mname}. {self.rname}. {' '.join(map(str, self.times))}"


RData = Address | Srv | Target | Txt | Soa


class Record(NamedTuple):
    """One resource record of class IN (field names as dnslib's RR, so either reads alike)."""

    rname: str
    rtype: int
    ttl: int
    rdata: RData


def address_of(ip: str) -> tuple[int, Address]:
    """(qtype, rdata) of an IP; raises ValueError for something that is not an address."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        packed = socket.inet_pton(family, ip)
    except OSError as err:
        raise ValueError(f"invalid address {ip!r}") from err
    return (TYPE_AAAA if family == socket.AF_INET6 else TYPE_A), Address(ip, packed)


@dataclass(frozen=True)
class RecordOptions:
    """The settings that shape records (CoreDNS plugin/kubernetes options)."""

    zones: tuple[str, ...] = ("cluster.local",)
    ttl: int = 5
    endpoint_pod_names: bool = False
    ignore_empty_service: bool = False
    # PTR for the ready endpoint IPs of ClusterIP Services too (CoreDNS does; the spec does not
    # ask for it). About 0.3 KB of RSS per endpoint IP (answers are encoded ahead), so opt-in.
    endpoint_ptrs: bool = False
    # CoreDNS k8s_external (dnsd.external): zones answering Services' outside addresses, and
    # whether headless Services without any answer their endpoints there.
    external_zones: tuple[str, ...] = ()
    external_headless: bool = False


class PtrRank(IntEnum):
    """Why a reverse name points at a Service's name: the order a shared reverse name lists
    its targets in (lowest first), and what yields to what (see dnsd.zone)."""

    CLUSTER_IP = 0  # SPEC §2.3.3
    HEADLESS_ENDPOINT = 1  # SPEC §2.4.3
    # CoreDNS extension (k8s/reverse.go): a ready endpoint of a ClusterIP Service. CoreDNS looks
    # the IP up among ClusterIPs first and only then among endpoints, so it yields to a ClusterIP.
    SERVICE_ENDPOINT = 2


class PtrTargets(NamedTuple):
    """What one Service puts at one reverse name."""

    rank: PtrRank
    names: list[str]  # PTR targets, lower case, without the trailing dot


@dataclass
class ServiceRecords:
    """Records one Service contributes; names are lower case, without the trailing dot."""

    answers: dict[RRKey, list[Record]] = field(default_factory=dict)
    additional: dict[RRKey, list[Record]] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)  # every name that exists, with its ancestors
    ptrs: dict[str, PtrTargets] = field(default_factory=dict)  # reverse name -> its targets
    aliases: dict[str, str] = field(default_factory=dict)  # ExternalName owner -> target
    _seen: set[tuple[str, int, str]] = field(default_factory=set, repr=False)

    def add_ptr(self, packed: bytes, rank: PtrRank, target: str) -> None:
        """PTR from the address `packed` (4 or 16 bytes) to `target`. A Service puts one rank
        at a reverse name, the lowest: its ClusterIP that is also its own endpoint's IP is
        answered as the ClusterIP only, as CoreDNS does."""
        rev = reverse_of_packed(packed)
        current = self.ptrs.get(rev)
        if current is None or rank < current.rank:
            self.ptrs[rev] = PtrTargets(rank, [target])
        elif rank == current.rank:
            current.names.append(target)

    def add(self, name: str, qtype: int, rr: Record, data: str | None = None) -> None:
        """Append `rr` unless the same data is already there (duplicates across EndpointSlices
        are collapsed, dns-features 1.11); `data` is the rdata as text when the caller has it."""
        ident = (name, qtype, data if data is not None else repr(rr.rdata))
        if ident not in self._seen:
            self._seen.add(ident)
            key = (name, qtype)
            rrs = self.answers.get(key)
            if rrs is None:
                self.answers[key] = [rr]
            else:
                rrs.append(rr)


def address_rr(name: str, ip: str, ttl: int) -> tuple[int, Record]:
    qtype, rdata = address_of(ip)
    return qtype, Record(name, qtype, ttl, rdata)


def add_name(names: set[str], name: str, zone: str) -> None:
    """Add `name` and every ancestor strictly below `zone` (empty non-terminals exist:
    RFC 8020); stops at the first one already there, whose ancestors are in as well."""
    suffix = "." + zone
    while name not in names and name.endswith(suffix):
        names.add(name)
        name = name[name.index(".") + 1 :]


def srv_weight(count: int) -> int:
    """CoreDNS plugin/backend_lookup.go SRV(): every record priority 0, weight
    floor(100 / N), at least 1, N = the records its backend lookup matched for the question."""
    return max(1, 100 // count) if count else 100


class SrvSet:
    """One SRV RRset as CoreDNS's SRV() builds it from kubernetes.go findServices' records:
    `count` is every record the question matched (each address x matching port: dual-stack
    addresses, duplicates across EndpointSlices and portless slices' port -1 sentinel
    included), which weighs the set; `targets` are the distinct (target, port) pairs SRV()
    answers after dropping duplicates and port -1."""

    __slots__ = ("count", "targets")

    def __init__(self) -> None:
        self.count = 0
        self.targets: dict[tuple[str, int], None] = {}  # an ordered set

    def add(self, target: str, port: int | None, times: int = 1) -> None:
        self.count += times
        if port is not None:
            self.targets[(target, port)] = None


class _Port(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def port(self) -> int: ...


def port_owner(port_name: str, protocol: str, base: str) -> str:
    """`_<port>._<proto>.<base>`, lower case (SPEC §2.3.2)."""
    return f"_{port_name}._{protocol}.{base}".lower()


def service_srv_sets(ports: Iterable[_Port], base: str, addresses: int) -> dict[str, SrvSet]:
    """SRV RRsets of a Service with virtual IPs (ClusterIPs, clusterset IPs), target `base`.
    CoreDNS kubernetes.go findServices matches each Service port against the question
    (matchPortAndProtocol: `_<port>._<proto>` one named port, the bare name every port, named
    or not) and makes a record per matching port and ClusterIP; so a single-stack port weighs
    100, a dual-stack one 50, and the bare name 100 / (ports x addresses)."""
    sets: dict[str, SrvSet] = {}
    for port in ports:
        owners = [base, port_owner(port.name, port.protocol, base)] if port.name else [base]
        for owner in owners:
            srvs = sets.get(owner)
            if srvs is None:
                sets[owner] = srvs = SrvSet()
            srvs.add(base, port.port, addresses)
    return sets


def _is_ipv4_literal(name: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, name)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class ReadyAddress:
    ip: str
    hostname: str  # the endpoint's DNS label: hostname, pod name, or dashed IP


def ready_addresses(
    service: Service, slices: Iterable[EndpointSlice], endpoint_pod_names: bool
) -> list[ReadyAddress]:
    """Ready endpoint addresses over all the Service's slices, duplicates dropped.

    Ready = EndpointSlice condition `ready` (absent = ready), as CoreDNS reads it
    (dns-features 1.18). With publishNotReadyAddresses the EndpointSlice controller already sets
    ready=true; honouring the flag here as well keeps manifest-fed slices consistent with that.
    """
    publish_all = service.spec.publish_not_ready_addresses
    seen: set[tuple[str, str]] = set()
    out = []
    for eps in slices:
        if eps.address_type == "FQDN":
            continue
        for endpoint in eps.endpoints:
            if not (endpoint.is_ready or publish_all):
                continue
            for ip in endpoint.addresses:
                hostname = _endpoint_hostname(
                    endpoint.hostname, endpoint.target_ref, ip, endpoint_pod_names
                )
                if (ip, hostname) not in seen:
                    seen.add((ip, hostname))
                    out.append(ReadyAddress(ip, hostname.lower()))
    return out


def _endpoint_hostname(hostname: str | None, target_ref: object, ip: str, pod_names: bool) -> str:
    """CoreDNS endpointHostname: hostname, else pod name (endpoint_pod_names), else dashed IP."""
    if hostname:
        return hostname
    if pod_names and target_ref is not None:
        kind = getattr(target_ref, "kind", "")
        name = getattr(target_ref, "name", "")
        if kind == "Pod" and name and len(name) < 64 and "." not in name:
            return str(name)
    return dashed_ip(ip)


def service_records(
    service: Service, slices: list[EndpointSlice], options: RecordOptions
) -> ServiceRecords:
    """Every record of `service` in every cluster zone."""
    records = ServiceRecords()
    ns, name = service.metadata.namespace, service.metadata.name
    if service.is_external_name:
        for zone in options.zones:
            _external_name(records, service, f"{name}.{ns}.svc.{zone}".lower(), zone, options)
        return records
    ready = ready_addresses(service, slices, options.endpoint_pod_names)
    if service.is_headless:
        if not ready:
            return records  # SPEC §2.4.1: no ready endpoints -> NXDOMAIN
        for index, zone in enumerate(options.zones):
            base = f"{name}.{ns}.svc.{zone}".lower()
            _headless(
                records,
                slices,
                ready,
                base,
                zone,
                options,
                primary=index == 0,
                publish_all=service.spec.publish_not_ready_addresses,
            )
        return records
    cluster_ips = service.cluster_ips
    # No IP allocated yet, or `ignore empty_service` without ready endpoints: the name does
    # not exist (the endpoints' PTRs below do, as CoreDNS finds them without the Service).
    if cluster_ips and not (options.ignore_empty_service and not ready):
        for index, zone in enumerate(options.zones):
            base = f"{name}.{ns}.svc.{zone}".lower()
            _cluster_ip(records, service, cluster_ips, base, zone, options, primary=index == 0)
    if options.endpoint_ptrs:
        _endpoint_ptrs(records, ready, f"{name}.{ns}.svc.{options.zones[0]}".lower())
    return records


def _cluster_ip(
    records: ServiceRecords,
    service: Service,
    cluster_ips: list[str],
    base: str,
    zone: str,
    options: RecordOptions,
    primary: bool,
) -> None:
    ttl = options.ttl
    rdatas = [address_of(ip) for ip in cluster_ips]  # SPEC §2.3.1, dual-stack
    addresses = [(qtype, Record(base, qtype, ttl, rdata)) for qtype, rdata in rdatas]
    for (qtype, rr), ip in zip(addresses, cluster_ips, strict=True):
        records.add(base, qtype, rr, ip)
    # SPEC §2.3.2: `_<port>._<proto>` per named port; CoreDNS extension (dns-features 2.5):
    # SRV at the bare Service name for every port, named or not.
    srv_sets = service_srv_sets(service.spec.ports, base, len(addresses))
    add_srv_sets(records, srv_sets, {base: [rr for _, rr in addresses]}, ttl, base, zone)
    if primary:
        # SPEC §2.3.3: PTR for each ClusterIP, pointing into the first (primary) zone like
        # CoreDNS reverse.go.
        for _, rdata in rdatas:
            records.add_ptr(rdata.packed, PtrRank.CLUSTER_IP, base)


def _endpoint_ptrs(records: ServiceRecords, ready: list[ReadyAddress], base: str) -> None:
    """CoreDNS extension (k8s/reverse.go serviceRecordForIP): a ready endpoint IP of a ClusterIP
    Service points at `<hostname>.<svc>.<ns>.svc.<primary zone>`, hostname as for headless
    Services (explicit hostname, pod name with endpoint_pod_names, else the dashed IP)."""
    for address in ready:
        _, rdata = address_of(address.ip)
        records.add_ptr(rdata.packed, PtrRank.SERVICE_ENDPOINT, f"{address.hostname}.{base}")


def _headless(
    records: ServiceRecords,
    slices: list[EndpointSlice],
    ready: list[ReadyAddress],
    base: str,
    zone: str,
    options: RecordOptions,
    primary: bool,
    publish_all: bool,
) -> None:
    ttl = options.ttl
    glue: dict[str, list[Record]] = {}
    for address in ready:
        owner = f"{address.hostname}.{base}"
        qtype, rdata = address_of(address.ip)
        rr = Record(owner, qtype, ttl, rdata)
        records.add(owner, qtype, rr, address.ip)  # SPEC §2.4.1: <hostname>.<svc>.<ns>.svc
        glue.setdefault(owner, []).append(rr)
        records.add(base, qtype, Record(base, qtype, ttl, rdata), address.ip)
        if primary:
            records.add_ptr(rdata.packed, PtrRank.HEADLESS_ENDPOINT, owner)  # SPEC §2.4.3
    # SPEC §2.4.2: per ready endpoint x named port; the port is the EndpointSlice's (CoreDNS),
    # and the bare name has every port, named or not (CoreDNS findServices, headless branch).
    srv_sets: dict[str, SrvSet] = {base: SrvSet()}
    for eps in slices:
        if eps.address_type == "FQDN":
            continue
        owners = slice_ports(eps, base)
        for endpoint in eps.endpoints:
            if not (endpoint.is_ready or publish_all):
                continue
            for ip in endpoint.addresses:
                label = _endpoint_hostname(
                    endpoint.hostname, endpoint.target_ref, ip, options.endpoint_pod_names
                )
                add_endpoint_srvs(srv_sets, owners, f"{label.lower()}.{base}")
    add_srv_sets(records, srv_sets, glue, ttl, base, zone)


SlicePorts = list[tuple[str | None, int | None]]  # (`_<port>._<proto>` owner or None, port)


def slice_ports(eps: EndpointSlice, base: str) -> SlicePorts:
    """Each port of an EndpointSlice with its `_<port>._<proto>` owner (None: unnamed), as
    CoreDNS object/endpoint.go reads it: no port number is port -1, which SRV() counts but
    does not answer, and a slice without ports has that one sentinel port."""
    if not eps.ports:
        return [(None, None)]
    return [(port_owner(p.name, p.protocol, base) if p.name else None, p.port) for p in eps.ports]


def add_endpoint_srvs(srv_sets: dict[str, SrvSet], ports: SlicePorts, target: str) -> None:
    """One ready endpoint address of a headless Service, `target` its name: a record per port
    at the bare name (the SrvSet at the first key) and per named port at its owner."""
    bare = next(iter(srv_sets.values()))
    for owner, port in ports:
        bare.add(target, port)
        if owner is not None:
            srvs = srv_sets.get(owner)
            if srvs is None:
                srv_sets[owner] = srvs = SrvSet()
            srvs.add(target, port)


def add_srv_sets(
    records: ServiceRecords,
    srv_sets: dict[str, SrvSet],
    glue: dict[str, list[Record]],
    ttl: int,
    base: str,
    zone: str,
) -> None:
    """SRV RRsets (owner -> set), each record weighed over its set's count as CoreDNS's
    SRV() does; `glue` maps a target to its address records (SPEC §2.3.2, §2.4.2 MAY). Every
    name at or below `base` is entered into the zone's names."""
    for owner, srvs in srv_sets.items():
        if not srvs.targets:
            continue  # nothing but port -1: CoreDNS answers no record (NODATA)
        weight = srv_weight(srvs.count)
        glued: dict[str, None] = {}  # a target with several ports is glued once
        for target, port in srvs.targets:
            srv = Srv(0, weight, port, target)
            records.add(owner, TYPE_SRV, Record(owner, TYPE_SRV, ttl, srv), f"{port} {target}")
            glued[target] = None
        if len(glued) == 1:  # one target (a ClusterIP Service's name): share its glue list
            extra = glue.get(next(iter(glued)), [])
        else:
            extra = [rr for target in glued for rr in glue.get(target, ())]
        records.additional[(owner, TYPE_SRV)] = extra
    for key in list(records.answers):
        if key[0].endswith(base):
            add_name(records.names, key[0], zone)


def _external_name(
    records: ServiceRecords, service: Service, owner: str, zone: str, options: RecordOptions
) -> None:
    """SPEC §2.5: CNAME to spec.externalName; names below it do not exist."""
    target = (service.spec.external_name or "").rstrip(".")
    if not target or _is_ipv4_literal(target):
        return  # CoreDNS serves nothing for an IPv4-literal externalName (coredns#2324)
    records.add(owner, TYPE_CNAME, cname_rr(owner, target, options.ttl))
    records.aliases[owner] = target
    add_name(records.names, owner, zone)


def cname_rr(owner: str, target: str, ttl: int) -> Record:
    return Record(owner, TYPE_CNAME, ttl, Target(target))


def ptr_rr(owner: str, target: str, ttl: int) -> Record:
    return Record(owner, TYPE_PTR, ttl, Target(target))
