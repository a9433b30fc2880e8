"""Rendering the benchmark report: report.md (the targets, then a section per benchmark with
its tables, the machine and how the report was made) and charts/*.png, from the JSON a sitting
left in the folder (results/*.json, machine.json, run.json). Running nothing, it gives the same
report for the same files."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import charts
from bench.jsonout import read_json_object
from bench.report_checks import (
    MET,
    NOT_MET,
    Check,
    all_checks,
    memory_sweep,
    overload_runs,
    per_run_ratio,
    run_ratios,
)
from bench.report_format import Doc, duration, f_int, f_num, f_ratio, finite, fmt, num
from bench.report_md import Report, missing, not_run, partial, per_run_rows, table
from bench.report_udp import udp_section


def load_results(folder: Path) -> dict[str, Doc]:
    """Each results/<name>.json that holds a JSON object, by name."""
    docs: dict[str, Doc] = {}
    for path in sorted(folder.glob("*.json")):
        doc = read_json_object(path)
        if doc:
            docs[path.stem] = doc
    return docs


def _splice_text(proxy: Doc) -> str:
    if not proxy.get("haproxy_splice"):
        return "off"
    if "proxy_cpus" in proxy:  # the runs that splice both ways with 1 MiB pipes say so
        return "request and response, 1 MiB pipes"
    return "auto"


def _cpus_text(proxy: Doc) -> str:
    cpus = proxy.get("proxy_cpus")
    if not cpus:
        return "neither proxy pinned to CPUs"
    load = proxy.get("load_cpus")
    where = f", the load generators and servers on CPUs {load}" if load else ""
    return f"both proxies pinned to CPUs {cpus}{where}"


DNS_ROWS = (
    ("qps", "throughput at saturation (qps)", "{:,.0f}"),
    ("lost_pct", "queries lost at saturation (%)", "{:.2f}"),
    ("avg_ms_saturated", "average latency at saturation (ms)", "{:.2f}"),
    ("cpu_us_per_query", "server CPU per query (µs)", "{:.2f}"),
    ("server_cpu_pct", "server CPU during the pass (%)", "{:.0f}"),
    ("dnsperf_cpu_pct", "dnsperf CPU during the pass (%)", "{:.0f}"),
    ("p50_ms", "p50 latency at the fixed load (ms)", "{:.3f}"),
    ("p99_ms", "p99 latency at the fixed load (ms)", "{:.3f}"),
)

PROXY_ROWS = (
    ("gbps_1", "throughput, 1 stream (Gbit/s)", "{:.2f}"),
    ("gbps_8", "throughput, 8 streams (Gbit/s)", "{:.2f}"),
    ("proxy_cpu_s_per_gb", "proxy CPU per GB, 8 streams (CPU-s/GB)", "{:.2f}"),
    ("machine_cpu_s_per_gb", "whole machine CPU per GB (CPU-s/GB)", "{:.2f}"),
    ("conn_per_s", "new connections/s", "{:,.0f}"),
    ("conn_p50_ms", "connection pass p50 (ms)", "{:.2f}"),
    ("conn_p99_ms", "connection pass p99 (ms)", "{:.2f}"),
    ("conn_errors", "connection pass errors", "{:,.0f}"),
    ("conn_user_us", "proxy user CPU per connection (µs)", "{:.1f}"),
    ("conn_kernel_us", "proxy kernel CPU per connection (µs)", "{:.1f}"),
    ("req_p50_ms", "small request p50 (ms)", "{:.3f}"),
    ("req_p99_ms", "small request p99 (ms)", "{:.3f}"),
    ("proxy_rss_mb", "proxy RSS after the passes (MB)", "{:.1f}"),
    ("req_gc_runs", "kpx GC runs in the small-request pass", "{:,.0f}"),
    ("req_lag_over_5ms", "kpx loop-lag samples over 5 ms in that pass", "{:,.0f}"),
    ("req_lag_max_ms_below", "kpx longest loop lag in that pass, below (ms)", "{:g}"),
)
# kpx-only figures (what held its loop): no ratio to a peer.
KPX_ONLY_ROWS = ("req_gc_runs", "req_lag_over_5ms", "req_lag_max_ms_below")


def dns_section(r: Report, dns: Doc | None, run: Doc, charts_made: dict[str, bool]) -> None:
    r.add("## DNS: dnsd vs knot\n")
    if not dns or not dns.get("medians"):
        missing(r, "dns", run)
        return
    partial(r, dns)
    args, cluster = dns.get("args") or {}, dns.get("cluster") or {}
    n_runs = len((dns.get("runs") or {}).get("knot") or [])
    r.add(
        f"`bench/dns.py`: {f_int(num(cluster.get('services')))} Services "
        f"({f_int(num(cluster.get('headless')))} headless with "
        f"{f_int(num(cluster.get('headless_endpoints')))} endpoints each), "
        f"{f_int(num(cluster.get('endpoints')))} endpoints, "
        f"{f_int(num(cluster.get('records')))} records, served by knot from zone files and by "
        "dnsd from the same objects. dnsperf "
        f"`-c {args.get('clients')} -T {args.get('threads')} -q {args.get('outstanding')}` "
        f"for {args.get('duration')} s without a rate limit (throughput, CPU), then "
        f"`-Q {fmt('{:,.0f}', args.get('latency_qps'))}` for {args.get('latency_duration')} s "
        f"(latency); {n_runs} run(s), the servers' order rotated each run. Figures are medians; "
        "ratios are medians of the per-run ratios.\n"
    )
    answers = dns.get("answers") or {}
    if answers:
        asked, differ = num(answers.get("asked")), num(answers.get("differ"))
        line = (
            f"Same answers from every server for {f_int(asked - differ)} of {f_int(asked)} "
            "sampled questions"
        )
        r.add(line + (" (the differences are in `logs/dns.log`).\n" if differ else ".\n"))
    r.chart(charts_made.get("dns_qps.png", False), "dns_qps.png", "DNS qps and CPU per query")
    servers = [s for s in dns.get("servers") or dns["medians"] if s in dns["medians"]]
    rows = [
        [label, *(fmt(pattern, dns["medians"][s].get(key)) for s in servers)]
        for key, label, pattern in DNS_ROWS
    ]
    r.add(table(["median", *servers], rows))
    ratio_rows = []
    for label in servers:
        if label == "knot":
            continue
        ratio_rows.append(
            [f"{label} / knot"]
            + [f_ratio(per_run_ratio(dns, label, "knot", k)) for k in ("qps", "cpu_us_per_query")]
            + [f_ratio(per_run_ratio(dns, label, "knot", "p99_ms"))]
        )
    r.add(table(["ratio (median of per-run)", "qps", "CPU per query", "p99 latency"], ratio_rows))
    per_run = per_run_rows(
        dns.get("runs") or {},
        servers,
        n_runs,
        lambda one: (
            f"{fmt('{:,.0f}', one.get('qps'))} qps, {fmt('{:.2f}', one.get('cpu_us_per_query'))} µs"
        ),
    )
    r.add("Per run (qps, server CPU per query):\n")
    r.add(table(["run", *servers], per_run))
    rss = dns.get("rss") or {}
    if rss:
        r.add(
            f"dnsd RSS (from manifests; with its forward child's private memory, "
            f"{fmt('{:.1f}', rss.get('child_private_mb'))} MB): "
            f"{fmt('{:.1f}', rss.get('dnsd_ready_mb'))} MB once ready, "
            f"{fmt('{:.1f}', rss.get('dnsd_after_runs_mb'))} MB after the runs; "
            f"`--workers 2`: RSS {fmt('{:.1f}', rss.get('workers2_rss_mb'))} MB, PSS "
            f"{fmt('{:.1f}', rss.get('workers2_pss_mb'))} MB for "
            f"{fmt('{:.0f}', rss.get('workers2_processes'))} processes.\n"
        )
    propagation_section(r, dns.get("propagation"))
    r.chart(charts_made.get("latency_dns.png", False), "latency_dns.png", "DNS latency")


def propagation_section(r: Report, prop: Doc | None) -> None:
    """### Propagation: API write -> new DNS answer served."""
    r.add("### Propagation\n")
    if not prop:
        r.add("Not measured (`--skip-propagation`, or the step failed before it).\n")
        return
    r.add(
        "The fake API server loaded with the same objects, dnsd `--kubeconfig` on it; Service "
        "creates and EndpointSlice updates alternate, and dnsd is polled over UDP about "
        "every millisecond until the answer carries the new address.\n"
    )
    rows = [
        ["samples", fmt("{:.0f}", prop.get("samples"))],
        ["p50 (ms)", fmt("{:.2f}", prop.get("p50_ms"))],
        ["p99 (ms)", fmt("{:.2f}", prop.get("p99_ms"))],
        ["max (ms)", fmt("{:.2f}", prop.get("max_ms"))],
        ["API request itself, p50 (ms)", fmt("{:.2f}", prop.get("api_request_p50_ms"))],
        ["Service created, p50 (ms)", fmt("{:.2f}", prop.get("service created p50_ms"))],
        ["endpoint replaced, p50 (ms)", fmt("{:.2f}", prop.get("endpoint replaced p50_ms"))],
        ["dnsd RSS via the API server (MB)", fmt("{:.1f}", prop.get("rss_via_api_mb"))],
    ]
    r.add(table(["propagation", "dnsd"], rows))
    for note in prop.get("notes") or []:
        r.add(f"Note: {note}.\n")


