"""kpx's Prometheus metrics: kube-proxy's names for the control path, `kpx_` for the proxy.

kube-proxy (pkg/proxy/metrics/metrics.go) semantics:
- `kubeproxy_sync_proxy_rules_duration_seconds`: one sync (table recompute + kernel update);
  the full/partial variants split startup rewrites from element updates;
- `kubeproxy_network_programming_duration_seconds`: now minus the EndpointSlice's
  `endpoints.kubernetes.io/last-change-trigger-time`, observed once the change is applied.
  kube-proxy's buckets start at 0.25 s; kpx programs in milliseconds, so finer buckets are
  prepended (a superset: kube-proxy dashboards and quantile queries keep working).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from kpx import balancer

if TYPE_CHECKING:
    from kwatch.store import Store

SYNC_BUCKETS = tuple(0.001 * 2**k for k in range(15))
PROGRAMMING_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    *(float(s) for s in range(1, 60)),
    *(float(s) for s in range(60, 120, 5)),
    *(float(s) for s in range(120, 301, 30)),
)

SYNC_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=SYNC_BUCKETS,
)
SYNC_FULL_DURATION = Histogram(
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for full resyncs",
    buckets=SYNC_BUCKETS,
)
SYNC_PARTIAL_DURATION = Histogram(
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for partial resyncs",
    buckets=SYNC_BUCKETS,
)
NETWORK_PROGRAMMING = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In Cluster Network Programming Latency in seconds",
    buckets=PROGRAMMING_BUCKETS,
)
SOURCE_ADDRESS_MODE = Gauge(
    "kpx_source_address_mode",
    "1 for the mode kpx runs in: transparent (backends see clients' addresses) or node",
    ["mode"],
)
SERVICE_COMPUTE_FAILURES = Counter(
    "kpx_service_compute_failures_total",
    "Services whose rules could not be computed from their objects (last good rules kept)",
)
SYNC_FAILURES = Counter(
    "kpx_sync_failures_total",
    "Syncs that failed (table or kernel update); the next one rewrites everything",
)
AFFINITY_ENTRIES = Gauge(
    "kpx_affinity_entries", "ClientIP affinity pins held over every Service port"
)
LAST_SYNC = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
)
LAST_QUEUED = Gauge(
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "The last time a sync of proxy rules was queued",
)
SERVICE_CHANGES = Counter(
    "kubeproxy_sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes"
)
ENDPOINT_CHANGES = Counter(
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "Cumulative proxy rules EndpointSlice changes",
)


def count_changes(services: Store[Any], slices: Store[Any]) -> None:
    """Count every Service and EndpointSlice event once, as kube-proxy's change trackers do.
    Subscribed once per process by its composition root (kpx/main.py), not by each protocol's
    table: the TCP and UDP tables see the same events."""
    services.subscribe(lambda _event: SERVICE_CHANGES.inc())
    slices.subscribe(lambda _event: ENDPOINT_CHANGES.inc())


NO_LOCAL_ENDPOINTS = Gauge(
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "Number of services with a Local traffic policy and no endpoints",
    ["traffic_policy"],
)
FRONTENDS = Gauge(
    "kpx_frontends",
    "Frontends steered by kpx, by protocol and state (serve; local: node/pod clients only; "
    "drop: Local policy without endpoints here; reject: no endpoints)",
    ["protocol", "state"],
)


class NoLocalEndpoints:
    """kube-proxy's no_local_endpoints gauge counts Service ports of every protocol: each
    protocol's syncer reports its own counts and the gauge shows their sum."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def set(self, protocol: str, policy: str, count: int) -> None:
        self._counts[(protocol, policy)] = count
        total = sum(v for (_proto, pol), v in self._counts.items() if pol == policy)
        NO_LOCAL_ENDPOINTS.labels(policy).set(total)


NO_LOCAL = NoLocalEndpoints()
SCTP_PORTS_IGNORED = Gauge(
    "kpx_sctp_service_ports_ignored",
    "SCTP Service ports kpx leaves alone (it proxies TCP and UDP only)",
)


class BalancerEventsCollector(Collector):
    """kpx/balancer.py's counts (cooldowns, affinity evictions) of this process, plus those
    the `--workers` processes report (`sources`: counter name -> their sum)."""

    FIELDS = {
        "backend_cooldowns": (
            "kpx_backend_cooldowns",
            "Times a backend was put in (or kept in) failure cool-down after a failed connect",
            balancer.COOLDOWNS,
        ),
        "affinity_evictions": (
            "kpx_affinity_evictions",
            "ClientIP affinity pins dropped because a Service port's table was full (least "
            "recently used first)",
            balancer.AFFINITY_EVICTIONS,
        ),
    }

    def __init__(self) -> None:
        self.sources: list[Callable[[str], float]] = []

    def collect(self) -> Iterator[Metric]:
        for name, (metric, doc, count) in self.FIELDS.items():
            value = count.value + sum(source(name) for source in self.sources)
            yield CounterMetricFamily(metric, doc, value=float(value))


