"""Running the benchmarks for the report: the plan of steps, each one a process with `--json`
whose output is echoed with a progress prefix and kept in logs/, the machine it ran on
(machine.json), and a sitting's record of every step (run.json)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.jsonout import read_json_object, write_json
from bench.report_format import Doc, duration

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 30.0

MEMORY_SCALES = (1_000, 3_000, 10_000)
QUICK_MEMORY_SCALES = (100, 300, 1_000)
PROGRAMMING_SCALES = (10, 1_000, 3_000, 10_000)
QUICK_PROGRAMMING_SCALES = (10, 100, 300)


# --- the steps -----------------------------------------------------------------------------


@dataclass
class Step:
    name: str  # results/<name>.json, logs/<name>.log
    title: str
    module_argv: list[str]  # after `python -m`
    estimate_s: float
    # Run only when named by --only (the 20-minute soak); a full sitting keeps its last result.
    optional: bool = False


def plan(quick: bool) -> list[Step]:
    q = ["--quick"] if quick else []
    steps = [
        Step(
            "sync",
            "kwatch initial sync" + (" (500 Services)" if quick else ", 10,000 Services"),
            ["bench.sync", *q],
            5 if quick else 40,
        ),
        Step(
            "dns",
            "DNS: dnsd vs knot, then propagation",
            ["bench.dns", *q],
            20 if quick else 330,
        ),
    ]
    for n in QUICK_MEMORY_SCALES if quick else MEMORY_SCALES:
        steps.append(
            Step(
                f"dns-memory-{n}",
                f"dnsd RSS + forward child at {n:,} Services",
                [
                    "bench.dns",
                    "--memory-only",
                    "--services",
                    str(n),
                    "--headless",
                    str(n // 10),
                    "--endpoints",
                    str(n * 10),
                ],
                4 if quick else 8 + n / 400,
            )
        )
    scales = QUICK_PROGRAMMING_SCALES if quick else PROGRAMMING_SCALES
    steps.append(
        Step(
            "proxy",
            "proxy: kpx vs haproxy and NAT, then programming latency",
            ["bench.proxy", *q, "--services", *(str(n) for n in scales)],
            25 if quick else 600,
        )
    )
    steps.append(
        Step(
            "proxy-workers",
            "kpx --workers 2 against --workers 1 on the same cores",
            ["bench.proxy_workers", *q],
            15 if quick else 200,
        )
    )
    steps.append(
        Step(
            "udp",
            "UDP: kpx vs nginx stream and NAT, sessions, re-targeting",
            ["bench.udp", *q],
            25 if quick else 330,
        )
    )
    steps.append(
        Step(
            "relist",
            "peak RSS of dnsd and kpx during a forced 410 relist",
            ["bench.relist", *q],
            15 if quick else 45,
        )
    )
    # Three runs, each judged; knotd answers the same probe under the same load (the peer);
    # dnsd and knotd pinned to one core, the loads to the other, as on a node whose flood
    # comes from other machines. Then the same with forwarding in dnsd's own event loop
    # (--no-forward-process), as dnsd forwarded before its child became the default.
    overload = [*q, "--control-knot", "--server-cpus", "0", "--load-cpus", "1"]
    if not quick:
        overload += ["--runs", "3", "--duration", "15"]
    steps.append(
        Step(
            "dns-overload",
            "dnsd under a flood of slow-path queries, cluster names timed",
            ["bench.dns_overload", *overload],
            10 if quick else 90,
        )
    )
    steps.append(
        Step(
            "dns-overload-in-process",
            "the same with --no-forward-process",
            ["bench.dns_overload", *overload, "--dnsd-arg=--no-forward-process"],
            10 if quick else 90,
        )
    )
    steps.append(
        Step(
            "soak",
            "convergence soak: both daemons under churn and chaos",
            ["bench.soak", *q],
            70 if quick else 1_380,
            optional=True,
        )
    )
    return steps


def _reader(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_step(step: Step, index: int, total: int, out: Path, started: float) -> dict[str, Any]:
    """Run one benchmark, echoing its output with a progress prefix; returns its record."""
    json_path = out / "results" / f"{step.name}.json"
    log_path = out / "logs" / f"{step.name}.log"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)
    argv = [sys.executable, "-u", "-m", *step.module_argv, "--json", str(json_path)]
    shown = [".venv/bin/python", "-m", *step.module_argv, "--json", f"results/{step.name}.json"]
    width = max(60, shutil.get_terminal_size((140, 24)).columns)
    print(
        f"\n[{index}/{total}] {step.title}: started {time.strftime('%H:%M:%S')}, "
        f"about {duration(step.estimate_s)} expected; {duration(time.monotonic() - started)} "
        "elapsed in all",
        flush=True,
    )
    print(f"  $ {shlex.join(shown)}", flush=True)
    t0 = time.monotonic()
    status: str
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
        try:
            while True:
                try:
                    line = lines.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    print(
                        f"  [{index}/{total} {step.name} {duration(time.monotonic() - t0)}] "
                        f"... still running ({duration(time.monotonic() - started)} in all)",
                        flush=True,
                    )
                    continue
                if line is None:
                    break
                log.write(line)
                log.flush()
                prefix = f"  [{index}/{total} {step.name} {duration(time.monotonic() - t0)}] "
                text = prefix + line.rstrip()
                print(text if len(text) <= width else text[: width - 3] + "...", flush=True)
            code = proc.wait()
            status = "ok" if code == 0 else f"failed (exit {code})"
        except KeyboardInterrupt:
            _terminate(proc)
            code = proc.returncode if proc.returncode is not None else -1
            status = "interrupted"
    seconds = time.monotonic() - t0
    print(f"[{index}/{total}] {step.name}: {status} in {duration(seconds)}", flush=True)
    record = {
        "name": step.name,
        "title": step.title,
        "command": shlex.join(shown),
        "seconds": seconds,
        "exit_code": code,
        "status": status,
        "log": f"logs/{step.name}.log",
        "json": f"results/{step.name}.json" if json_path.exists() else None,
    }
    if status == "interrupted":
        raise Interrupted(record)
    return record


class Interrupted(Exception):
    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["name"])
        self.record = record


def _terminate(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (the benchmarks clean up: namespaces, servers), then SIGKILL after 60 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- the machine ---------------------------------------------------------------------------


def _cmd(*argv: str, pattern: str | None = None) -> str | None:
    """First line of a command's output (or the first line matching `pattern`)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        line = line.strip()
        if line and (pattern is None or re.search(pattern, line)):
            return line
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def collect_machine(out: Path) -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.M)
    os_name = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read("/etc/os-release"), re.M)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    packages = {}
    for name in ("kpx-dnsd", "uvloop", "aiohttp", "orjson", "dnslib", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    exclude = []
    with contextlib.suppress(ValueError):
        exclude = [f":(exclude){out.resolve().relative_to(ROOT)}"]
    dirty = _git("status", "--porcelain", "--", ".", *exclude)
    now = dt.datetime.now(dt.UTC)
    return {
        "date": now.isoformat(timespec="seconds"),
        "cpu_model": model.group(1).strip() if model else platform.processor() or "?",
        "logical_cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "ram_gib": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "os": os_name.group(1) if os_name else platform.system(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "tools": {
            "knot": _cmd("knotd", "-V"),
            "dnsperf": _cmd("dnsperf", "-h", pattern=r"^Version"),
            "haproxy": _cmd("haproxy", "-v"),
            "iperf3": _cmd("iperf3", "--version"),
            "wrk": _cmd("wrk", "-v"),
            "nft": _cmd("nft", "--version"),
        },
        "python_packages": packages,
        "git": {
            "commit": _git("rev-parse", "HEAD"),
            "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "subject": _git("log", "-1", "--format=%s"),
            "commit_date": _git("log", "-1", "--format=%cI"),
            "uncommitted_changes": bool(dirty),
        },
    }


