"""kpx `--workers N` against `--workers 1` on the same cores, in the same sitting (issue 12
item 3).

    .venv/bin/python -m bench.proxy_workers [--runs 3] [--duration 8] [--workers 2]
        [--cpus 0,1] [--quick] [--json PATH]

bench/proxy.py's netns chain, origin and iperf3 server; kpx `--mode nftables --manifests` in
the node ns, restarted with `--workers 1` and `--workers N` in turn, the order swapped every run
(run 1: 1 then N, run 2: N then 1, ...), each pinned to `--cpus` (default: every CPU this process
may use). The load generators and servers are not pinned: on a machine with no other cores they
share the proxies', which is what limits the scaling there, and what this benchmark shows next
to it. Per configuration and run:
- 8-stream throughput (iperf3 -P 8, after a 1-stream pass) and new connections/s (wrk -t1
  -c32 `Connection: close`), as bench/proxy.py measures them;
- in each of those passes, how long kpx's processes waited for a core while runnable
  (run-queue wait, summed over them), their CPU seconds, the load's (iperf3 both ends, wrk
  and the origin) and the rest of the machine's (other processes, interrupts);
- RSS of every kpx process after the passes: the control process and each worker.
Every run's ratios N / 1 are printed (N workers' figure over one worker's in the same run),
then their median; a target missed in any run is printed as MISSED. Targets (issue 12): conn/s
>= 1.8x, 8-stream throughput >= 1.6x, each worker's RSS <= 30 MB.
`--quick`: 1 run, 1 s passes and 300 MB transfers: a smoke test of the harness.
`--json PATH` writes the per-run figures, the ratios and `targets_missed` to PATH.
Figures, never assertions: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.jsonout import write_json
from bench.netns_topology import Chain
from bench.procstat import children_of, rss_mb
from bench.proxy import (
    Bench,
    _median,
    check_environment,
    cpu_list,
    fmt,
    measure_mode,
    misses,
    parse_args,
    ratio_line,
)

# (figure, what, comparison, limit): N workers / one worker per run, issue 12 item 3.
SCALING_TARGETS = (
    ("conn_per_s", "new connections/s", ">=", 1.8),
    ("gbps_8", "8-stream throughput", ">=", 1.6),
)
WORKER_RSS_MB = 30.0  # per extra worker
# Figures kept per configuration and run (the rest of bench/proxy.py's are NaN or not asked).
KEPT = (
    "gbps_1",
    "gbps_8",
    "bulk_runq_wait_ms",
    "bulk_proxy_cpu_s",
    "bulk_load_cpu_s",
    "bulk_machine_cpu_s",
    "conn_per_s",
    "conn_p99_ms",
    "conn_errors",
    "conn_runq_wait_ms",
    "conn_proxy_cpu_s",
    "conn_load_cpu_s",
    "conn_machine_cpu_s",
    "proxy_rss_mb",
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8, help="seconds per pass")
    parser.add_argument("--workers", type=int, default=2, help="compared with --workers 1")
    parser.add_argument(
        "--cpus",
        default=",".join(map(str, sorted(os.sched_getaffinity(0)))),
        help="CPUs (taskset -c list) kpx runs on in both configurations (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="1 run, short passes")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    ours = parser.parse_args(argv)
    proxy_argv = [
        "--modes",
        "kpx",
        "--passes",
        "bulk",
        "conn",
        "--cpus",
        ours.cpus,
        "--runs",
        str(ours.runs),
        "--duration",
        str(ours.duration),
        "--no-idle",
        "--no-programming",
    ]
    # bench/proxy.py's settings for the passes (load CPUs: the ones kpx leaves, if any).
    args = parse_args(proxy_argv + (["--quick"] if ours.quick else []))
    args.workers, args.json = ours.workers, ours.json
    return args


def configurations(run: int, workers: int) -> list[int]:
    """The worker counts in the order run `run` (0-based) measures them: swapped every run."""
    pair = [1, workers]
    return pair if run % 2 == 0 else pair[::-1]


def kpx_rss(pid: int) -> dict[str, Any]:
    """RSS of the control process and of each worker (MB)."""
    return {"control_mb": rss_mb([pid]), "workers_mb": [rss_mb([w]) for w in children_of(pid)]}


def scaling_ratios(runs: dict[str, list[dict[str, float]]], key: str) -> list[float]:
    """N workers' `key` over one worker's, per run."""
    out = []
    for many, one in zip(runs["many"], runs["one"], strict=True):
        a, b = many.get(key, math.nan), one.get(key, math.nan)
        out.append(a / b if math.isfinite(a) and math.isfinite(b) and b else math.nan)
    return out


def rss_misses(runs: list[dict[str, Any]], limit: float) -> list[str]:
    """One line per worker whose RSS exceeded `limit` MB (or when no worker was seen)."""
    out = []
    for n, run in enumerate(runs, 1):
        workers = run.get("rss", {}).get("workers_mb") or []
        if not workers:
            out.append(f"no worker process seen in run {n}")
        for rss in workers:
            if not rss <= limit:
                out.append(f"worker RSS {rss:.1f} MB > {limit:g} MB in run {n}")
    return out


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Per run, kpx with one worker and with `args.workers`, in swapped order."""
    runs: dict[str, list[dict[str, Any]]] = {"one": [], "many": []}
    for run in range(args.runs):
        for workers in configurations(run, args.workers):
            if workers != args.kpx_workers:
                args.kpx_workers = workers
                bench.kpx_mode = ""  # restart: one kpx owns the table at a time
                bench.switch_kpx("kpx")
            assert bench.kpx is not None
            figures = measure_mode(bench.chain, "kpx", bench.kpx.pid, args, bench.server_pids)
            kept: dict[str, Any] = {k: figures[k] for k in KEPT}
            kept["rss"] = kpx_rss(bench.kpx.pid)
            kept["cpus"] = args.cpus
            runs["one" if workers == 1 else "many"].append(kept)
            shown = ", ".join(f"{k}={fmt(v)}" for k, v in kept.items() if isinstance(v, float))
            rss = kept["rss"]
            print(
                f"run {run + 1} --workers {workers}: {shown}, control RSS "
                f"{rss['control_mb']:.1f} MB"
                + "".join(f", worker {w:.1f} MB" for w in rss["workers_mb"]),
                flush=True,
            )
    return runs


