"""/metrics for `--workers N`: the workers' proxy counters, summed (the single-process names,
kpx/metrics.py `ProxyStatsCollector`) and per worker."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kpx.worker_pool import WorkerPool


class SummedWorkerStats:
    """Reads like one `ProxyStats`: each counter is the sum over the workers (dead processes'
    counts included, so counters never go back)."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        return sum(slot.counter(name) for slot in self._pool.slots)


class WorkerCollector(Collector):
    """kpx_worker_up, kpx_worker_restarts_total, kpx_worker_connections_total per worker."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "kpx_worker_up", "1 while the worker applied its rules and accepts", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "kpx_worker_restarts", "Times the worker was started again", labels=["worker"]
        )
        connections = CounterMetricFamily(
            "kpx_worker_connections", "Connections the worker accepted", labels=["worker"]
        )
        for slot in self.pool.slots:
            label = [str(slot.index)]
            up.add_metric(label, 1.0 if slot.listening else 0.0)
            restarts.add_metric(label, float(slot.restarts))
            connections.add_metric(label, float(slot.counter("connections_total")))
        yield from (up, restarts, connections)
