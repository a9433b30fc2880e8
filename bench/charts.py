"""PNG charts for the benchmark report (bench/report_render.py), drawn with matplotlib's Agg backend
from the JSON the benchmarks write with `--json`.

Every function takes the loaded JSON documents (None where a benchmark did not run), draws one
figure and returns True if it wrote `path`, False if there was nothing to draw. Ours is blue,
the peer measured in the same run grey, the other references light grey; a target that is a
ratio of the peer is drawn as a dashed red line at that multiple of the peer's median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

OURS, OURS_2, PEER, OTHER, TARGET = "#1f77b4", "#6baed6", "#7f7f7f", "#c7c7c7", "#d62728"
DPI = 110

Doc = dict[str, Any]


def num(value: Any) -> float:
    """A figure from JSON (None for NaN) as a float, NaN if missing."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.nan


def finite(value: float) -> bool:
    return not math.isnan(value) and not math.isinf(value)


def _figure(ncols: int, title: str, quick: bool, height: float = 4.4) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(1, ncols, figsize=(5.4 * ncols, height), squeeze=False)
    if quick:
        title += "  (--quick smoke run: figures mean nothing)"
    fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig, list(axes[0])


def _save(fig: Figure, path: Path) -> bool:
    """Legends where there is something to name (series, runs, targets), then the PNG."""
    for ax in fig.axes:
        handles = ax.get_legend_handles_labels()[0]
        if handles and ax.get_legend() is None:
            ax.legend(fontsize=8, framealpha=0.9, loc="best", ncols=2 if len(handles) > 5 else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _nothing(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _bars(
    ax: Axes,
    labels: Sequence[str],
    medians: Sequence[float],
    colors: Sequence[str],
    runs: Sequence[Sequence[float]] | None = None,
    fmt: str = "{:,.0f}",
) -> None:
    """Bars of the medians, each labelled with its value (above the highest run), with the
    per-run figures as dots when there was more than one run."""
    xs = list(range(len(labels)))
    heights = [m if finite(m) else 0.0 for m in medians]
    bars = ax.bar(xs, heights, color=colors, width=0.62, zorder=2)
    labelled = False
    for i, (bar, m) in enumerate(zip(bars, medians, strict=True)):
        pts = [v for v in (runs[i] if runs else []) if finite(v)]
        if len(pts) > 1:
            ax.scatter(
                [xs[i] + 0.18] * len(pts),
                pts,
                s=14,
                color="black",
                zorder=3,
                label=None if labelled else "each run",
            )
            labelled = True
        ax.annotate(
            fmt.format(m) if finite(m) else "n/a",
            (bar.get_x() + bar.get_width() / 2, max([bar.get_height(), *pts])),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(xs, labels)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.margins(y=0.2)
    if max(heights, default=0.0) >= 10_000:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))


def _target_line(ax: Axes, y: float, label: str, x0: float = -0.5, x1: float | None = None) -> None:
    """A dashed red line at `y` over the bars (or from x0 to x1), named in the legend."""
    if not finite(y):
        return
    right = x1 if x1 is not None else len(ax.get_xticks()) - 0.5
    ax.hlines(
        y, x0, right, colors=TARGET, linestyles="dashed", linewidth=1.4, zorder=4, label=label
    )


def _median(doc: Doc, section: str, label: str, key: str) -> float:
    return num(doc.get(section, {}).get(label, {}).get(key))


def _runs(doc: Doc, label: str, key: str) -> list[float]:
    return [num(r.get(key)) for r in doc.get("runs", {}).get(label, [])]


# --- DNS -----------------------------------------------------------------------------------


def dns_qps(dns: Doc | None, path: Path) -> bool:
    """qps and server CPU per query, knot vs dnsd (one process and --workers 2)."""
    if not dns or not dns.get("medians"):
        return False
    servers = [s for s in ("knot", "dnsd", "dnsd --workers 2") if s in dns["medians"]]
    colors = [{"knot": PEER, "dnsd": OURS}.get(s, OURS_2) for s in servers]
    fig, (left, right) = _figure(
        2, "DNS: dnsd vs knot, same records, same run", bool(dns.get("quick"))
    )
    qps = [_median(dns, "medians", s, "qps") for s in servers]
    _bars(left, servers, qps, colors, [_runs(dns, s, "qps") for s in servers])
    left.set_title("Throughput at saturation (dnsperf, no rate limit)", fontsize=10)
    left.set_ylabel("queries per second (qps)")
    knot_qps = _median(dns, "medians", "knot", "qps")
    _target_line(left, 0.75 * knot_qps, "target: >= 0.75x knot")
    cpu = [_median(dns, "medians", s, "cpu_us_per_query") for s in servers]
    _bars(
        right, servers, cpu, colors, [_runs(dns, s, "cpu_us_per_query") for s in servers], "{:.2f}"
    )
    right.set_title("Server CPU per query (utime+stime / queries)", fontsize=10)
    right.set_ylabel("CPU microseconds per query (µs)")
    knot_cpu = _median(dns, "medians", "knot", "cpu_us_per_query")
    _target_line(right, 1.5 * knot_cpu, "target: <= 1.5x knot")
    return _save(fig, path)


def _grouped(
    ax: Axes,
    groups: Sequence[str],
    series: dict[str, list[float]],
    colors: dict[str, str],
    fmt: str = "{:.2f}",
) -> list[float]:
    """Grouped bars: one group per entry of `groups`, one bar per series; returns the bars'
    x centres of each group."""
    n = max(1, len(series))
    width = 0.8 / n
    centres = list(range(len(groups)))
    for i, (name, values) in enumerate(series.items()):
        xs = [c - 0.4 + width * (i + 0.5) for c in centres]
        heights = [v if finite(v) else 0.0 for v in values]
        bars = ax.bar(xs, heights, width=width * 0.92, color=colors[name], label=name, zorder=2)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(
                fmt.format(v) if finite(v) else "n/a",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(centres, groups)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.margins(y=0.35)
    return [float(c) for c in centres]


def latency_dns(dns: Doc | None, path: Path) -> bool:
    """Query latency percentiles at a fixed load, and propagation latency percentiles."""
    if not dns or (not dns.get("medians") and not dns.get("propagation")):
        return False
    fig, (left, right) = _figure(2, "DNS latency percentiles", bool(dns.get("quick")))
    medians = dns.get("medians") or {}
    servers = [s for s in ("knot", "dnsd", "dnsd --workers 2") if s in medians]
    if servers:
        series = {
            s: [_median(dns, "medians", s, "p50_ms"), _median(dns, "medians", s, "p99_ms")]
            for s in servers
        }
        colors = {"knot": PEER, "dnsd": OURS, "dnsd --workers 2": OURS_2}
        _grouped(left, ["p50", "p99"], series, colors)
        qps = (dns.get("args") or {}).get("latency_qps")
        load = f"{qps:,} qps offered" if isinstance(qps, int) else "fixed load"
        left.set_title(f"Query latency at a fixed load ({load})", fontsize=10)
        left.set_ylabel("latency (ms)")
    else:
        _nothing(left, "query latency")
    prop = dns.get("propagation")
    if prop:
        keys = [("p50", "p50_ms"), ("p99", "p99_ms"), ("max", "max_ms")]
        values = [num(prop.get(k)) for _, k in keys]
        _bars(right, [k for k, _ in keys], values, [OURS] * 3, fmt="{:.1f}")
        right.set_title("Propagation: API write -> new answer served", fontsize=10)
        right.set_ylabel("latency (ms)")
        _target_line(right, 100.0, "target: p99 <= 100 ms")
        top = max([v for v in values if finite(v)] + [0.0])
        right.set_ylim(0, max(130.0, top * 1.3))
    else:
        _nothing(right, "propagation")
    return _save(fig, path)


# --- proxy ---------------------------------------------------------------------------------

MODE_COLORS = {"direct": OTHER, "nat": "#a6a6a6", "haproxy": PEER, "kpx": OURS}


def proxy_throughput(proxy: Doc | None, path: Path) -> bool:
    """Bulk throughput (1 and 8 streams), proxy CPU per GB, new connections/s, every path."""
    if not proxy or not proxy.get("medians"):
        return False
    modes = [m for m in ("direct", "nat", "haproxy", "kpx") if m in proxy["medians"]]
    med = proxy["medians"]
    fig, (tput, cpu, conns) = _figure(
        3, "Proxy: kpx vs haproxy and the kernel's NAT, same run", bool(proxy.get("quick"))
    )
    series = {m: [num(med[m].get("gbps_1")), num(med[m].get("gbps_8"))] for m in modes}
    centres = _grouped(tput, ["1 stream", "8 streams"], series, MODE_COLORS, "{:.1f}")
    tput.set_title("Bulk TCP throughput (iperf3)", fontsize=10)
    tput.set_ylabel("throughput (Gbit/s)")
    if "haproxy" in med:
        _target_line(
            tput,
            0.9 * num(med["haproxy"].get("gbps_8")),
            "target: >= 0.9x haproxy",
            centres[1] - 0.45,
            centres[1] + 0.45,
        )
    proxies = [m for m in ("haproxy", "kpx") if m in med]
    _bars(
        cpu,
        proxies,
        [num(med[m].get("proxy_cpu_s_per_gb")) for m in proxies],
        [MODE_COLORS[m] for m in proxies],
        [_runs(proxy, m, "proxy_cpu_s_per_gb") for m in proxies],
        "{:.2f}",
    )
    cpu.set_title("Proxy CPU per GB moved (8 streams)", fontsize=10)
    cpu.set_ylabel("CPU seconds per GB (CPU-s/GB)")
    if "haproxy" in med:
        _target_line(
            cpu, 1.2 * num(med["haproxy"].get("proxy_cpu_s_per_gb")), "target: <= 1.2x haproxy"
        )
    _bars(
        conns,
        modes,
        [num(med[m].get("conn_per_s")) for m in modes],
        [MODE_COLORS[m] for m in modes],
        [_runs(proxy, m, "conn_per_s") for m in modes],
    )
    conns.set_title("New connections/s, one small request each (wrk)", fontsize=10)
    conns.set_ylabel("connections per second")
    if "haproxy" in med:
        _target_line(conns, 0.6 * num(med["haproxy"].get("conn_per_s")), "target: >= 0.6x haproxy")
    return _save(fig, path)


def latency_proxy(proxy: Doc | None, path: Path) -> bool:
    """Small-request latency percentiles per path, and programming latency vs Services."""
    if not proxy or (not proxy.get("medians") and not proxy.get("programming")):
        return False
    fig, (left, right) = _figure(2, "Proxy latency percentiles", bool(proxy.get("quick")))
    med = proxy.get("medians") or {}
    modes = [m for m in ("direct", "nat", "haproxy", "kpx") if m in med]
    if modes:
        series = {m: [num(med[m].get("req_p50_ms")), num(med[m].get("req_p99_ms"))] for m in modes}
        centres = _grouped(left, ["p50", "p99"], series, MODE_COLORS, "{:.3f}")
        left.set_title("Small request on a keep-alive connection (wrk -c1)", fontsize=10)
        left.set_ylabel("latency (ms)")
        if "haproxy" in med:
            _target_line(
                left,
                1.5 * num(med["haproxy"].get("req_p99_ms")),
                "target: p99 <= 1.5x haproxy",
                centres[1] - 0.45,
                centres[1] + 0.45,
            )
    else:
        _nothing(left, "request latency")
    prog = sorted(proxy.get("programming") or [], key=lambda p: num(p.get("services")))
    if prog:
        xs = [num(p.get("services")) for p in prog]
        for key, label, style in (
            ("endpoint_p50_ms", "endpoint change p50", ":"),
            ("endpoint_p99_ms", "endpoint change p99", "-"),
            ("new_service_p50_ms", "new Service p50", ":"),
            ("new_service_p99_ms", "new Service p99", "-"),
        ):
            color = OURS if key.startswith("endpoint") else "#ff7f0e"
            right.plot(
                xs, [num(p.get(key)) for p in prog], style, marker="o", color=color, label=label
            )
        right.axhline(
            50.0,
            color=TARGET,
            linestyle="dashed",
            linewidth=1.4,
            label="target: p99 <= 50 ms at 10,000 Services",
        )
        tops = [num(p.get(k)) for p in prog for k in ("endpoint_p99_ms", "new_service_p99_ms")]
        right.set_ylim(0, max([75.0] + [1.4 * t for t in tops if finite(t)]))
        right.set_title("kpx programming: API write -> first connection served", fontsize=10)
        right.set_xlabel("Services watched")
        right.set_ylabel("latency (ms)")
        right.grid(alpha=0.3)
    else:
        _nothing(right, "programming latency")
    return _save(fig, path)


# --- UDP -----------------------------------------------------------------------------------

UDP_COLORS = {**MODE_COLORS, "nginx": PEER}
UDP_SIZES = (("small", "64 B"), ("bulk", "1,200 B"))


def _per_size_targets(
    ax: Axes, centres: Sequence[float], peer: Sequence[float], label: str
) -> None:
    """A target line over each size's group of bars, at that size's figure of the peer times
    the limit (`peer` already multiplied), named once in the legend."""
    for i, (centre, y) in enumerate(zip(centres, peer, strict=True)):
        _target_line(ax, y, label if i == 0 else "_nolegend_", centre - 0.45, centre + 0.45)


def _legend_above(ax: Axes, series: dict[str, list[float]], *lines: float) -> None:
    """Room above the highest bar and target line for a legend in rows across the top."""
    drawn = [v for values in series.values() for v in values] + list(lines)
    top = max([v for v in drawn if finite(v)], default=0.0)
    if top > 0:
        ax.set_ylim(0, top * 1.55)
    ax.legend(fontsize=8, framealpha=0.9, loc="upper left", ncols=3)


def udp(doc: Doc | None, path: Path) -> bool:
    """bench/udp.py: datagrams/s per path and size, proxy CPU per datagram (nginx, kpx) and
    latency at a fixed rate per path, with issue 11's targets against nginx."""
    if not doc or not doc.get("small"):
        return False
    modes = [m for m in ("direct", "nat", "nginx", "kpx") if m in doc["small"]]
    fig, (rate, cpu, lat) = _figure(
        3, "Proxy UDP: kpx vs nginx and the kernel's NAT, same run", bool(doc.get("quick"))
    )
    groups = [label for _, label in UDP_SIZES]

    def figures(mode: str, key: str) -> list[float]:
        return [_median(doc, section, mode, key) for section, _ in UDP_SIZES]

    def thousands(mode: str) -> list[float]:
        return [v / 1000 for v in figures(mode, "answers_per_s")]

    series = {m: thousands(m) for m in modes}
    centres = _grouped(rate, groups, series, UDP_COLORS, "{:.0f}")
    rate.set_title("Request/response datagrams/s at saturation", fontsize=10)
    rate.set_ylabel("answered datagrams per second (thousands)")
    limits = [1.5 * v for v in thousands("nginx")] if "nginx" in modes else []
    if limits:
        _per_size_targets(rate, centres, limits, "target: kpx >= 1.5x nginx")
    _legend_above(rate, series, *limits)
    proxies = [m for m in ("nginx", "kpx") if m in modes]
    if proxies:
        series = {m: figures(m, "proxy_cpu_us_per_datagram") for m in proxies}
        centres = _grouped(cpu, groups, series, UDP_COLORS, "{:.2f}")
        cpu.set_title("Proxy CPU per answered datagram (utime+stime)", fontsize=10)
        cpu.set_ylabel("CPU microseconds per datagram (µs)")
        if "nginx" in proxies:
            nginx = [0.8 * v for v in figures("nginx", "proxy_cpu_us_per_datagram")]
            _per_size_targets(cpu, centres, nginx, "target: kpx <= 0.8x nginx")
        _legend_above(cpu, series)  # the targets are below nginx's bars
    else:
        _nothing(cpu, "proxy CPU")
    latency = doc.get("latency") or {}
    lat_modes = [m for m in modes if m in latency]
    if lat_modes:
        series = {
            m: [_median(doc, "latency", m, "p50_us"), _median(doc, "latency", m, "p99_us")]
            for m in lat_modes
        }
        centres = _grouped(lat, ["p50", "p99"], series, UDP_COLORS, "{:,.0f}")
        rate_per_s = num((doc.get("args") or {}).get("rate"))
        offered = f"{rate_per_s:,.0f}/s" if finite(rate_per_s) else "a fixed rate"
        lat.set_title(f"One datagram in flight at {offered}", fontsize=10)
        lat.set_ylabel("round trip (µs)")
        # kpx's p99 minus the direct path's within 1.5x nginx's: drawn on the p99 bars.
        direct, added = (
            _median(doc, "latency", "direct", "p99_us"),
            _median(doc, "latency", "nginx", "added_p99_us"),
        )
        limit = direct + 1.5 * added
        _target_line(
            lat, limit, "target: added p99 <= 1.5x nginx's", centres[1] - 0.45, centres[1] + 0.45
        )
        _legend_above(lat, series, limit)
    else:
        _nothing(lat, "latency")
    return _save(fig, path)


# --- memory --------------------------------------------------------------------------------


def memory(dns_memory: Sequence[Doc], proxy: Doc | None, quick: bool, path: Path) -> bool:
    """RSS vs number of Services (dnsd from manifests and via the API, kpx via the API), and
    memory per idle proxied connection."""
    points = sorted(
        ((num(d["cluster"]["services"]), d["memory"]) for d in dns_memory if d.get("memory")),
        key=lambda p: p[0],
    )
    prog = sorted((proxy or {}).get("programming") or [], key=lambda p: num(p.get("services")))
    idle = (proxy or {}).get("idle") or {}
    if not points and not prog and not idle:
        return False
    fig, (left, right) = _figure(2, "Memory", quick)
    if points or prog:
        if points:
            xs = [p[0] for p in points]
            left.plot(
                xs,
                [num(m.get("rss_api_mb")) for _, m in points],
                "-o",
                color=OURS,
                label="dnsd, via the API server",
            )
            token = [num(m.get("rss_token_mb")) for _, m in points]
            if any(finite(v) for v in token):
                left.plot(xs, token, ":o", color=OURS, label="dnsd, in-cluster style (URL + token)")
            left.plot(
                xs,
                [num(m.get("rss_manifests_mb")) for _, m in points],
                "--o",
                color=OURS_2,
                label="dnsd, from manifests",
            )
            if max(xs) >= 10_000:  # the target is for 10,000 Services: drawn where measured
                left.plot(
                    [10_000],
                    [164],
                    marker="*",
                    markersize=13,
                    color=OURS,
                    linestyle="none",
                    label="dnsd target: <= 164 MB at 10k / 100k endpoints",
                )
        if prog:
            xs = [num(p.get("services")) for p in prog]
            left.plot(
                xs,
                [num(p.get("kpx_rss_mb")) for p in prog],
                "-s",
                color="#2ca02c",
                label="kpx, via the API server",
            )
            if max(xs) >= 10_000:
                left.plot(
                    [10_000],
                    [150],
                    marker="*",
                    markersize=13,
                    color="#2ca02c",
                    linestyle="none",
                    label="kpx target: <= 150 MB at 10k",
                )
        left.set_title("RSS once ready vs Services watched", fontsize=10)
        left.set_xlabel("Services")
        left.set_ylabel("resident set size (MB)")
        left.set_ylim(bottom=0)
        left.grid(alpha=0.3)
    else:
        _nothing(left, "RSS vs Services")
    proxies = [m for m in ("haproxy", "kpx") if isinstance(idle.get(m), dict)]
    if proxies:
        _bars(
            right,
            proxies,
            [num(idle[m].get("kib_per_conn")) for m in proxies],
            [MODE_COLORS[m] for m in proxies],
            fmt="{:.2f}",
        )
        held = num(idle[proxies[-1]].get("held"))
        right.set_title(
            f"Memory per idle proxied connection ({held:,.0f} held)"
            if finite(held)
            else "Memory per idle proxied connection",
            fontsize=10,
        )
        right.set_ylabel("RSS growth per connection (KiB)")
        _target_line(right, 3.0, "target: kpx <= 3 KiB")
    else:
        _nothing(right, "idle connections")
    return _save(fig, path)


def sync(doc: Doc | None, path: Path) -> bool:
    """kwatch initial sync time and store RSS growth per run, against their targets."""
    if not doc or not doc.get("runs"):
        return False
    runs = doc["runs"]
    services = num(doc.get("services"))
    fig, (left, right) = _figure(
        2, f"kwatch initial sync, {services:,.0f} Services", bool(doc.get("quick")), 3.8
    )
    labels = [f"run {i + 1}" for i in range(len(runs))]
    _bars(left, labels, [num(r.get("synced_s")) for r in runs], [OURS] * len(runs), fmt="{:.2f}")
    left.set_title("Start -> synced (paginated lists over HTTPS)", fontsize=10)
    left.set_ylabel("seconds (s)")
    _target_line(left, 3.0, "target: <= 3 s")
    _bars(
        right, labels, [num(r.get("rss_growth_mb")) for r in runs], [OURS] * len(runs), fmt="{:.1f}"
    )
    right.set_title("RSS growth caused by the stores", fontsize=10)
    right.set_ylabel("RSS growth (MB)")
    _target_line(right, 120.0, "target: <= 120 MB")
    return _save(fig, path)