def _git(*argv: str) -> str | None:
    try:
        out = subprocess.run(["git", *argv], capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def stamp(machine: Doc) -> Doc:
    """When and from which commit a step ran: the date, commit and dirty flag of `machine`."""
    git = machine.get("git") or {}
    return {
        "date": machine.get("date"),
        "commit": git.get("commit"),
        "uncommitted_changes": bool(git.get("uncommitted_changes")),
    }


# --- a sitting: the chosen steps, one after the other ------------------------------------------


@dataclass
class Sitting:
    """What one run of the chosen steps did: run.json's content and how it ended."""

    run: Doc  # as written to run.json
    records: list[Doc]  # the steps run in this sitting
    interrupted: bool

    @property
    def exit_code(self) -> int:
        """130 when interrupted, 1 when a step failed, else 0."""
        if self.interrupted:
            return 130
        return 0 if all(rec["status"] == "ok" for rec in self.records) else 1


def select(steps: list[Step], only: list[str] | None) -> list[Step]:
    """The steps named by `only` (names or prefixes); without `only`, every step but the
    optional ones."""
    if not only:
        return [s for s in steps if not s.optional]
    return [s for s in steps if any(s.name.startswith(p) for p in only)]


def earlier_steps(out: Path, keep: set[str] | None) -> list[Doc]:
    """The steps of `out`'s earlier run that this sitting keeps, each stamped with the commit
    and date it ran at: those named in `keep`, every one when `keep` is None (an `--only`
    sitting). The results of the steps not kept are removed, so nothing stale gets rendered;
    a step whose results are gone (a step renamed or dropped since) is not kept either."""
    previous = read_json_object(out / "run.json")
    earlier = read_json_object(out / "machine.json")
    kept: list[Doc] = [
        s
        for s in previous.get("steps") or []
        if (keep is None or s.get("name") in keep)
        and (not isinstance(s.get("json"), str) or (out / s["json"]).exists())
    ]
    for kept_step in kept:
        kept_step.setdefault("measured", stamp(earlier))
    if keep is not None:
        for stale in (out / "results").glob("*.json"):
            if stale.stem not in keep:
                stale.unlink()
    return kept


def announce(steps: list[Step], out: Path, quick: bool, machine: Doc) -> None:
    print(
        f"bench.report: {len(steps)} steps into {out}/ "
        f"({'quick' if quick else 'full'}; about "
        f"{duration(sum(s.estimate_s for s in steps))} expected) on {machine['cpus_usable']} "
        f"cores of {machine['cpu_model']}, load {machine['load_average_at_start']}",
        flush=True,
    )
    for i, step in enumerate(steps, 1):
        print(f"  {i}. {step.name}: {step.title}")


def run_steps(steps: list[Step], out: Path, machine: Doc) -> tuple[list[Doc], bool]:
    """Each step's record, stamped with when it started; stops at an interrupt (then True)."""
    started = time.monotonic()
    records: list[Doc] = []
    for i, step in enumerate(steps, 1):
        when = {**stamp(machine), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        try:
            records.append({**run_step(step, i, len(steps), out, started), "measured": when})
        except Interrupted as stop:
            records.append({**stop.record, "measured": when})
            return records, True
    return records, False


def sitting(steps: list[Step], out: Path, *, quick: bool, only: bool) -> Sitting:
    """Run `steps` into `out`: machine.json first, each step's results and log, run.json last.
    An `only` sitting keeps the earlier run's other steps; a full one keeps only the optional
    steps it did not run (with the results they left)."""
    out.mkdir(parents=True, exist_ok=True)
    running = {s.name for s in steps}
    optional = {s.name for s in plan(quick) if s.optional} - running
    kept = earlier_steps(out, None if only else optional)
    machine = collect_machine(out)
    write_json(out / "machine.json", machine)
    announce(steps, out, quick, machine)
    started = time.monotonic()
    records, interrupted = run_steps(steps, out, machine)
    names = {rec["name"] for rec in records}
    shown_out = str(out)
    with contextlib.suppress(ValueError):
        shown_out = str(out.resolve().relative_to(ROOT))
    run = {
        "quick": quick,
        "out": shown_out,
        "started": machine["date"],
        "seconds": time.monotonic() - started,
        "steps": [s for s in kept if s.get("name") not in names] + records,
    }
    write_json(out / "run.json", run)
    return Sitting(run, records, interrupted)
