"""The targets of the benchmark report: each benchmark's figures against its issue's target,
with a verdict (met, not met, or why it is not judged). Pure: JSON documents in, `Check`s out."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bench.report_format import Doc, f_int, f_num, f_ratio, f_us, finite, num

MET, NOT_MET = "✅ met", "❌ not met"
NOT_RUN = "n/a: not run"


def judge(value: float, op: str, limit: float) -> str:
    if not finite(value):
        return "n/a: not measured"
    ok = value >= limit if op == ">=" else value <= limit
    return MET if ok else NOT_MET


@dataclass
class Check:
    what: str
    ours: str
    peer: str
    ratio: float
    target: str
    verdict: str
    # Shown after the verdict: which runs missed the target, and every run's figure.
    note: str = ""

    def row(self) -> list[str]:
        verdict = f"{self.verdict}: {self.note}" if self.note else self.verdict
        return [self.what, self.ours, self.peer, f_ratio(self.ratio), self.target, verdict]


def per_run_ratio(doc: Doc, ours: str, peer: str, key: str) -> float:
    """Median over runs of ours/peer (what the benchmarks print)."""
    runs = doc.get("runs") or {}
    pairs = [
        (num(a.get(key)), num(b.get(key)))
        for a, b in zip(runs.get(ours) or [], runs.get(peer) or [], strict=False)
    ]
    ratios = [a / b for a, b in pairs if finite(a) and finite(b) and b]
    return statistics.median(ratios) if ratios else math.nan


def run_ratios(doc: Doc, ours: str, peer: str, key: str) -> list[float]:
    """ours/peer of every run, in run order (NaN where a figure is missing)."""
    runs = doc.get("runs") or {}
    out = []
    for a, b in zip(runs.get(ours) or [], runs.get(peer) or [], strict=False):
        x, y = num(a.get(key)), num(b.get(key))
        out.append(x / y if finite(x) and finite(y) and y else math.nan)
    return out


def judge_every_run(ratios: Sequence[float], op: str, limit: float) -> tuple[str, str]:
    """The verdict over all runs (met only if every run met it) and a note naming the runs
    that missed, with every run's ratio."""
    if not ratios or not any(finite(v) for v in ratios):
        return "n/a: not measured", ""
    missed = [i + 1 for i, v in enumerate(ratios) if judge(v, op, limit) != MET]
    if not missed:
        return MET, ""
    shown = ", ".join(f_ratio(v) for v in ratios)
    which = ", ".join(map(str, missed))
    return NOT_MET, f"missed in run {which} of {len(ratios)} (per run: {shown})"


def _scale_note(services: float, want: int) -> str | None:
    if services == want:
        return None
    shown = f"{services:,.0f}" if finite(services) else "?"
    return f"n/a: measured at {shown} Services, the target is for {want:,}"


