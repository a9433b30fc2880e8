"""What dnsd and its --forward-process child say to each other, as bytes, and the one loop that
reads such packets off a socket (`read_packets`, used for the child and for `--workers`).

One AF_UNIX SOCK_SEQPACKET socket pair joins them; every message is one packet, its first
byte its kind:

- parent -> child, `Q`: queries to answer, those of one batch of a UDP thread's recvmmsg
  (one message and one wake-up of the child per batch, not per query). Then the number of
  the listener they came on (one byte), then per query the length of the client's sockaddr
  (one byte), the sockaddr as the kernel wrote it (sockaddr_in / sockaddr_in6), the query's
  length (two bytes, big-endian) and the query. The child answers from that listener's
  socket (passed to it at start), so the client sees the address it asked.
- child -> parent, `R`: the child is ready to answer (sent once).
- child -> parent, `M`: a JSON snapshot of the child's `dnsd_*` metrics (every second and
  when it stops), which the parent's /metrics adds to its own (`merge`).

Metrics are merged sample by sample, by (sample name, labels): counters and histograms add
up, `_created` takes the earliest, gauges add up (queries in flight, cache entries) except
those that say whether something is healthy, which take the lowest value (unhealthy if
either process sees it so). A child that ended leaves its counters behind (`cumulative`), so
the totals never go down when it is restarted.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

QUERY = b"Q"
READY = b"R"
METRICS = b"M"
LOOP = b"L"  # either way: the label of an upstream found looping (dnsd/forward_loop.py)
MESSAGE_LIMIT = 8 * 1024  # bytes of queries in one message, about (a batch is 64 at most)

# Gauges where the lowest of the processes' values is the truth (1 = healthy).
LOWEST = frozenset({"dnsd_forward_upstream_healthy"})

Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, str, list[Sample]]  # name, type, documentation, samples


def read_packets(
    sock: socket.socket, handle: Callable[[bytes], None], *, size: int, burst: int
) -> bool:
    """Hands each packet waiting on the non-blocking `sock` to `handle`, at most `burst` of them
    per call (a reader callback must not hold the loop). False once the peer has ended: an
    empty read or an error."""
    for _ in range(burst):
        try:
            message = sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not message:
            return False
        handle(message)
    return True


def query_messages(
    listener: int, queries: list[tuple[bytes, bytes]], limit: int = MESSAGE_LIMIT
) -> list[tuple[bytes, int]]:
    """`queries` (sockaddr, query) of listener number `listener` as messages of at most
    about `limit` bytes, each with the number of queries it holds."""
    out: list[tuple[bytes, int]] = []
    parts = [QUERY + bytes((listener,))]
    size, count = 2, 0
    for sockaddr, data in queries:
        frame = bytes((len(sockaddr),)) + sockaddr + len(data).to_bytes(2, "big") + data
        if count and size + len(frame) > limit:
            out.append((b"".join(parts), count))
            parts, size, count = [parts[0]], 2, 0
        parts.append(frame)
        size += len(frame)
        count += 1
    if count:
        out.append((b"".join(parts), count))
    return out


def read_queries(message: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(listener number, [(sockaddr, query), ...]) of a query message; ValueError if it is
    malformed."""
    if len(message) < 2 or message[:1] != QUERY:
        raise ValueError("not a query message")
    queries: list[tuple[bytes, bytes]] = []
    i, n = 2, len(message)
    while i < n:
        length = message[i]
        start = i + 1 + length
        if start + 2 > n:
            raise ValueError("sockaddr cut short")
        size = (message[start] << 8) | message[start + 1]
        end = start + 2 + size
        if end > n:
            raise ValueError("query cut short")
        queries.append((message[i + 1 : start], message[start + 2 : end]))
        i = end
    return message[1], queries


def snapshot(registry: Collector, prefix: str = "dnsd_") -> list[Family]:
    """Every metric family of `registry` whose name starts with `prefix`, as plain data."""
    out: list[Family] = []
    for family in registry.collect():
        if family.name.startswith(prefix):
            samples = [(s.name, dict(s.labels), float(s.value)) for s in family.samples]
            out.append((family.name, family.type, family.documentation, samples))
    return out


def metrics_message(families: list[Family]) -> bytes:
    return METRICS + json.dumps(families, separators=(",", ":")).encode()


def read_metrics(message: bytes) -> list[Family]:
    """The families of a `metrics_message`; ValueError if malformed."""
    if message[:1] != METRICS:
        raise ValueError("not a metrics message")
    raw: Any = json.loads(message[1:])
    families: list[Family] = []
    for name, kind, documentation, samples in raw:
        kept = [(str(s), {str(k): str(v) for k, v in labels.items()}, float(value))
                for s, labels, value in samples]  # fmt: skip
        families.append((str(name), str(kind), str(documentation), kept))
    return families


def cumulative(families: Iterable[Family]) -> list[Family]:
    """What a process that ended still counts for: its counters and histograms (without
    their `_created`), not its gauges."""
    out: list[Family] = []
    for name, kind, documentation, samples in families:
        if kind in ("counter", "histogram", "summary"):
            kept = [s for s in samples if not s[0].endswith("_created")]
            out.append((name, kind, documentation, kept))
    return out


def retire(before: Iterable[Family], ended: Iterable[Family]) -> list[Family]:
    """What ended children counted (`before`) with one more child's snapshot added."""
    added = merge((), cumulative(before), cumulative(ended))
    return [
        (m.name, m.type, m.documentation, [(s.name, dict(s.labels), s.value) for s in m.samples])
        for m in added
    ]


def _combine(family: str, kind: str, sample: str, a: float, b: float) -> float:
    if sample.endswith("_created") or (kind == "gauge" and family in LOWEST):
        return min(a, b)
    return a + b


def merge(own: Iterable[Metric], *others: Iterable[Family]) -> list[Metric]:
    """`own` families (a registry's collect()) with the samples of `others` added: each
    family once, each (sample name, labels) once."""
    merged: dict[str, Metric] = {}
    index: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], int]] = {}

    def add(name: str, kind: str, documentation: str, samples: Iterable[Sample]) -> None:
        family = merged.get(name)
        if family is None:
            family = merged[name] = Metric(name, documentation, kind)
            index[name] = {}
        positions = index[name]
        for sample, labels, value in samples:
            key = (sample, tuple(sorted(labels.items())))
            at = positions.get(key)
            if at is None:
                positions[key] = len(family.samples)
                family.add_sample(sample, dict(labels), value)
                continue
            old = family.samples[at]
            family.samples[at] = old._replace(
                value=_combine(name, family.type, sample, old.value, value)
            )

    for metric in own:
        add(
            metric.name,
            metric.type,
            metric.documentation,
            ((s.name, s.labels, s.value) for s in metric.samples),
        )
    for families in others:
        for name, kind, documentation, samples in families:
            add(name, kind, documentation, samples)
    return list(merged.values())


class MergedRegistry(Collector):
    """A registry's families plus those `others()` returns (for generate_latest)."""

    def __init__(self, own: Collector, others: Any) -> None:
        self.own = own
        self.others = others  # () -> list of family lists

    def collect(self) -> Iterable[Metric]:
        return merge(self.own.collect(), *self.others())
