"""bench/report_render.py renders the Markdown report and the charts from saved JSON results.

No benchmark runs here: small synthetic result files, shaped like what `bench.dns`, `bench.proxy`
and `bench.sync` write with `--json`, go into tmp_path and are rendered with `--render-only`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import report, report_render, report_run
from bench.jsonout import write_json
from bench.report_checks import MET, NOT_MET, udp_checks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = math.nan


def dns_run(qps: float, cpu: float, p99: float) -> dict[str, float]:
    return {
        "qps": qps,
        "lost": 0.0,
        "lost_pct": 0.0,
        "avg_ms_saturated": 1.5,
        "cpu_us_per_query": cpu,
        "server_cpu_pct": 90.0,
        "dnsperf_cpu_pct": 100.0,
        "p50_ms": 0.05,
        "p99_ms": p99,
        "lat_lost": 0.0,
    }


def dns_doc(services: int = 10_000, endpoints: int = 100_000) -> dict[str, Any]:
    runs = {
        # per-run qps ratios dnsd/knot 0.80, 0.70, 0.80 -> 0.80x; CPU 10/6 -> 1.67x
        "knot": [dns_run(100_000, 6, 0.10), dns_run(120_000, 6, 0.10), dns_run(110_000, 6, 0.12)],
        "dnsd": [dns_run(80_000, 10, 0.2), dns_run(84_000, 10, 0.2), dns_run(88_000, 10, 0.3)],
        # 0.90, 0.80, 0.90 -> 0.90x; CPU 8/6, 9/6, 9/6 -> 1.50x: exactly on the target
        "dnsd --workers 2": [
            dns_run(90_000, 8, 0.2),
            dns_run(96_000, 9, 0.2),
            dns_run(99_000, 9, 0.2),
        ],
    }
    medians = {label: {k: sorted(r[k] for r in rs)[1] for k in rs[0]} for label, rs in runs.items()}
    return {
        "benchmark": "dns",
        "quick": False,
        "args": {
            "clients": 20,
            "threads": 2,
            "outstanding": 300,
            "duration": 10,
            "latency_qps": 20_000,
            "latency_duration": 5,
        },
        "cluster": {
            "services": services,
            "headless": services // 10,
            "headless_endpoints": 5,
            "endpoints": endpoints,
            "records": 71_000,
        },
        "answers": {"asked": 180, "differ": 0, "examples": []},
        "servers": list(runs),
        "runs": runs,
        "medians": medians,
        "ratios_vs_knot": {
            "dnsd": {"qps": 0.8, "cpu_us_per_query": 10 / 6, "p99_ms": 2.0},
            "dnsd --workers 2": {"qps": 0.9, "cpu_us_per_query": 1.5, "p99_ms": 2.0},
        },
        "rss": {
            "dnsd_ready_mb": 199.2,
            "dnsd_after_runs_mb": 199.3,
            "workers2_rss_mb": 388.0,
            "workers2_pss_mb": 354.0,
            "workers2_processes": 2,
        },
        "propagation": {
            "samples": 50.0,
            "p50_ms": 2.9,
            "p99_ms": 8.3,
            "max_ms": 8.3,
            "api_request_p50_ms": 1.2,
            "rss_via_api_mb": 174.5,
            "dnsd_ready_s": 4.0,
            "service created p50_ms": 3.0,
            "endpoint replaced p50_ms": 2.5,
            "notes": [],
        },
        "complete": True,
    }


def proxy_run(gbps_8: float, cpu: float, conns: float, p99: float, proxy: bool) -> dict[str, Any]:
    return {
        "gbps_1": gbps_8 * 1.2,
        "gbps_8": gbps_8,
        "proxy_cpu_s_per_gb": cpu if proxy else NAN,
        "machine_cpu_s_per_gb": 1.1,
        "conn_per_s": conns,
        "conn_p50_ms": 3.0,
        "conn_p99_ms": 6.0,
        "conn_errors": 0.0,
        "req_p50_ms": 0.06,
        "req_p99_ms": p99,
        "proxy_rss_mb": 58.0 if proxy else NAN,
    }


def proxy_doc() -> dict[str, Any]:
    runs = {
        "direct": [proxy_run(24, 0, 11_000, 0.07, False)] * 3,
        "nat": [proxy_run(24, 0, 12_000, 0.07, False)] * 3,
        "haproxy": [proxy_run(g, 0.8, 8_000, 0.10, True) for g in (10, 12, 11)],
        # 8 streams 11/10, 10/12, 12/11 -> 1.09x; CPU 0.32/0.8 -> 0.40x; conn/s 0.56x; p99 1.20x
        "kpx": [proxy_run(g, 0.32, 4_500, 0.12, True) for g in (11, 10, 12)],
    }
    medians = {m: {k: sorted(r[k] for r in rs)[1] for k in rs[0]} for m, rs in runs.items()}
    haproxy_ratios = {
        "gbps_1": 12 / 12,
        "gbps_8": 12 / 11,
        "proxy_cpu_s_per_gb": 0.4,
        "machine_cpu_s_per_gb": 1.0,
        "conn_per_s": 4_500 / 8_000,
        "conn_p50_ms": 1.0,
        "conn_p99_ms": 1.0,
        "conn_errors": NAN,
        "req_p50_ms": 1.0,
        "req_p99_ms": 0.12 / 0.10,
        "proxy_rss_mb": 1.0,
    }
    programming = [
        {
            "services": n,
            "endpoint_p50_ms": 3.5,
            "endpoint_p99_ms": 8.7 if n == 10_000 else 5.0,
            "endpoint_max_ms": 9.0,
            "new_service_p50_ms": 15.0,
            "new_service_p99_ms": 61.0 if n == 10_000 else 17.0,
            "samples": 100.0,
            "not_seen_in_5s": 0.0,
            "kpx_ready_s": 2.0,
            "kpx_rss_mb": 60 + n * 0.0064,  # 124 MB at 10,000
        }
        for n in (10, 1_000, 3_000, 10_000)
    ]
    idle = {
        "requested": 5_000,
        "haproxy": {"held": 5_000.0, "alive_after_1s": 5_000.0, "kib_per_conn": 3.22},
        "kpx": {"held": 5_000.0, "alive_after_1s": 5_000.0, "kib_per_conn": 2.05},
    }
    return {
        "benchmark": "proxy",
        "quick": False,
        "args": {"duration": 8, "bulk_mb": 0, "conns": 32, "samples": 50},
        "haproxy_threads": 2,
        "haproxy_splice": False,
        "modes": list(runs),
        "runs": runs,
        "medians": medians,
        "ratios": {"haproxy": haproxy_ratios, "nat": dict.fromkeys(haproxy_ratios, 0.5)},
        "idle": idle,
        "programming": programming,
        "complete": True,
    }


def sync_doc(services: int = 10_000) -> dict[str, Any]:
    runs = [
        {"synced_s": s, "rss_growth_mb": g, "rss_total_mb": 248.0, "objects": 20_000.0}
        for s, g in ((2.32, 108.9), (2.74, 108.3), (2.19, 108.4))
    ]
    return {
        "benchmark": "sync",
        "quick": False,
        "services": services,
        "endpoints": services * 10,
        "runs": runs,
        "medians": {"synced_s": 2.32, "rss_growth_mb": 108.4, "rss_total_mb": 248.0},
        "complete": True,
    }


def memory_doc(services: int, api: float, token: float, manifests: float) -> dict[str, Any]:
    return {
        "benchmark": "dns",
        "mode": "memory",
        "cluster": {"services": services, "endpoints": services * 10},
        "memory": {"rss_api_mb": api, "rss_token_mb": token, "rss_manifests_mb": manifests},
        "complete": True,
    }


def relist_doc(services: int = 10_000) -> dict[str, Any]:
    return {
        "benchmark": "relist",
        "quick": False,
        "services": services,
        "endpoints": services * 10,
        "dnsd": {"steady_mb": 160.0, "peak_mb": 180.0, "after_mb": 165.0, "ratio": 1.125},
        "kpx": {"steady_mb": 150.0, "peak_mb": 190.0, "after_mb": 160.0, "ratio": 190 / 150},
        "target_ratio": 1.2,
        "missed": ["kpx"],
        "complete": True,
    }


def soak_doc(duration: float = 1200.0, differences: int = 0) -> dict[str, Any]:
    """Shaped as `bench.soak --json` writes it (the parts the report reads)."""
    return {
        "complete": True,
        "duration_s": duration,
        "rate": 50.0,
        "writes": int(duration * 49.5),
        "achieved_rate": 49.5,
        "chaos": ["60s compact+drop", "90s drop", "600s api_stop", "605s api_start"],
        "questions_checked": 400,
        "frontends_checked": 350,
        "differences": differences,
        "first_differences": ["dns svc-7.ns-1: want ['10.96.0.7'] got []"][:differences],
        "settle_s": 0.0,
        "healthz": {"dnsd": 200, "kpx": 200},
        "warm": {"dnsd": {"rss_mb": 60.0, "fds": 20}, "kpx": {"rss_mb": 80.0, "fds": 330}},
        "end": {"dnsd": {"rss_mb": 62.0, "fds": 20}, "kpx": {"rss_mb": 88.0, "fds": 352}},
        "peak_rss_mb": {"dnsd": 63.0, "kpx": 90.0},
        "rss_growth_pct": {"dnsd": 100 * 2 / 60, "kpx": 10.0},
        "fd_growth": {"dnsd": 0, "kpx": 0},
        "targets_missed": ["kpx RSS growth +10.0 % (target <= 5 %)"],
        "logs": "/tmp/kpx-dnsd-soak-x",
    }


def overload_doc(flood_p99_ms: float = 0.4, lost: int = 0) -> dict[str, Any]:
    """Shaped as `bench.dns_overload --json` writes it."""

    def probe(p99: float, lost: int) -> dict[str, float]:
        return {"sent": 30_000, "answered": 30_000 - lost, "lost": lost, "qps": 1000.0,
                "p50_ms": 0.08, "p99_ms": p99, "max_ms": 3.0}  # fmt: skip

    def waits(count: int, p99: float) -> dict[str, float]:
        return {"count": count, "p50_ms": p99 / 4, "p99_ms": p99, "max_ms": 2 * p99}

    def flood(itself_p99: float) -> dict[str, Any]:
        return {"sent": 900_000, "completed": 40_000, "lost": 860_000, "qps": 1300.0,
                "answered_avg_wait_ms": 450.0, "codes": "SERVFAIL 5%, REFUSED 95%",
                "waits": {"SERVFAIL": waits(2_000, 2_004.0), "REFUSED": waits(38_000, itself_p99),
                          "dnsd_itself": waits(38_000, itself_p99)}}  # fmt: skip

    return {
        "complete": True,
        "duration_s": 30.0,
        "probe_idle": probe(0.15, 0),
        "probe_flood": probe(flood_p99_ms, lost),
        "flood": {"plain": flood(12.0), "edns": flood(150.0)},
        "malformed_sent": 60_000,
        "dropped": {"udp_queue_full": 700_000, "malformed": 60_000},
        "rss_growth_mb": 4.5,
        "rss_peak_growth_mb": 6.5,
    }


def workers_run(conn: float, gbps: float, wait_s: float, load_s: float, rss: list[float]) -> Any:
    return {
        "gbps_8": gbps,
        "bulk_runq_wait_ms": wait_s * 1000,
        "bulk_proxy_cpu_s": 6.0,
        "bulk_load_cpu_s": load_s,
        "bulk_machine_cpu_s": 15.0,
        "conn_per_s": conn,
        "conn_runq_wait_ms": wait_s * 1000,
        "conn_proxy_cpu_s": 7.0,
        "conn_load_cpu_s": load_s,
        "conn_machine_cpu_s": 16.0,
        "rss": {"control_mb": 64.0, "workers_mb": rss},
    }


def workers_doc(
    many_conn: tuple[float, ...] = (14_640, 15_040, 14_800),
    many_gbps: tuple[float, ...] = (20.0, 19.56, 21.0),
    worker_rss: float = 28.0,
) -> dict[str, Any]:
    """bench/proxy_workers.py's output: one worker at 8,000 conn/s and 12 Gbit/s every run."""
    one = [workers_run(8_000, 12.0, 0.4, 6.0, []) for _ in many_conn]
    many = [
        workers_run(c, g, 4.7, 8.0, [worker_rss, 27.8])
        for c, g in zip(many_conn, many_gbps, strict=True)
    ]
    return {
        "benchmark": "proxy-workers",
        "workers": 2,
        "cpus": "0,1",
        "cores": 2,
        "load_cpus": None,
        "duration_s": 8.0,
        "conns": 32,
        "orders": [[1, 2], [2, 1], [1, 2]],
        "runs": {"one": one, "many": many},
        "ratio_runs": {
            "conn_per_s": [c / 8_000 for c in many_conn],
            "gbps_8": [g / 12.0 for g in many_gbps],
        },
        "complete": True,
    }