def dns_checks(dns: Doc | None, memory: Sequence[Doc] = ()) -> list[Check]:
    """The issue's dnsd targets; `memory` (the --memory-only sweep) adds the RSS of dnsd
    started as the DaemonSet starts it (API URL, token and CA files) at 10,000 Services."""
    dns = dns or {}
    med = dns.get("medians") or {}
    ratios = dns.get("ratios_vs_knot") or {}
    cluster = dns.get("cluster") or {}
    services = num(cluster.get("services"))
    knot = med.get("knot") or {}
    checks: list[Check] = []
    for label in ("dnsd", "dnsd --workers 2"):
        ours = med.get(label) or {}
        for key, what, fmt, op, limit in (
            ("qps", "qps (dnsperf, saturated)", f_int, ">=", 0.75),
            ("cpu_us_per_query", "CPU per query", f_us, "<=", 1.5),
        ):
            ratio = num((ratios.get(label) or {}).get(key))
            if not finite(ratio):
                ratio = per_run_ratio(dns, label, "knot", key)
            checks.append(
                Check(
                    f"{label} {what} vs knot",
                    fmt(num(ours.get(key))),
                    fmt(num(knot.get(key))),
                    ratio,
                    f"{op} {limit}x knot",
                    judge(ratio, op, limit),
                )
            )
    prop = dns.get("propagation") or {}
    p99 = num(prop.get("p99_ms"))
    checks.append(
        Check(
            "dnsd propagation p99, API write -> new answer served",
            f_num(p99, 1, "ms"),
            "—",
            math.nan,
            "<= 100 ms",
            judge(p99, "<=", 100),
        )
    )
    scale = _scale_note(services, 10_000) or (
        None
        if num(cluster.get("endpoints")) == 100_000
        else "n/a: not measured at 100,000 endpoints"
    )
    rss = dns.get("rss") or {}
    for what, value in (
        ("via the API server", num(prop.get("rss_via_api_mb"))),
        ("from manifests", num(rss.get("dnsd_ready_mb"))),
    ):
        checks.append(
            Check(
                f"dnsd RSS + forward child at 10,000 Services / 100,000 endpoints, {what}",
                f_num(value, 1, "MB"),
                "—",
                math.nan,
                "<= 164 MB",
                scale if scale and finite(value) else judge(value, "<=", 164),
            )
        )
    for doc in memory:
        size = doc.get("cluster") or {}
        value = num((doc.get("memory") or {}).get("rss_token_mb"))
        if num(size.get("services")) == 10_000 and num(size.get("endpoints")) == 100_000:
            checks.append(
                Check(
                    "dnsd RSS + forward child at 10,000 Services / 100,000 endpoints, "
                    "in-cluster style (API URL + token file, as the DaemonSet runs)",
                    f_num(value, 1, "MB"),
                    "—",
                    math.nan,
                    "<= 164 MB",
                    judge(value, "<=", 164),
                )
            )
    return checks


def _programming_at(proxy: Doc, services: int) -> tuple[Doc, str | None]:
    """The programming entry at `services`, else the largest with a scale note."""
    entries = sorted(proxy.get("programming") or [], key=lambda p: num(p.get("services")))
    for entry in entries:
        if num(entry.get("services")) == services:
            return entry, None
    if not entries:
        return {}, None
    return entries[-1], _scale_note(num(entries[-1].get("services")), services)


def bulk_conditions(proxy: Doc, missed: Sequence[int]) -> str:
    """What each missed run's 8-stream passes met, kpx / haproxy (bench/proxy.py records it
    since the passes are interleaved): their CPU-s, their wait for a core, the load cores'
    idle share. Empty for results without those figures."""
    runs = proxy.get("runs") or {}
    kpx, haproxy = runs.get("kpx") or [], runs.get("haproxy") or []
    parts = []
    for i in missed:
        if i >= len(kpx) or i >= len(haproxy) or "bulk_proxy_cpu_s" not in kpx[i]:
            continue
        a, b = kpx[i], haproxy[i]

        def pair(key: str, scale: float = 1.0, a: Doc = a, b: Doc = b) -> str:
            return f"{f_num(num(a.get(key)) * scale, 1)} / {f_num(num(b.get(key)) * scale, 1)}"

        parts.append(
            f"run {i + 1}, kpx / haproxy: CPU {pair('bulk_proxy_cpu_s')} s, waited for a core "
            f"{pair('bulk_runq_wait_ms', 1e-3)} s, load cores idle "
            f"{pair('bulk_load_cores_idle_pct')} %"
        )
    return "".join(f"; {p}" for p in parts)


# Transparent mode (the default, `--source-address-mode auto`) against node mode, same run:
# backends keeping the client's address must cost at most 5 % (issue 10).
TRANSPARENT_TARGETS = (
    ("gbps_8", "8-stream throughput", 2, "Gbit/s", ">=", 0.95),
    ("proxy_cpu_s_per_gb", "CPU per GB moved", 2, "CPU-s/GB", "<=", 1.05),
    ("conn_per_s", "new connections/s", 0, "/s", ">=", 0.95),
)


def transparent_checks(proxy: Doc) -> list[Check]:
    med = proxy.get("medians") or {}
    tp, node = med.get("kpx-tp") or {}, med.get("kpx") or {}
    if not tp:
        return []
    checks = []
    for key, what, digits, unit, op, limit in TRANSPARENT_TARGETS:
        each = run_ratios(proxy, "kpx-tp", "kpx", key)
        verdict, missed = judge_every_run(each, op, limit)
        checks.append(
            Check(
                f"kpx transparent mode {what} vs node mode",
                f_num(num(tp.get(key)), digits, unit),
                f_num(num(node.get(key)), digits, unit),
                per_run_ratio(proxy, "kpx-tp", "kpx", key),
                f"{op} {limit}x node mode, every run",
                verdict,
                missed,
            )
        )
    return checks


