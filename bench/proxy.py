"""kpx against haproxy, the kernel's NAT and no proxy at all, through one netns chain (issue 4).

    .venv/bin/python -m bench.proxy [--runs 3] [--duration 8] [--idle 5000] [--samples 50]
        [--services 10 10000] [--cpus 0] [--modes M ...] [--passes bulk conn req]
        [--bulk-slices 4] [--no-idle] [--no-programming] [--conn-only] [--quick] [--json PATH]

Topology (bench/netns_topology.py): client ns -- node ns -- server ns over veths, all addresses
in 10.233.0.0/16 inside the namespaces; the node routes. The server ns runs iperf3 -s, haproxy
as a tiny HTTP origin (`http-request return` "ok", one thread) and a whoami server. Four paths
from the client, measured in the same run (mode order rotated per run):
  direct   client -> 10.233.2.2 (routed by the node, no NAT)
  nat      client -> 10.96.0.11, an nftables `dnat` rule in the node's prerouting (what
           kube-proxy's nftables mode does per packet)
  haproxy  client -> 10.233.1.1, haproxy `mode tcp` in the node ns as its users run it for
           bulk traffic: `option splice-request`, `option splice-response` and 1 MiB pipes
           (`tune.pipesize`; kpx's pipes are 1 MiB too), one thread per CPU of `--cpus`
           (`--haproxy-threads N`, `--no-haproxy-splice` to change that)
  kpx      client -> 10.96.0.10, `kpx --mode nftables --manifests DIR` in the node ns, with
           `--source-address-mode node` (the server sees the node's address)
  kpx-tp   the same with `--source-address-mode transparent` (nftables tproxy, the server sees
           the client's address): one kpx owns the table at a time, so kpx is restarted in the
           other mode whenever the pass switches between the two (not timed)
Both proxies run pinned (taskset) to the same CPUs, `--cpus` (default 0: one core, as in
issue 12); the load generators (wrk, iperf3), the origin and the whoami server to the other
CPUs, when there are any, so they do not take the proxies' core.
Each path gets:
- bulk throughput, iperf3 -P 1 and -P 8 (`--duration` s; Gbit/s received); haproxy's and
  kpx's 8-stream passes are taken together, interleaved in `--bulk-slices` alternating slices
  (A B B A ..., the first swapped every run) so that whatever else the shared machine runs meets
  both alike (one 8 s pass each met it unevenly: 0.83x in one run of 2026-12-04, with kpx's
  CPU halved); the other paths keep one pass;
- proxy CPU seconds per GB moved in the 8-stream pass (utime+stime of the proxy process from
  /proc / bytes) and the whole machine's CPU-s per GB (/proc/stat: includes iperf3 and the
  kernel; shared machine, noisy);
- new connections/s with a small request each: wrk -t1 -c32 (`--conns`) with
  `Connection: close` (every request a new TCP connection through the path), and wrk's
  p50/p99 latency in that pass, and the proxy's user and kernel CPU per connection in it
  (bench/conncost.py counts its syscalls and instructions per connection);
- small-request latency: wrk -t1 -c1 on one keep-alive connection, p50/p99; for kpx, what held
  its event loop in that pass (kpx_gc_pause_seconds, kpx_event_loop_lag_seconds);
- connections per second of the proxy's own CPU (`conn_per_cpu_s`, requests / its user+kernel
  time in the pass): what a core of its own would serve, which other work on the shared core
  barely moves (conn_per_s does; the target is conn_per_s's);
- in both wrk passes, how long the proxy waited for its CPU while runnable (run-queue wait,
  /proc/PID/task/*/schedstat): on a shared machine a p99 spike that comes with a long wait is
  another process's doing;
- in the 8-stream pass, what held it: the slowest stream's and the slowest second's Gbit/s, the
  proxy's run-queue wait, and the share of the proxies' and the load's cores that was idle,
  softirq or stolen by the hypervisor (/proc/stat per CPU);
- in the 8-stream and conn passes, the CPU seconds of the proxy and of the load (wrk or iperf3
  and the origin or iperf3 -s): on shared cores (bench/proxy_workers.py) what took them;
- proxy RSS after the passes.
Ratios kpx/haproxy are computed per run and every run's are printed, then the median; a target
missed in any run (or, for programming latency, at any Service count) is printed as MISSED.
Then, for haproxy and kpx: `--idle` connections (default 5,000) opened through the proxy, each
with one keep-alive request answered end to end, then held idle: RSS delta per connection.
Then network programming latency, kpx on the fake API server (`python -m tests.apiserver` in
the node ns, `kpx --kubeconfig`) holding `--services` Services (default 10 and 10,000; one of
them the probe Service): `--samples` times, PUT its EndpointSlice moving the endpoint between
10.233.2.2 and 10.233.2.3 (whoami servers that answer "A" / "B") and connect from the client
about every millisecond until the new endpoint answers; p50/p99 of write-sent -> first
connection served by it. Then `--samples` new Services (slice first, untimed; then the timed
Service POST) until a connection to the new ClusterIP is served. kpx RSS at that count too.

`--quick`: 1 s wrk passes, 300 MB iperf3 transfers instead of timed ones, 200 idle connections,
3 samples of each kind at 10 and 50 Services (unless `--services` is given): a smoke test of the
harness (about 20 s); its figures mean nothing.
`--modes`, `--passes`, `--no-idle` and `--no-programming` measure a part only; `--conn-only` is
the connection-rate part of issue 12: haproxy and kpx, the conn and req passes.
The start checks and prints that haproxy and kpx share the CPUs (their affinity, read back),
and after each haproxy bulk pass the pipes haproxy holds (`haproxy_pipes`: splice at work).
`--json PATH` also writes what it printed (per-run figures, medians, ratios, every run's ratios
as `ratio_runs`, idle connections, programming latency and kpx RSS per Service count, and
`targets_missed`: one line per target missed in any run or at any Service count) to PATH, for
bench/report.py.
Figures, never assertions: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.apiclient import Api, start_fake_apiserver
from bench.jsonout import write_json
from bench.netns_topology import (
    CLIENT_IP,
    NODE_CLIENT_SIDE_IP,
    SERVER_IP,
    SERVER_IP_2,
    Chain,
    Ns,
    netns_unavailable,
)
from bench.procstat import (
    CLK_TCK,
    children_of,
    cpu_seconds,
    process_tree,
    rss_mb,
    user_kernel_seconds,
)

ROOT = Path(__file__).resolve().parent.parent
# kpx from this checkout (cwd ROOT), run by the interpreter running the benchmark.
KPX = [sys.executable, "-m", "kpx.main"]

KPX_VIP = "10.96.0.10"
NAT_VIP = "10.96.0.11"
PROBE_VIP = "10.96.200.1"
HTTP_PORT, IPERF_PORT, WHOAMI_PORT = 8080, 5201, 9000
HAPROXY_HTTP, HAPROXY_IPERF = 18080, 15201
KPX_METRICS = "127.0.0.1:10249"

MODES = ("direct", "nat", "haproxy", "kpx", "kpx-tp")
# kpx's --source-address-mode per kpx pass.
KPX_SOURCE_MODES = {"kpx": "node", "kpx-tp": "transparent"}
TARGETS = {
    "direct": {"http": (SERVER_IP, HTTP_PORT), "iperf": (SERVER_IP, IPERF_PORT)},
    "nat": {"http": (NAT_VIP, 80), "iperf": (NAT_VIP, IPERF_PORT)},
    "haproxy": {
        "http": (NODE_CLIENT_SIDE_IP, HAPROXY_HTTP),
        "iperf": (NODE_CLIENT_SIDE_IP, HAPROXY_IPERF),
    },
    "kpx": {"http": (KPX_VIP, 80), "iperf": (KPX_VIP, IPERF_PORT)},
    "kpx-tp": {"http": (KPX_VIP, 80), "iperf": (KPX_VIP, IPERF_PORT)},
}

ORIGIN_CFG = f"""global
    maxconn 8000
    nbthread 1