def summarize(doc: dict[str, Any], runs: dict[str, list[dict[str, Any]]], workers: int) -> None:
    missed: list[str] = doc.setdefault("targets_missed", [])
    doc["runs"] = runs
    doc["ratio_runs"] = {}
    print(f"\n--workers {workers} / --workers 1, every run, then the median:")
    for key, what, op, limit in SCALING_TARGETS:
        ratios = scaling_ratios(runs, key)
        doc["ratio_runs"][key] = ratios
        print("  " + ratio_line(key, ratios, _median(ratios), op, limit))
        for run in misses(ratios, op, limit):
            missed.append(
                f"{what} {workers} workers / 1: {ratios[run - 1]:.2f}x in run {run} "
                f"(target {op} {limit}x)"
            )
    for label, runs_of in (("1", runs["one"]), (str(workers), runs["many"])):
        waits = [
            f"{r['conn_runq_wait_ms'] / 1000:.1f}/{r['bulk_runq_wait_ms'] / 1000:.1f}"
            for r in runs_of
        ]
        print(
            f"  --workers {label}: run-queue wait (s, conn/8-stream pass) per run "
            + " ".join(waits)
        )
    rss_missed = rss_misses(runs["many"], WORKER_RSS_MB)
    missed.extend(rss_missed)
    print(f"  each worker's RSS <= {WORKER_RSS_MB:g} MB: " + ("; ".join(rss_missed) or "met"))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    check_environment()
    doc: dict[str, Any] = {
        "benchmark": "proxy-workers",
        "quick": args.quick,
        "workers": args.workers,
        "cpus": args.cpus,
        "cores": len(cpu_list(args.cpus)),
        "load_cpus": args.load_cpus,
        "duration_s": args.duration,
        "runs_requested": args.runs,
        "conns": args.conns,
        # The worker counts of each run in the order they ran.
        "orders": [configurations(run, args.workers) for run in range(args.runs)],
    }
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmpname, Chain() as chain:
        bench = Bench(chain, Path(tmpname), args)
        args.kpx_workers = configurations(0, args.workers)[0]
        bench.start()
        print(
            f"kpx --workers 1 and --workers {args.workers} on CPUs {args.cpus}, load on "
            f"{args.load_cpus or 'the same CPUs'}; iperf3 -P1/-P8 and wrk -t1 -c{args.conns} "
            f"'Connection: close', {args.duration:g} s each; order swapped every run\n",
            flush=True,
        )
        runs = measure(bench, args)
        summarize(doc, runs, args.workers)
        bench.stop_proxies()
    missed = doc["targets_missed"]
    print(f"\ntargets missed in any run: {len(missed)}" + "".join(f"\n  {m}" for m in missed))
    if args.quick:
        print("  (--quick: short passes: the figures are a smoke test only)")
    if args.json:
        write_json(args.json, {**doc, "complete": True})


if __name__ == "__main__":
    main()