def proxy_checks(proxy: Doc | None) -> list[Check]:
    proxy = proxy or {}
    med = proxy.get("medians") or {}
    ratios = (proxy.get("ratios") or {}).get("haproxy") or {}
    kpx, haproxy = med.get("kpx") or {}, med.get("haproxy") or {}
    checks: list[Check] = []
    for key, what, digits, unit, op, limit in (
        ("gbps_8", "8-stream throughput (iperf3 -P 8)", 2, "Gbit/s", ">=", 0.9),
        ("proxy_cpu_s_per_gb", "CPU per GB moved (proxy process)", 2, "CPU-s/GB", "<=", 1.2),
        ("conn_per_s", "new connections/s (wrk, Connection: close)", 0, "/s", ">=", 0.8),
        ("req_p99_ms", "small-request p99 (keep-alive, wrk -c1)", 3, "ms", "<=", 1.5),
    ):
        ratio = num(ratios.get(key))
        if not finite(ratio):
            ratio = per_run_ratio(proxy, "kpx", "haproxy", key)
        # Every run must meet the target: a median hides the erratic run (issue 12).
        each = run_ratios(proxy, "kpx", "haproxy", key)
        verdict, missed = (
            judge_every_run(each, op, limit) if each else (judge(ratio, op, limit), "")
        )
        if key == "gbps_8" and missed:
            missed += bulk_conditions(proxy, [i for i, v in enumerate(each) if not v >= limit])
        checks.append(
            Check(
                f"kpx {what} vs haproxy",
                f_num(num(kpx.get(key)), digits, unit),
                f_num(num(haproxy.get(key)), digits, unit),
                ratio,
                f"{op} {limit}x haproxy, every run",
                verdict,
                missed,
            )
        )
    checks += transparent_checks(proxy)
    idle = proxy.get("idle") or {}
    ours = num((idle.get("kpx") or {}).get("kib_per_conn"))
    peer = num((idle.get("haproxy") or {}).get("kib_per_conn"))
    checks.append(
        Check(
            f"kpx memory per idle connection ({f_int(num(idle.get('requested')))} held)",
            f_num(ours, 2, "KiB"),
            f_num(peer, 2, "KiB"),
            ours / peer if finite(ours) and finite(peer) and peer else math.nan,
            "<= 3 KiB",
            judge(ours, "<=", 3),
        )
    )
    entry, note = _programming_at(proxy, 10_000)
    # The 50 ms target is set at 10,000 Services and holds a fortiori at fewer: every Service
    # count measured is judged (a 149 ms p99 at 1,000 is a miss, whatever 10,000 gave).
    entries = sorted(proxy.get("programming") or [], key=lambda p: num(p.get("services")))
    judged = [e for e in entries if num(e.get("services")) != 10_000]
    if note is None:
        judged.append(entry)
    for one in judged:
        for key, what in (
            ("endpoint_p99_ms", "endpoint change"),
            ("new_service_p99_ms", "new Service"),
        ):
            value = num(one.get(key))
            checks.append(
                Check(
                    f"kpx programming p99 at {f_int(num(one.get('services')))} Services, {what}",
                    f_num(value, 1, "ms"),
                    "—",
                    math.nan,
                    "<= 50 ms",
                    judge(value, "<=", 50),
                )
            )
    if note is not None:
        for what in ("endpoint change", "new Service"):
            checks.append(
                Check(
                    f"kpx programming p99 at 10,000 Services, {what}",
                    "—",
                    "—",
                    math.nan,
                    "<= 50 ms",
                    note.replace("measured at", "largest measured:"),
                )
            )
    value = num(entry.get("kpx_rss_mb"))
    checks.append(
        Check(
            "kpx RSS at 10,000 Services",
            f_num(value, 1, "MB"),
            "—",
            math.nan,
            "<= 150 MB",
            note if note and finite(value) else judge(value, "<=", 150),
        )
    )
    return checks


