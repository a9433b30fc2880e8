"""Every benchmark in one command, and a Markdown report with tables and PNG charts (issue 5).

    .venv/bin/python -m bench.report [--out bench/report] [--quick] [--only STEP ...]
    .venv/bin/python -m bench.report --render-only bench/report

Runs, one after the other, each as its own process with `--json` (root is needed for the proxy
benchmark's network namespaces; knot, dnsperf, haproxy, iperf3 and wrk must be installed):
  sync             bench.sync: kwatch initial sync of 10,000 Services / 100,000 endpoints
  dns              bench.dns: dnsd vs knot (qps, CPU per query, latency, RSS, propagation)
  dns-memory-N     bench.dns --memory-only at 1,000 / 3,000 / 10,000 Services (10 endpoints
                   per Service, a tenth of them headless): dnsd RSS once ready
  proxy            bench.proxy: kpx vs haproxy, the kernel's NAT and no proxy (throughput, CPU
                   per GB, connections/s, latency, idle connections), then programming latency
                   and kpx RSS at 10 / 1,000 / 3,000 / 10,000 Services
  proxy-workers    bench.proxy_workers: kpx --workers 2 against --workers 1 on the same
                   cores, interleaved (8-stream throughput, connections/s, what held them,
                   each worker's RSS)
  udp              bench.udp: kpx vs nginx stream and NAT (UDP)
  relist           bench.relist: peak RSS of dnsd and kpx during a forced 410 relist at
                   10,000 Services / 100,000 endpoints, against their steady RSS
  dns-overload     bench.dns_overload: cluster names timed while a flood of slow-path queries
                   (forwarded names to a silent upstream, EDNS, malformed packets) hits dnsd;
                   3 runs, knotd as the control, dnsd and knotd pinned apart from the loads
  dns-overload-in-process
                   the same with dnsd --no-forward-process (forwarding in its event loop)
  soak             bench.soak, only when named by --only (20 minutes): both daemons under
                   churn and chaos, then compared with the API; a full run keeps its last result
Progress: one line per line the benchmark prints, prefixed with [step n/N, name, elapsed], and a
line every 30 s while it is silent; its whole output also goes to logs/<step>.log.

Then it writes into `--out` (default bench/report/):
  machine.json     the machine it ran on (CPU, cores, RAM, kernel, Python, tool versions, date,
                   git commit), taken before the first step
  run.json         the steps: command, duration, exit status
  results/*.json   each benchmark's own --json output
  charts/*.png     qps and CPU per query; proxy throughput, CPU per GB and connections/s;
                   latency percentiles (DNS, proxy, programming); memory vs Services; sync;
                   UDP datagrams/s, CPU per datagram and latency
  report.md        the tables (ours, the peer measured in the same run, ratio, target, verdict)
                   and the charts

`--quick` passes each benchmark's own `--quick` (tiny sizes, short passes; about a minute in
all; the figures mean nothing). `--only dns proxy` runs just those steps (step names or
prefixes) and keeps the other results already in `--out`. `--render-only DIR` runs nothing: it
renders DIR/report.md and DIR/charts/ again from DIR's saved JSON. The full run takes about
20-25 minutes on 2 cores.

The parts: bench/report_run.py runs the steps, bench/report_checks.py judges the figures
against their targets, bench/report_render.py writes report.md (with the Markdown building
blocks of bench/report_md.py) and the charts; this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.report_checks import MET, NOT_MET, Check
from bench.report_format import duration
from bench.report_render import render
from bench.report_run import ROOT, plan, select, sitting

DEFAULT_OUT = ROOT / "bench" / "report"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: bench/report/")
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    parser.add_argument(
        "--render-only", type=Path, metavar="DIR", help="only render DIR's saved results"
    )
    args = parser.parse_args(argv)
    if args.render_only:
        path, checks = render(args.render_only)
        summary(path, checks)
        return 0
    steps = select(plan(args.quick), args.only)
    if not steps:
        parser.error(f"no step matches {args.only}")
    done = sitting(steps, args.out, quick=args.quick, only=bool(args.only))
    path, checks = render(args.out)
    print(f"\nall steps done in {duration(done.run['seconds'])}")
    summary(path, checks)
    return done.exit_code


def summary(path: Path, checks: list[Check]) -> None:
    met = sum(c.verdict == MET for c in checks)
    not_met = [c.what for c in checks if c.verdict == NOT_MET]
    print(f"report: {path} ({met} of {len(checks)} targets met)")
    for what in not_met:
        print(f"  not met: {what}")


if __name__ == "__main__":
    sys.exit(main())
