"""Peak memory of dnsd and kpx during a forced 410 relist (issue 14 item 8).

    .venv/bin/python -m bench.relist [--services 10000] [--endpoints 100000]
        [--objects realistic|minimal] [--quick] [--json PATH]

After a compaction, every reflector's watch gets 410 Expired and lists everything again; with
CoreDNS users have seen memory double past their limits then (kubernetes/kubernetes#139117).
This benchmark builds bench/dns.py's cluster (10,000 Services, 100,000 endpoints, objects
shaped as a real cluster's by default), serves it from the fake API server, and runs dnsd
(`--kubeconfig`) and kpx (`--mode nftables --kubeconfig`) on it, all inside one network
namespace it creates (`kpxb-<hex>-relist`: kpx's nftables table and every socket stay there).
Once both are ready and settled, for each daemon:
- steady RSS: VmRSS after the settle time;
- the peak is reset (`echo 5 > /proc/PID/clear_refs` sets VmHWM to the current RSS);
- a relist is forced: every watch fails with 503 and is dropped; meanwhile 1 % of the
  EndpointSlices change an address and 0.2 % of the Services (with their slices) are deleted;
  then the API server compacts its history, so the next watch gets 410 and both relist;
- once both daemons counted a relist of services and endpointslices
  (`kwatch_relists_total`) and settled again: peak RSS = VmHWM, and the RSS after.
Prints steady, peak, after and peak/steady per daemon, and flags a ratio above 1.2 (the
issue's target). Root is needed (network namespace, kpx's nftables). `--quick`: 300 Services,
a smoke test of the harness; its figures mean nothing. Memory figures are not disturbed by
other CPU load, but the settle times assume a machine that is not starved.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.dns import generate
from bench.jsonout import write_json
from bench.realistic import dress
from tests.apiserver import FakeApiServer

ROOT = Path(__file__).resolve().parent.parent
DNSD = str(ROOT / ".venv" / "bin" / "dnsd")
KPX = str(ROOT / ".venv" / "bin" / "kpx")
TARGET_RATIO = 1.2
CLONE_NEWNET = 0x40000000
DNSD_HTTP = "127.0.0.1:8081"
KPX_METRICS = "127.0.0.1:10249"

_libc = ctypes.CDLL(None, use_errno=True)


class Namespace:
    """One network namespace, its processes killed and itself deleted by close()."""

    def __init__(self, role: str) -> None:
        self.name = f"kpxb-{secrets.token_hex(3)}-{role}"
        self.processes: list[subprocess.Popen[Any]] = []
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, timeout=30)

    def popen(self, *argv: str, log: Path) -> subprocess.Popen[Any]:
        """`ip netns exec` execs: the pid is the program's own."""
        with open(log, "w") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in the namespace for the block; threads and sockets created
        meanwhile stay in it."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=30)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- /proc ---------------------------------------------------------------------------------


def status_mb(pid: int, field: str) -> float:
    """VmRSS or VmHWM of a process, in MB (10^6 bytes, as bench/procstat.py)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no {field} for pid {pid}")


def reset_peak(pid: int) -> None:
    """VmHWM := the current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def settle(pids: list[int], seconds: float, limit: float = 60) -> None:
    """Wait `seconds`, then until no RSS moved by more than 1 % over one more second."""
    time.sleep(seconds)
    deadline = time.monotonic() + limit
    before = [status_mb(p, "VmRSS") for p in pids]
    while time.monotonic() < deadline:
        time.sleep(1)
        now = [status_mb(p, "VmRSS") for p in pids]
        if all(abs(a - b) <= 0.01 * b for a, b in zip(now, before, strict=True)):
            return
        before = now


# --- the daemons ---------------------------------------------------------------------------


def http_get(ns: Namespace, url: str) -> tuple[int, str]:
    with ns.entered():
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status), resp.read().decode()
        except OSError:
            return 0, ""