# kpx --workers N / --workers 1 per run (bench/proxy_workers.py): figure, what, unit, digits,
# limit (issue 12 item 3, on a 2-core machine).
WORKERS_GOALS = (
    ("conn_per_s", "new connections/s", "/s", 0, "conn", 1.8),
    ("gbps_8", "8-stream throughput", "Gbit/s", 2, "bulk", 1.6),
)
WORKER_RSS_MB = 30.0


def _median_of(runs: Sequence[Doc], key: str) -> float:
    values = [num(r.get(key)) for r in runs]
    finite_values = [v for v in values if finite(v)]
    return statistics.median(finite_values) if finite_values else math.nan


def workers_limits(doc: Doc, pass_name: str) -> str:
    """What holds the scaling in a pass: how long kpx's processes waited for a core and how
    much CPU the load generators took of the cores they share (medians over runs)."""
    runs = doc.get("runs") or {}
    one, many = runs.get("one") or [], runs.get("many") or []
    cores = num(doc.get("cores"))
    seconds = num(doc.get("duration_s"))
    n = doc.get("workers", "N")

    def secs(runs_of: Sequence[Doc], key: str) -> str:
        return f_num(_median_of(runs_of, key), 1)

    wait_key, load_key = f"{pass_name}_runq_wait_ms", f"{pass_name}_load_cpu_s"
    wait_many, wait_one = _median_of(many, wait_key) / 1000, _median_of(one, wait_key) / 1000
    budget = f" of the {f_num(cores * seconds, 0)}" if finite(cores * seconds) else ""
    shared = "the same" if not doc.get("load_cpus") else "other"
    text = (
        f"kpx's processes waited {f_num(wait_many, 1)} s (summed) for a core with {n} "
        f"workers ({f_num(wait_one, 1)} s with 1) in each {f_num(seconds, 0)} s pass; the load "
        f"generators on {shared} cores used {secs(many, load_key)} CPU-s{budget} "
        f"({secs(one, load_key)} with 1), kpx {secs(many, pass_name + '_proxy_cpu_s')} "
        f"({secs(one, pass_name + '_proxy_cpu_s')} with 1)"
    )
    rests = [
        num(r.get(f"{pass_name}_machine_cpu_s"))
        - num(r.get(load_key))
        - num(r.get(f"{pass_name}_proxy_cpu_s"))
        for r in many
    ]
    rest = statistics.median([v for v in rests if finite(v)] or [math.nan])
    if finite(rest):
        text += f", the rest of the machine (other processes, interrupts) {f_num(rest, 1)}"
    return text


def workers_checks(doc: Doc | None) -> list[Check]:
    """Issue 12 item 3 (bench/proxy_workers.py): N workers reach >= 1.8x one worker's
    connections/s and >= 1.6x its 8-stream throughput in every run, on the same cores in the
    same sitting; each worker costs <= 30 MB RSS. Next to the scaling: what limits it."""
    n = (doc or {}).get("workers", 2)
    what_rss = f"kpx RSS of each worker (--workers {n})"

    def label(what: str) -> str:
        return f"kpx --workers {n} {what} vs --workers 1 (same cores, same sitting)"

    if not doc:
        rows = [
            Check(label(what), "—", "—", math.nan, f">= {limit}x one worker, every run", NOT_RUN)
            for _, what, _, _, _, limit in WORKERS_GOALS
        ]
        return [*rows, Check(what_rss, "—", "—", math.nan, "<= 30 MB", NOT_RUN)]
    runs = doc.get("runs") or {}
    one, many = runs.get("one") or [], runs.get("many") or []
    checks = []
    for key, what, unit, digits, pass_name, limit in WORKERS_GOALS:
        ratios = list((doc.get("ratio_runs") or {}).get(key) or [])
        if not ratios:
            ratios = [
                num(a.get(key)) / num(b.get(key))
                if finite(num(a.get(key))) and finite(num(b.get(key))) and num(b.get(key))
                else math.nan
                for a, b in zip(many, one, strict=False)
            ]
        finite_ratios = [v for v in ratios if finite(v)]
        verdict, missed = judge_every_run(ratios, ">=", limit)
        limits = workers_limits(doc, pass_name)
        checks.append(
            Check(
                label(what),
                f_num(_median_of(many, key), digits, unit),
                f_num(_median_of(one, key), digits, unit),
                statistics.median(finite_ratios) if finite_ratios else math.nan,
                f">= {limit}x one worker, every run",
                verdict,
                f"{missed}; {limits}" if missed else limits,
            )
        )
    worker_rss = [num(w) for run in many for w in ((run.get("rss") or {}).get("workers_mb") or [])]
    worst = max(worker_rss) if worker_rss else math.nan
    shown = ", ".join(f_num(w, 1) for w in worker_rss)
    checks.append(
        Check(
            what_rss,
            f_num(worst, 1, "MB") + " (largest)",
            "—",
            math.nan,
            f"<= {WORKER_RSS_MB:g} MB",
            judge(worst, "<=", WORKER_RSS_MB),
            f"every worker, every run: {shown} MB" if worker_rss else "",
        )
    )
    return checks


