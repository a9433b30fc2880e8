"""dnsd's Prometheus metrics, in the spirit of CoreDNS's (dns-features 4.16).

The hot path only bumps plain dict entries and list slots (a labelled Counter.inc() costs more
than answering a cached query); a custom collector turns them into metric families when
/metrics is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

# CoreDNS's request duration buckets (plugin/metrics/vars: 0.00025 .. 8.192 s, doubling).
DURATION_BUCKETS = tuple(0.00025 * 2**i for i in range(16))

TYPE_NAMES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    35: "NAPTR",
    64: "SVCB",
    65: "HTTPS",
    252: "AXFR",
    251: "IXFR",
    255: "ANY",
}
RCODE_NAMES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
}


# Control-path metrics (observed once per batch, not per query), like CoreDNS's
# coredns_kubernetes_dns_programming_duration_seconds: from the EndpointSlice controller's
# last-change-trigger-time (the Pod/Service change that caused it) to dnsd serving the result.
PROGRAMMING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DNS_PROGRAMMING = Histogram(
    "dnsd_dns_programming_duration_seconds",
    "From an endpoint change (last-change-trigger-time) to its DNS answers being served",
    ["service_kind"],
    buckets=PROGRAMMING_BUCKETS,
)
RECORDS_KEPT = Counter(
    "dnsd_records_kept_total",
    "Services whose new records could not be encoded: their last good records stay served",
)
ZONE_SYNC = Histogram(
    "dnsd_zone_sync_duration_seconds",
    "Time to apply one batch of store changes to the zone index (re-encoding included)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)


class DnsStats:
    """Counters owned by one process; cheap enough to touch on every query."""

    def __init__(self) -> None:
        # Answers from the handler's fast path, by QTYPE << 8 | the header's fourth byte
        # (rcode in the low bits): finished within microseconds, so not timed one by one; the
        # collector folds them into the request/response counts and the histogram's first
        # bucket. One dict per writer (each UDP thread has its own, see fast_counts), so
        # no two threads ever update the same counter; the collector reads copies.
        self.fast: list[tuple[bool, dict[int, int]]] = []
        self.requests: dict[tuple[bool, int], int] = {}  # (tcp, qtype) -> count
        self.responses: dict[tuple[bool, int], int] = {}  # (tcp, rcode) -> count
        self.dropped: dict[str, int] = {}  # reason -> count
        # Drops counted by the UDP threads themselves (queries shed before reaching the event
        # loop): one dict per thread, like `fast`, so no two threads write one counter.
        self.thread_dropped: list[dict[str, int]] = []
        self.durations = [[0] * (len(DURATION_BUCKETS) + 1) for _ in range(2)]
        self.duration_sum = [0.0, 0.0]
        self.response_bytes = [0, 0]

    def thread_drops(self) -> dict[str, int]:
        """A new drop counter dict (reason -> count) for one UDP thread."""
        counts: dict[str, int] = {}
        self.thread_dropped.append(counts)
        return counts

    def fast_counts(self, tcp: bool) -> dict[int, int]:
        """A new fast-path counter dict for one writer (a thread, or the event loop)."""
        counts: dict[int, int] = {}
        self.fast.append((tcp, counts))
        return counts

    def answered(self, tcp: bool, qtype: int, response: bytes | None, seconds: float) -> None:
        key = (tcp, qtype)
        self.requests[key] = self.requests.get(key, 0) + 1
        if response is None:
            self.dropped["no_response"] = self.dropped.get("no_response", 0) + 1
            return
        rkey = (tcp, response[3] & 0x0F)
        self.responses[rkey] = self.responses.get(rkey, 0) + 1
        proto = 1 if tcp else 0
        self.durations[proto][bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum[proto] += seconds
        self.response_bytes[proto] += len(response)

    def rejected(self, tcp: bool, rcode: int | None) -> None:
        if rcode is None:
            self.dropped["malformed"] = self.dropped.get("malformed", 0) + 1
            return
        rkey = (tcp, rcode)
        self.responses[rkey] = self.responses.get(rkey, 0) + 1

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _proto(tcp: bool) -> str:
    return "tcp" if tcp else "udp"


class DnsCollector(Collector):
    """Exposes DnsStats and the zone index as metric families."""

    def __init__(self, stats: DnsStats, zone_info: Any = None) -> None:
        self.stats = stats
        self.zone_info = zone_info  # callable -> dict of gauges, or None

    def collect(self) -> Iterator[Any]:
        stats = self.stats
        by_type: dict[tuple[str, str], int] = {}
        by_rcode: dict[tuple[str, str], int] = {}
        first_bucket = [0, 0]
        for (tcp, qtype), count in list(stats.requests.items()):
            key = (_proto(tcp), TYPE_NAMES.get(qtype, "other"))
            by_type[key] = by_type.get(key, 0) + count
        for tcp, fast in list(stats.fast):
            label = _proto(tcp)
            for counted, count in list(fast.items()):
                key = (label, TYPE_NAMES.get(counted >> 8, "other"))
                by_type[key] = by_type.get(key, 0) + count
                code = counted & 0x0F
                rkey = (label, RCODE_NAMES.get(code, str(code)))
                by_rcode[rkey] = by_rcode.get(rkey, 0) + count
                first_bucket[tcp] += count
        for (tcp, rcode), count in list(stats.responses.items()):
            rkey = (_proto(tcp), RCODE_NAMES.get(rcode, str(rcode)))
            by_rcode[rkey] = by_rcode.get(rkey, 0) + count
        requests = CounterMetricFamily(
            "dnsd_dns_requests", "DNS queries by transport and query type", labels=["proto", "type"]
        )
        for labels, count in sorted(by_type.items()):
            requests.add_metric(list(labels), count)
        yield requests
        responses = CounterMetricFamily(
            "dnsd_dns_responses", "DNS responses by transport and rcode", labels=["proto", "rcode"]
        )
        for labels, count in sorted(by_rcode.items()):
            responses.add_metric(list(labels), count)
        yield responses
        dropped = CounterMetricFamily(
            "dnsd_dns_dropped", "Queries dropped without an answer, by reason", labels=["reason"]
        )
        by_reason = dict(stats.dropped)
        for counts in list(stats.thread_dropped):
            for reason, count in list(counts.items()):
                by_reason[reason] = by_reason.get(reason, 0) + count
        for reason, count in sorted(by_reason.items()):
            dropped.add_metric([reason], count)
        yield dropped
        duration = HistogramMetricFamily(
            "dnsd_dns_request_duration_seconds",
            "Time from reading a query to having its answer (upstream time included)",
            labels=["proto"],
        )
        for proto in (0, 1):
            cumulative = first_bucket[proto]
            buckets = []
            for bound, count in zip(
                [*DURATION_BUCKETS, float("inf")], stats.durations[proto], strict=True
            ):
                cumulative += count
                buckets.append((_bucket_label(bound), cumulative))
            duration.add_metric([_proto(bool(proto))], buckets, stats.duration_sum[proto])
        yield duration
        size = CounterMetricFamily(
            "dnsd_dns_response_size_bytes", "Bytes of DNS responses sent", labels=["proto"]
        )
        for proto in (0, 1):
            size.add_metric([_proto(bool(proto))], stats.response_bytes[proto])
        yield size
        if self.zone_info is not None:
            for name, (help_text, value) in self.zone_info().items():
                yield GaugeMetricFamily(name, help_text, value=value)


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