def write_all(out: Path, **overrides: Any) -> None:
    docs: dict[str, Any] = {
        "dns": dns_doc(),
        "proxy": proxy_doc(),
        "proxy-workers": workers_doc(),
        "sync": sync_doc(),
        "relist": relist_doc(),
        "soak": soak_doc(),
        "dns-overload": overload_doc(),
        "dns-memory-1000": memory_doc(1_000, 40.0, 38.0, 45.0),
        "dns-memory-3000": memory_doc(3_000, 75.0, 70.0, 85.0),
        "dns-memory-10000": memory_doc(10_000, 174.0, 160.0, 199.0),
    }
    docs.update(overrides)
    for name, doc in docs.items():
        if doc is not None:
            write_json(out / "results" / f"{name}.json", doc)
    write_json(
        out / "machine.json",
        {
            "date": "2026-11-23T10:00:00+00:00",
            "cpu_model": "AMD EPYC Test",
            "logical_cpus": 2,
            "cpus_usable": 2,
            "ram_gib": 23.5,
            "kernel": "6.1.0-test",
            "os": "Debian GNU/Linux 12 (bookworm)",
            "python": "CPython 3.11.2",
            "load_average_at_start": [0.5, 0.4, 0.3],
            "tools": {"knot": "knotd (Knot DNS), version 3.2.6", "haproxy": "HAProxy 2.6.12"},
            "python_packages": {"uvloop": "0.21.0"},
            "git": {"commit": "0123456789abcdef" * 2 + "01234567", "uncommitted_changes": True},
        },
    )