# bench/udp.py's goals: its name, the section and key of the figure, what it is, how shown.
UDP_GOALS = (
    ("small_datagrams_per_s", "small", "answers_per_s", "64-byte datagrams/s at saturation",
     0, "/s", ">=", 1.5),
    ("small_cpu_per_datagram", "small", "proxy_cpu_us_per_datagram", "CPU per 64-byte datagram",
     1, "µs", "<=", 0.8),
    ("bulk_datagrams_per_s", "bulk", "answers_per_s", "1,200-byte datagrams/s",
     0, "/s", ">=", 1.5),
    ("bulk_cpu_per_datagram", "bulk", "proxy_cpu_us_per_datagram",
     "CPU per 1,200-byte datagram", 1, "µs", "<=", 0.8),
    ("latency_added_p99", "latency", "added_p99_us", "p99 added latency at a fixed rate",
     0, "µs", "<=", 1.5),
)  # fmt: skip


def session_memory(held: Doc) -> str:
    """A proxy's RSS growth per UDP session held (bench/udp.py's `sessions.<proxy>`), or that
    its RSS did not grow, with the RSS before and after: nginx's stays flat (it allocates its
    connection table for `worker_connections` when it starts), and "0.00 KiB" would read as a
    session costing it nothing."""
    value = num(held.get("bytes_per_session"))
    if not finite(value) or value > 0:
        return f_num(value / 1024, 2, "KiB")
    before, after = num(held.get("rss_before_mb")), num(held.get("rss_after_mb"))
    if not finite(before) or not finite(after):
        return "no RSS growth"
    return f"no RSS growth ({f_num(before, 1)} MB before, {f_num(after, 1)} MB after)"


def udp_checks(udp: Doc | None) -> list[Check]:
    """Issue 11's targets: kpx against nginx's stream UDP proxy in the same run."""
    udp = udp or {}
    checks: list[Check] = []

    def pair(section: str, key: str) -> tuple[float, float]:
        part = udp.get(section) or {}
        return num((part.get("kpx") or {}).get(key)), num((part.get("nginx") or {}).get(key))

    # bench/udp.py's own targets, when it writes them: each ratio the median of the runs' own
    # kpx/nginx ratios (each run's pair met the same load), else the ratio of the medians.
    own = udp.get("targets") or {}

    def ratio_of(goal: str, ours: float, peer: float) -> float:
        if goal in own:
            return num((own[goal] or {}).get("ratio"))
        return ours / peer if finite(ours) and finite(peer) and peer else math.nan

    for goal, section, key, what, digits, unit, op, limit in UDP_GOALS:
        if goal == "bulk_cpu_per_datagram" and goal not in own:
            continue  # judged since bench/udp.py judges it; older results do not
        ours, peer = pair(section, key)
        ratio = ratio_of(goal, ours, peer)
        checks.append(
            Check(
                f"kpx UDP {what} vs nginx",
                f_num(ours, digits, unit),
                f_num(peer, digits, unit),
                ratio,
                f"{op} {limit}x nginx",
                judge(ratio, op, limit),
            )
        )
    sessions = udp.get("sessions") or {}
    kpx_s, nginx_s = sessions.get("kpx") or {}, sessions.get("nginx") or {}
    ours, peer = num(kpx_s.get("bytes_per_session")), num(nginx_s.get("bytes_per_session"))
    checks.append(
        Check(
            f"kpx memory per UDP session ({f_int(num(kpx_s.get('held')))} held)",
            session_memory(kpx_s),
            session_memory(nginx_s),
            ours / peer if finite(ours) and finite(peer) and peer > 0 else math.nan,
            "measured",
            "—",
        )
    )
    loaded = num((kpx_s.get("small_with_sessions") or {}).get("answers_per_s"))
    # bench/udp.py's pass right before the sessions were made; older results: the first one.
    idle = num(
        (kpx_s.get("small_without_sessions") or (udp.get("small") or {}).get("kpx") or {}).get(
            "answers_per_s"
        )
    )
    ratio = ratio_of("datagrams_per_s_with_sessions_held", loaded, idle)
    checks.append(
        Check(
            "kpx UDP datagrams/s with the sessions held vs without",
            f_num(loaded, 0, "/s"),
            f_num(idle, 0, "/s"),
            ratio,
            ">= 0.9x",
            judge(ratio, ">=", 0.9),
        )
    )
    value = num((udp.get("retarget") or {}).get("p99_ms"))
    checks.append(
        Check(
            "kpx UDP session re-targeting after an endpoint change, p99",
            f_num(value, 1, "ms"),
            "—",
            math.nan,
            "measured",
            "—",
        )
    )
    return checks