defaults
    mode http
    maxconn 8000
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout http-keep-alive 1h
frontend web
    bind {SERVER_IP}:{HTTP_PORT}
    http-request return status 200 content-type text/plain string ok
"""

WHOAMI = r"""
import socket, sys, threading
def serve(ip, name):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, int(sys.argv[3])))
    srv.listen(1024)
    while True:
        conn, _ = srv.accept()
        try:
            conn.sendall(name)
        except OSError:
            pass
        conn.close()
threads = [threading.Thread(target=serve, args=(sys.argv[1], b"A\n"), daemon=True),
           threading.Thread(target=serve, args=(sys.argv[2], b"B\n"), daemon=True)]
for t in threads:
    t.start()
print("ready", flush=True)
threads[0].join()
"""


def haproxy_cfg(threads: int | None, splice: bool) -> str:
    nbthread = f"    nbthread {threads}\n" if threads else ""
    # Splice both ways with 1 MiB pipes, what haproxy's users configure for bulk TCP.
    splice_opt = "    option splice-request\n    option splice-response\n" if splice else ""
    pipesize = "    tune.pipesize 1048576\n" if splice else ""
    # maxconn 7000: 2 fds per connection plus splice pipes stay under 20,000 open files.
    return f"""global
    maxconn 7000
{nbthread}{pipesize}defaults
    mode tcp
{splice_opt}    maxconn 7000
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend http
    bind {NODE_CLIENT_SIDE_IP}:{HAPROXY_HTTP}
    default_backend http
backend http
    server s1 {SERVER_IP}:{HTTP_PORT}
frontend iperf
    bind {NODE_CLIENT_SIDE_IP}:{HAPROXY_IPERF}
    default_backend iperf
backend iperf
    server s1 {SERVER_IP}:{IPERF_PORT}