def proxy_section(r: Report, proxy: Doc | None, run: Doc, charts_made: dict[str, bool]) -> None:
    r.add("## Proxy: kpx vs haproxy and the kernel's NAT\n")
    if not proxy or not proxy.get("medians"):
        missing(r, "proxy", run)
        return
    partial(r, proxy)
    args = proxy.get("args") or {}
    modes = [m for m in proxy.get("modes") or proxy["medians"] if m in proxy["medians"]]
    n_runs = len((proxy.get("runs") or {}).get("kpx") or [])
    seconds = max(1, int(num(args.get("duration")))) if finite(num(args.get("duration"))) else "?"
    bulk = (
        f"{args.get('bulk_mb')} MB transfers"
        if args.get("bulk_mb")
        else f"passes of {args.get('duration')} s"
    )
    r.add(
        "`bench/proxy.py`: client ns -> node ns -> server ns over veths; the same origin reached "
        "directly (`direct`), through an nftables `dnat` rule (`nat`, what kube-proxy's "
        "nftables mode does), through haproxy `mode tcp` "
        f"({proxy.get('haproxy_threads')} threads, splice "
        f"{_splice_text(proxy)}) and through kpx; "
        f"{_cpus_text(proxy)}. iperf3 {bulk}, "
        f"wrk `-c{args.get('conns')}` with `Connection: close` and `-c1` keep-alive for "
        f"{seconds} s each; {n_runs} run(s), the paths' order rotated each run. Figures are "
        "medians; ratios are medians of the per-run ratios.\n"
    )
    r.chart(
        charts_made.get("proxy_throughput.png", False),
        "proxy_throughput.png",
        "proxy throughput, CPU per GB and connections per second",
    )
    rows = [
        [label, *(fmt(pattern, proxy["medians"][m].get(key)) for m in modes)]
        for key, label, pattern in PROXY_ROWS
    ]
    r.add(table(["median", *modes], rows))
    ratios = proxy.get("ratios") or {}
    peers = [p for p in ("haproxy", "nat") if p in ratios]
    if peers:
        rows = [
            [label, *(f_ratio(num((ratios[p] or {}).get(key))) for p in peers)]
            for key, label, _ in PROXY_ROWS
            if key not in ("conn_errors", "proxy_rss_mb", *KPX_ONLY_ROWS)
        ]
        r.add(table(["ratio (median of per-run)", *(f"kpx / {p}" for p in peers)], rows))
    per_run = per_run_rows(
        proxy.get("runs") or {},
        modes,
        n_runs,
        lambda one: (
            f"{fmt('{:.2f}', one.get('gbps_8'))} Gbit/s, "
            f"{fmt('{:,.0f}', one.get('conn_per_s'))} conn/s, "
            f"p99 {fmt('{:.3f}', one.get('req_p99_ms'))} ms"
            + (
                f", {fmt('{:.0f}', one.get('req_gc_runs'))} GC runs, "
                f"{fmt('{:.0f}', one.get('req_lag_over_5ms'))} lags > 5 ms"
                if finite(num(one.get("req_gc_runs")))
                else ""
            )
        ),
    )
    r.add(
        "Per run (8-stream throughput, new connections/s, small-request p99; for kpx what held "
        "its loop in that pass: collector runs, loop-lag samples over 5 ms):\n"
    )
    r.add(table(["run", *modes], per_run))
    bulk_section(r, proxy, n_runs)
    if "haproxy" in modes and "kpx" in modes:
        keys = [
            (k, label) for k, label, _ in PROXY_ROWS if k not in ("conn_errors", *KPX_ONLY_ROWS)
        ]
        rows = [
            [label, *(f_ratio(v) for v in run_ratios(proxy, "kpx", "haproxy", key))]
            for key, label in keys
        ]
        r.add("kpx / haproxy in every run:\n")
        r.add(table(["ratio", *(f"run {i + 1}" for i in range(n_runs))], rows))
    idle_section(r, proxy.get("idle") or {})
    programming_section(r, proxy)
    r.chart(charts_made.get("latency_proxy.png", False), "latency_proxy.png", "proxy latency")