def sync_checks(sync: Doc | None) -> list[Check]:
    sync = sync or {}
    med = sync.get("medians") or {}
    note = _scale_note(num(sync.get("services")), 10_000) if sync else None
    checks = []
    for key, what, unit, limit in (
        ("synced_s", "kwatch initial sync, 10,000 Services / 100,000 endpoints", "s", 3),
        ("rss_growth_mb", "kwatch RSS growth for those stores", "MB", 120),
    ):
        value = num(med.get(key))
        checks.append(
            Check(
                what,
                f_num(value, 2 if unit == "s" else 1, unit),
                "—",
                math.nan,
                f"<= {limit} {unit}",
                note if note and finite(value) else judge(value, "<=", limit),
            )
        )
    return checks


def relist_checks(relist: Doc | None) -> list[Check]:
    """Issue 14 item 8: a forced 410 relist raises neither daemon's peak RSS above 1.2x
    its steady RSS (bench/relist.py)."""
    relist = relist or {}
    note = _scale_note(num(relist.get("services")), 10_000) if relist else None
    limit = num(relist.get("target_ratio")) if relist.get("target_ratio") else 1.2
    checks = []
    for daemon in ("dnsd", "kpx"):
        figures = relist.get(daemon) or {}
        ratio = num(figures.get("ratio"))
        ours = (
            f"{f_num(num(figures.get('peak_mb')), 1, 'MB')} peak, "
            f"{f_num(num(figures.get('steady_mb')), 1, 'MB')} steady ({ratio:.2f}x)"
            if finite(ratio)
            else "—"
        )
        checks.append(
            Check(
                f"{daemon} peak RSS during a forced 410 relist, 10,000 Services / 100,000 "
                "endpoints",
                ours,
                "—",
                math.nan,
                f"<= {limit:g}x steady",
                note if note and finite(ratio) else judge(ratio, "<=", limit),
            )
        )
    return checks


SOAK_SECONDS, SOAK_RATE = 1200, 50  # issue 14 item 3: 20 minutes of churn at 50 writes/s