BALANCER_EVENTS = BalancerEventsCollector()
REGISTRY.register(BALANCER_EVENTS)


class ProxyStatsCollector(Collector):
    """Exports the data path's plain counters (kpx.proxy.ProxyStats) at scrape time, so the
    hot path only increments integers."""

    # attribute -> (metric name, help, kind)
    FIELDS = {
        "connections_active": ("kpx_connections_active", "Proxied connections open", "gauge"),
        "connections_total": ("kpx_connections_total", "Client connections accepted", "counter"),
        "backend_failures": (
            "kpx_backend_failures_total",
            "Backend connects refused, failed or timed out",
            "counter",
        ),
        "backend_retries": (
            "kpx_backend_retries_total",
            "Connect attempts after the first",
            "counter",
        ),
        "backends_exhausted": (
            "kpx_backends_exhausted_total",
            "Clients reset because every candidate failed",
            "counter",
        ),
        "refused_no_endpoints": (
            "kpx_refused_no_endpoints_total",
            "Clients reset: frontend without endpoints",
            "counter",
        ),
        "unknown_frontend": (
            "kpx_unknown_frontend_total",
            "Clients reset: destination not a frontend",
            "counter",
        ),
        "limit_hits": (
            "kpx_connection_limit_hits_total",
            "Clients reset at --max-connections",
            "counter",
        ),
        "drain_resets": (
            "kpx_drain_resets_total",
            "Connections reset when a drain timeout expired",
            "counter",
        ),
        "idle_closes": (
            "kpx_idle_closes_total",
            "Connections closed by kpx after --idle-timeout without a byte moving",
            "counter",
        ),
        "accept_errors": ("kpx_accept_errors_total", "accept() failures", "counter"),
    }

    def __init__(self, stats: object) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for attr, (name, doc, kind) in self.FIELDS.items():
            value = float(getattr(self.stats, attr, 0))
            if kind == "gauge":
                yield GaugeMetricFamily(name, doc, value=value)
            else:
                yield CounterMetricFamily(name.removesuffix("_total"), doc, value=value)
        bytes_family = CounterMetricFamily(
            "kpx_bytes", "Payload bytes relayed", labels=["direction"]
        )
        bytes_family.add_metric(["to_backend"], float(getattr(self.stats, "bytes_to_backend", 0)))
        bytes_family.add_metric(["to_client"], float(getattr(self.stats, "bytes_to_client", 0)))
        yield bytes_family


def register_proxy_stats(stats: object) -> ProxyStatsCollector:
    collector = ProxyStatsCollector(stats)
    REGISTRY.register(collector)
    return collector


class UdpStatsCollector(Collector):
    """Exports the UDP relay's counters (kpx.udp_relay.UdpStats) and its session count."""

    SESSION_EVENTS = {
        "sessions_created": ("created", "UDP sessions created (a client's first datagram)"),
        "sessions_expired": ("expired", "UDP sessions ended by --udp-timeout"),
        "sessions_evicted": ("evicted", "UDP sessions evicted at --udp-max-sessions"),
        "sessions_retargeted": (
            "retargeted",
            "UDP sessions moved to another endpoint (theirs left or failed)",
        ),
    }

    def __init__(self, stats: Any, active: Callable[[], int]) -> None:
        self.stats = stats
        self.active = active

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "kpx_udp_sessions_active", "UDP sessions open", value=float(self.active())
        )
        for attr, (event, doc) in self.SESSION_EVENTS.items():
            yield CounterMetricFamily(
                f"kpx_udp_sessions_{event}", doc, value=float(getattr(self.stats, attr))
            )
        datagrams = CounterMetricFamily(
            "kpx_udp_datagrams", "UDP datagrams relayed", labels=["direction"]
        )
        octets = CounterMetricFamily(
            "kpx_udp_bytes", "UDP payload bytes relayed", labels=["direction"]
        )
        for direction in ("to_backend", "to_client"):
            datagrams.add_metric([direction], float(getattr(self.stats, f"datagrams_{direction}")))
            octets.add_metric([direction], float(getattr(self.stats, f"bytes_{direction}")))
        yield datagrams
        yield octets
        drops = CounterMetricFamily(
            "kpx_udp_drops", "UDP datagrams dropped, by reason", labels=["reason"]
        )
        for reason, count in sorted(self.stats.drops.items()):
            drops.add_metric([reason], float(count))
        yield drops


def register_udp_stats(stats: Any, active: Callable[[], int]) -> UdpStatsCollector:
    collector = UdpStatsCollector(stats, active)
    REGISTRY.register(collector)
    return collector