def targets(md: str) -> dict[str, list[str]]:
    """The Targets table: `what` -> [ours, peer, ratio, target, verdict]."""
    section = md.split("## Targets", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines()[3:]:  # after the heading, the blank line and the header
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def render(tmp_path: Path) -> str:
    path, _ = report_render.render(tmp_path)
    assert path == tmp_path / "report.md"
    return path.read_text()


def test_targets_table_has_ours_peer_ratio_and_verdicts(tmp_path: Path) -> None:
    write_all(tmp_path)
    rows = targets(render(tmp_path))

    assert rows["dnsd qps (dnsperf, saturated) vs knot"] == [
        "84,000",
        "110,000",
        "0.80x",
        ">= 0.75x knot",
        MET,
    ]
    cpu = rows["dnsd CPU per query vs knot"]
    assert cpu[:3] == ["10.00 µs", "6.00 µs", "1.67x"] and cpu[4] == NOT_MET
    # exactly on the target counts as met
    assert rows["dnsd --workers 2 CPU per query vs knot"][2:] == [
        "1.50x",
        "<= 1.5x knot",
        MET,
    ]
    assert rows["dnsd --workers 2 qps (dnsperf, saturated) vs knot"][2] == "0.90x"
    assert rows["dnsd propagation p99, API write -> new answer served"] == [
        "8.3 ms",
        "—",
        "n/a",
        "<= 100 ms",
        MET,
    ]
    api = rows[
        "dnsd RSS + forward child at 10,000 Services / 100,000 endpoints, via the API server"
    ]
    assert api[0] == "174.5 MB" and api[3:] == ["<= 164 MB", NOT_MET]

    # the median meets the target, run 2 does not: a miss in any run is a miss
    tput = rows["kpx 8-stream throughput (iperf3 -P 8) vs haproxy"]
    assert tput == [
        "11.00 Gbit/s",
        "11.00 Gbit/s",
        "1.09x",
        ">= 0.9x haproxy, every run",
        f"{NOT_MET}: missed in run 2 of 3 (per run: 1.10x, 0.83x, 1.09x)",
    ]
    assert rows["kpx CPU per GB moved (proxy process) vs haproxy"][2:] == [
        "0.40x",
        "<= 1.2x haproxy, every run",
        MET,
    ]
    assert rows["kpx new connections/s (wrk, Connection: close) vs haproxy"][2:] == [
        "0.56x",
        ">= 0.8x haproxy, every run",
        f"{NOT_MET}: missed in run 1, 2, 3 of 3 (per run: 0.56x, 0.56x, 0.56x)",
    ]
    assert rows["kpx small-request p99 (keep-alive, wrk -c1) vs haproxy"][2:] == [
        "1.20x",
        "<= 1.5x haproxy, every run",
        MET,
    ]
    idle = rows["kpx memory per idle connection (5,000 held)"]
    assert idle == ["2.05 KiB", "3.22 KiB", "0.64x", "<= 3 KiB", MET]
    assert rows["kpx programming p99 at 10,000 Services, endpoint change"][0] == "8.7 ms"
    # every Service count measured is judged against the same 50 ms
    assert rows["kpx programming p99 at 1,000 Services, new Service"][::4] == [
        "17.0 ms",
        MET,
    ]
    assert rows["kpx programming p99 at 10,000 Services, new Service"][::4] == [
        "61.0 ms",
        NOT_MET,
    ]
    assert rows["kpx RSS at 10,000 Services"][::4] == ["124.0 MB", MET]
    assert rows["kwatch initial sync, 10,000 Services / 100,000 endpoints"][::4] == [
        "2.32 s",
        MET,
    ]
    assert rows["kwatch RSS growth for those stores"][::4] == ["108.4 MB", MET]


def test_report_sections_machine_and_summary_line(tmp_path: Path) -> None:
    write_all(tmp_path)
    write_json(
        tmp_path / "run.json",
        {
            "quick": False,
            "seconds": 900.0,
            "steps": [
                {
                    "name": "sync",
                    "command": ".venv/bin/python -m bench.sync",
                    "seconds": 60.0,
                    "status": "ok",
                },
            ],
        },
    )
    md = render(tmp_path)
    for heading in (
        "## Targets",
        "## DNS: dnsd vs knot",
        "### Propagation",
        "## Proxy: kpx vs haproxy and the kernel's NAT",
        "### Idle connections",
        "### Network programming latency",
        UDP_HEADING,
        "## kwatch initial sync",
        "## Memory vs number of Services",
        "## dnsd under a slow-path flood",
        "## Convergence soak",
        "## Machine",
        "## How this report was made",
    ):
        assert heading in md
    rows = targets(md)
    # 20, programming p99 at 10, 1,000 and 3,000 Services, 3 of the workers, 3 of the
    # overload, 5 of the soak
    assert len(rows) == 37
    not_met = [what for what, cells in rows.items() if cells[-1].startswith(NOT_MET)]
    # dnsd CPU, dnsd RSS x 2, kpx conn/s, kpx 8 streams (run 2), new Service p99 at 10,000,
    # kpx relist peak, the flood's wait (EDNS flood), kpx RSS growth in the soak
    assert len(not_met) == 9, not_met
    assert "28 of 37 targets met, 9 not met, 0 not judged." in md
    assert "## kpx --workers 2 against --workers 1" in md
    relist = "peak RSS during a forced 410 relist, 10,000 Services / 100,000 endpoints"
    assert rows[f"dnsd {relist}"][0] == "180.0 MB peak, 160.0 MB steady (1.12x)"
    assert rows[f"dnsd {relist}"][-1] == MET
    assert rows[f"kpx {relist}"][3] == "<= 1.2x steady"
    assert "| CPU | AMD EPYC Test |" in md
    assert "| knot | knotd (Knot DNS), version 3.2.6 |" in md
    assert "with uncommitted changes" in md
    assert "Quick run" not in md
    # memory table merges dnsd's sweep and kpx's programming runs by Service count
    assert "| 10,000 | 100,000 | 174.0 | 160.0 | 199.0 | 124.0 |" in md
    assert "| 10 | — | — | — | — | 60.1 |" in md
    assert "| 1 | sync | `.venv/bin/python -m bench.sync` | — | 1m00s | ok |" in md
    for name in ("dns_qps", "latency_dns", "proxy_throughput", "latency_proxy", "memory", "sync"):
        assert f"](charts/{name}.png)" in md


def test_charts_are_valid_pngs(tmp_path: Path) -> None:
    import matplotlib.image

    write_all(tmp_path)
    render(tmp_path)
    pngs = sorted((tmp_path / "charts").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(
        ["dns_qps", "latency_dns", "proxy_throughput", "latency_proxy", "memory", "sync"]
    )
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE), png
        assert len(data) > 15_000, f"{png.name} is only {len(data)} bytes"
        image = matplotlib.image.imread(png)
        height, width = image.shape[:2]
        assert width >= 600 and height >= 350, (png.name, width, height)


def test_a_missed_8_stream_run_says_what_both_passes_met(tmp_path: Path) -> None:
    proxy = proxy_doc()
    proxy["args"]["bulk_slices"] = 4
    for mode, cpu, wait_ms, idle in (("kpx", 2.3, 150.0, 35.0), ("haproxy", 4.4, 220.0, 2.0)):
        proxy["runs"][mode] = [
            {**one, "bulk_proxy_cpu_s": cpu, "bulk_runq_wait_ms": wait_ms,
             "bulk_load_cores_idle_pct": idle, "bulk_slowest_second_gbps": 9.5}
            for one in proxy["runs"][mode]
        ]  # fmt: skip
    write_all(tmp_path, proxy=proxy)
    md = render(tmp_path)
    verdict = targets(md)["kpx 8-stream throughput (iperf3 -P 8) vs haproxy"][4]
    assert verdict == (
        f"{NOT_MET}: missed in run 2 of 3 (per run: 1.10x, 0.83x, 1.09x); run 2, kpx / haproxy: "
        "CPU 2.3 / 4.4 s, waited for a core 0.1 / 0.2 s, load cores idle 35.0 / 2.0 %"
    )
    assert "8-stream passes of haproxy and kpx, interleaved in 4 alternating slices" in md
    assert "| proxy CPU-s | 4.4 / 2.3 | 4.4 / 2.3 | 4.4 / 2.3 |" in md
    assert "| load cores idle (%) | 2 / 35 | 2 / 35 | 2 / 35 |" in md


WORKERS_CONN = "kpx --workers 2 new connections/s vs --workers 1 (same cores, same sitting)"
WORKERS_BULK = "kpx --workers 2 8-stream throughput vs --workers 1 (same cores, same sitting)"
WORKERS_RSS = "kpx RSS of each worker (--workers 2)"


def test_workers_scaling_met_in_every_run_shows_what_held_it(tmp_path: Path) -> None:
    write_all(tmp_path)
    md = render(tmp_path)
    rows = targets(md)
    conn = rows[WORKERS_CONN]
    assert conn[:4] == ["14,800 /s", "8,000 /s", "1.85x", ">= 1.8x one worker, every run"]
    # met, with what limits the scaling beside it: the wait for a core, the load's CPU
    assert conn[4].startswith(
        f"{MET}: kpx's processes waited 4.7 s (summed) for a core with 2 workers (0.4 s with 1)"
    )
    assert "used 8.0 CPU-s of the 16 (6.0 with 1)" in conn[4]
    # what neither kpx nor the load took: 16 busy - 8 load - 7 kpx
    assert conn[4].endswith("the rest of the machine (other processes, interrupts) 1.0")
    bulk = rows[WORKERS_BULK]
    assert bulk[:4] == ["20.00 Gbit/s", "12.00 Gbit/s", "1.67x", ">= 1.6x one worker, every run"]
    assert bulk[4].startswith(MET)
    assert rows[WORKERS_RSS][0] == "28.0 MB (largest)"
    assert rows[WORKERS_RSS][4].startswith(f"{MET}: every worker, every run: 28.0, 27.8")
    # every run of both, in the order they ran (run 2: two workers first)
    section = md.split("## kpx --workers 2 against --workers 1", 1)[1].split("\n## ", 1)[0]
    firsts = [line.split(" | ")[:2] for line in section.splitlines() if line.startswith("| ")]
    assert firsts[2:] == [["| 1", "1"], ["| 1", "2"], ["| 2", "2"], ["| 2", "1"], ["| 3", "1"],
                          ["| 3", "2"]]  # fmt: skip
    assert "conn/s 1.83x, 1.88x, 1.85x; 8 streams 1.67x, 1.63x, 1.75x" in section


def test_workers_scaling_missed_in_one_run_is_flagged_with_that_run(tmp_path: Path) -> None:
    # run 2: 1.09x the connections/s (the median 1.83x meets it), run 3: 1.17x the throughput
    doc = workers_doc(many_conn=(14_640, 8_720, 15_040), many_gbps=(20.0, 19.56, 14.04))
    del doc["ratio_runs"]  # computed from the runs then
    write_all(tmp_path, **{"proxy-workers": doc})
    rows = targets(render(tmp_path))
    conn = rows[WORKERS_CONN]
    assert conn[2] == "1.83x"
    assert conn[4].startswith(
        f"{NOT_MET}: missed in run 2 of 3 (per run: 1.83x, 1.09x, 1.88x); kpx's processes"
    )
    assert rows[WORKERS_BULK][4].startswith(
        f"{NOT_MET}: missed in run 3 of 3 (per run: 1.67x, 1.63x, 1.17x)"
    )


def test_a_worker_over_30_mb_is_flagged(tmp_path: Path) -> None:
    write_all(tmp_path, **{"proxy-workers": workers_doc(worker_rss=30.5)})
    rss = targets(render(tmp_path))[WORKERS_RSS]
    assert rss[0] == "30.5 MB (largest)" and rss[3:] == [
        "<= 30 MB",
        f"{NOT_MET}: every worker, every run: 30.5, 27.8, 30.5, 27.8, 30.5, 27.8 MB",
    ]


def test_workers_scaling_not_run_is_said_so(tmp_path: Path) -> None:
    write_all(tmp_path, **{"proxy-workers": None})
    md = render(tmp_path)
    rows = targets(md)
    for what in (WORKERS_CONN, WORKERS_BULK):
        assert rows[what][4] == "n/a: not run"
    assert rows[WORKERS_RSS][4] == "n/a: not run"
    assert "Not measured (no `results/proxy-workers.json`)." in md


def test_ratios_come_from_the_runs_when_the_json_has_none(tmp_path: Path) -> None:
    dns, proxy = dns_doc(), proxy_doc()
    del dns["ratios_vs_knot"], proxy["ratios"]
    write_all(tmp_path, dns=dns, proxy=proxy)
    rows = targets(render(tmp_path))
    assert rows["dnsd qps (dnsperf, saturated) vs knot"][2] == "0.80x"
    assert rows["dnsd --workers 2 CPU per query vs knot"][2] == "1.50x"
    assert rows["kpx 8-stream throughput (iperf3 -P 8) vs haproxy"][2] == "1.09x"
    assert rows["kpx new connections/s (wrk, Connection: close) vs haproxy"][2] == "0.56x"


def test_a_programming_miss_at_a_smaller_scale_is_flagged(tmp_path: Path) -> None:
    proxy = proxy_doc()
    proxy["programming"][1]["new_service_p99_ms"] = 149.0  # 1,000 Services; 10,000 is fine
    write_all(tmp_path, proxy=proxy)
    rows = targets(render(tmp_path))
    assert rows["kpx programming p99 at 1,000 Services, new Service"][::4] == [
        "149.0 ms",
        NOT_MET,
    ]
    assert rows["kpx programming p99 at 10,000 Services, endpoint change"][-1] == MET


def test_a_ratio_target_missed_in_one_run_only_is_flagged(tmp_path: Path) -> None:
    proxy = proxy_doc()
    del proxy["ratios"]
    proxy["runs"]["kpx"][2] = {**proxy["runs"]["kpx"][2], "req_p99_ms": 0.78}  # 7.8x in run 3
    write_all(tmp_path, proxy=proxy)
    rows = targets(render(tmp_path))
    row = rows["kpx small-request p99 (keep-alive, wrk -c1) vs haproxy"]
    assert row[2] == "1.20x"  # the median alone would pass
    assert row[-1] == f"{NOT_MET}: missed in run 3 of 3 (per run: 1.20x, 1.20x, 7.80x)"


def test_targets_at_10000_services_are_not_judged_at_another_scale(tmp_path: Path) -> None:
    dns, proxy, sync = dns_doc(services=200, endpoints=500), proxy_doc(), sync_doc(500)
    dns["quick"] = True
    proxy["programming"] = [p for p in proxy["programming"] if p["services"] <= 3_000]
    write_all(tmp_path, dns=dns, proxy=proxy, sync=sync)
    md = render(tmp_path)
    rows = targets(md)
    assert "Quick run" in md
    na = "n/a: measured at 200 Services, the target is for 10,000"
    assert (
        rows["dnsd RSS + forward child at 10,000 Services / 100,000 endpoints, from manifests"][-1]
        == na
    )
    assert rows["kpx RSS at 10,000 Services"][-1] == (
        "n/a: measured at 3,000 Services, the target is for 10,000"
    )
    assert rows["kwatch initial sync, 10,000 Services / 100,000 endpoints"][-1].startswith(
        "n/a: measured at 500 Services"
    )
    # ratio targets do not depend on the scale
    assert rows["dnsd qps (dnsperf, saturated) vs knot"][-1] == MET


def test_missing_benchmarks_are_reported_not_measured(tmp_path: Path) -> None:
    write_all(
        tmp_path,
        dns=None,
        proxy=None,
        **{"dns-memory-1000": None, "dns-memory-3000": None, "dns-memory-10000": None},
    )
    write_json(
        tmp_path / "run.json",
        {
            "steps": [
                {"name": "dns", "status": "failed (exit 1)", "log": "logs/dns.log", "seconds": 3},
            ]
        },
    )
    md = render(tmp_path)
    rows = targets(md)
    assert rows["dnsd qps (dnsperf, saturated) vs knot"] == [
        "n/a",
        "n/a",
        "n/a",
        ">= 0.75x knot",
        "n/a: not measured",
    ]
    assert "Not measured: the step failed (exit 1) (see `logs/dns.log`)." in md
    assert "Not measured (no `results/proxy.json`)." in md
    assert [p.name for p in (tmp_path / "charts").glob("*.png")] == ["sync.png"]


def test_render_only_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_all(tmp_path)
    stale = tmp_path / "charts" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    assert report.main(["--render-only", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").exists()
    assert not stale.exists()
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report.md'}" in out
    assert "not met: dnsd CPU per query vs knot" in out


def test_json_output_is_strict_json_with_null_for_nan(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"a": NAN, "b": [1.0, math.inf], "c": {"d": (2, NAN)}})
    assert json.loads((tmp_path / "x.json").read_text()) == {
        "a": None,
        "b": [1.0, None],
        "c": {"d": [2, None]},
    }


def test_quick_plan_passes_each_benchmarks_quick_flag() -> None:
    steps = {s.name: s.module_argv for s in report_run.plan(quick=True)}
    assert "--quick" in steps["sync"] and "--quick" in steps["dns"] and "--quick" in steps["proxy"]
    assert [n for n in steps if n.startswith("dns-memory")] == [
        "dns-memory-100",
        "dns-memory-300",
        "dns-memory-1000",
    ]
    full = {s.name: s.module_argv for s in report_run.plan(quick=False)}
    assert full["dns-memory-10000"][-6:] == [
        "--services",
        "10000",
        "--headless",
        "1000",
        "--endpoints",
        "100000",
    ]
    assert full["proxy"][-5:] == ["--services", "10", "1000", "3000", "10000"]
    default = report_run.select(report_run.plan(quick=False), None)
    assert sum(s.estimate_s for s in default) < 30 * 60
    assert "soak" not in {s.name for s in default}  # 20 minutes: only when named


def test_only_names_the_optional_soak_and_a_full_sitting_keeps_its_result(
    tmp_path: Path,
) -> None:
    steps = report_run.plan(quick=False)
    assert [s.name for s in report_run.select(steps, ["soak"])] == ["soak"]
    assert [s.name for s in report_run.select(steps, ["dns-o"])] == [
        "dns-overload",
        "dns-overload-in-process",
    ]
    soak_stamp = {"date": "2026-11-20T08:00:00+00:00", "commit": "c" * 40}
    write_json(tmp_path / "results" / "soak.json", soak_doc())
    write_json(tmp_path / "results" / "dns.json", dns_doc())
    write_json(
        tmp_path / "run.json",
        {
            "steps": [
                {"name": "soak", "status": "ok", "measured": soak_stamp},
                {"name": "dns", "status": "ok"},
            ]
        },
    )
    kept = report_run.earlier_steps(tmp_path, {"soak"})  # a full sitting, soak not run
    assert [s["name"] for s in kept] == ["soak"] and kept[0]["measured"] == soak_stamp
    assert [p.name for p in (tmp_path / "results").glob("*.json")] == ["soak.json"]


def test_an_only_sitting_drops_earlier_steps_whose_results_are_gone(tmp_path: Path) -> None:
    write_json(tmp_path / "results" / "dns.json", dns_doc())
    write_json(
        tmp_path / "run.json",
        {
            "steps": [
                {"name": "dns", "status": "ok", "json": "results/dns.json"},
                {"name": "renamed", "status": "ok", "json": "results/renamed.json"},
            ]
        },
    )
    kept = report_run.earlier_steps(tmp_path, None)
    assert [s["name"] for s in kept] == ["dns"]


def test_steps_rerun_with_only_say_which_commit_and_date_they_ran_at(tmp_path: Path) -> None:
    write_all(tmp_path)
    first = {"date": "2026-11-23T09:00:00+00:00", "commit": "a" * 40}
    second = {"date": "2026-11-23T10:00:00+00:00", "commit": "b" * 40}
    step = {"command": "x", "seconds": 60.0, "status": "ok"}
    write_json(
        tmp_path / "run.json",
        {
            "seconds": 60.0,
            "steps": [
                {**step, "name": "proxy", "measured": first},
                {**step, "name": "dns", "measured": second},
            ],
        },
    )
    md = render(tmp_path)
    assert "Measured in several sittings" in md
    assert "| 1 | proxy | `x` | 2026-11-23 09:00 UTC, `aaaaaaaaaaaa` | 1m00s | ok |" in md
    assert "| 2 | dns | `x` | 2026-11-23 10:00 UTC, `bbbbbbbbbbbb` | 1m00s | ok |" in md


SOAK_DIFFERENCES = "soak: DNS names and kpx frontends differing from the API"
PROBE_P99 = "dnsd cluster names p99 during a slow-path flood"
FLOOD_WAIT = "dnsd flood's answers given by dnsd itself, p99 wait"


def ours_target_verdict(row: list[str]) -> list[str]:
    return [row[0], *row[3:]]


def test_soak_and_overload_targets_show_their_figures_and_flag_misses(tmp_path: Path) -> None:
    write_all(tmp_path)
    md = render(tmp_path)
    rows = targets(md)
    differing = rows[f"{SOAK_DIFFERENCES} after 20.0 min of churn and chaos"]
    assert differing[0] == "0 of 750" and differing[3:] == ["0", MET]
    assert ours_target_verdict(rows["soak: dnsd RSS growth after warm-up"]) == [
        "+3.3 %",
        "<= 5 %",
        MET,
    ]
    assert ours_target_verdict(rows["soak: kpx RSS growth after warm-up"]) == [
        "+10.0 %",
        "<= 5 %",
        NOT_MET,
    ]
    fds = rows["soak: kpx open file descriptors after warm-up beyond one listener per frontend"]
    assert ours_target_verdict(fds) == ["+0", "no growth", MET]
    assert ours_target_verdict(rows[f"{PROBE_P99} (probe at 1,000 qps)"]) == [
        "0.400 ms (0 lost; idle 0.150 ms)",
        "<= 1 ms",
        MET,
    ]
    # The EDNS flood's answers from dnsd itself waited 150 ms at p99: the worst flood counts.
    assert ours_target_verdict(rows[f"{FLOOD_WAIT} (worst of 2 floods)"]) == [
        "150.0 ms (76,000 answers)",
        "<= 100 ms",
        NOT_MET,
    ]
    assert ours_target_verdict(rows["dnsd RSS growth over the flood, at its peak"]) == [
        "6.5 MB (4.5 MB at its end)",
        "<= 10 MB",
        MET,
    ]
    assert "| during the flood | 1,000 | 30,000 / 30,000 | 0.080 | 0.400 | 3.000 |" in md
    assert "dnsd shed during the flood: udp_queue_full 700,000, malformed 60,000. " in md
    assert "+4.5 MB at its end, +6.5 MB at its peak." in md
    assert "| edns | given by dnsd itself | 38,000 | 37.5 | 150.0 | 300.0 |" in md
    assert "| kpx | 80.0 | 88.0 | +10.0 | 90.0 | 330 | 352 | +0 | 200 |" in md
    assert "(49.5/s achieved, 59,400 in all: " in md
    assert "chaos (compact+drop x1, drop x1, api_stop x1, api_start x1)" in md
    assert "own check (also /healthz, a relist in each daemon, the write rate): kpx RSS" in md


def test_soak_differences_are_flagged_and_a_short_soak_leaves_growth_unjudged(
    tmp_path: Path,
) -> None:
    write_all(tmp_path, soak=soak_doc(duration=60, differences=1))
    md = render(tmp_path)
    rows = targets(md)
    assert rows[f"{SOAK_DIFFERENCES} after 1.0 min of churn and chaos"][::4] == [
        "1 of 750",
        NOT_MET,
    ]
    short = "n/a: 1.0 min at 50 writes/s, the target is for 20 min at 50"
    assert rows["soak: kpx RSS growth after warm-up"][-1] == short
    assert rows["soak: dnsd open file descriptors after warm-up"][-1] == short
    assert "- differs: `dns svc-7.ns-1: want ['10.96.0.7'] got []`" in md


def test_probe_queries_lost_during_the_flood_miss_the_p99_target(tmp_path: Path) -> None:
    write_all(tmp_path, **{"dns-overload": overload_doc(flood_p99_ms=0.5, lost=600)})
    row = targets(render(tmp_path))[f"{PROBE_P99} (probe at 1,000 qps)"]
    assert row[-1] == f"{NOT_MET}: 600 of 30,000 probes lost"


def test_soak_and_overload_without_results_are_not_run(tmp_path: Path) -> None:
    write_all(tmp_path, soak=None, **{"dns-overload": None})
    md = render(tmp_path)
    rows = targets(md)
    for what in (SOAK_DIFFERENCES, "soak: kpx RSS growth after warm-up", PROBE_P99, FLOOD_WAIT):
        assert rows[what] == ["—", "—", "n/a", rows[what][3], "n/a: not run"]
    assert "Not run (no `results/soak.json`): `.venv/bin/python -m bench.report --only soak`" in md
    assert "Not run (no `results/dns-overload.json`)" in md
    assert "22 of 37 targets met, 7 not met, 8 not judged." in md


def udp_doc(targets: dict[str, Any] | None = None) -> dict[str, Any]:
    def pair(kpx: dict[str, float], nginx: dict[str, float]) -> dict[str, Any]:
        return {"kpx": kpx, "nginx": nginx}

    saturated = pair(
        {"answers_per_s": 300_000.0, "proxy_cpu_us_per_datagram": 3.0},
        {"answers_per_s": 150_000.0, "proxy_cpu_us_per_datagram": 6.0},
    )
    doc: dict[str, Any] = {
        "small": saturated,
        "bulk": saturated,
        "latency": pair({"added_p99_us": 30.0}, {"added_p99_us": 40.0}),
        "sessions": {
            "kpx": {
                "held": 10_000,
                "bytes_per_session": 512.0,
                "small_with_sessions": {"answers_per_s": 285_000.0},
            },
            "nginx": {"held": 10_000, "bytes_per_session": 1024.0},
        },
    }
    if targets is not None:
        doc["targets"] = targets
    return doc


def test_udp_ratios_are_bench_udps_own_when_it_writes_its_targets() -> None:
    rows = {c.what: c for c in udp_checks(udp_doc())}
    small = rows["kpx UDP 64-byte datagrams/s at saturation vs nginx"]
    assert (small.ratio, small.verdict) == (2.0, MET)  # 300,000 / 150,000 from the medians
    assert "kpx UDP CPU per 1,200-byte datagram vs nginx" not in rows  # older results
    held = rows["kpx UDP datagrams/s with the sessions held vs without"]
    assert math.isclose(held.ratio, 0.95) and held.verdict == MET
    # Newer results carry each target's median of per-run ratios: that ratio is judged.
    own = {
        "small_datagrams_per_s": {"ratio": 1.4},
        "bulk_cpu_per_datagram": {"ratio": 0.5},
        "datagrams_per_s_with_sessions_held": {"ratio": 0.85},
    }
    rows = {c.what: c for c in udp_checks(udp_doc(own))}
    small = rows["kpx UDP 64-byte datagrams/s at saturation vs nginx"]
    assert (small.ours, small.ratio, small.verdict) == ("300,000 /s", 1.4, NOT_MET)
    bulk_cpu = rows["kpx UDP CPU per 1,200-byte datagram vs nginx"]
    assert (bulk_cpu.ratio, bulk_cpu.target, bulk_cpu.verdict) == (0.5, "<= 0.8x nginx", MET)
    assert rows["kpx UDP datagrams/s with the sessions held vs without"].verdict == NOT_MET
    assert rows["kpx UDP 1,200-byte datagrams/s vs nginx"].ratio == 2.0  # not in its targets


def test_transparent_mode_is_judged_against_node_mode_in_every_run(tmp_path: Path) -> None:
    proxy = proxy_doc()
    write_all(tmp_path, proxy=proxy)
    assert not any("transparent" in what for what in targets(render(tmp_path)))  # not run
    proxy["runs"]["kpx-tp"] = [
        {**run, "conn_per_s": conns}
        for run, conns in zip(proxy["runs"]["kpx"], (4_400, 2_000, 4_500), strict=True)
    ]
    proxy["medians"]["kpx-tp"] = {**proxy["medians"]["kpx"], "conn_per_s": 4_400}
    write_all(tmp_path, proxy=proxy)
    rows = targets(render(tmp_path))
    conns = rows["kpx transparent mode new connections/s vs node mode"]
    assert conns[:3] == ["4,400 /s", "4,500 /s", "0.98x"]
    assert conns[-1] == f"{NOT_MET}: missed in run 2 of 3 (per run: 0.98x, 0.44x, 1.00x)"
    assert rows["kpx transparent mode 8-stream throughput vs node mode"][-1] == MET
    assert rows["kpx transparent mode CPU per GB moved vs node mode"][-1] == MET


UDP_MEMORY = "kpx memory per UDP session (10,000 held)"


def test_udp_memory_per_session_says_when_the_peers_rss_did_not_grow() -> None:
    doc = udp_doc()
    rows = {c.what: c for c in udp_checks(doc)}
    grew = rows[UDP_MEMORY]
    assert (grew.ours, grew.peer, grew.ratio) == ("0.50 KiB", "1.00 KiB", 0.5)
    # nginx's RSS stays flat while it holds the sessions (bench/udp.py measures 0 bytes or
    # less): no "0.00 KiB" as if a session cost it nothing, and no ratio to it.
    doc["sessions"]["nginx"].update(
        bytes_per_session=0.0, rss_before_mb=40.296448, rss_after_mb=40.296448
    )
    flat = {c.what: c for c in udp_checks(doc)}[UDP_MEMORY]
    assert flat.ours == "0.50 KiB"
    assert flat.peer == "no RSS growth (40.3 MB before, 40.3 MB after)"
    assert math.isnan(flat.ratio)
    doc["sessions"]["nginx"].update(bytes_per_session=-30.7, rss_after_mb=39.903232)
    shrank = {c.what: c for c in udp_checks(doc)}[UDP_MEMORY]
    assert shrank.peer == "no RSS growth (40.3 MB before, 39.9 MB after)"


SAVED_UDP = Path(__file__).resolve().parent.parent / "bench" / "report" / "results" / "udp.json"


def saved_udp() -> dict[str, Any]:
    """bench/udp.py's results kept in the repository (bench/report/results/udp.json)."""
    doc: dict[str, Any] = json.loads(SAVED_UDP.read_text())
    return doc


def test_udp_memory_row_from_the_saved_results_shows_no_zero_kib(tmp_path: Path) -> None:
    udp = saved_udp()
    write_all(tmp_path, udp=udp)
    row = targets(render(tmp_path))[UDP_MEMORY]
    nginx = udp["sessions"]["nginx"]
    expected = (
        f"{nginx['bytes_per_session'] / 1024:.2f} KiB"
        if nginx["bytes_per_session"] > 0
        else "no RSS growth ("
    )
    assert row[1].startswith(expected) and row[1] != "0.00 KiB"
    assert row[0] == f"{udp['sessions']['kpx']['bytes_per_session'] / 1024:.2f} KiB"


def test_udp_chart_is_drawn_when_udp_results_exist(tmp_path: Path) -> None:
    import matplotlib.image

    write_all(tmp_path, udp=saved_udp())
    render(tmp_path)
    png = tmp_path / "charts" / "udp.png"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 15_000
    height, width = matplotlib.image.imread(png).shape[:2]
    assert width >= 1200 and height >= 350, (width, height)  # three panels side by side
    # A bare document (no direct or nat path, no latency percentiles) still draws.
    write_all(tmp_path, udp=udp_doc())
    render(tmp_path)
    assert (tmp_path / "charts" / "udp.png").read_bytes().startswith(PNG_SIGNATURE)
    write_all(tmp_path, udp={"benchmark": "udp", "complete": False})
    render(tmp_path)
    assert not (tmp_path / "charts" / "udp.png").exists()


UDP_HEADING = "## Proxy UDP: kpx vs nginx and the kernel's NAT"


def udp_section(md: str) -> str:
    return md.split(UDP_HEADING, 1)[1].split("\n## ", 1)[0]


def udp_pass(rate: float, cpu: float, proxy_busy: float, client_busy: float) -> dict[str, float]:
    """One saturation pass as bench/udp.py's saturation() records it."""
    return {
        "answers_per_s": rate,
        "mb_per_s": rate * 64 / 1e6,
        "proxy_cpu_us_per_datagram": cpu,
        "proxy_user_us_per_datagram": cpu / 4,
        "proxy_core_busy": proxy_busy,
        "client_server_core_busy": client_busy,
        "proxy_core_total_busy": max(proxy_busy, 0.01),
        "client_core_total_busy": client_busy,
    }


def udp_run(kpx: float, nginx: float, kpx_added_p99: float, retarget_p99: float) -> Any:
    """One run of bench/udp.py: kpx's and nginx's 64-byte rate, kpx's added p99 (nginx's is
    400 µs), the re-targeting p99; the 1,200-byte passes at 90 % of the 64-byte ones."""
    cpu = {"kpx": 5.0, "nginx": 10.0}
    small = {
        "direct": udp_pass(170_000, NAN, NAN, 1.0),
        "nat": udp_pass(175_000, NAN, NAN, 1.0),
        "nginx": udp_pass(nginx, cpu["nginx"], 0.98, 0.96),
        "kpx": udp_pass(kpx, cpu["kpx"], 0.6 if kpx > 190_000 else 0.94, 0.99),
    }
    bulk = {m: {**f, "answers_per_s": 0.9 * f["answers_per_s"]} for m, f in small.items()}
    latency = {
        m: {"p50_us": p50, "p99_us": 40.0 + added, "lost": 0.0, "added_p99_us": added}
        for m, p50, added in (
            ("direct", 12.0, 0.0),
            ("nat", 13.0, 5.0),
            ("nginx", 190.0, 400.0),
            ("kpx", 220.0, kpx_added_p99),
        )
    }
    sessions = {
        "nginx": {"held": 10_000.0, "failed": 0.0, "rss_before_mb": 40.3, "rss_after_mb": 40.3,
                  "bytes_per_session": 0.0, "small_without_sessions": small["nginx"],
                  "small_with_sessions": small["nginx"]},
        "kpx": {"held": 10_000.0, "failed": 0.0, "rss_before_mb": 64.1, "rss_after_mb": 71.4,
                "bytes_per_session": 730.0, "small_without_sessions": small["kpx"],
                "small_with_sessions": {**small["kpx"], "answers_per_s": 0.95 * kpx}},
    }  # fmt: skip
    retarget = {"p50_ms": 3.0, "p99_ms": retarget_p99, "samples": 50.0, "not_seen_in_5s": 0.0}
    return {"small": small, "bulk": bulk, "latency": latency, "sessions": sessions,
            "retarget": retarget}  # fmt: skip


def udp_full_doc() -> dict[str, Any]:
    """Put together as bench/udp.py's main() does: the runs, their medians, the targets."""
    from bench import udp

    runs = [udp_run(180_000, 96_000, 480.0, 3.5), udp_run(200_000, 100_000, 700.0, 4.5)]
    for one in runs:
        one["targets"] = udp.targets(one)
    args = {"runs": 2, "duration": 4.0, "flows": 64, "window": 8, "rate": 2000.0,
            "sessions": 10_000, "samples": 50, "quick": False}  # fmt: skip
    doc: dict[str, Any] = {"benchmark": "udp", "quick": False, "args": args, "runs": runs}
    doc.update(udp.medians(runs))
    doc["targets"] = udp.over_runs([one["targets"] for one in runs])
    doc["targets_missed"] = [n for n, t in doc["targets"].items() if not t["met"]]
    return {**doc, "complete": True}


def test_udp_section_renders_the_medians_every_runs_ratios_sessions_and_retargeting(
    tmp_path: Path,
) -> None:
    write_all(tmp_path, udp=udp_full_doc())
    md = render(tmp_path)
    # after the TCP proxy and its workers, before kwatch
    assert md.index("## kpx --workers 2") < md.index(UDP_HEADING) < md.index("## kwatch")
    section = udp_section(md)
    assert "saturation passes of 4 s, 64 client sockets each keeping 8 datagrams" in section
    assert "in flight at 2,000/s" in section and "10,000 sessions held" in section
    assert "50 re-targetings of kpx" in section and "2 run(s)" in section
    assert "](charts/udp.png)" in section
    for line in (
        "| median | direct | nat | nginx | kpx |",
        "| 64-byte datagrams/s | 170,000 | 175,000 | 98,000 | 190,000 |",
        "| 1,200-byte datagrams/s | 153,000 | 157,500 | 88,200 | 171,000 |",
        "| proxy CPU per 64-byte datagram (µs) | — | — | 10.00 | 5.00 |",
        "| proxy CPU per 1,200-byte datagram (µs) | — | — | 10.00 | 5.00 |",
        "| proxy core busy, 64-byte pass (CPU 0) | — | — | 0.98 | 0.77 |",
        "| fixed-rate latency p50 (µs) | 12 | 13 | 190 | 220 |",
        "| fixed-rate latency p99 (µs) | 40 | 45 | 440 | 630 |",
        "| p99 added over direct (µs) | 0 | 5 | 400 | 590 |",
        # run 1: kpx's core busy 94 %; run 2: 60 %, the client and server's 99 %
        "| what bound the 64-byte rate | — | — | proxy core (2 of 2 runs) | proxy core (1 of 2 "
        "runs), client/server core (1 of 2 runs) |",
    ):
        assert line + "\n" in section, line
    # every run's ratio with the figures it divides; run 2 misses the latency target
    assert (
        "| 1 | 1.88x (180,000 / 96,000) | 0.50x (5.0 / 10.0) | 1.88x (162,000 / 86,400) | "
        "0.50x (5.0 / 10.0) | 1.20x (480 / 400) | 0.95x (171,000 / 180,000) |"
    ) in section
    assert "| 2 | 2.00x (200,000 / 100,000) |" in section
    assert "| 1.75x (700 / 400), not met | 0.95x (190,000 / 200,000) |" in section
    assert "| nginx | 10,000 | 0 | 40.3 | 40.3 | none | 98,000 | 98,000 | 1.00x |" in section
    assert "| kpx | 10,000 | 0 | 64.1 | 71.4 | 730 bytes | 190,000 | 180,500 | 0.95x |" in section
    assert "nginx's RSS did not grow while it held them" in section
    assert "| 2 | 100,000 -> 100,000 /s (1.00x); RSS 40.3 -> 40.3 MB, none per session |" in section
    assert "| run 2 | 3.00 | 4.50 | 50 | 0 |" in section
    assert "| median | 3.00 | 4.00 | 50 | 0 |" in section


def test_udp_section_renders_from_the_saved_results(tmp_path: Path) -> None:
    udp = saved_udp()
    write_all(tmp_path, udp=udp)
    section = udp_section(render(tmp_path))
    assert (tmp_path / "charts" / "udp.png").exists() and "](charts/udp.png)" in section
    cells = [line.strip("| ").split(" | ") for line in section.splitlines() if line[:2] == "| "]
    rows = {row[0]: row[1:] for row in cells}
    small = udp["small"]
    assert rows["64-byte datagrams/s"][:4] == [
        f"{small[m]['answers_per_s']:,.0f}" for m in ("direct", "nat", "nginx", "kpx")
    ]
    every_run = section.split("kpx / nginx in every run", 1)[1].split("\n### ", 1)[0]
    ratios = [line.strip("| ").split(" | ") for line in every_run.splitlines() if line[:2] == "| "]
    assert len(ratios) == 2 + len(udp["runs"])  # the header, its rule, a row per run
    for i, one in enumerate(udp["runs"]):
        assert ratios[2 + i][0] == str(i + 1)
        assert len(ratios[2 + i][1:]) == len(one["targets"])
        for cell, target in zip(ratios[2 + i][1:], one["targets"].values(), strict=True):
            assert cell.startswith(f"{target['ratio']:.2f}x ("), (i, cell)
        assert rows[f"run {i + 1}"][1] == f"{one['retarget']['p99_ms']:.2f}"
    retarget = udp["retarget"]
    assert rows["median"][-4:] == [
        f"{retarget['p50_ms']:.2f}",
        f"{retarget['p99_ms']:.2f}",
        f"{retarget['samples']:,.0f}",
        f"{retarget['not_seen_in_5s']:,.0f}",
    ]
    assert "| — | — | — | — |" not in section  # every path has its figures


def test_udp_section_from_a_bare_document_shows_what_it_has(tmp_path: Path) -> None:
    write_all(tmp_path, udp=udp_doc())  # no runs, no args, no direct or nat path
    section = udp_section(render(tmp_path))
    assert "| median | nginx | kpx |" in section
    assert "| 64-byte datagrams/s | 150,000 | 300,000 |" in section
    assert "| p99 added over direct (µs) | 40 | 30 |" in section
    assert "| kpx | 10,000 | — | — | — | 512 bytes | — | 285,000 | n/a |" in section
    assert "in every run" not in section and "Re-targeting" not in section


def test_udp_section_says_when_the_benchmark_did_not_run_or_stopped(tmp_path: Path) -> None:
    write_all(tmp_path)
    section = udp_section(render(tmp_path))
    assert section.strip() == (
        "Not run (no `results/udp.json`): `.venv/bin/python -m bench.report --only udp` runs it "
        "(about 4 minutes)."
    )
    write_json(
        tmp_path / "run.json",
        {"steps": [{"name": "udp", "status": "failed (exit 1)", "log": "logs/udp.log"}]},
    )
    section = udp_section(render(tmp_path))
    assert section.strip() == "Not measured: the step failed (exit 1) (see `logs/udp.log`)."
    write_all(tmp_path, udp={**udp_full_doc(), "complete": False})
    section = udp_section(render(tmp_path))
    assert "> The benchmark stopped before its end" in section
    assert "| 64-byte datagrams/s | 170,000 |" in section


def test_overload_runs_are_each_judged_with_knotd_as_the_peer(tmp_path: Path) -> None:
    """bench.dns_overload --runs 3 --control-knot: one run over 1 ms misses the target, the
    control knotd's p99 is the peer, and a table shows every run."""
    runs = []
    for p99, knotd, peak in ((0.6, 0.3, 5.0), (1.4, 0.9, 6.0), (0.8, 0.4, 4.0)):
        run = overload_doc(flood_p99_ms=p99)
        run["probe_flood"]["control"] = {"p99_ms": knotd, "p50_ms": 0.05, "lost": 0}
        run["rss_peak_growth_mb"] = peak
        runs.append(run)
    doc = {**runs[1], "runs": runs, "server_cpus": [0], "load_cpus": [1]}
    write_all(tmp_path, **{"dns-overload": doc})
    md = render(tmp_path)
    row = targets(md)[f"{PROBE_P99} (probe at 1,000 qps)"]
    assert row[0] == "0.600, 1.400, 0.800 ms (per run; 0 lost; idle 0.150, 0.150, 0.150 ms)"
    assert row[1] == "knotd 0.300, 0.900, 0.400 ms"
    assert row[2] == "2.00x"  # the median of 2.0, 1.56, 2.0
    assert row[-1] == f"{NOT_MET}: missed in run 2 of 3"
    peak = targets(md)["dnsd RSS growth over the flood, at its peak"]
    assert peak[0] == "5.0, 6.0, 4.0 MB (per run)" and peak[-1] == MET
    assert targets(md)[f"{FLOOD_WAIT} (worst of 6 floods in 3 runs)"][-1] == NOT_MET
    assert "| 2 | 1.400 | 0.900 | 0.080 | 0 | 2,600 | 150.0 | +6.0 |" in md
    assert "pinned to CPU 0, the flood, the malformed packets and the probe to CPU 1" in md
    assert "The tables below are those of run 2, whose cluster-name p99 was the highest." in md


def test_the_in_process_flood_gets_its_own_rows_and_runs_table(tmp_path: Path) -> None:
    runs = [overload_doc(flood_p99_ms=p99) for p99 in (0.7, 0.9, 1.1)]
    for run in runs:
        run["probe_flood"]["control"] = {"p99_ms": 0.2}
    write_all(tmp_path, **{"dns-overload-in-process": {**runs[2], "runs": runs}})
    md = render(tmp_path)
    rows = targets(md)
    row = rows[
        "dnsd --no-forward-process cluster names p99 during a slow-path flood (probe at 1,000 qps)"
    ]
    assert row[0].startswith("0.700, 0.900, 1.100 ms (per run;")
    assert row[-1] == f"{NOT_MET}: missed in run 3 of 3"
    assert rows[f"{PROBE_P99} (probe at 1,000 qps)"][-1] == MET  # the plain flood's, unchanged
    assert "### The same flood with --no-forward-process" in md
    assert "| 3 | 1.100 | 0.200 |" in md
    # Without those results (reports made before the comparison) nothing is added.
    write_all(tmp_path / "old")
    assert "no-forward-process" not in render(tmp_path / "old")
