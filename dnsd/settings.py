"""dnsd's settings: one pydantic model, defaults equal to CoreDNS's (dns-features §4)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from dnsd.forward import Policy
from dnsd.handler import PodMode
from dnsd.names import to_wire
from dnsd.transfer import parse_networks
from kwatch.health import parse_listen
from kwatch.settings import AccessSettings, ListenAddress, settings_or_exit

DESCRIPTION = (
    "Cluster DNS per the Kubernetes DNS-Based Service Discovery specification 1.1.0, "
    "answering like CoreDNS's kubernetes + forward + cache."
)


def parse_hostport(value: str, default_port: int = 53) -> tuple[str, int]:
    """`1.2.3.4`, `1.2.3.4:5353`, `::1`, `[::1]`, `[::1]:53` -> (host, port).

    The host must be an IP address (a resolver is not looked up by name) and the port 1-65535;
    raises ValueError quoting the value otherwise.
    """
    problem = f"expected IP[:PORT] or [IPv6]:PORT, got {value!r}"
    port_text: str | None = None
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(problem)
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host = value
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(problem) from None
    if value.startswith("[") and address.version != 6:
        raise ValueError(problem)
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"port must be 1-65535, got {value!r}")
    return host, int(port_text)


class DnsdSettings(AccessSettings):
    zone: list[str] = Field(
        default_factory=lambda: ["cluster.local"],
        description="cluster zone served (the first is primary: PTR targets, SOA names)",
    )
    ttl: int = Field(5, ge=0, le=3600, description="TTL of cluster records and negative answers")
    pods: PodMode = Field(
        PodMode.DISABLED,
        description="pod records <a-b-c-d>.<ns>.pod.<zone>: disabled, "
        "insecure (any well-formed IP) or verified (a pod with that IP in that namespace)",
    )
    namespaces: list[str] = Field(
        default_factory=list, description="only serve these namespaces (default: all)"
    )
    endpoint_pod_names: bool = Field(
        False, description="name endpoints without a hostname by their pod name, not dashed IP"
    )
    endpoint_ptrs: bool = Field(
        False,
        description="also answer PTR for the ready endpoint IPs of ClusterIP Services, "
        "as CoreDNS does (about 0.3 KB of memory per endpoint IP)",
    )
    endpoint_names: bool = Field(
        True,
        description="answer <hostname or dashed IP>.<svc>.<ns>.svc.<zone> for the ready "
        "endpoints of ClusterIP Services too, as CoreDNS does (looked up when asked)",
    )
    zonal: bool = Field(
        False,
        description="answer <topology-zone>.pin._zone.<svc>.<ns>.svc.<zone> and "
        "<topology-zone>.prefer._zone... for headless Services: their endpoints in that zone "
        "(pin: none -> NODATA; prefer: none -> all), as CoreDNS's zonal option",
    )
    multicluster: list[str] = Field(
        default_factory=list,
        description="zone answering the Multi-Cluster Services API's ServiceImports "
        "(usually clusterset.local), as CoreDNS's multicluster option; watches ServiceImports",
    )
    external_zone: list[str] = Field(
        default_factory=list,
        description="outside zone answering <svc>.<ns>.<ZONE> with the Service's externalIPs "
        "and LoadBalancer ingress addresses, with its own SOA and NS (CoreDNS k8s_external)",
    )
    external_headless: bool = Field(
        False,
        description="in the --external-zone, headless Services without external addresses "
        "answer their ready endpoints (CoreDNS k8s_external headless)",
    )
    ignore_empty_service: bool = Field(
        False, description="NXDOMAIN for ClusterIP services without ready endpoints"
    )
    loadbalance: bool = Field(
        False,
        description="A and AAAA answers of two or more records in an order that changes per "
        "query, each record first as often as any other (CoreDNS loadbalance)",
    )
    upstream: list[str] = Field(
        default_factory=list,
        description="upstream resolver IP[:PORT] or [IPv6]:PORT for names outside the zones "
        "(default: the nameservers of --resolv-conf)",
    )
    stub_domain: list[str] = Field(
        default_factory=list,
        description="ZONE=ADDR[:PORT][,ADDR[:PORT]]...: forward ZONE to these servers; "
        "an ADDR after a comma adds to the ZONE before it",
    )
    resolv_conf: str = Field("/etc/resolv.conf", description="where default upstreams are read")
    cache_size: int = Field(9984, ge=0, description="entries in the positive and negative cache")
    cache_max_ttl: int = Field(3600, ge=0, description="cap on a cached answer's TTL (seconds)")
    cache_max_negative_ttl: int = Field(
        1800, ge=0, description="cap on a cached negative answer's TTL (seconds)"
    )
    forward_policy: Policy = Field(
        "random",
        description="order in which a query tries the upstreams: random, round_robin (the "
        "next one first, the others in order) or sequential (as listed). CoreDNS forward `policy`",
    )
    forward_timeout: float = Field(2.0, gt=0, description="seconds to wait for one upstream")
    max_concurrent: int = Field(1000, ge=1, description="forwarded queries in flight at most")
    slow_queue: int = Field(
        256,
        ge=1,
        description="UDP queries the fast path leaves (forwarded names, malformed packets)"
        " waiting for the event loop at most; more are dropped (udp_queue_full)",
    )
    forward_process: bool = Field(
        True,
        description="forward the names outside dnsd's zones that the UDP threads receive from "
        "a child process with its own GIL, at --forward-nice: cluster names never wait for "
        "forwarding work (TCP, and the parent's own lookups, still forward in the parent); "
        "--no-forward-process forwards in dnsd's event loop and saves the child's ~20 MB",
    )
    forward_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU niceness of the --forward-process child (0-19; raising it needs no "
        "privilege): on a busy core the kernel prefers dnsd's own threads",
    )
    forward_idle: bool = Field(
        True,
        description="run the --forward-process child under SCHED_IDLE (no privilege "
        "needed): a core runs it only when nothing else wants it, and dnsd's threads "
        "preempt it at once; off: --forward-nice alone",
    )
    loop_detect: bool = Field(
        True,
        description="send each upstream a probe name at start (CoreDNS loop): an upstream that "
        "sends it back to dnsd is logged, counted and no longer forwarded to",
    )
    gil_switch_interval: float = Field(
        0.0005,
        gt=0,
        le=0.1,
        description="seconds a busy thread keeps the GIL while another waits for it "
        "(sys.setswitchinterval; Python's own default is 0.005): bounds how long the UDP "
        "threads' cluster names wait while the event loop works through a flood",
    )
    udp_thread_slice: float = Field(
        0.0,
        ge=0,
        le=0.1,
        description="scheduler time slice (seconds) the UDP threads ask Linux for "
        "(sched_setattr; EEVDF, Linux 6.12 and later): a shorter one waits less for a busy "
        "core when a query arrives, with no larger share of the CPU; 0: the kernel's default",
    )
    listen: list[ListenAddress] = Field(
        default_factory=lambda: ["0.0.0.0:53"], description="UDP and TCP listen ADDR:PORT"
    )
    http_listen: ListenAddress = Field(
        ":9153", description="/healthz, /readyz and /metrics ADDR:PORT"
    )
    workers: int = Field(1, ge=1, le=64, description="processes sharing the port (SO_REUSEPORT)")
    lameduck: float = Field(
        0.0,
        ge=0,
        le=300,
        description="seconds dnsd keeps answering after SIGTERM, its health endpoints closed "
        "and its port steered to a successor (CoreDNS health `lameduck`); 0: stop at once",
    )
    max_udp_size: int = Field(
        1232, ge=512, le=65535, description="largest UDP answer and the EDNS size we advertise"
    )
    tcp_idle_timeout: float = Field(10.0, gt=0, description="close idle TCP clients after (s)")
    tcp_max_connections: int = Field(1000, ge=1, description="TCP connections at most")
    query_log_sample: float = Field(
        0.0, ge=0.0, le=1.0, description="fraction of queries written to the query log"
    )

    prefetch: int = Field(
        0,
        ge=0,
        description="refresh a forwarded answer asked this many times (no gap of "
        "--prefetch-duration) before it expires; 0: never. CoreDNS cache `prefetch AMOUNT`",
    )
    prefetch_duration: float = Field(
        60.0, gt=0, description="longest gap between the hits that make an answer popular (s)"
    )
    prefetch_percentage: int = Field(
        10, ge=10, le=90, description="prefetch when this % of the answer's TTL is left"
    )
    serve_stale: float = Field(
        0.0,
        ge=0,
        description="serve expired forwarded answers (TTL 30) for up to this many seconds "
        "after they expired when every upstream fails (RFC 8767); 0: never",
    )
    autopath: bool = Field(
        False,
        description="complete a pod's search path on the server: a missing name below "
        "<its ns>.svc.<zone> is answered by the first search-list candidate that exists "
        "(CNAME + answer); watches every Pod for its IP. CoreDNS `autopath @kubernetes`",
    )
    namespace_isolation: bool = Field(
        False,
        description="answer a pod only the cluster names of its own namespace and of "
        "--shared-namespaces (others NXDOMAIN); watches every Pod for its IP",
    )
    shared_namespaces: list[str] = Field(
        default_factory=list,
        description="with --namespace-isolation: namespaces every pod sees (e.g. kube-system)",
    )
    transfer_to: list[str] = Field(
        default_factory=list,
        description="CIDR (or IP, or *) allowed to transfer the cluster zones (AXFR/IXFR over "
        "TCP); everyone else is REFUSED. CoreDNS transfer `to`",
    )

    @field_validator("shared_namespaces")
    @classmethod
    def _valid_shared(cls, values: list[str], info: ValidationInfo) -> list[str]:
        if values and "namespace_isolation" in info.data and not info.data["namespace_isolation"]:
            raise ValueError("only used with --namespace-isolation, which is not set")
        for value in values:
            if not 0 < len(value) <= 63 or "." in value:
                raise ValueError(f"expected a namespace name (a DNS label), got {value!r}")
        return [v.lower() for v in values]

    @field_validator("transfer_to")
    @classmethod
    def _valid_transfer_to(cls, values: list[str]) -> list[str]:
        parse_networks(values)
        return values

    @field_validator("zone")
    @classmethod
    def _valid_zones(cls, zones: list[str]) -> list[str]:
        if not zones:
            raise ValueError("at least one zone is needed")
        out = []
        for zone in zones:
            zone = zone.lower().strip(".")
            to_wire(zone)  # ValueError names the bad label
            out.append(zone)
        return out

    @field_validator("multicluster", "external_zone")
    @classmethod
    def _valid_other_zones(cls, zones: list[str], info: ValidationInfo) -> list[str]:
        """Zones that must not overlap the cluster zones, the reverse ones or each other."""
        cluster = [*(info.data.get("zone") or []), *(info.data.get("multicluster") or [])]
        out: list[str] = []
        for zone in zones:
            zone = zone.lower().strip(".")
            to_wire(zone)  # ValueError names the bad label
            for other in [*cluster, "in-addr.arpa", "ip6.arpa", *out]:
                if zone == other or zone.endswith("." + other) or other.endswith("." + zone):
                    raise ValueError(f"zone {zone!r} overlaps the zone {other!r}")
            if not zone:
                raise ValueError("the root cannot be an external zone")
            out.append(zone)
        return out

    @field_validator("upstream")
    @classmethod
    def _valid_upstreams(cls, values: list[str]) -> list[str]:
        for value in values:
            parse_hostport(value)
        return values

    @field_validator("stub_domain", mode="before")
    @classmethod
    def _stub_entries(cls, value: Any) -> Any:
        if isinstance(value, str):  # the environment's form, in a config file
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return _group_stub_servers(value)
        return value  # pydantic reports the wrong type

    @field_validator("stub_domain")
    @classmethod
    def _valid_stubs(cls, values: list[str]) -> list[str]:
        for value in values:
            _parse_stub(value)
        return values

    def upstream_addresses(self) -> list[tuple[str, int]]:
        return [parse_hostport(v) for v in self.upstream]

    def stub_domains(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for value in self.stub_domain:
            zone, servers = _parse_stub(value)
            out.setdefault(zone, []).extend(servers)
        return out

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_listen(v) for v in self.listen]


def _group_stub_servers(values: list[str]) -> list[str]:
    """Entries `ZONE=ADDR[,ADDR]...` however the commas were split.

    Flags and the environment arrive split at every comma (`a=1`, `2`, `b=3`, see
    kwatch.settings), a config entry keeps `a=1,2` whole; both become `a=1,2` and `b=3` here:
    an item without `=` is one more server of the zone before it, so every source reads the
    same text the same way.
    """
    entries: list[str] = []
    for item in (i.strip() for v in values for i in v.split(",")):
        if not item:
            continue
        if "=" in item or not entries:
            entries.append(item)  # a lone ADDR first is reported by _parse_stub
        else:
            entries[-1] += "," + item
    return entries


def _parse_stub(value: str) -> tuple[str, list[tuple[str, int]]]:
    zone, sep, servers = value.partition("=")
    addresses = [s for s in servers.split(",") if s]
    if not sep or not zone.strip(".") or not addresses:
        raise ValueError(f"expected ZONE=ADDR[:PORT][,ADDR[:PORT]]..., got {value!r}")
    zone = zone.lower().strip(".")
    to_wire(zone)
    return zone, [parse_hostport(s) for s in addresses]


def load(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> DnsdSettings:
    """Settings from argv, `DNSD_*` (os.environ by default) and --config, or exit status 2."""
    return settings_or_exit(
        DnsdSettings,
        argv,
        env_prefix="DNSD",
        prog="dnsd",
        description=DESCRIPTION,
        environ=environ,
    )
