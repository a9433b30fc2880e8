"""bench/proxy.py's pure parts: what an iperf3 report and /proc/stat samples say about a pass."""

from __future__ import annotations

import math

from bench.proxy import core_shares, stream_spread
from bench.proxy_workers import configurations, rss_misses, scaling_ratios


def _iperf_report(streams: list[float], seconds: list[tuple[float, float]]) -> dict[str, object]:
    return {
        "end": {"streams": [{"receiver": {"bits_per_second": g * 1e9}} for g in streams]},
        "intervals": [{"sum": {"bits_per_second": g * 1e9, "seconds": s}} for g, s in seconds],
    }


def test_stream_spread_names_the_slowest_stream_and_whole_second() -> None:
    report = _iperf_report([1.5, 0.2, 1.6], [(12.0, 1.0), (3.0, 1.0), (11.0, 1.0), (0.1, 0.05)])
    spread = stream_spread(report)
    assert spread == {"slowest_stream_gbps": 0.2, "slowest_second_gbps": 3.0}


def test_stream_spread_of_a_report_without_streams_is_nan() -> None:
    spread = stream_spread({"end": {}})
    assert math.isnan(spread["slowest_stream_gbps"])
    assert math.isnan(spread["slowest_second_gbps"])


def test_core_shares_are_percent_of_the_chosen_cores_time() -> None:
    # user nice system idle iowait irq softirq steal
    before = {0: [0] * 8, 1: [0] * 8}
    after = {0: [50, 0, 20, 10, 0, 0, 10, 10], 1: [0, 0, 0, 100, 0, 0, 0, 0]}
    assert core_shares(before, after, [0]) == {"idle": 10.0, "softirq": 10.0, "steal": 10.0}
    both = core_shares(before, after, [0, 1])
    assert both == {"idle": 55.0, "softirq": 5.0, "steal": 5.0}
    assert all(math.isnan(v) for v in core_shares(before, after, []).values())


def test_worker_configurations_swap_their_order_every_run() -> None:
    assert [configurations(run, 2) for run in range(3)] == [[1, 2], [2, 1], [1, 2]]


def test_scaling_ratios_pair_each_run_with_the_same_runs_single_worker() -> None:
    runs = {
        "one": [{"conn_per_s": 8_000.0}, {"conn_per_s": 4_000.0}, {"conn_per_s": 0.0}],
        "many": [{"conn_per_s": 14_000.0}, {"conn_per_s": 8_000.0}, {"conn_per_s": 9_000.0}],
    }
    ratios = scaling_ratios(runs, "conn_per_s")
    assert ratios[:2] == [1.75, 2.0] and math.isnan(ratios[2])


def test_rss_misses_name_each_worker_over_the_limit_and_a_run_without_workers() -> None:
    runs = [{"rss": {"workers_mb": [28.0, 31.0]}}, {"rss": {"workers_mb": []}}]
    assert rss_misses(runs, 30.0) == [
        "worker RSS 31.0 MB > 30 MB in run 1",
        "no worker process seen in run 2",
    ]