BULK_ROWS = (
    ("gbps_8", "Gbit/s", "{:.2f}", 1.0),
    ("bulk_slowest_second_gbps", "slowest second (Gbit/s)", "{:.2f}", 1.0),
    ("bulk_slowest_stream_gbps", "slowest stream (Gbit/s)", "{:.2f}", 1.0),
    ("bulk_proxy_cpu_s", "proxy CPU-s", "{:.1f}", 1.0),
    ("bulk_runq_wait_ms", "proxy waited for a core (s)", "{:.1f}", 1e-3),
    ("bulk_load_cpu_s", "iperf3 CPU-s (both ends)", "{:.1f}", 1.0),
    ("bulk_proxy_cores_idle_pct", "proxy cores idle (%)", "{:.0f}", 1.0),
    ("bulk_load_cores_idle_pct", "load cores idle (%)", "{:.0f}", 1.0),
    ("bulk_proxy_cores_steal_pct", "proxy cores stolen by the hypervisor (%)", "{:.0f}", 1.0),
)


def bulk_section(r: Report, proxy: Doc, n_runs: int) -> None:
    """haproxy's and kpx's 8-stream passes per run and what they met (results that record it:
    bench/proxy.py interleaves the two in alternating slices)."""
    runs = proxy.get("runs") or {}
    kpx, haproxy = runs.get("kpx") or [], runs.get("haproxy") or []
    if not kpx or "bulk_proxy_cpu_s" not in kpx[0]:
        return
    slices = (proxy.get("args") or {}).get("bulk_slices", 1)
    how = (
        f"interleaved in {slices} alternating slices (A B B A ...), the first swapped every run"
        if slices and slices > 1
        else "one pass each"
    )
    r.add(f"8-stream passes of haproxy and kpx, {how}; what each met, haproxy / kpx:\n")
    rows = []
    for key, label, pattern, scale in BULK_ROWS:
        cells = []
        for i in range(n_runs):
            h = num((haproxy[i] if i < len(haproxy) else {}).get(key)) * scale
            k = num((kpx[i] if i < len(kpx) else {}).get(key)) * scale
            cells.append(f"{fmt(pattern, h)} / {fmt(pattern, k)}")
        rows.append([label, *cells])
    r.add(table(["haproxy / kpx", *(f"run {i + 1}" for i in range(n_runs))], rows))