"""


NAT_RULES = f"""table ip bench_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {NAT_VIP} tcp dport 80 dnat to {SERVER_IP}:{HTTP_PORT}
        ip daddr {NAT_VIP} tcp dport {IPERF_PORT} dnat to {SERVER_IP}:{IPERF_PORT}
    }}
}}
"""


# --- objects for kpx -----------------------------------------------------------------------


def service(name: str, ip: str, ports: list[tuple[str, int, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [
                {"name": n, "protocol": "TCP", "port": p, "targetPort": t} for n, p, t in ports
            ],
        },
    }


def endpoint_slice(svc: str, ips: list[str], ports: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-x1",
            "namespace": "bench",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": n, "protocol": "TCP", "port": p} for n, p in ports],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def bench_objects() -> list[dict[str, Any]]:
    return [
        service("bench", KPX_VIP, [("http", 80, HTTP_PORT), ("iperf", IPERF_PORT, IPERF_PORT)]),
        endpoint_slice("bench", [SERVER_IP], [("http", HTTP_PORT), ("iperf", IPERF_PORT)]),
    ]


def programming_objects(services: int) -> list[dict[str, Any]]:
    """The probe Service plus `services - 1` others whose endpoints are never dialled."""
    objs = [
        service("probe", PROBE_VIP, [("who", WHOAMI_PORT, WHOAMI_PORT)]),
        endpoint_slice("probe", [SERVER_IP], [("who", WHOAMI_PORT)]),
    ]
    for i in range(1, services):
        name = f"svc{i}"
        objs.append(service(name, f"10.97.{i // 250}.{i % 250 + 1}", [("http", 80, 8080)]))
        objs.append(endpoint_slice(name, [f"10.233.3.{i % 250 + 1}"], [("http", 8080)]))
    return objs


# --- processes -----------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_until(what: str, check: Any, proc: subprocess.Popen[Any] | None, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}) before it was ready")
        if check():
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s")


def connects(ns: Ns, ip: str, port: int) -> bool:
    s = ns.socket()
    s.settimeout(0.5)
    try:
        s.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def whoami(client: Ns, ip: str, port: int, timeout: float = 0.5) -> str:
    s = client.socket()
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return s.recv(16).decode(errors="replace").strip()
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "error"
    finally:
        s.close()


def http_ok_in(ns: Ns, url: str) -> bool:
    with ns.entered():
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def pinned(cpus: str | None) -> list[str]:
    """The argv prefix that runs a program on `cpus` only (nothing when None)."""
    return ["taskset", "-c", cpus] if cpus else []


def start_kpx(
    chain: Chain,
    source: list[str],
    tmp: Path,
    label: str,
    timeout: float,
    source_address_mode: str = "node",
    cpus: str | None = None,
) -> subprocess.Popen[Any]:
    log = open(tmp / f"{label}.log", "w")
    proc = chain.node.popen(
        *pinned(cpus),
        *KPX,
        "--mode",
        "nftables",
        "--source-address-mode",
        source_address_mode,
        *source,
        "--node-name",
        "node",
        "--metrics-bind-address",
        KPX_METRICS,
        "--healthz-bind-address",
        "127.0.0.1:10256",
        "--drain-timeout",
        "2",
        "--log-format",
        "json",
        "--log-level",
        "warning",
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    wait_until(
        f"kpx ({label}, log {tmp / (label + '.log')})",
        lambda: http_ok_in(chain.node, f"http://{KPX_METRICS}/readyz"),
        proc,
        timeout,
    )
    return proc


# --- measurements --------------------------------------------------------------------------


def machine_cpu_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: everything but idle and iowait
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def iperf(
    chain: Chain, mode: str, streams: int, args: argparse.Namespace, share: float = 1.0
) -> dict[str, float]:
    """iperf3 -P `streams` through `mode`'s path for `share` of a pass (`--duration` s, or
    `--bulk-mb` MB)."""
    ip, port = TARGETS[mode]["iperf"]
    amount = (
        ["-n", f"{max(1, round(args.bulk_mb * share))}M"]
        if args.bulk_mb
        else ["-t", f"{args.duration * share:g}"]
    )
    argv = ["iperf3", "-c", ip, "-p", str(port), "-P", str(streams), "-J", *amount]
    argv = pinned(args.load_cpus) + argv
    for attempt in range(3):  # a server still busy with the previous test refuses briefly
        out = subprocess.run(
            ["ip", "netns", "exec", chain.client.name, *argv],
            capture_output=True,
            text=True,
            timeout=args.duration + 60,
        )
        try:
            report = json.loads(out.stdout)
        except ValueError:
            report = {"error": out.stderr.strip() or out.stdout[-300:]}
        if "error" not in report:
            end = report["end"]
            received = end["sum_received"]
            return {
                "gbps": received["bits_per_second"] / 1e9,
                "bytes": float(received["bytes"]),
                "seconds": float(received["seconds"]),
                **stream_spread(report),
            }
        if attempt < 2:
            time.sleep(1)
    raise RuntimeError(f"iperf3 {mode} -P {streams}: {report['error']}")


def stream_spread(report: dict[str, Any]) -> dict[str, float]:
    """How evenly an iperf3 test moved its bytes: the slowest stream's Gbit/s (received) and
    the slowest whole second's (all streams; iperf3's 1 s intervals, a short last one left
    out). A stream that stalls shows in the first, a pause of the whole path in the second."""
    streams = [
        s["receiver"]["bits_per_second"] / 1e9
        for s in report["end"].get("streams") or []
        if "receiver" in s
    ]
    seconds = [
        i["sum"]["bits_per_second"] / 1e9
        for i in report.get("intervals") or []
        if i["sum"]["seconds"] >= 0.9
    ]
    return {
        "slowest_stream_gbps": min(streams, default=float("nan")),
        "slowest_second_gbps": min(seconds, default=float("nan")),
    }


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_ms(text: str, pct: str) -> float:
    m = re.search(rf"^\s+{pct}%\s+([0-9.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(
    chain: Chain, mode: str, conns: int, close: bool, seconds: int, cpus: str | None = None
) -> dict[str, float]:
    ip, port = TARGETS[mode]["http"]
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    argv = pinned(cpus) + argv
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(
        ["ip", "netns", "exec", chain.client.name, *argv, f"http://{ip}:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk {mode}: {out.stderr.strip()[-300:]}")
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "rps": float(rps.group(1)) if rps else float("nan"),
        "requests": float(total.group(1)) if total else float("nan"),
        "p50_ms": _wrk_ms(text, "50"),
        "p99_ms": _wrk_ms(text, "99"),
        "errors": float(
            (sum(int(x) for x in errors.groups()) if errors else 0)
            + (int(non2xx.group(1)) if non2xx else 0)
        ),
    }


def measure_mode(
    chain: Chain,
    mode: str,
    proxy_pid: int | None,
    args: argparse.Namespace,
    server_pids: list[int] | None = None,
    eight: dict[str, float] | None = None,
) -> dict[str, float]:
    """Every figure of one path in one run; the passes left out (`--passes`) are NaN.
    `server_pids`: the origin's and iperf3 server's, whose CPU counts as the load's; `eight`:
    the 8-stream figures when measured already (`paired_eight_streams`)."""
    figures = dict.fromkeys(FIGURES, float("nan"))
    # The proxy's process and its children (kpx --workers N: the workers do the proxying).
    pids = process_tree(proxy_pid) if proxy_pid else []
    load = LoadMeter(server_pids or [])
    if "bulk" in args.passes:
        figures.update(bulk_pass(chain, mode, pids, args, load, eight))
    if "conn" in args.passes:
        figures.update(conn_pass(chain, mode, pids, args, load))
    if "req" in args.passes:
        figures.update(req_pass(chain, mode, pids, args))
    if proxy_pid:
        figures["proxy_rss_mb"] = rss_mb(pids)
    return figures


def pass_seconds(args: argparse.Namespace) -> int:
    return max(1, int(args.duration)) if not args.bulk_mb else 1


class LoadMeter:
    """CPU seconds of the load generators (wrk, iperf3 -c: the benchmark's children, counted
    once they are waited for) and of the servers (`server_pids`) between `start` and `stop`."""

    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self._t0 = 0.0

    def _now(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime + cpu_seconds(self.server_pids)

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> float:
        return self._now() - self._t0


def bulk_pass(
    chain: Chain,
    mode: str,
    pids: list[int],
    args: argparse.Namespace,
    load: LoadMeter | None = None,
    eight: dict[str, float] | None = None,
) -> dict[str, float]:
    """iperf3 with 1 and 8 streams; the proxy's and the machine's CPU per GB in the second.
    `eight`: the 8-stream figures, measured already (`paired_eight_streams`)."""
    one = iperf(chain, mode, 1, args)
    if eight is None:  # one 8-stream pass of its own
        meter = EightStreams(pids, load or LoadMeter([]))
        meter.measure(chain, mode, args)
        eight = meter.figures(args)
    return {"gbps_1": one["gbps"], **eight}


class EightStreams:
    """The 8-stream pass of one path, in one or more slices (an iperf3 -P 8 each): its figures
    over all of them (bytes / seconds; CPU, run-queue wait and the cores' ticks summed; the
    slowest stream and second of any slice)."""

    def __init__(self, pids: list[int], load: LoadMeter) -> None:
        self.pids = pids
        self.load = load
        self.bytes = self.seconds = self.cpu = self.machine = self.wait = self.load_cpu = 0.0
        self.slowest_stream = self.slowest_second = math.inf
        # Per CPU, /proc/stat's ticks summed over the slices.
        self.ticks: dict[int, list[int]] = {}

    def measure(self, chain: Chain, mode: str, args: argparse.Namespace, share: float = 1) -> None:
        """One slice: `share` of a pass."""
        pids = self.pids
        cpu0, mach0 = cpu_seconds(pids), machine_cpu_seconds()
        wait0, cores0 = runq_wait_seconds(pids), cpu_times()
        self.load.start()
        eight = iperf(chain, mode, 8, args, share)
        self.load_cpu += self.load.stop()
        self.cpu += cpu_seconds(pids) - cpu0
        self.machine += machine_cpu_seconds() - mach0
        self.wait += runq_wait_seconds(pids) - wait0
        for cpu, ticks in cpu_times().items():
            grown = [a - b for a, b in zip(ticks, cores0.get(cpu, ticks), strict=True)]
            summed = self.ticks.get(cpu, [0] * 8)
            self.ticks[cpu] = [a + b for a, b in zip(summed, grown, strict=True)]
        self.bytes += eight["bytes"]
        self.seconds += eight["seconds"]
        self.slowest_stream = min(self.slowest_stream, eight["slowest_stream_gbps"])
        self.slowest_second = min(self.slowest_second, eight["slowest_second_gbps"])

    def figures(self, args: argparse.Namespace) -> dict[str, float]:
        nan = float("nan")
        gb, pids = self.bytes / 1e9, self.pids
        zero = {cpu: [0] * 8 for cpu in self.ticks}
        return {
            "gbps_8": self.bytes * 8 / 1e9 / self.seconds if self.seconds else nan,
            "proxy_cpu_s_per_gb": self.cpu / gb if pids and gb else nan,
            "machine_cpu_s_per_gb": self.machine / gb if gb else nan,
            # What held the 8-stream pass: a stream that stalled, a pause of the whole path,
            # the proxy waiting for its core, and how idle (or stolen by the hypervisor) the
            # proxies' and the load generators' cores were.
            "bulk_slowest_stream_gbps": _finite_or_nan(self.slowest_stream),
            "bulk_slowest_second_gbps": _finite_or_nan(self.slowest_second),
            "bulk_runq_wait_ms": self.wait * 1000 if pids else nan,
            # CPU-s of the proxy and of iperf3 (both ends) in the 8-stream pass.
            "bulk_proxy_cpu_s": self.cpu if pids else nan,
            "bulk_load_cpu_s": self.load_cpu,
            # The whole machine's busy CPU-s (stolen included) in the pass.
            "bulk_machine_cpu_s": self.machine,
            **{
                f"bulk_{side}_{kind}_pct": share
                for side, cpus in (("proxy_cores", args.cpus), ("load_cores", args.load_cpus))
                for kind, share in core_shares(zero, self.ticks, cpu_list(cpus or "")).items()
            },
        }


def paired_eight_streams(
    chain: Chain,
    pids: dict[str, list[int]],
    args: argparse.Namespace,
    server_pids: list[int],
    first: int,
) -> dict[str, dict[str, float]]:
    """The 8-stream passes of two paths (haproxy and kpx) in `--bulk-slices` alternating
    slices, A B B A A B ... (`first`: which of the two starts): whatever else the machine runs
    meanwhile falls on both alike, not on whichever pass it happened to meet."""
    modes = list(pids)
    modes = modes[first % 2 :] + modes[: first % 2]
    meters = {m: EightStreams(pids[m], LoadMeter(server_pids)) for m in modes}
    for k in range(args.bulk_slices):
        for mode in modes if k % 2 == 0 else modes[::-1]:
            meters[mode].measure(chain, mode, args, 1 / args.bulk_slices)
    return {m: meter.figures(args) for m, meter in meters.items()}


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


def cpu_times() -> dict[int, list[int]]:
    """Per CPU, /proc/stat's ticks: user nice system idle iowait irq softirq steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                out[int(name[3:])] = [int(x) for x in fields[:8]]
    return out


