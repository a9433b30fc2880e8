"""The benchmark harnesses run end to end in `--quick` mode (seconds each).

Only that they work, and that `--json` writes what bench.report reads: the figures of a quick
run on a shared machine mean nothing, so none is checked. They skip when the peer tools are not
installed (knot, dnsperf, haproxy, iperf3 and wrk are not in scripts/bootstrap.sh) or network
namespaces are not available.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.netns_topology import netns_unavailable
from bench.report_checks import overload_checks, soak_checks

ROOT = Path(__file__).resolve().parent.parent


def _needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install it to run the benchmarks)")


def _run(module: str, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", module, "--quick", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}\n{out.stdout[-3000:]}"
    return out.stdout


def _json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())  # strict JSON: no NaN
    assert doc["complete"] is True
    return doc


@pytest.mark.timeout(120)
def test_bench_dns_quick(tmp_path: Path) -> None:
    _needs("knotd", "dnsperf")
    text = _run("bench.dns", "--json", str(tmp_path / "dns.json"))
    assert "medians of 1 runs" in text
    assert "propagation" in text
    # The knot zone mirrors dnsd's records: every sampled question gets the same answer.
    assert "differs:" not in text, "knot and dnsd answer differently:\n" + text
    doc = _json(tmp_path / "dns.json")
    assert set(doc["medians"]) == {"knot", "dnsd", "dnsd --workers 2"}
    assert len(doc["runs"]["knot"]) == 1 and doc["medians"]["dnsd"]["qps"] > 0
    assert set(doc["ratios_vs_knot"]["dnsd"]) == {"qps", "cpu_us_per_query", "p99_ms"}
    assert doc["rss"]["dnsd_ready_mb"] > 0 and doc["propagation"]["rss_via_api_mb"] > 0


@pytest.mark.timeout(120)
def test_bench_dns_memory_only(tmp_path: Path) -> None:
    text = _run("bench.dns", "--memory-only", "--json", str(tmp_path / "mem.json"))
    assert "dnsd RSS + its forward child's private memory" in text
    doc = _json(tmp_path / "mem.json")
    assert doc["cluster"]["services"] == 200
    assert doc["memory"]["rss_api_mb"] > 0 and doc["memory"]["rss_manifests_mb"] > 0
    assert doc["memory"]["child_private_mb"] > 5  # the child was found and measured


@pytest.mark.timeout(120)
def test_bench_sync_quick(tmp_path: Path) -> None:
    text = _run("bench.sync", "--json", str(tmp_path / "sync.json"))
    assert "medians of 1 runs (500 Services" in text
    doc = _json(tmp_path / "sync.json")
    assert doc["services"] == 500 and doc["medians"]["objects"] == 1_000


@pytest.mark.timeout(120)
def test_bench_proxy_quick(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    _needs("iperf3", "wrk", "haproxy")
    text = _run("bench.proxy", "--json", str(tmp_path / "proxy.json"))
    assert "medians of 1 runs" in text
    assert "run 1 8 streams in 4 alternating slices: haproxy" in text
    assert "network programming latency" in text
    doc = _json(tmp_path / "proxy.json")
    assert set(doc["medians"]) == {"direct", "nat", "haproxy", "kpx", "kpx-tp"}
    assert doc["ratios"]["haproxy"]["gbps_8"] > 0
    assert doc["ratios"]["transparent_vs_node"]["conn_per_s"] > 0  # both kpx modes measured
    assert set(doc["idle"]) == {"requested", "haproxy", "kpx"}
    assert [p["services"] for p in doc["programming"]] == [10, 50]
    prefix = text.split("netns chain ", 1)[1].split("-*", 1)[0]
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in leftovers  # every namespace it created is gone


@pytest.mark.timeout(120)
def test_bench_udp_quick(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    _needs("nginx", "taskset", "gcc")  # gcc builds bench/udpgen.c (CI machines have it)
    if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        pytest.skip("needs libnginx-mod-stream (apt-get install it to run the benchmarks)")
    text = _run("bench.udp", "--json", str(tmp_path / "udp.json"))
    assert "re-targeting" in text
    doc = _json(tmp_path / "udp.json")
    assert set(doc["small"]) == {"direct", "nat", "nginx", "kpx"}
    assert doc["small"]["kpx"]["answered"] > 0 and doc["small"]["nginx"]["answered"] > 0
    assert doc["sessions"]["kpx"]["held"] > 0
    assert doc["retarget"]["samples"] > 0
    assert len(doc["runs"]) == 1 and doc["runs"][0]["small"]["kpx"]["answered"] > 0
    assert set(doc["targets"]) >= {"small_datagrams_per_s", "latency_added_p99"}
    assert set(doc["targets_missed"]) <= set(doc["targets"])


@pytest.mark.timeout(120)
def test_bench_soak_quick(tmp_path: Path) -> None:
    text = _run("bench.soak", "--duration", "24", "--json", str(tmp_path / "soak.json"))
    assert "0 differences" in text
    doc = _json(tmp_path / "soak.json")
    assert doc["differences"] == 0 and doc["writes"] > 100
    assert set(doc["rss_growth_pct"]) == {"dnsd", "kpx"}
    assert "targets_missed" in doc
    # The checker asked about every kind of name, present and gone, and both frontend states.
    kinds = {"service A answer", "service AAAA answer", "service SRV answer",
             "service CNAME answer", "service A NXDOMAIN", "endpoint A answer", "port SRV answer",
             "reverse PTR answer", "reverse PTR NXDOMAIN", "pod A answer", "pod A NXDOMAIN",
             "namespace A NODATA", "frontend serve", "frontend reject"}  # fmt: skip
    assert kinds <= set(doc["coverage"]), doc["coverage"]
    # The compactions reached both daemons: each relisted.
    assert all(doc["watch"][d]["kwatch_relists_total"] > 0 for d in ("dnsd", "kpx"))
    # bench.report reads every figure it judges (a short run leaves the growth unjudged).
    assert not [c.what for c in soak_checks(doc) if c.verdict.startswith("n/a: not")]


@pytest.mark.timeout(120)
def test_bench_dns_overload_quick(tmp_path: Path) -> None:
    _needs("dnsperf")
    text = _run("bench.dns_overload", "--json", str(tmp_path / "overload.json"))
    assert "probe_flood:" in text
    doc = _json(tmp_path / "overload.json")
    assert doc["probe_flood"]["answered"] > 0 and set(doc["flood"]) == {"plain", "edns"}
    # bench.report reads every figure it judges; at the quick run's 300 outstanding the flood
    # may have no answer of dnsd's own (all SERVFAIL after the upstream's timeout).
    probe, wait, rss = overload_checks(doc)
    assert not probe.verdict.startswith("n/a") and not rss.verdict.startswith("n/a")
    assert wait.ours.endswith("(0 answers)") or not wait.verdict.startswith("n/a")


@pytest.mark.timeout(120)
def test_bench_relist_quick(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    text = _run("bench.relist", "--json", str(tmp_path / "relist.json"))
    assert "forced 410 relist" in text
    doc = _json(tmp_path / "relist.json")
    for daemon in ("dnsd", "kpx"):
        figures = doc[daemon]
        assert figures["peak_mb"] >= figures["steady_mb"] > 0
        assert figures["ratio"] == pytest.approx(figures["peak_mb"] / figures["steady_mb"])
    name = text.split("network namespace ", 1)[1].split()[0]
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in leftovers


@pytest.mark.timeout(120)
def test_bench_proxy_workers_quick(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    _needs("iperf3", "wrk", "haproxy")
    text = _run("bench.proxy_workers", "--json", str(tmp_path / "workers.json"))
    assert "run 1 --workers 1:" in text and "run 1 --workers 2:" in text
    doc = _json(tmp_path / "workers.json")
    assert len(doc["runs"]["one"]) == len(doc["runs"]["many"]) == 1
    assert set(doc["ratio_runs"]) == {"conn_per_s", "gbps_8"}
    assert doc["runs"]["one"][0]["rss"]["workers_mb"] == []  # one worker: kpx proxies itself
    assert len(doc["runs"]["many"][0]["rss"]["workers_mb"]) == 2