def soak_checks(soak: Doc | None) -> list[Check]:
    """Issue 14 item 3 (bench/soak.py): after churn and chaos, what dnsd and kpx serve equals
    what the API holds; after warm-up RSS grows <= 5 % and open fds do not grow. The growth
    targets are judged over the full 20 minutes only: a shorter run has no steady state."""
    ran, soak = bool(soak), soak or {}
    seconds, rate = num(soak.get("duration_s")), num(soak.get("rate"))
    full = finite(seconds) and seconds >= SOAK_SECONDS and finite(rate) and rate >= SOAK_RATE
    short = (
        f"n/a: {f_num(seconds / 60, 1)} min at {f_num(rate, 0)} writes/s, the target is for "
        f"{SOAK_SECONDS // 60} min at {SOAK_RATE}"
        if ran and not full
        else None
    )

    def verdict(value: float, limit: float, unjudged: str | None = None) -> str:
        if not ran:
            return NOT_RUN
        return unjudged if unjudged and finite(value) else judge(value, "<=", limit)

    def shown(text: str, value: float) -> str:
        return "—" if not ran else text if finite(value) else "n/a"

    differences = num(soak.get("differences"))
    questions = soak.get("questions_checked", soak.get("names_checked"))  # renamed
    checked = num(questions) + num(soak.get("frontends_checked"))
    length = f" after {f_num(seconds / 60, 1)} min of churn and chaos" if ran else ""
    checks = [
        Check(
            f"soak: DNS names and kpx frontends differing from the API{length}",
            shown(f"{f_int(differences)} of {f_int(checked)}", differences),
            "—",
            math.nan,
            "0",
            verdict(differences, 0),
        )
    ]
    growth, fds = soak.get("rss_growth_pct") or {}, soak.get("fd_growth") or {}
    for daemon in ("dnsd", "kpx"):
        value = num(growth.get(daemon))
        checks.append(
            Check(
                f"soak: {daemon} RSS growth after warm-up",
                shown(f"{value:+.1f} %", value),
                "—",
                math.nan,
                "<= 5 %",
                verdict(value, 5, short),
            )
        )
    for daemon in ("dnsd", "kpx"):
        value = num(fds.get(daemon))
        beyond = " beyond one listener per frontend" if daemon == "kpx" else ""
        checks.append(
            Check(
                f"soak: {daemon} open file descriptors after warm-up{beyond}",
                shown(f"{value:+.0f}", value),
                "—",
                math.nan,
                "no growth",
                verdict(value, 0, short),
            )
        )
    return checks


def _itself(flood: Doc) -> Doc:
    """The waits of a flood's answers that dnsd gave itself, not after the upstream's timeout."""
    return (flood.get("waits") or {}).get("dnsd_itself") or {}


def overload_runs(overload: Doc) -> list[Doc]:
    """Every run of bench/dns_overload.py (`runs`); results written before it had runs are
    one run, the document itself."""
    runs = [r for r in overload.get("runs") or [] if isinstance(r, dict) and r.get("probe_flood")]
    return runs or [overload]


def _per_run_ms(values: Sequence[float], digits: int) -> str:
    return ", ".join(f_num(v, digits) for v in values) + " ms"