def wait_for(what: str, check: Callable[[], bool], procs: list[Any], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{what}: a daemon exited ({proc.returncode}); see its log")
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise SystemExit(f"{what}: not done after {timeout:.0f} s")


def relists(ns: Namespace, url: str) -> dict[str, float]:
    """kwatch_relists_total per resource (every reason), from a /metrics page."""
    _, text = http_get(ns, url)
    counts: dict[str, float] = {}
    for m in re.finditer(r"^kwatch_relists_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        resource = re.search(r'resource="([^"]+)"', m.group(1))
        if resource:
            counts[resource.group(1)] = counts.get(resource.group(1), 0) + float(m.group(2))
    return counts


# --- the relist ----------------------------------------------------------------------------


def force_relist(server: FakeApiServer, services: list[tuple[str, str]], changes: int) -> None:
    """Cut every watch off, change some objects while nobody watches, compact history."""
    server.fail_next(10**9, status=503, verb="watch")
    server.drop_watches()
    for ns, name in services[:changes]:
        eps = server.get("endpointslices", ns, f"{name}-abcde")
        if eps and eps.get("endpoints"):
            first = eps["endpoints"][0]
            first["addresses"] = ["10.250." + ".".join(first["addresses"][0].split(".")[2:])]
            server.update(eps)
    for ns, name in services[changes : changes + max(1, changes // 5)]:
        server.delete("services", ns, name)
        with contextlib.suppress(KeyError):
            server.delete("endpointslices", ns, f"{name}-abcde")
    server.compact()
    server.clear_faults()


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cluster = generate(args.services, args.services // 10, 5, args.endpoints)
    if args.objects == "realistic":
        dress(cluster.objects)
    clusterip = [
        (o["metadata"]["namespace"], o["metadata"]["name"])
        for o in cluster.objects
        if o["kind"] == "Service" and o["spec"].get("clusterIP") != "None"
    ]
    ns = Namespace("relist")
    print(f"network namespace {ns.name}", flush=True)
    server = FakeApiServer(history_limit=len(cluster.objects) + 10_000, bookmark_interval=5.0)
    try:
        server.load(cluster.objects)
        objects = len(cluster.objects)
        del cluster
        with ns.entered():
            server.start()  # its thread and listener live in the namespace
        kubeconfig = server.write_kubeconfig(tmp / "kubeconfig.yaml")
        daemons = {
            "dnsd": ns.popen(
                DNSD,
                "--kubeconfig",
                str(kubeconfig),
                "--listen",
                "127.0.0.1:53",
                "--http-listen",
                DNSD_HTTP,
                "--upstream",
                "127.0.0.1:5399",  # nothing listens there
                "--log-format",
                "json",
                "--log-level",
                "warning",
                log=tmp / "dnsd.log",
            ),
            "kpx": ns.popen(
                KPX,
                "--mode",
                "nftables",
                "--kubeconfig",
                str(kubeconfig),
                "--node-name",
                "node",
                "--metrics-bind-address",
                KPX_METRICS,
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--log-format",
                "json",
                "--log-level",
                "warning",
                log=tmp / "kpx.log",
            ),
        }
        metrics = {"dnsd": f"http://{DNSD_HTTP}/metrics", "kpx": f"http://{KPX_METRICS}/metrics"}
        ready = {"dnsd": f"http://{DNSD_HTTP}/readyz", "kpx": f"http://{KPX_METRICS}/readyz"}
        procs = list(daemons.values())
        pids = [p.pid for p in procs]
        wait_for(
            "ready",
            lambda: all(http_get(ns, url)[0] == 200 for url in ready.values()),
            procs,
            args.timeout,
        )
        for url in metrics.values():
            http_get(ns, url)  # a daemon is scraped: the first scrape's allocations are steady
        settle(pids, args.settle)
        steady = {name: status_mb(p.pid, "VmRSS") for name, p in daemons.items()}
        for pid in pids:
            reset_peak(pid)
        changes = max(1, len(clusterip) // 100)
        force_relist(server, clusterip, changes)
        wait_for(
            "relist",
            lambda: all(
                min(relists(ns, url).get(r, 0) for r in ("services", "endpointslices")) >= 1
                for url in metrics.values()
            ),
            procs,
            args.timeout,
        )
        settle(pids, args.settle)
        result: dict[str, Any] = {
            "services": args.services,
            "endpoints": args.endpoints,
            "objects": objects,
            "changed_slices": changes,
        }
        for name, proc in daemons.items():
            peak = status_mb(proc.pid, "VmHWM")
            result[name] = {
                "steady_mb": steady[name],
                "peak_mb": peak,
                "after_mb": status_mb(proc.pid, "VmRSS"),
                "ratio": peak / steady[name],
            }
        return result
    finally:
        ns.close()
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=100_000)
    parser.add_argument("--objects", choices=["realistic", "minimal"], default="realistic")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before each reading")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="300 Services, a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args()
    if args.quick:
        args.services, args.endpoints, args.settle = 300, 3_000, 1.0
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        raise SystemExit("needs root, `ip` and `nft` (a network namespace and kpx's nftables)")
    with tempfile.TemporaryDirectory(prefix="bench-relist-") as tmpname:
        result = measure(args, Path(tmpname))
    print(
        f"cluster: {args.services:,} Services, {args.endpoints:,} endpoints, {args.objects} "
        f"objects; forced 410 relist with {result['changed_slices']} EndpointSlices changed"
    )
    missed = []
    for name in ("dnsd", "kpx"):
        r = result[name]
        verdict = "ok" if r["ratio"] <= TARGET_RATIO else f"MISS (> {TARGET_RATIO}x)"
        if r["ratio"] > TARGET_RATIO:
            missed.append(name)
        print(
            f"  {name}: steady {r['steady_mb']:,.1f} MB, peak during the relist "
            f"{r['peak_mb']:,.1f} MB ({r['ratio']:.2f}x steady), after {r['after_mb']:,.1f} MB"
            f"  {verdict}"
        )
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "relist",
                "quick": args.quick,
                "args": vars(args),
                **result,
                "target_ratio": TARGET_RATIO,
                "missed": missed,
                "complete": True,
            },
        )


if __name__ == "__main__":
    main()