def core_shares(
    before: dict[int, list[int]], after: dict[int, list[int]], cpus: list[int]
) -> dict[str, float]:
    """Percent of `cpus`' time between the two samples that was idle, softirq and stolen by
    the hypervisor (NaN without CPUs)."""
    grown = [sum(a - b for a, b in zip(after[c], before[c], strict=True)) for c in cpus]
    total = sum(grown)
    if not cpus or not total:
        return dict.fromkeys(("idle", "softirq", "steal"), float("nan"))

    def share(index: int) -> float:
        return 100 * sum(after[c][index] - before[c][index] for c in cpus) / total

    return {"idle": share(3) + share(4), "softirq": share(6), "steal": share(7)}


def conn_pass(
    chain: Chain,
    mode: str,
    pids: list[int],
    args: argparse.Namespace,
    load: LoadMeter | None = None,
) -> dict[str, float]:
    """New connections/s, one small request each (wrk `Connection: close`)."""
    load = load or LoadMeter([])
    user0, kernel0 = user_kernel_seconds(pids)
    wait0, machine0 = runq_wait_seconds(pids), machine_cpu_seconds()
    load.start()
    conn = wrk(chain, mode, args.conns, True, pass_seconds(args), args.load_cpus)
    load_cpu, machine = load.stop(), machine_cpu_seconds() - machine0
    user1, kernel1 = user_kernel_seconds(pids)
    wait = runq_wait_seconds(pids) - wait0
    per_conn = 1e6 / conn["requests"] if pids and conn["requests"] else float("nan")
    return {
        "conn_per_s": conn["rps"],
        "conn_p50_ms": conn["p50_ms"],
        "conn_p99_ms": conn["p99_ms"],
        "conn_errors": conn["errors"],
        # The proxy's CPU per connection in that pass, user and kernel (10 ms clock ticks:
        # meaningful over thousands of connections, and on a quiet machine only).
        "conn_user_us": (user1 - user0) * per_conn,
        "conn_kernel_us": (kernel1 - kernel0) * per_conn,
        # How long the proxy was ready to run but another process had its CPU, in the pass.
        "conn_runq_wait_ms": wait * 1000 if pids else float("nan"),
        # CPU-s of the proxy and of wrk and the origin in the pass.
        "conn_proxy_cpu_s": user1 - user0 + kernel1 - kernel0 if pids else float("nan"),
        "conn_load_cpu_s": load_cpu,
        "conn_machine_cpu_s": machine,
        # Connections per second of the proxy's own CPU time: what one core it had to itself
        # would serve. Unlike conn_per_s, other processes taking the shared core barely move it.
        "conn_per_cpu_s": (
            conn["requests"] / cpu
            if pids and (cpu := user1 - user0 + kernel1 - kernel0) > 0
            else float("nan")
        ),
    }


def req_pass(
    chain: Chain, mode: str, pids: list[int], args: argparse.Namespace
) -> dict[str, float]:
    """Small-request latency on one keep-alive connection; what held the proxy: other
    processes on its CPU (run-queue wait) and, for kpx, its own loop."""
    nan = float("nan")
    kpx = mode in KPX_SOURCE_MODES
    before = kpx_stalls(chain) if kpx else {}
    wait0 = runq_wait_seconds(pids)
    req = wrk(chain, mode, 1, False, pass_seconds(args), args.load_cpus)
    wait = runq_wait_seconds(pids) - wait0
    after = kpx_stalls(chain) if kpx else {}
    return {
        "req_p50_ms": req["p50_ms"],
        "req_p99_ms": req["p99_ms"],
        # A p99 spike with a long run-queue wait is the machine's, not the proxy's.
        "req_runq_wait_ms": wait * 1000 if pids else nan,
        # What held kpx's loop during the small-request pass (kpx/stalls.py; NaN elsewhere):
        # collector runs, lag samples over 5 ms, and a bound on the longest lag seen.
        "req_gc_runs": after.get("gc_runs", nan) - before.get("gc_runs", nan),
        "req_lag_over_5ms": after.get("lag_over_5ms", nan) - before.get("lag_over_5ms", nan),
        "req_lag_max_ms_below": lag_bound_ms(before, after),
    }


# Every figure of one path in one run, in print order.
FIGURES = (
    "gbps_1",
    "gbps_8",
    "proxy_cpu_s_per_gb",
    "machine_cpu_s_per_gb",
    "bulk_slowest_stream_gbps",
    "bulk_slowest_second_gbps",
    "bulk_runq_wait_ms",
    "bulk_proxy_cpu_s",
    "bulk_load_cpu_s",
    "bulk_machine_cpu_s",
    "bulk_proxy_cores_idle_pct",
    "bulk_proxy_cores_softirq_pct",
    "bulk_proxy_cores_steal_pct",
    "bulk_load_cores_idle_pct",
    "bulk_load_cores_softirq_pct",
    "bulk_load_cores_steal_pct",
    "conn_per_s",
    "conn_p50_ms",
    "conn_p99_ms",
    "conn_errors",
    "conn_user_us",
    "conn_kernel_us",
    "conn_runq_wait_ms",
    "conn_proxy_cpu_s",
    "conn_load_cpu_s",
    "conn_machine_cpu_s",
    "conn_per_cpu_s",
    "req_p50_ms",
    "req_p99_ms",
    "req_runq_wait_ms",
    "proxy_rss_mb",
    "req_gc_runs",
    "req_lag_over_5ms",
    "req_lag_max_ms_below",
)
PASSES = ("bulk", "conn", "req")


def kpx_stalls(chain: Chain) -> dict[str, Any]:
    """kpx's stall histograms (kpx_gc_pause_seconds, kpx_event_loop_lag_seconds), scraped."""
    with chain.node.entered(), urllib.request.urlopen(f"http://{KPX_METRICS}/metrics") as resp:
        text = resp.read().decode()
    gc_runs = sum(
        float(m.group(1))
        for m in re.finditer(r"^kpx_gc_pause_seconds_count\{.*\} (\S+)$", text, re.M)
    )
    buckets = {
        float(m.group(1)): float(m.group(2))
        for m in re.finditer(
            r'^kpx_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
        )
    }
    total = buckets.get(math.inf, 0.0)
    return {"gc_runs": gc_runs, "lag_over_5ms": total - buckets.get(0.005, 0.0), "lag": buckets}