def overload_checks(overload: Doc | None, variant: str = "") -> list[Check]:
    """Issue 14 item 4 (bench/dns_overload.py): during a flood of slow-path queries, cluster
    names keep p99 <= 1 ms, the flood's answers dnsd gives itself (REFUSED, cached, not those
    that waited for the silent upstream's timeout by design) wait <= 100 ms at p99 in every
    flood, and dnsd's RSS grows <= 10 MB at its peak; each in every run. With `--control-knot`
    the same probe's p99 from a knotd under the same load (the flood never reaches it) is the
    peer: what this machine gives a server without a GIL or a flood of its own."""
    targets = (
        (f"dnsd{variant} cluster names p99 during a slow-path flood", "<= 1 ms"),
        (f"dnsd{variant} flood's answers given by dnsd itself, p99 wait", "<= 100 ms"),
        (f"dnsd{variant} RSS growth over the flood, at its peak", "<= 10 MB"),
    )
    if not overload:
        return [Check(what, "—", "—", math.nan, target, NOT_RUN) for what, target in targets]
    runs = overload_runs(overload)
    several = len(runs) > 1
    loaded = [r.get("probe_flood") or {} for r in runs]
    idle = [num((r.get("probe_idle") or {}).get("p99_ms")) for r in runs]
    p99s = [num(probe.get("p99_ms")) for probe in loaded]
    controls = [num((probe.get("control") or {}).get("p99_ms")) for probe in loaded]
    lost = sum(num(probe.get("lost")) for probe in loaded)
    # A lost probe waited forever: beyond 1 % lost in a run, the p99 of every probe is beyond
    # the probe's timeout, whatever that of the answered ones.
    lossy = [
        i + 1
        for i, probe in enumerate(loaded)
        if num(probe.get("sent")) and num(probe.get("lost")) / num(probe.get("sent")) > 0.01
    ]
    missed = [i + 1 for i, v in enumerate(p99s) if judge(v, "<=", 1) != MET]
    p99_verdict, p99_note = judge(max(p99s), "<=", 1), ""
    if lossy:
        p99_verdict = NOT_MET
        lost_in = ", ".join(
            f"{f_int(num(loaded[i - 1].get('lost')))} of {f_int(num(loaded[i - 1].get('sent')))}"
            for i in lossy
        )
        p99_note = f"{lost_in} probes lost"
    elif several and missed:
        p99_note = f"missed in run {', '.join(map(str, missed))} of {len(runs)}"
    if several:
        ours = f"{_per_run_ms(p99s, 3)} (per run; {f_int(lost)} lost; idle {_per_run_ms(idle, 3)})"
    else:
        ours = f"{f_num(p99s[0], 3, 'ms')} ({f_int(lost)} lost; idle {f_num(idle[0], 3, 'ms')})"
    peer, ratio = "—", math.nan
    if any(finite(c) for c in controls):
        peer = "knotd " + (_per_run_ms(controls, 3) if several else f_num(controls[0], 3, "ms"))
        ratios = [a / b for a, b in zip(p99s, controls, strict=True) if finite(a) and b]
        ratio = statistics.median(ratios) if ratios else math.nan
    qps = num(loaded[0].get("qps"))
    floods = [f for r in runs for f in (r.get("flood") or {}).values() if isinstance(f, dict)]
    waits = [num(_itself(f).get("p99_ms")) for f in floods]
    # A flood with no answer of dnsd's own (all waited for the upstream) has no wait to judge.
    worst = max((w for w in waits if finite(w)), default=math.nan)
    answers = sum(num(_itself(f).get("count")) for f in floods)
    peaks = [num(r.get("rss_peak_growth_mb")) for r in runs]
    ends = [num(r.get("rss_growth_mb")) for r in runs]
    peak = max((p for p in peaks if finite(p)), default=math.nan)
    runs_text = f" in {len(runs)} runs" if several else ""
    return [
        Check(
            f"{targets[0][0]} (probe at {f_int(qps)} qps)",
            ours,
            peer,
            ratio,
            targets[0][1],
            p99_verdict,
            p99_note,
        ),
        Check(
            f"{targets[1][0]} (worst of {len(floods)} floods{runs_text})",
            f"{f_num(worst, 1, 'ms')} ({f_int(answers)} answers)",
            "—",
            math.nan,
            targets[1][1],
            judge(worst, "<=", 100),
        ),
        Check(
            targets[2][0],
            (
                f"{_per_run_ms(peaks, 1).replace(' ms', ' MB')} (per run)"
                if several
                else f"{f_num(peak, 1, 'MB')} ({f_num(ends[0], 1, 'MB')} at its end)"
            ),
            "—",
            math.nan,
            targets[2][1],
            judge(peak, "<=", 10),
        ),
    ]


def memory_sweep(results: dict[str, Doc]) -> list[Doc]:
    """The dns-memory-N results (bench.dns --memory-only), fewest Services first."""
    return sorted(
        (d for name, d in results.items() if name.startswith("dns-memory") and d.get("memory")),
        key=lambda d: num((d.get("cluster") or {}).get("services")),
    )


def all_checks(results: dict[str, Doc]) -> list[Check]:
    """Every target, in the report's order, from results/<name>.json by name."""
    udp = results.get("udp")
    return (
        dns_checks(results.get("dns"), memory_sweep(results))
        + proxy_checks(results.get("proxy"))
        + workers_checks(results.get("proxy-workers"))
        + (udp_checks(udp) if udp else [])  # reports from before bench/udp.py have none
        + sync_checks(results.get("sync"))
        + relist_checks(results.get("relist"))
        + overload_checks(results.get("dns-overload"))
        + (  # reports from before the comparison have none
            overload_checks(in_process, " --no-forward-process")
            if (in_process := results.get("dns-overload-in-process"))
            else []
        )
        + soak_checks(results.get("soak"))
    )