def workers_section(r: Report, workers: Doc | None, run: Doc) -> None:
    """## kpx --workers N against one worker: every run of both, what held them."""
    n = (workers or {}).get("workers", 2)
    r.add(f"## kpx --workers {n} against --workers 1\n")
    runs = (workers or {}).get("runs") or {}
    if not runs.get("one") or not runs.get("many"):
        missing(r, "proxy-workers", run)
        return
    partial(r, workers or {})
    doc = workers or {}
    load = doc.get("load_cpus")
    r.add(
        f"`bench/proxy_workers.py`: bench/proxy.py's chain, kpx restarted with `--workers 1` and "
        f"`--workers {n}` in turn (the order swapped every run; rows in the order they ran), "
        f"pinned to CPUs {doc.get('cpus')}"
        + (
            f", the load generators on CPUs {load}"
            if load
            else ", the load generators and "
            "servers (iperf3, wrk, the origin) unpinned on the same cores"
        )
        + f"; iperf3 -P 8 and wrk `-c{doc.get('conns')}` `Connection: close`, "
        f"{f_num(num(doc.get('duration_s')), 0)} s each. Run-queue wait: time kpx's processes "
        "were runnable but waited for a core, summed over them; load CPU: iperf3 (both ends), "
        "or wrk and the origin, in the same pass; rest: the whole machine's busy CPU-s in the pass "
        "but kpx's and the load's (other processes, interrupts). Every run:\n"
    )
    rows = []
    orders = doc.get("orders") or []
    for i, (one, many) in enumerate(zip(runs["one"], runs["many"], strict=False)):
        pair = (("1", one), (str(n), many))
        if i < len(orders) and orders[i] and orders[i][0] != 1:
            pair = pair[::-1]  # in the order they ran
        for label, fig in pair:
            rss = fig.get("rss") or {}
            rows.append(
                [
                    str(i + 1),
                    label,
                    fmt("{:.2f}", fig.get("gbps_8")),
                    fmt("{:.1f}", num(fig.get("bulk_runq_wait_ms")) / 1000),
                    fmt("{:.1f}", fig.get("bulk_proxy_cpu_s")),
                    fmt("{:.1f}", fig.get("bulk_load_cpu_s")),
                    fmt("{:.1f}", _rest(fig, "bulk")),
                    fmt("{:,.0f}", fig.get("conn_per_s")),
                    fmt("{:.1f}", num(fig.get("conn_runq_wait_ms")) / 1000),
                    fmt("{:.1f}", fig.get("conn_proxy_cpu_s")),
                    fmt("{:.1f}", fig.get("conn_load_cpu_s")),
                    fmt("{:.1f}", _rest(fig, "conn")),
                    fmt("{:.1f}", rss.get("control_mb"))
                    + "".join(f" + {fmt('{:.1f}', w)}" for w in rss.get("workers_mb") or []),
                ]
            )
    r.add(
        table(
            [
                "run",
                "workers",
                "8 streams (Gbit/s)",
                "wait (s), 8 streams",
                "kpx CPU-s, 8 streams",
                "load CPU-s, 8 streams",
                "rest CPU-s, 8 streams",
                "conn/s",
                "wait (s), conn",
                "kpx CPU-s, conn",
                "load CPU-s, conn",
                "rest CPU-s, conn",
                "RSS (MB): control + workers",
            ],
            rows,
        )
    )
    ratio_runs = doc.get("ratio_runs") or {}
    r.add(
        f"--workers {n} / --workers 1 per run: "
        + "; ".join(
            f"{label} " + ", ".join(f_ratio(num(v)) for v in ratio_runs.get(key) or [])
            for key, label in (("conn_per_s", "conn/s"), ("gbps_8", "8 streams"))
        )
        + ".\n"
    )


def _rest(figures: Doc, pass_name: str) -> float:
    """The machine's busy CPU-s in a pass that were neither kpx's nor the load's."""
    return (
        num(figures.get(f"{pass_name}_machine_cpu_s"))
        - num(figures.get(f"{pass_name}_load_cpu_s"))
        - num(figures.get(f"{pass_name}_proxy_cpu_s"))
    )


def idle_section(r: Report, idle: Doc) -> None:
    """### Idle connections: RSS per connection held through haproxy and kpx."""
    if not idle:
        return
    r.add("### Idle connections\n")
    r.add(
        f"{f_int(num(idle.get('requested')))} connections opened through the proxy, each "
        "answered once end to end, then held; RSS growth per connection.\n"
    )
    rows = []
    for m in ("haproxy", "kpx"):
        one = idle.get(m) or {}
        if one:
            rows.append(
                [
                    m,
                    fmt("{:,.0f}", one.get("held")),
                    fmt("{:,.0f}", one.get("alive_after_1s")),
                    fmt("{:.1f}", one.get("rss_before_mb")),
                    fmt("{:.1f}", one.get("rss_after_mb")),
                    fmt("{:.2f}", one.get("kib_per_conn")),
                ]
            )
    r.add(
        table(
            ["proxy", "held", "alive after 1 s", "RSS before (MB)", "RSS after (MB)", "KiB"],
            rows,
        )
    )


def programming_section(r: Report, proxy: Doc) -> None:
    """### Network programming latency: API write -> first connection served, per scale."""
    args = proxy.get("args") or {}
    prog = sorted(proxy.get("programming") or [], key=lambda p: num(p.get("services")))
    r.add("### Network programming latency\n")
    if not prog:
        r.add("Not measured.\n")
    else:
        r.add(
            "kpx `--kubeconfig` on the fake API server in the node ns, watching that many "
            "Services (one endpoint each); API write sent -> first connection served by the new "
            f"endpoint / the new Service, {fmt('{:.0f}', args.get('samples'))} samples of each.\n"
        )
        rows = [
            [
                f_int(num(p.get("services"))),
                fmt("{:.1f}", p.get("endpoint_p50_ms")),
                fmt("{:.1f}", p.get("endpoint_p99_ms")),
                fmt("{:.1f}", p.get("new_service_p50_ms")),
                fmt("{:.1f}", p.get("new_service_p99_ms")),
                fmt("{:.0f}", p.get("not_seen_in_5s")),
                fmt("{:.2f}", p.get("kpx_ready_s")),
                fmt("{:.1f}", p.get("kpx_rss_mb")),
            ]
            for p in prog
        ]
        r.add(
            table(
                [
                    "Services",
                    "endpoint p50 (ms)",
                    "endpoint p99 (ms)",
                    "new Service p50 (ms)",
                    "new Service p99 (ms)",
                    "not seen in 5 s",
                    "kpx ready (s)",
                    "kpx RSS (MB)",
                ],
                rows,
            )
        )