def lag_bound_ms(before: dict[str, Any], after: dict[str, Any]) -> float:
    """The smallest lag bucket bound holding every sample taken between the two scrapes."""
    if not before or not after:
        return float("nan")
    grown = {le: after["lag"][le] - before["lag"].get(le, 0.0) for le in after["lag"]}
    total = grown.get(math.inf, 0.0)
    bounds = [le for le, n in sorted(grown.items()) if n >= total]
    return bounds[0] * 1000 if bounds and total else float("nan")


def hold_idle(chain: Chain, mode: str, count: int, pid: int) -> dict[str, float]:
    """Open `count` connections through the proxy, one answered request each, keep them."""
    ip, port = TARGETS[mode]["http"]
    before = rss_mb([pid])
    socks: list[socket.socket] = []
    failures = 0
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    t0 = time.perf_counter()
    try:
        with chain.client.entered():
            for _ in range(count):
                if failures > 50:
                    break
                s = socket.socket()
                s.settimeout(5)
                try:
                    s.connect((ip, port))
                    s.sendall(request)
                    data = b""
                    while not data.endswith(b"ok"):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionResetError("closed before the answer")
                        data += chunk
                    socks.append(s)
                except OSError:
                    failures += 1
                    s.close()
        opened = time.perf_counter() - t0
        time.sleep(1.0)
        after = rss_mb([pid])
        alive = sum(1 for s in socks if _alive(s))
    finally:
        for s in socks:
            s.close()
    held = len(socks)
    return {
        "held": float(held),
        "alive_after_1s": float(alive),
        "failed": float(failures),
        "open_s": opened,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "kib_per_conn": (after - before) * 1e6 / 1024 / held if held else float("nan"),
    }


