"""bench/udp.py's arithmetic on figures: medians over runs, the targets, what bound a pass."""

from __future__ import annotations

import math
from typing import Any

from bench.udp import bound_by, medians, over_runs, targets


def saturation(rate: float, cpu: float, proxy: float, client: float) -> dict[str, float]:
    return {
        "answers_per_s": rate,
        "proxy_cpu_us_per_datagram": cpu,
        "proxy_core_busy": proxy,
        "client_server_core_busy": client,
        "proxy_core_total_busy": max(proxy, 0.2),
        "client_core_total_busy": client,
    }


def run(kpx_rate: float, nginx_rate: float, loaded: float) -> dict[str, Any]:
    small = {
        "nginx": saturation(nginx_rate, 20.0, 0.99, 0.7),
        "kpx": saturation(kpx_rate, 10.0, 0.6, 0.98),
    }
    return {
        "small": small,
        "bulk": small,
        "latency": {"nginx": {"added_p99_us": 100.0}, "kpx": {"added_p99_us": 160.0}},
        "sessions": {"kpx": {"small_with_sessions": {"answers_per_s": loaded}}},
        "retarget": {"p99_ms": 4.0, "samples": 50},
    }


def test_medians_take_each_figure_over_the_runs_and_skip_missing_ones() -> None:
    runs = [run(60_000, 40_000, 58_000), run(70_000, 30_000, 69_000), run(65_000, 50_000, 1)]
    runs[1]["retarget"]["p99_ms"] = math.nan
    doc = medians(runs)
    assert doc["small"]["kpx"]["answers_per_s"] == 65_000
    assert doc["small"]["nginx"]["answers_per_s"] == 40_000
    assert doc["retarget"]["p99_ms"] == 4.0  # the median of the runs that measured it


def test_targets_say_the_ratio_whether_met_and_what_bound_each_rate() -> None:
    got = targets(run(60_000, 40_000, 57_000))
    assert got["small_datagrams_per_s"]["ratio"] == 1.5 and got["small_datagrams_per_s"]["met"]
    assert got["small_cpu_per_datagram"]["ratio"] == 0.5 and got["small_cpu_per_datagram"]["met"]
    assert got["latency_added_p99"]["ratio"] == 1.6 and not got["latency_added_p99"]["met"]
    assert got["datagrams_per_s_with_sessions_held"]["ratio"] == 0.95
    assert got["small_datagrams_per_s"]["bound_by"] == {
        "nginx": "proxy core",
        "kpx": "client/server core",
    }


def test_a_pass_where_neither_of_our_processes_was_busy_names_the_other_load() -> None:
    assert bound_by(saturation(1000, 10.0, 0.3, 0.4)) == "neither core (latency)"
    loaded = saturation(1000, 10.0, 0.3, 0.4) | {"proxy_core_total_busy": 0.97}
    assert bound_by(loaded) == "other load on a pinned core"


def test_over_runs_judges_the_median_of_each_runs_own_ratio() -> None:
    runs = [targets(run(60_000, 40_000, 60_000)), targets(run(40_000, 40_000, 20_000))]
    runs.append(targets(run(90_000, 50_000, 90_000)))
    got = over_runs(runs)
    assert got["small_datagrams_per_s"]["runs"] == [1.5, 1.0, 1.8]
    assert got["small_datagrams_per_s"]["ratio"] == 1.5 and got["small_datagrams_per_s"]["met"]
    assert got["datagrams_per_s_with_sessions_held"]["ratio"] == 1.0
    assert len(got["bulk_datagrams_per_s"]["bound_by_runs"]) == 3


def test_the_sessions_target_compares_with_the_pass_right_before_the_sessions() -> None:
    doc = run(60_000, 40_000, 45_000)
    doc["sessions"]["kpx"]["small_without_sessions"] = {"answers_per_s": 50_000.0}
    got = targets(doc)["datagrams_per_s_with_sessions_held"]
    assert got["ratio"] == 0.9 and got["met"]
    del doc["sessions"]["kpx"]["small_without_sessions"]  # older results: the first pass
    assert targets(doc)["datagrams_per_s_with_sessions_held"]["ratio"] == 0.75