def sync_section(r: Report, sync: Doc | None, run: Doc, charts_made: dict[str, bool]) -> None:
    r.add("## kwatch initial sync\n")
    if not sync or not sync.get("runs"):
        missing(r, "sync", run)
        return
    r.add(
        f"`bench/sync.py`: {f_int(num(sync.get('services')))} Services and as many "
        f"EndpointSlices ({f_int(num(sync.get('endpoints')))} endpoints) in the fake API server "
        "(its own process); a fresh process per run lists them over HTTPS through kwatch. "
        "Medians of the runs:\n"
    )
    med = sync.get("medians") or {}
    rows = [
        ["start -> synced (s)", fmt("{:.2f}", med.get("synced_s"))],
        ["RSS growth caused by the stores (MB)", fmt("{:.1f}", med.get("rss_growth_mb"))],
        ["RSS of the process (MB)", fmt("{:.1f}", med.get("rss_total_mb"))],
        [
            "Service events applied afterwards (/s)",
            fmt("{:,.0f}", med.get("services_events_per_s")),
        ],
        [
            "EndpointSlice events applied afterwards (/s)",
            fmt("{:,.0f}", med.get("endpointslices_events_per_s")),
        ],
    ]
    r.add(table(["kwatch", "median"], rows))
    r.chart(charts_made.get("sync.png", False), "sync.png", "kwatch sync")


def memory_section(
    r: Report, memory: list[Doc], proxy: Doc | None, charts_made: dict[str, bool]
) -> None:
    r.add("## Memory vs number of Services\n")
    by_count: dict[float, list[str]] = {}
    for doc in memory:
        cluster, mem = doc.get("cluster") or {}, doc.get("memory") or {}
        n = num(cluster.get("services"))
        row = by_count.setdefault(n, ["—"] * 5)
        row[0] = f_int(num(cluster.get("endpoints")))
        row[1] = fmt("{:.1f}", mem.get("rss_api_mb"))
        row[2] = fmt("{:.1f}", mem.get("rss_token_mb"))
        row[3] = fmt("{:.1f}", mem.get("rss_manifests_mb"))
    for entry in (proxy or {}).get("programming") or []:
        n = num(entry.get("services"))
        row = by_count.setdefault(n, ["—"] * 5)
        row[4] = fmt("{:.1f}", entry.get("kpx_rss_mb"))
    if not by_count:
        r.add("Not measured.\n")
        return
    r.add(
        "RSS once ready. dnsd: `bench/dns.py --memory-only`, a cluster per count with 10 "
        "endpoints per Service (a tenth of the Services headless with 5 endpoints), objects "
        "shaped as a real cluster's (`bench/realistic.py`: managedFields, last-applied "
        "annotations, labels, ownerReferences, endpoint node, zone and Pod), started "
        "alone from the manifests and via the fake API server (with a kubeconfig, and with "
        "the URL, token and CA files a DaemonSet uses). dnsd's figures add to its own RSS "
        "the private memory of its `--forward-process` child (on by default; the libraries "
        "both map counted once, as the pod's memory counts them). kpx: its programming runs "
        "in `bench/proxy.py` (one endpoint per Service, via the fake API server).\n"
    )
    rows = [[f_int(n), *cells] for n, cells in sorted(by_count.items())]
    r.add(
        table(
            [
                "Services",
                "dnsd: endpoints",
                "dnsd via the API, --kubeconfig (MB)",
                "dnsd via the API, in-cluster style --apiserver/--token-file (MB)",
                "dnsd from manifests (MB)",
                "kpx via the API (MB)",
            ],
            rows,
        )
    )
    r.chart(charts_made.get("memory.png", False), "memory.png", "memory vs Services")