def _alive(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def _poll_whoami(client: Ns, ip: str, want: str, start: float) -> float | None:
    """Connect about every millisecond until `want` answers; ms since `start`, None at 5 s."""
    deadline = start + 5.0
    while time.perf_counter() < deadline:
        if whoami(client, ip, WHOAMI_PORT) == want:
            return (time.perf_counter() - start) * 1000
        time.sleep(0.001)
    return None


def programming(
    chain: Chain,
    tmp: Path,
    services: int,
    samples: int,
    timeout: float,
    cpus: str | None = None,
    workers: int = 1,
) -> dict[str, float]:
    """Two kinds of change, `samples` each, on kpx watching `services` Services:
    - endpoint: PUT the probe Service's EndpointSlice moving its endpoint A <-> B, until a new
      connection is served by the new one (kpx: no kernel change at all);
    - new Service: POST a Service (its EndpointSlice was created beforehand, untimed) with a
      new ClusterIP, until a connection to it is served (kpx: one nftables set element).
    Before it is programmed the new ClusterIP is answered with a TCP reset by the node's
    `bench_unprogrammed` table (an ICMP unreachable would be rate-limited and stall the poll)."""
    folder = tmp / f"api-{services}"
    api, kubeconfig = start_fake_apiserver(
        programming_objects(services), folder, chain.node.popen, extra_history=3 * samples + 100
    )
    kpx: subprocess.Popen[Any] | None = None
    client: Api | None = None
    try:
        t0 = time.perf_counter()
        kpx = start_kpx(
            chain,
            ["--kubeconfig", str(kubeconfig), "--workers", str(workers)],
            tmp,
            f"kpx-{services}",
            timeout,
            cpus=cpus,
        )
        wait_until(
            "probe Service through kpx",
            lambda: whoami(chain.client, PROBE_VIP, WHOAMI_PORT) == "A",
            kpx,
            timeout,
        )
        ready_s = time.perf_counter() - t0
        rss = rss_mb([kpx.pid])
        client = Api(kubeconfig)
        path = "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/probe-x1"
        endpoint_ms: list[float] = []
        service_ms: list[float] = []
        failures = 0
        current = "A"
        for _ in range(samples):
            new, ip = ("B", SERVER_IP_2) if current == "A" else ("A", SERVER_IP)
            with chain.node.entered():  # the API server listens on the node's loopback
                body = client.request("GET", path)
                body["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}}]
                start = time.perf_counter()
                client.request("PUT", path, body)
            took = _poll_whoami(chain.client, PROBE_VIP, new, start)
            if took is None:
                failures += 1
            else:
                endpoint_ms.append(took)
            current = new
            time.sleep(0.05)
        for k in range(samples):
            name, vip = f"new{k}", f"10.98.{k // 250}.{k % 250 + 1}"
            with chain.node.entered():
                client.request(
                    "POST",
                    "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices",
                    endpoint_slice(name, [SERVER_IP], [("who", WHOAMI_PORT)]),
                )
                time.sleep(0.05)  # kpx has seen the slice; only the Service is timed
                start = time.perf_counter()
                client.request(
                    "POST",
                    "/api/v1/namespaces/bench/services",
                    service(name, vip, [("who", WHOAMI_PORT, WHOAMI_PORT)]),
                )
            took = _poll_whoami(chain.client, vip, "A", start)
            if took is None:
                failures += 1
            else:
                service_ms.append(took)
            time.sleep(0.05)
        return {
            "endpoint_p50_ms": percentile(endpoint_ms, 50),
            "endpoint_p99_ms": percentile(endpoint_ms, 99),
            "endpoint_max_ms": max(endpoint_ms) if endpoint_ms else float("nan"),
            "new_service_p50_ms": percentile(service_ms, 50),
            "new_service_p99_ms": percentile(service_ms, 99),
            "samples": float(len(endpoint_ms) + len(service_ms)),
            "not_seen_in_5s": float(failures),
            "kpx_ready_s": ready_s,
            "kpx_rss_mb": rss,
        }
    finally:
        if client is not None:
            client.close()
        if kpx is not None:
            _stop(kpx, 20)
        _stop(api)


UNPROGRAMMED = """table ip bench_unprogrammed {
    chain forward {
        type filter hook forward priority filter; policy accept;
        ip daddr 10.96.0.0/12 meta l4proto tcp reject with tcp reset
    }
}
"""


# --- main ----------------------------------------------------------------------------------


def fmt(v: float) -> str:
    return f"{v:,.2f}"


def print_table(title: str, columns: list[str], rows: dict[str, list[float]]) -> None:
    print(title)
    print(f"  {'':22}" + "".join(f"{c:>14}" for c in columns))
    for key, values in rows.items():
        print(f"  {key:22}" + "".join(f"{v:>14,.2f}" for v in values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8, help="seconds per pass")
    parser.add_argument("--bulk-mb", type=int, default=0, help="iperf3 -n instead of -t")
    parser.add_argument("--idle", type=int, default=5_000, help="idle connections held")
    parser.add_argument("--samples", type=int, default=50, help="programming samples")
    parser.add_argument(
        "--services", type=int, nargs="+", help="Service counts for programming (10 10000)"
    )
    parser.add_argument(
        "--cpus", default="0", help="CPUs (taskset -c list) both proxies run on; '' unpinned"
    )
    parser.add_argument(
        "--haproxy-threads", type=int, default=None, help="default: one per CPU of --cpus"
    )
    parser.add_argument(
        "--haproxy-splice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="haproxy splice-request/-response with 1 MiB pipes (default on)",
    )
    parser.add_argument(
        "--kpx-workers",
        type=int,
        default=1,
        help="kpx --workers: TCP data-plane processes (give --cpus a CPU for each)",
    )
    parser.add_argument(
        "--bulk-slices",
        type=int,
        default=4,
        help="haproxy's and kpx's 8-stream passes in N alternating slices (A B B A ...); "
        "1: one pass each",
    )
    parser.add_argument("--conns", type=int, default=32, help="wrk -c for the connections/s pass")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="paths to measure"
    )
    parser.add_argument(
        "--passes",
        nargs="+",
        choices=PASSES,
        default=list(PASSES),
        help="bulk: iperf3 -P1/-P8; conn: new connections/s; req: small-request latency",
    )
    parser.add_argument("--no-idle", action="store_true", help="skip the idle connections")
    parser.add_argument(
        "--no-programming", action="store_true", help="skip the programming latency"
    )
    parser.add_argument(
        "--conn-only",
        action="store_true",
        help="haproxy and kpx, conn and req passes only (--modes haproxy kpx --passes conn "
        "req --no-idle --no-programming)",
    )
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short passes")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if args.conn_only:
        args.modes, args.passes = ["haproxy", "kpx"], ["conn", "req"]
        args.no_idle = args.no_programming = True
    args.modes = [m for m in MODES if m in args.modes]  # the documented order, once each
    if args.services is None:
        args.services = [10, 50] if args.quick else [10, 10_000]
    cpus = cpu_list(args.cpus) if args.cpus else []
    if args.haproxy_threads is None and cpus:
        args.haproxy_threads = len(cpus)
    # The load generators and servers keep off the proxies' CPUs when others are left.
    others = sorted(os.sched_getaffinity(0) - set(cpus)) if cpus else []
    args.load_cpus = ",".join(map(str, others)) if others else None
    if args.quick:
        args.runs, args.duration, args.bulk_mb = 1, 1, 300
        args.idle, args.samples = 200, 3
        args.ready_timeout = 60
    return args


def check_environment() -> None:
    reason = netns_unavailable()
    missing = [t for t in ("iperf3", "wrk", "haproxy") if shutil.which(t) is None]
    if reason or missing:
        raise SystemExit(reason or f"needs {', '.join(missing)} (apt-get install them)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


class Bench:
    """The chain with its servers and proxies running, and the results document so far."""

    def __init__(self, chain: Chain, tmp: Path, args: argparse.Namespace) -> None:
        self.chain = chain
        self.tmp = tmp
        self.args = args
        self.proxy_cpus: str | None = args.cpus or None
        self.haproxy: subprocess.Popen[Any] | None = None
        self.kpx: subprocess.Popen[Any] | None = None
        # The origin's and iperf3 server's (their CPU is the load's).
        self.server_pids: list[int] = []
        # Which of the two kpx passes the running kpx serves ("kpx" or "kpx-tp").
        self.kpx_mode = "kpx"
        self.doc: dict[str, Any] = {
            "benchmark": "proxy",
            "quick": args.quick,
            "args": vars(args),
            "modes": list(args.modes),
        }

    def save(self, complete: bool = False) -> None:
        _save(self.args.json, {**self.doc, "complete": True} if complete else self.doc)

    def pid(self, mode: str) -> int | None:
        """The process proxying `mode`'s path (None: the kernel does)."""
        proc = {"haproxy": self.haproxy, "kpx": self.kpx, "kpx-tp": self.kpx}.get(mode)
        return proc.pid if proc is not None else None

    # -- set-up ----------------------------------------------------------------------------

    def start(self) -> None:
        """Write the configurations, start the origin servers and both proxies, wait until
        every measured path connects."""
        args, chain, tmp = self.args, self.chain, self.tmp
        (tmp / "origin.cfg").write_text(ORIGIN_CFG)
        (tmp / "haproxy.cfg").write_text(haproxy_cfg(args.haproxy_threads, args.haproxy_splice))
        (tmp / "manifests").mkdir()
        (tmp / "manifests" / "bench.json").write_text(
            json.dumps({"apiVersion": "v1", "kind": "List", "items": bench_objects()})
        )
        origin = self.start_servers()
        chain.node.nft(NAT_RULES)
        # Service addresses nobody programmed: routed, then reset (not an ICMP error).
        chain.node.ip("route", "add", "10.96.0.0/12", "dev", "vs")
        chain.node.nft(UNPROGRAMMED)
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.haproxy = chain.node.popen(
            *pinned(self.proxy_cpus), "haproxy", "-db", "-f", str(tmp / "haproxy.cfg"), **quiet
        )
        first_kpx = next((m for m in args.modes if m in KPX_SOURCE_MODES), "kpx")
        self.start_kpx(first_kpx)
        owner = {"direct": origin, "nat": origin, "haproxy": self.haproxy}
        for mode in args.modes:
            for what, (ip, port) in TARGETS[mode].items():
                wait_until(
                    f"{mode} {what} {ip}:{port}",
                    lambda ip=ip, port=port: connects(chain.client, ip, port),
                    owner.get(mode, self.kpx),
                    args.ready_timeout / 4,
                )

    def start_servers(self) -> subprocess.Popen[Any]:
        """The origin (haproxy `http-request return`), iperf3 -s and the whoami servers in the
        server ns, on the load CPUs; returns the origin."""
        args, server, tmp = self.args, self.chain.server, self.tmp
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        load = pinned(args.load_cpus)
        origin = server.popen(*load, "haproxy", "-db", "-f", str(tmp / "origin.cfg"), **quiet)
        iperf_server = server.popen(*load, "iperf3", "-s", "-p", str(IPERF_PORT), **quiet)
        self.server_pids = [origin.pid, iperf_server.pid]
        who = server.popen(
            *load,
            sys.executable,
            "-u",
            "-c",
            WHOAMI,
            SERVER_IP,
            SERVER_IP_2,
            str(WHOAMI_PORT),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert who.stdout is not None
        if who.stdout.readline().strip() != "ready":
            raise SystemExit("whoami server did not start")
        return origin

    def start_kpx(self, mode: str) -> None:
        """(Re)start kpx for `mode` ("kpx": node address, "kpx-tp": transparent)."""
        if self.kpx is not None:
            _stop(self.kpx, 40)
        self.kpx = start_kpx(
            self.chain,
            ["--manifests", str(self.tmp / "manifests"), "--workers", str(self.args.kpx_workers)],
            self.tmp,
            mode,
            self.args.ready_timeout,
            source_address_mode=KPX_SOURCE_MODES[mode],
            cpus=self.proxy_cpus,
        )
        self.kpx_mode = mode

    def switch_kpx(self, mode: str) -> None:
        """One kpx owns the table at a time: restart it in `mode`'s source-address mode."""
        if mode not in KPX_SOURCE_MODES or mode == self.kpx_mode:
            return
        self.start_kpx(mode)
        wait_until(
            f"{mode} serving",
            lambda: connects(self.chain.client, KPX_VIP, 80),
            self.kpx,
            self.args.ready_timeout / 4,
        )

    def describe(self) -> None:
        """Record and print what runs where: haproxy's threads, splice and CPUs next to kpx's."""
        args = self.args
        assert self.haproxy is not None and self.kpx is not None
        threads = haproxy_threads(self.haproxy.pid)
        haproxy_cpus = cpus_of(self.haproxy.pid)
        kpx_cpus = cpus_of(self.kpx.pid)
        self.doc.update(
            {
                "haproxy_threads": threads,
                "haproxy_splice": args.haproxy_splice,
                "proxy_cpus": args.cpus,
                "haproxy_cpus": haproxy_cpus,
                "kpx_cpus": kpx_cpus,
                "load_cpus": args.load_cpus,
                "kpx_rss_at_start_mb": rss_mb([self.kpx.pid]),
                # --kpx-workers N: each worker process's RSS (the control process's above).
                "kpx_worker_rss_mb": [rss_mb([pid]) for pid in children_of(self.kpx.pid)],
            }
        )
        print(
            f"netns chain {self.chain.prefix}-*: client {CLIENT_IP} -> node -> server "
            f"{SERVER_IP}; haproxy threads: {threads}, splice "
            f"{'on' if args.haproxy_splice else 'off'}; haproxy on CPUs {haproxy_cpus}, kpx on "
            f"{kpx_cpus}, load on {args.load_cpus or 'any'}; kpx RSS at start "
            f"{self.doc['kpx_rss_at_start_mb']:.1f} MB"
            + "".join(f", worker {rss:.1f} MB" for rss in self.doc["kpx_worker_rss_mb"])
        )
        if haproxy_cpus != kpx_cpus:
            raise SystemExit(f"haproxy runs on CPUs {haproxy_cpus}, kpx on {kpx_cpus}")
        bulk = f"{args.bulk_mb} MB" if args.bulk_mb else f"{args.duration:g} s"
        print(
            f"modes {' '.join(args.modes)}; passes: "
            + "; ".join(PASS_TEXT[p].format(bulk=bulk, conns=args.conns) for p in args.passes)
            + f", {pass_seconds(args)} s each\n"
        )

    # -- measurements ----------------------------------------------------------------------

    def measure_runs(self) -> dict[str, list[dict[str, float]]]:
        """`--runs` rounds over the modes, the order rotated per run."""
        modes = tuple(self.args.modes)
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for run in range(self.args.runs):
            order = modes[run % len(modes) :] + modes[: run % len(modes)]
            self.doc.setdefault("run_orders", []).append(list(order))
            paired = self.paired_pass(run)
            for mode in order:
                self.switch_kpx(mode)
                r = measure_mode(
                    self.chain, mode, self.pid(mode), self.args, self.server_pids, paired.get(mode)
                )
                if mode == "haproxy" and "bulk" in self.args.passes:
                    # Splice at work: haproxy keeps the pipes of its bulk transfers pooled.
                    r["haproxy_pipes"] = float(pipes_of(self.pid(mode)))
                results[mode].append(r)
                shown = ", ".join(f"{k}={fmt(v)}" for k, v in r.items() if not math.isnan(v))
                print(f"run {run + 1} {mode:8} {shown}")
        return results

    def paired_pass(self, run: int) -> dict[str, dict[str, float]]:
        """haproxy's and kpx's 8-stream passes of run `run`, interleaved (`--bulk-slices`;
        none with 1 slice or without both paths): {} or their figures by mode."""
        args = self.args
        if args.bulk_slices < 2 or "bulk" not in args.passes:
            return {}
        if not {"haproxy", "kpx"} <= set(args.modes):
            return {}
        self.switch_kpx("kpx")
        pids = {m: process_tree(self.pid(m) or 0) for m in ("haproxy", "kpx")}
        paired = paired_eight_streams(self.chain, pids, args, self.server_pids, run)
        print(
            f"run {run + 1} 8 streams in {args.bulk_slices} alternating slices: "
            + ", ".join(f"{m} {fmt(f['gbps_8'])} Gbit/s" for m, f in paired.items())
        )
        return paired

    def summarize(self, results: dict[str, list[dict[str, float]]]) -> None:
        """Medians per mode, kpx's ratios to each peer per run and their median, the targets
        missed in any run."""
        modes = list(self.args.modes)
        keys = [k for k in FIGURES if any(not math.isnan(r[k]) for m in modes for r in results[m])]
        medians = {m: {k: _median([r[k] for r in results[m]]) for k in keys} for m in modes}
        print_table(
            f"\nmedians of {self.args.runs} runs:",
            modes,
            {k: [medians[m][k] for m in modes] for k in keys},
        )
        per_run = {
            name: {k: per_run_ratios(results, mine, peer, k) for k in keys}
            for name, mine, peer in RATIO_PAIRS
            if mine in results and peer in results
        }
        # Transparent mode's cost (issue 10) is kpx-tp / kpx, target within 5 %.
        self.doc["runs"] = results
        self.doc["medians"] = medians
        self.doc["ratio_runs"] = per_run
        self.doc["ratios"] = {
            peer: {k: _median(v) for k, v in ratios.items()} for peer, ratios in per_run.items()
        }
        missed = self.doc.setdefault("targets_missed", [])
        if "haproxy" in per_run:
            print(
                "  kpx / haproxy, every run, then the median (a target missed in any run: MISSED):"
            )
            missed += judge_runs(per_run["haproxy"], RATIO_TARGETS, "kpx/haproxy")
        ratios = self.doc["ratios"]
        if "nat" in ratios:
            print(
                "  kpx / kernel NAT (median of per-run ratios): "
                + ", ".join(
                    f"{k} {ratios['nat'][k]:.2f}x" for k in ("gbps_8", "conn_per_s") if k in keys
                )
            )
        if "transparent_vs_node" in per_run:
            print("  kpx transparent / node address, every run (target: within 5 %):")
            missed += judge_runs(
                per_run["transparent_vs_node"], TRANSPARENT_TARGETS, "kpx transparent/node"
            )
        self.save()

    def idle_pass(self) -> None:
        """`--idle` connections through haproxy and kpx (node mode), one request each, held."""
        args = self.args
        self.switch_kpx("kpx")
        print(f"\nidle connections ({args.idle:,} requested, each answered once, then held):")
        self.doc["idle"] = {"requested": args.idle}
        for mode in ("haproxy", "kpx"):
            pid = self.pid(mode)
            assert pid is not None
            idle = hold_idle(self.chain, mode, args.idle, pid)
            self.doc["idle"][mode] = idle
            print(f"  {mode:8} " + ", ".join(f"{k}={fmt(v)}" for k, v in idle.items()))
        self.save()
        print(
            f"  targets: kpx <= {IDLE_KIB_PER_CONN:g} KiB per idle connection "
            "(haproxy measured 3.3 KiB)"
        )
        kib = self.doc["idle"]["kpx"]["kib_per_conn"]
        if not kib <= IDLE_KIB_PER_CONN:
            print(f"    MISSED: kpx {kib:.2f} KiB per connection")
            self.doc.setdefault("targets_missed", []).append(
                f"idle kpx {kib:.2f} KiB per connection (target <= {IDLE_KIB_PER_CONN:g})"
            )

    def stop_proxies(self) -> None:
        if self.kpx is not None:
            _stop(self.kpx, 40)  # its table goes with it; the programming runs start their own
            self.kpx = None
        if self.haproxy is not None:
            _stop(self.haproxy)
            self.haproxy = None

    def programming_pass(self) -> None:
        """Network programming latency at every `--services` count, kpx on the fake API."""
        args = self.args
        print(
            "\nnetwork programming latency (API write sent -> first connection served by the new"
            "\nendpoint / new Service; kpx --kubeconfig on the fake API server in the node ns):"
        )
        self.doc["programming"] = []
        for count in args.services:
            prog = programming(
                self.chain,
                self.tmp,
                count,
                args.samples,
                args.ready_timeout,
                self.proxy_cpus,
                args.kpx_workers,
            )
            print(f"  {count:>6,} Services: " + ", ".join(f"{k}={fmt(v)}" for k, v in prog.items()))
            for miss in programming_misses(count, prog):
                print(f"    MISSED: {miss}")
                self.doc.setdefault("targets_missed", []).append(miss)
            self.doc["programming"].append({"services": count, **prog})
            self.save()
        print(
            "  targets: p99 <= 50 ms at every Service count (set for 10,000); "
            "kpx RSS at 10,000 Services <= 150 MB"
        )


PASS_TEXT = {
    "bulk": "iperf3 -P1/-P8 {bulk}",
    "conn": "wrk -t1 -c{conns} 'Connection: close'",
    "req": "wrk -t1 -c1 keep-alive",
}
# (name, ours, peer): the ratios ours / peer per run, filed under name.
RATIO_PAIRS = (
    ("haproxy", "kpx", "haproxy"),
    ("nat", "kpx", "nat"),
    ("direct", "kpx", "direct"),
    ("transparent_vs_node", "kpx-tp", "kpx"),
)
IDLE_KIB_PER_CONN = 3.0


def per_run_ratios(
    results: dict[str, list[dict[str, float]]], mine: str, peer: str, key: str
) -> list[float]:
    return [
        _safe(lambda a=a, b=b: a[key] / b[key])
        for a, b in zip(results[mine], results[peer], strict=True)
    ]


def main() -> None:
    args = parse_args()
    check_environment()
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmpname, Chain() as chain:
        bench = Bench(chain, Path(tmpname), args)
        bench.start()
        bench.describe()
        bench.summarize(bench.measure_runs())
        if not args.no_idle:
            bench.idle_pass()
        bench.stop_proxies()
        if not args.no_programming:
            bench.programming_pass()
        missed = bench.doc.setdefault("targets_missed", [])
        print(f"\ntargets missed in any run: {len(missed)}" + "".join(f"\n  {m}" for m in missed))
        if args.quick:
            print("  (--quick: short passes, small sizes: the figures are a smoke test only)")
        bench.save(complete=True)


# kpx / haproxy per run: (figure, comparison, limit); issue 12 for connections/s and p99.
RATIO_TARGETS = (
    ("gbps_8", ">=", 0.9),
    ("gbps_1", None, None),
    ("proxy_cpu_s_per_gb", "<=", 1.2),
    ("conn_per_s", ">=", 0.8),
    ("conn_per_cpu_s", None, None),
    ("req_p99_ms", "<=", 1.5),
    ("conn_p99_ms", None, None),
)
# Transparent mode against node mode (issue 10): within 5 %.
TRANSPARENT_TARGETS = (
    ("gbps_8", ">=", 0.95),
    ("proxy_cpu_s_per_gb", "<=", 1.05),
    ("conn_per_s", ">=", 0.95),
)
PROGRAMMING_P99_MS = 50.0  # every Service count, not only 10,000
KPX_RSS_MB_AT_10000 = 150.0


def run_pairs(results: dict[str, list[dict[str, float]]]) -> list[tuple[Any, Any]]:
    return list(zip(results["kpx"], results["haproxy"], strict=True))


def misses(values: list[float], op: str | None, limit: float | None) -> list[int]:
    """1-based numbers of the runs whose value misses the target (NaN counts as missed)."""
    if op is None or limit is None:
        return []
    return [
        i + 1
        for i, v in enumerate(values)
        if not (v >= limit if op == ">=" else v <= limit)  # NaN compares false: missed
    ]


def judge_runs(
    per_run: dict[str, list[float]],
    targets: tuple[tuple[str, str | None, float | None], ...],
    label: str,
) -> list[str]:
    """Print each target's per-run ratios; the runs that missed, one line each."""
    missed = []
    for key, op, limit in targets:
        if key not in per_run:
            continue
        runs = per_run[key]
        print("    " + ratio_line(key, runs, _median(runs), op, limit))
        missed += [
            f"{key} {label} {runs[run - 1]:.2f}x in run {run} (target {op} {limit}x)"
            for run in misses(runs, op, limit)
        ]
    return missed


def ratio_line(
    key: str, per_run: list[float], median: float, op: str | None, limit: float | None
) -> str:
    runs = " ".join(f"{v:.2f}x" for v in per_run)
    line = f"{key:20} runs {runs}, median {median:.2f}x"
    if op is not None:
        line += f" (target {op} {limit:.2f}x)"
        missed = misses(per_run, op, limit)
        if missed:
            line += f"  MISSED in run {', '.join(map(str, missed))} of {len(per_run)}"
    return line


def programming_misses(services: int, prog: dict[str, float]) -> list[str]:
    out = []
    for key in ("endpoint_p99_ms", "new_service_p99_ms"):
        if not prog[key] <= PROGRAMMING_P99_MS:
            out.append(f"{key} {prog[key]:.1f} ms > {PROGRAMMING_P99_MS:g} ms at {services:,}")
    if prog["not_seen_in_5s"]:
        out.append(f"{prog['not_seen_in_5s']:.0f} changes not seen in 5 s at {services:,}")
    if services >= 10_000 and not prog["kpx_rss_mb"] <= KPX_RSS_MB_AT_10000:
        out.append(f"kpx RSS {prog['kpx_rss_mb']:.1f} MB > {KPX_RSS_MB_AT_10000:g} MB")
    return out


def cpu_list(text: str) -> list[int]:
    """A taskset -c list ("0", "0,2", "0-3") as CPU numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.append(int(part))
    return cpus


def _save(path: str | None, doc: dict[str, Any]) -> None:
    """Write the results so far (`complete` only at the end: a failed run keeps its figures)."""
    if path:
        write_json(path, {"complete": False, **doc})


def _safe(compute: Any) -> float:
    """A ratio, or NaN where a figure is missing or zero (no proxy process to measure)."""
    try:
        value = float(compute())
    except (ZeroDivisionError, statistics.StatisticsError):
        return float("nan")
    return value


def _median(values: list[float]) -> float:
    """The median of the finite values (NaN: a pass not run, a figure missing), else NaN."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def runq_wait_seconds(pids: list[int]) -> float:
    """Time the threads of `pids` spent runnable, waiting for a CPU (schedstat field 2)."""
    ns = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        ns += int(f.read().split()[1])
    return ns / 1e9


def cpus_of(pid: int) -> str:
    """The CPUs `pid` may run on, as a taskset -c list."""
    return ",".join(map(str, sorted(os.sched_getaffinity(pid))))


def pipes_of(pid: int | None) -> int:
    """Pipe fds `pid` holds open."""
    if pid is None:
        return 0
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return count


def haproxy_threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


if __name__ == "__main__":
    main()
