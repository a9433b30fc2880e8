"""The benchmark report's section on bench/udp.py (issue 11): kpx's UDP relay against nginx's
`stream` UDP proxy and the kernel's NAT. How the benchmark measures, its chart, the medians per
path, every run's kpx / nginx ratio for each target, the sessions held and the re-targeting."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from bench.report_checks import UDP_GOALS
from bench.report_format import Doc, f_int, f_num, f_ratio, finite, fmt, num
from bench.report_md import Report, not_run, partial, per_run_rows, table
from bench.udp import BUSY, CLIENT_CPU, PROXY_CPU, SESSIONS_GOAL

PATHS = ("direct", "nat", "nginx", "kpx")
PROXIES = ("nginx", "kpx")

# The medians table: section of bench/udp.py's results, figure, row, how shown.
UDP_ROWS = (
    ("small", "answers_per_s", "64-byte datagrams/s", "{:,.0f}"),
    ("bulk", "answers_per_s", "1,200-byte datagrams/s", "{:,.0f}"),
    ("bulk", "mb_per_s", "1,200-byte datagrams, MB/s", "{:.1f}"),
    ("small", "proxy_cpu_us_per_datagram", "proxy CPU per 64-byte datagram (µs)", "{:.2f}"),
    ("small", "proxy_user_us_per_datagram", "of which user CPU (µs)", "{:.2f}"),
    ("bulk", "proxy_cpu_us_per_datagram", "proxy CPU per 1,200-byte datagram (µs)", "{:.2f}"),
    ("small", "proxy_core_busy", f"proxy core busy, 64-byte pass (CPU {PROXY_CPU})", "{:.2f}"),
    ("bulk", "proxy_core_busy", "proxy core busy, 1,200-byte pass", "{:.2f}"),
    ("small", "client_server_core_busy",
     f"client and server core busy, 64-byte pass (CPU {CLIENT_CPU})", "{:.2f}"),
    ("latency", "p50_us", "fixed-rate latency p50 (µs)", "{:,.0f}"),
    ("latency", "p99_us", "fixed-rate latency p99 (µs)", "{:,.0f}"),
    ("latency", "added_p99_us", "p99 added over direct (µs)", "{:,.0f}"),
    ("latency", "lost", "fixed-rate datagrams lost", "{:,.0f}"),
)  # fmt: skip
# What held each saturation rate (bench/udp.py's bound_by, per run): row, target.
BOUND_ROWS = (
    ("what bound the 64-byte rate", "small_datagrams_per_s"),
    ("what bound the 1,200-byte rate", "bulk_datagrams_per_s"),
)


def udp_section(r: Report, udp: Doc | None, run: Doc, charts_made: dict[str, bool]) -> None:
    r.add("## Proxy UDP: kpx vs nginx and the kernel's NAT\n")
    if not udp or not udp.get("small"):
        not_run(r, "udp", run, "about 4 minutes")
        return
    partial(r, udp)
    args = udp.get("args") or {}
    runs = udp.get("runs") or []
    n_runs = len(runs) if runs else fmt("{:.0f}", args.get("runs"))
    r.add(
        "`bench/udp.py`: client ns -> node ns -> server ns over veths; a UDP echo server in the "
        "server ns reached directly (`direct`), through an nftables `dnat` rule (`nat`, "
        "kube-proxy's way), through nginx `stream` (`listen udp`, `proxy_responses 1`, one "
        "worker) and through kpx (`--mode nftables`). The load generator and the echo server "
        "are bench/udpgen.c (recvmmsg/sendmmsg); the proxies are pinned to CPU "
        f"{PROXY_CPU}, the client and the echo server to CPU {CLIENT_CPU}. {n_runs} run(s), each "
        "with nginx, the fake API server and kpx started afresh: saturation passes of "
        f"{fmt('{:g}', args.get('duration'))} s, {fmt('{:,.0f}', args.get('flows'))} client "
        f"sockets each keeping {fmt('{:,.0f}', args.get('window'))} datagrams in flight, with "
        "64-byte then 1,200-byte datagrams (answers/s, and proxy CPU per answered datagram: "
        "utime+stime of the proxy's processes / answers); latency with one socket and one "
        f"64-byte datagram in flight at {fmt('{:,.0f}', args.get('rate'))}/s (added: the "
        "path's p99 minus the direct path's); "
        f"{fmt('{:,.0f}', args.get('sessions'))} sessions held through nginx and kpx; "
        f"{fmt('{:,.0f}', args.get('samples'))} re-targetings of kpx. A core busy is the CPU "
        "time of the processes on it over the pass's length; what bound a rate: the proxy's "
        f"core if the proxy kept it busy {BUSY:.0%} of the pass or more, else the client's and "
        "server's core if they kept theirs that busy, else other load on a pinned core if "
        "either was that busy, else neither. The kernel's NAT runs in softirq on the sending "
        "side's CPU: it has no CPU figure of its own. Figures are medians of the runs; ratios "
        "are medians of the per-run ratios.\n"
    )
    r.chart(
        charts_made.get("udp.png", False),
        "udp.png",
        "UDP datagrams per second, proxy CPU per datagram and latency",
    )
    paths = [p for p in PATHS if p in udp["small"]]
    rows = [
        [label, *(fmt(pattern, ((udp.get(section) or {}).get(p) or {}).get(key)) for p in paths)]
        for section, key, label, pattern in UDP_ROWS
    ]
    targets = udp.get("targets") or {}
    for label, goal in BOUND_ROWS:
        bounds = _bounds_by_run(targets.get(goal) or {}, runs, goal)
        rows.append([label, *(_bounds_text(bounds.get(p) or []) for p in paths)])
    r.add(table(["median", *paths], rows))
    if runs:
        ratios_per_run(r, runs, targets)
    sessions_section(r, udp, runs)
    retarget_section(r, udp, runs)


def _bounds_by_run(target: Doc, runs: Sequence[Doc], goal: str) -> dict[str, list[str]]:
    """Per proxy, what bound its rate in each run (bench/udp.py's `bound_by_runs`, else each
    run's own targets)."""
    by_run = target.get("bound_by_runs") or [
        ((one.get("targets") or {}).get(goal) or {}).get("bound_by") or {} for one in runs
    ]
    out: dict[str, list[str]] = {}
    for bound in by_run:
        for proxy, what in (bound or {}).items():
            out.setdefault(proxy, []).append(str(what))
    return out


def _bounds_text(bounds: Sequence[str]) -> str:
    """'proxy core (3 of 3 runs)', or each cause with its runs' count."""
    if not bounds:
        return "—"
    counts: dict[str, int] = {}
    for what in bounds:
        counts[what] = counts.get(what, 0) + 1
    return ", ".join(f"{what} ({n} of {len(bounds)} runs)" for what, n in counts.items())


def _pair(one: Doc, section: str, key: str) -> tuple[float, float]:
    """kpx's and nginx's figure in one run; for the sessions target, kpx's 64-byte rate with
    the sessions held and right before."""
    if section == "sessions":
        kpx = (one.get("sessions") or {}).get("kpx") or {}
        before = kpx.get("small_without_sessions") or (one.get("small") or {}).get("kpx") or {}
        return (
            num((kpx.get("small_with_sessions") or {}).get("answers_per_s")),
            num(before.get("answers_per_s")),
        )
    part = one.get(section) or {}
    return num((part.get("kpx") or {}).get(key)), num((part.get("nginx") or {}).get(key))


def ratios_per_run(r: Report, runs: Sequence[Doc], targets: Doc) -> None:
    """Every run's kpx / nginx ratio for each target, with the two figures it divides."""
    name, op, limit = SESSIONS_GOAL
    goals = [
        (goal, section, key, f"{what} ({op_} {limit_}x)", digits)
        for goal, section, key, what, digits, _unit, op_, limit_ in UDP_GOALS
        if goal in targets or goal != "bulk_cpu_per_datagram"  # judged as the Targets table does
    ]
    goals.append((name, "sessions", "", f"64-byte datagrams/s, sessions held ({op} {limit}x)", 0))
    by_goal: dict[str, list[Doc]] = {}
    for goal, section, key, _header, digits in goals:
        for one in runs:
            ours, peer = _pair(one, section, key)
            own = (one.get("targets") or {}).get(goal) or {}
            ratio = num(own.get("ratio"))
            if not finite(ratio) and finite(ours) and finite(peer) and peer:
                ratio = ours / peer
            by_goal.setdefault(goal, []).append(
                {
                    "ratio": ratio,
                    "ours": ours,
                    "peer": peer,
                    "digits": digits,
                    "met": own.get("met"),
                }
            )

    def cell(one: Doc) -> str:
        if not one:
            return "—"
        digits = int(one["digits"])
        text = (
            f"{f_ratio(num(one['ratio']))} ({f_num(num(one['ours']), digits)} / "
            f"{f_num(num(one['peer']), digits)})"
        )
        return text + (", not met" if one["met"] is False else "")

    r.add(
        "kpx / nginx in every run, for each target (in parentheses kpx's figure / nginx's; for the "
        "sessions, kpx's rate with them held / right before they were made):\n"
    )
    rows = per_run_rows(by_goal, [g[0] for g in goals], len(runs), cell)
    r.add(table(["run", *(header for _, _, _, header, _ in goals)], rows))


def _median(values: Sequence[float]) -> float:
    present = [v for v in values if finite(v)]
    return statistics.median(present) if present else float("nan")


def _growth(held: Doc) -> str:
    """RSS growth per session in bytes; "none" where the RSS did not grow."""
    value = num(held.get("bytes_per_session"))
    if not finite(value):
        return "—"
    return f"{value:,.0f} bytes" if value > 0 else "none"


def _rate(held: Doc, key: str) -> float:
    return num((held.get(key) or {}).get("answers_per_s"))


def sessions_section(r: Report, udp: Doc, runs: Sequence[Doc]) -> None:
    """### The sessions held: RSS per session, the 64-byte rate right before and with them."""
    sessions = udp.get("sessions") or {}
    proxies = [p for p in PROXIES if isinstance(sessions.get(p), dict)]
    if not proxies:
        return
    count = num((udp.get("args") or {}).get("sessions"))
    if not finite(count):
        count = num(sessions[proxies[-1]].get("held"))
    r.add(f"### {f_int(count)} UDP sessions held\n")
    r.add(
        "The 64-byte saturation pass once more through the proxy, then that many sessions "
        "opened through it (a socket each, one exchange each) and held: RSS growth per "
        "session; then the same pass with them held. Medians of the runs (the ratio: median "
        "of the runs' own):\n"
    )

    def ratio_runs(proxy: str) -> list[float]:
        out = []
        for one in runs:
            held = (one.get("sessions") or {}).get(proxy) or {}
            loaded, idle = _rate(held, "small_with_sessions"), _rate(held, "small_without_sessions")
            out.append(loaded / idle if finite(loaded) and finite(idle) and idle else float("nan"))
        return out

    rows = []
    for proxy in proxies:
        held = sessions[proxy]
        rows.append(
            [
                proxy,
                fmt("{:,.0f}", held.get("held")),
                fmt("{:,.0f}", held.get("failed")),
                fmt("{:.1f}", held.get("rss_before_mb")),
                fmt("{:.1f}", held.get("rss_after_mb")),
                _growth(held),
                fmt("{:,.0f}", _rate(held, "small_without_sessions")),
                fmt("{:,.0f}", _rate(held, "small_with_sessions")),
                f_ratio(_median(ratio_runs(proxy))),
            ]
        )
    r.add(
        table(
            [
                "proxy",
                "held",
                "failed",
                "RSS before (MB)",
                "RSS after (MB)",
                "RSS growth per session",
                "64-byte datagrams/s right before",
                "with the sessions held",
                "with / before",
            ],
            rows,
        )
    )
    nginx = num((sessions.get("nginx") or {}).get("bytes_per_session"))
    if finite(nginx) and nginx <= 0:
        r.add(
            "nginx's RSS did not grow while it held them: it allocates and writes its "
            "connection table for `worker_connections` when it starts, so a session takes a "
            "slot already counted in its RSS before; what a session costs nginx is not seen "
            "this way.\n"
        )
    if not runs:
        return

    def cell(held: Doc) -> str:
        if not held:
            return "—"
        loaded, idle = _rate(held, "small_with_sessions"), _rate(held, "small_without_sessions")
        ratio = loaded / idle if finite(loaded) and finite(idle) and idle else float("nan")
        return (
            f"{f_int(idle)} -> {f_int(loaded)} /s ({f_ratio(ratio)}); RSS "
            f"{fmt('{:.1f}', held.get('rss_before_mb'))} -> "
            f"{fmt('{:.1f}', held.get('rss_after_mb'))} MB, {_growth(held)} per session"
        )

    per_proxy = {p: [(one.get("sessions") or {}).get(p) or {} for one in runs] for p in proxies}
    r.add("Per run (64-byte datagrams/s right before -> with the sessions held; RSS):\n")
    r.add(table(["run", *proxies], per_run_rows(per_proxy, proxies, len(runs), cell)))


def retarget_section(r: Report, udp: Doc, runs: Sequence[Doc]) -> None:
    """### Re-targeting: an EndpointSlice change -> the first answer from the new endpoint."""
    median = udp.get("retarget") or {}
    if not median:
        return
    r.add("### Re-targeting a UDP session\n")
    samples = (udp.get("args") or {}).get("samples")
    r.add(
        f"kpx only, {fmt('{:,.0f}', samples)} times a run: a client sends every millisecond "
        "from one source port while the EndpointSlice is PUT moving the endpoint between the "
        "echo server's two addresses; the time from the PUT to the first answer from the new "
        "endpoint.\n"
    )

    def row(label: str, one: Doc) -> list[str]:
        return [
            label,
            fmt("{:.2f}", one.get("p50_ms")),
            fmt("{:.2f}", one.get("p99_ms")),
            fmt("{:,.0f}", one.get("samples")),
            fmt("{:,.0f}", one.get("not_seen_in_5s")),
        ]

    rows = [row(f"run {i + 1}", one.get("retarget") or {}) for i, one in enumerate(runs)]
    rows.append(row("median", median))
    r.add(table(["kpx", "p50 (ms)", "p99 (ms)", "samples", "not seen in 5 s"], rows))