def overload_section(r: Report, overload: Doc | None, run: Doc) -> None:
    r.add("## dnsd under a slow-path flood\n")
    if not overload or not overload.get("probe_flood"):
        not_run(r, "dns-overload", run, "about a minute")
        return
    partial(r, overload)
    r.add(
        "`bench/dns_overload.py`: dnsd forwards names outside the cluster to an upstream that "
        "never answers; dnsperf floods it with such names (half with an EDNS cookie) at the "
        "highest rate it reaches, a process of its own sends malformed packets, and a probe "
        "asks cluster names one at a time for "
        f"{fmt('{:.0f}', overload.get('duration_s'))} s, first alone (idle), then during the "
        "flood.\n"
    )
    dnsd_args = overload.get("dnsd_args")
    if isinstance(dnsd_args, list) and "--no-forward-process" not in dnsd_args:
        r.add(
            "dnsd as shipped: the names it forwards are answered by its `--forward-process` "
            "child, a process with its own GIL at the lowest CPU priority (SCHED_IDLE); the "
            "RSS growth counts the child.\n"
        )
    runs = overload_runs(overload)
    pinned = overload.get("server_cpus")
    if pinned:
        r.add(
            f"dnsd (and the control knotd) pinned to CPU {_cpus(pinned)}, the flood, the "
            f"malformed packets and the probe to CPU {_cpus(overload.get('load_cpus'))}: "
            "as on a node whose flood comes from other machines.\n"
        )
    if len(runs) > 1 or (overload.get("probe_flood") or {}).get("control"):
        r.add(_overload_runs_table(runs))
        r.add("The tables below are those of run " + str(_worst_run(runs) + 1) + ", whose "
              "cluster-name p99 was the highest.\n")  # fmt: skip
        overload = runs[_worst_run(runs)]
    rows = []
    for label, key in (("idle", "probe_idle"), ("during the flood", "probe_flood")):
        probe = overload.get(key) or {}
        rows.append(
            [
                label,
                fmt("{:,.0f}", probe.get("qps")),
                f"{fmt('{:,.0f}', probe.get('answered'))} / {fmt('{:,.0f}', probe.get('sent'))}",
                fmt("{:.3f}", probe.get("p50_ms")),
                fmt("{:.3f}", probe.get("p99_ms")),
                fmt("{:.3f}", probe.get("max_ms")),
            ]
        )
    r.add(
        table(
            ["cluster-name probe", "qps", "answered / sent", "p50 (ms)", "p99 (ms)", "max (ms)"],
            rows,
        )
    )
    floods = {n: f for n, f in (overload.get("flood") or {}).items() if isinstance(f, dict)}
    rows = [
        [
            name,
            fmt("{:,.0f}", one.get("sent")),
            fmt("{:,.0f}", one.get("completed")),
            fmt("{:,.0f}", one.get("qps")),
            fmt("{:.1f}", one.get("answered_avg_wait_ms")),
            str(one.get("codes", "—")),
        ]
        for name, one in floods.items()
    ]
    if rows:
        headers = ["flood", "sent", "answered", "answered/s", "average wait (ms)", "codes"]
        r.add(table(headers, rows))
    rows = [
        [
            name,
            "given by dnsd itself" if rcode == "dnsd_itself" else rcode,
            fmt("{:,.0f}", w.get("count")),
            fmt("{:.1f}", w.get("p50_ms")),
            fmt("{:.1f}", w.get("p99_ms")),
            fmt("{:.1f}", w.get("max_ms")),
        ]
        for name, one in floods.items()
        for rcode, w in (one.get("waits") or {}).items()
        if isinstance(w, dict)
    ]
    if rows:
        r.add(
            'The flood\'s waits per response code (`dnsperf -v`); "given by dnsd itself" is '
            "every answer that did not wait for the silent upstream's timeout:\n"
        )
        r.add(table(["flood", "answers", "count", "p50 (ms)", "p99 (ms)", "max (ms)"], rows))
    dropped = overload.get("dropped") or {}
    shed = ", ".join(f"{reason} {f_int(num(n))}" for reason, n in dropped.items()) or "nothing"
    r.add(
        f"Malformed packets sent: {fmt('{:,.0f}', overload.get('malformed_sent'))}. dnsd shed "
        f"during the flood: {shed}. dnsd RSS growth over the flood: "
        f"{fmt('{:+.1f}', overload.get('rss_growth_mb'))} MB at its end, "
        f"{fmt('{:+.1f}', overload.get('rss_peak_growth_mb'))} MB at its peak.\n"
    )


def in_process_section(r: Report, doc: Doc | None) -> None:
    """The same flood with `--no-forward-process`: every run's figures, next to the section
    above (absent from reports made before the comparison)."""
    if not doc or not doc.get("probe_flood"):
        return
    r.add("### The same flood with --no-forward-process\n")
    partial(r, doc)
    r.add(
        "dnsd `--no-forward-process`: the names it forwards are answered by its own event "
        "loop, which shares one GIL with the UDP threads that answer cluster names (how dnsd "
        "forwarded by default until 2026-12-05).\n"
    )
    r.add(_overload_runs_table(overload_runs(doc)))
    dropped = doc.get("dropped") or {}
    shed = ", ".join(f"{reason} {f_int(num(n))}" for reason, n in dropped.items()) or "nothing"
    r.add(f"dnsd shed during the flood of the run above with the highest p99: {shed}.\n")


def _cpus(cpus: Any) -> str:
    return ",".join(str(c) for c in cpus) if isinstance(cpus, list) else str(cpus)


def _worst_run(runs: list[Doc]) -> int:
    p99s = [num((run.get("probe_flood") or {}).get("p99_ms")) for run in runs]
    return max(range(len(runs)), key=lambda i: p99s[i] if finite(p99s[i]) else math.inf)


def _overload_runs_table(runs: list[Doc]) -> str:
    """Every run: the probe's p99 from dnsd and from the control knotd under the same load,
    the floods' rate, the wait of the answers dnsd gave itself, the RSS growth."""
    rows = []
    for i, run in enumerate(runs):
        probe = run.get("probe_flood") or {}
        control = probe.get("control") or {}
        floods = [f for f in (run.get("flood") or {}).values() if isinstance(f, dict)]
        itself = [
            num(((f.get("waits") or {}).get("dnsd_itself") or {}).get("p99_ms")) for f in floods
        ]
        worst = max((w for w in itself if finite(w)), default=math.nan)
        rows.append(
            [
                str(i + 1),
                fmt("{:.3f}", probe.get("p99_ms")),
                fmt("{:.3f}", control.get("p99_ms")),
                fmt("{:.3f}", probe.get("p50_ms")),
                fmt("{:,.0f}", probe.get("lost")),
                fmt("{:,.0f}", sum(num(f.get("qps")) for f in floods)),
                fmt("{:.1f}", worst),
                fmt("{:+.1f}", run.get("rss_peak_growth_mb")),
            ]
        )
    headers = [
        "run",
        "cluster names p99, dnsd (ms)",
        "same, knotd (ms)",
        "p50, dnsd (ms)",
        "probes lost",
        "floods answered/s",
        "flood's answers by dnsd itself, p99 (ms)",
        "RSS peak growth (MB)",
    ]
    return table(headers, rows)


def soak_section(r: Report, soak: Doc | None, run: Doc) -> None:
    r.add("## Convergence soak\n")
    if not soak or "differences" not in soak:
        not_run(r, "soak", run, "20 minutes")
        return
    partial(r, soak)
    kinds: dict[str, int] = {}
    for event in soak.get("chaos") or []:  # "600s api_stop": counted by what happened
        what = str(event).split(" ", 1)[-1]
        kinds[what] = kinds.get(what, 0) + 1
    chaos = ", ".join(f"{what} x{n}" for what, n in kinds.items()) or "none"
    questions = soak.get("questions_checked", soak.get("names_checked"))
    achieved = soak.get("achieved_rate")
    writes = f"{fmt('{:,.0f}', soak.get('writes'))} in all"
    if achieved is not None:
        writes = f"{fmt('{:.1f}', achieved)}/s achieved, {writes}"
    r.add(
        f"`bench/soak.py`: dnsd and kpx watch the fake API server for "
        f"{fmt('{:.0f}', soak.get('duration_s'))} s while it takes "
        f"{fmt('{:.0f}', soak.get('rate'))} writes/s ({writes}: Services, EndpointSlices, "
        f"Pods, Namespaces) and chaos ({chaos}). At the end {fmt('{:,.0f}', questions)} DNS "
        f"questions and {fmt('{:,.0f}', soak.get('frontends_checked'))} kpx frontends were "
        f"compared with what the API holds: {fmt('{:,.0f}', soak.get('differences'))} "
        "differences.\n"
    )
    for line in soak.get("first_differences") or []:
        r.add(f"- differs: `{line}`")
    if soak.get("first_differences"):
        r.add()
    warm, end = soak.get("warm") or {}, soak.get("end") or {}
    growth, fds = soak.get("rss_growth_pct") or {}, soak.get("fd_growth") or {}
    healthz, peak = soak.get("healthz") or {}, soak.get("peak_rss_mb") or {}
    rows = [
        [
            daemon,
            fmt("{:.1f}", (warm.get(daemon) or {}).get("rss_mb")),
            fmt("{:.1f}", (end.get(daemon) or {}).get("rss_mb")),
            fmt("{:+.1f}", growth.get(daemon)),
            fmt("{:.1f}", peak.get(daemon)),
            fmt("{:.0f}", (warm.get(daemon) or {}).get("fds")),
            fmt("{:.0f}", (end.get(daemon) or {}).get("fds")),
            fmt("{:+.0f}", fds.get(daemon)),
            str(healthz.get(daemon, "—")),
        ]
        for daemon in ("dnsd", "kpx")
    ]
    r.add(
        table(
            [
                "daemon",
                "RSS after warm-up (MB)",
                "RSS at the end (MB)",
                "growth (%)",
                "peak RSS (MB)",
                "fds after warm-up",
                "fds at the end",
                "fd growth",
                "/healthz",
            ],
            rows,
        )
    )
    r.add("kpx's fd growth leaves out the listening socket per frontend of `--mode ports`.\n")
    missed = soak.get("targets_missed")
    if missed is not None:
        r.add(
            "The benchmark's own check (also /healthz, a relist in each daemon, the write rate): "
            + ("; ".join(str(m) for m in missed) or "every target met")
            + ".\n"
        )


def machine_section(r: Report, machine: Doc) -> None:
    r.add("## Machine\n")
    if not machine:
        r.add("Not recorded (no `machine.json`).\n")
        return
    tools = machine.get("tools") or {}
    git = machine.get("git") or {}
    packages = machine.get("python_packages") or {}
    commit = git.get("commit") or "?"
    rows = [
        ["date", str(machine.get("date"))],
        ["CPU", str(machine.get("cpu_model"))],
        [
            "cores",
            f"{machine.get('logical_cpus')} logical CPUs ({machine.get('cpus_usable')} usable)",
        ],
        ["RAM", f"{machine.get('ram_gib')} GiB"],
        ["kernel", str(machine.get("kernel"))],
        ["OS", str(machine.get("os"))],
        ["Python", str(machine.get("python"))],
        [
            "load average at start",
            ", ".join(str(x) for x in machine.get("load_average_at_start") or []),
        ],
    ]
    rows += [[name, str(version or "not installed")] for name, version in tools.items()]
    rows.append(["Python packages", ", ".join(f"{k} {v}" for k, v in packages.items())])
    about = ", ".join(str(git[k]) for k in ("branch", "commit_date") if git.get(k))
    if git.get("subject"):
        about += f": {git['subject']}"
    rows.append(
        [
            "git commit",
            f"`{commit}`"
            + (f" ({about})" if about else "")
            + (", with uncommitted changes" if git.get("uncommitted_changes") else ""),
        ]
    )
    r.add(table(["machine", ""], rows))


def _measured(stamp: Doc) -> str:
    """'2026-12-02 16:48 UTC, `0123456789ab`' (plus a note on uncommitted changes)."""
    when = str(stamp.get("date") or "?")
    with contextlib.suppress(ValueError):
        when = dt.datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
    dirty = " + uncommitted changes" if stamp.get("uncommitted_changes") else ""
    return f"{when}, `{str(stamp.get('commit') or '?')[:12]}`{dirty}"


def how_section(r: Report, run: Doc) -> None:
    r.add("## How this report was made\n")
    steps = run.get("steps") or []
    if steps:
        rows = [
            [
                str(i + 1),
                s.get("name", "?"),
                f"`{s.get('command')}`",
                _measured(s["measured"]) if s.get("measured") else "—",
                duration(num(s.get("seconds"))),
                str(s.get("status")),
            ]
            for i, s in enumerate(steps)
        ]
        r.add(table(["#", "step", "command", "measured", "took", "result"], rows))
        total = num(run.get("seconds"))
        if finite(total):
            r.add(f"The last sitting took {duration(total)}.\n")
    quick = " --quick" if run.get("quick") else ""
    out = run.get("out") or "DIR"
    r.add(
        "Run every benchmark and write this report again (as root, with knot, dnsperf, haproxy, "
        "iperf3 and wrk installed):\n\n"
        f"```sh\n.venv/bin/python -m bench.report{quick} --out {out}\n```\n\n"
        "Render the Markdown and the charts again from the saved JSON without running anything:"
        f"\n\n```sh\n.venv/bin/python -m bench.report --render-only {out}\n```\n"
    )


def draw_charts(out: Path, results: dict[str, Doc], quick: bool) -> dict[str, bool]:
    """charts/*.png from the results (the old ones removed first): chart name -> drawn."""
    dns, proxy, sync = results.get("dns"), results.get("proxy"), results.get("sync")
    chart_dir = out / "charts"
    chart_dir.mkdir(parents=True, exist_ok=True)
    for old in chart_dir.glob("*.png"):
        old.unlink()
    return {
        "dns_qps.png": charts.dns_qps(dns, chart_dir / "dns_qps.png"),
        "latency_dns.png": charts.latency_dns(dns, chart_dir / "latency_dns.png"),
        "proxy_throughput.png": charts.proxy_throughput(proxy, chart_dir / "proxy_throughput.png"),
        "latency_proxy.png": charts.latency_proxy(proxy, chart_dir / "latency_proxy.png"),
        "memory.png": charts.memory(memory_sweep(results), proxy, quick, chart_dir / "memory.png"),
        "sync.png": charts.sync(sync, chart_dir / "sync.png"),
        "udp.png": charts.udp(results.get("udp"), chart_dir / "udp.png"),
    }


def intro_section(r: Report, machine: Doc, run: Doc, quick: bool) -> None:
    """The title, when, where and from which commit it was measured."""
    r.add("# kpx + dnsd benchmark report\n")
    git = machine.get("git") or {}
    commit = (git.get("commit") or "?")[:12]
    dirty = " plus uncommitted changes" if git.get("uncommitted_changes") else ""
    cpu = machine.get("cpu_model", "an unrecorded CPU")
    when = str(machine.get("date", "at an unrecorded date"))
    with contextlib.suppress(ValueError):
        when = dt.datetime.fromisoformat(when).strftime("%Y-%m-%d %H:%M UTC")
    stamps = {
        _measured(step["measured"]): None for step in run.get("steps") or [] if step.get("measured")
    }
    measured = f"Measured {when} from commit `{commit}`{dirty}"
    if len(stamps) > 1:  # steps re-run with --only: say which ran when
        measured = (
            "Measured in several sittings (each step's under [How](#how-this-report-was-made))"
        )
    r.add(
        f"{measured} on "
        f"{machine.get('cpus_usable', '?')} cores of {cpu}"
        f" with {machine.get('ram_gib', '?')} GiB of RAM (details under [Machine](#machine)). "
        "Each peer (knot, haproxy, the kernel's NAT) is measured in the same run as ours, "
        "interleaved; figures are medians of the runs and ratios are medians of the per-run "
        "ratios. The machine is shared: figures, never assertions.\n"
    )
    if quick:
        r.add(
            "> **Quick run** (`--quick`): tiny sizes and short passes to smoke-test the harness. "
            "The figures mean nothing and the targets set at 10,000 Services are not judged.\n"
        )


def targets_section(r: Report, checks: Sequence[Check]) -> None:
    r.add("## Targets\n")
    r.add(
        table(
            ["what", "ours", "peer, same run", "ratio", "target", "verdict"],
            [c.row() for c in checks],
        )
    )
    met = sum(c.verdict == MET for c in checks)
    not_met = sum(c.verdict == NOT_MET for c in checks)
    r.add(
        f"{met} of {len(checks)} targets met, {not_met} not met, "
        f"{len(checks) - met - not_met} not judged.\n"
    )


def render(out: Path) -> tuple[Path, list[Check]]:
    """report.md and charts/*.png in `out` from out/results/*.json, machine.json, run.json."""
    results = load_results(out / "results")
    machine = read_json_object(out / "machine.json")
    run = read_json_object(out / "run.json")
    quick = bool(run.get("quick")) or any(bool(d.get("quick")) for d in results.values())
    made = draw_charts(out, results, quick)
    checks = all_checks(results)
    r = Report(out)
    intro_section(r, machine, run, quick)
    targets_section(r, checks)
    dns_section(r, results.get("dns"), run, made)
    proxy_section(r, results.get("proxy"), run, made)
    workers_section(r, results.get("proxy-workers"), run)
    udp_section(r, results.get("udp"), run, made)
    sync_section(r, results.get("sync"), run, made)
    memory_section(r, memory_sweep(results), results.get("proxy"), made)
    overload_section(r, results.get("dns-overload"), run)
    in_process_section(r, results.get("dns-overload-in-process"))
    soak_section(r, results.get("soak"), run)
    machine_section(r, machine)
    how_section(r, run)
    path = out / "report.md"
    path.write_text(r.text())
    return path, checks
