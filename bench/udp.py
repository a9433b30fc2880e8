"""kpx's UDP relay against nginx's `stream` UDP proxy and the kernel's NAT (issue 11).

    .venv/bin/python -m bench.udp [--runs 3] [--duration 4] [--sessions 10000] [--samples 50]
        [--rate 2000] [--quick] [--json PATH]

Topology (bench/netns_topology.py): client ns -- node ns -- server ns over veths. The server
ns runs a batched UDP echo server on SERVER_IP and SERVER_IP_2, port 5353 (answering each
datagram with its first byte replaced by "A" or "B"). Paths from the client, one run:
  direct  client -> SERVER_IP:5353 (routed by the node)
  nat     client -> 10.96.0.11:53, an nftables `dnat` rule in the node (kube-proxy's way)
  nginx   client -> 10.233.1.1:5300, nginx `stream { listen udp; proxy_responses 1; }`
          (Debian's nginx-light + libnginx-mod-stream), one worker
  kpx     client -> 10.96.0.10:53, `kpx --mode nftables` fed by the fake API server
The load generator and the echo server are bench/udpgen.c, compiled with gcc at run time
(recvmmsg/sendmmsg: a Python client moving one datagram per call was the bottleneck, not the
proxies). The proxies are pinned to CPU 0 (`taskset`), the client and the server to CPU 1:
on this 2-core machine they share that core, so a path whose CPU 1 is busy about 100% of a
pass (`client_server_core_busy`) is bounded by the client and the server, not by the proxy
(`proxy_core_busy` is the proxy's share of CPU 0). The kernel's NAT runs in softirq on the
sending side's CPU, so it has no CPU figure of its own.

Each of `--runs` runs starts nginx, the fake API server and kpx afresh (no session of an
earlier run is alive) and measures, per path:
- saturation, 64-byte request/response: `--flows` client sockets (sessions), each keeping
  `--window` datagrams in flight, for `--duration` s: answers/s, and proxy CPU per answered
  datagram (utime+stime of the proxy's processes / answers);
- the same with 1,200-byte datagrams (bulk), also in MB/s;
- latency at a fixed `--rate`: one socket, one datagram in flight, p50/p99; "added" is the
  path's p99 minus the direct path's;
- nginx and kpx: the 64-byte saturation pass once more, then `--sessions` concurrent sessions
  (one socket each, one exchange each, then held): proxy RSS per session, then the same pass
  with those held. The target compares these two passes, taken back to back on the same
  proxy: the machine is shared, and the first 64-byte pass ran a minute or more earlier
  (before the bulk and latency passes), so comparing against it measured the drift of the
  machine's load too (in the earlier runs the echo server, which holds no session, lost as
  much CPU per datagram as the proxy did);
- kpx only: re-targeting time, `--samples` times: a client sends every millisecond from one
  source port; the EndpointSlice is PUT moving the endpoint A <-> B; time from the PUT to the
  first answer from the new endpoint; p50/p99.
The JSON holds every run (`runs`, each with its `targets`: ratio, limit, met, what bound
each rate), the medians of each figure over runs under the top-level keys bench/report reads
(`small`, `bulk`, `latency`, `sessions`, `retarget`), the median of the runs' ratios per target
(`targets`), and the targets that median misses (`targets_missed`). nginx listens with
`rcvbuf=4m`, the receive buffer kpx asks for (both are capped by net.core.rmem_max).
`--quick`: one run of 1 s passes, 200 sessions, 3 samples: a smoke test of the harness,
figures meaningless. Figures, never assertions: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.apiclient import Api, start_fake_apiserver
from bench.jsonout import write_json
from bench.netns_topology import NODE_CLIENT_SIDE_IP, SERVER_IP, SERVER_IP_2, Chain, Ns
from bench.procstat import cpu_seconds, process_tree, rss_mb, user_kernel_seconds
from bench.proxy import _stop, percentile, wait_until

ROOT = Path(__file__).resolve().parent.parent
UDPGEN_SOURCE = Path(__file__).resolve().parent / "udpgen.c"
KPX_VIP, NAT_VIP, ECHO_PORT = "10.96.0.10", "10.96.0.11", 5353
NGINX_PORT = 5300
KPX_METRICS = "127.0.0.1:10249"
TARGETS = {
    "direct": (SERVER_IP, ECHO_PORT),
    "nat": (NAT_VIP, 53),
    "nginx": (NODE_CLIENT_SIDE_IP, NGINX_PORT),
    "kpx": (KPX_VIP, 53),
}
MODES = tuple(TARGETS)
PROXY_CPU, CLIENT_CPU = "0", "1"
# Issue 11's targets, kpx against nginx in the same run: (name, section, key, op, limit).
GOALS = (
    ("small_datagrams_per_s", "small", "answers_per_s", ">=", 1.5),
    ("small_cpu_per_datagram", "small", "proxy_cpu_us_per_datagram", "<=", 0.8),
    ("bulk_datagrams_per_s", "bulk", "answers_per_s", ">=", 1.5),
    ("bulk_cpu_per_datagram", "bulk", "proxy_cpu_us_per_datagram", "<=", 0.8),
    ("latency_added_p99", "latency", "added_p99_us", "<=", 1.5),
)
BUSY = 0.9  # a core this busy over a pass bounded its rate
# kpx's 64-byte datagrams/s with `--sessions` held, against without: unchanged within 10%.
SESSIONS_GOAL = ("datagrams_per_s_with_sessions_held", ">=", 0.9)


def build_udpgen(folder: Path) -> str:
    """bench/udpgen.c compiled into `folder`; its path."""
    if shutil.which("gcc") is None:
        raise SystemExit("needs gcc to build bench/udpgen.c (apt-get install gcc)")
    binary = folder / "udpgen"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(UDPGEN_SOURCE)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return str(binary)


def nginx_conf(tmp: Path) -> str:
    return f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
events {{ worker_connections 65536; }}
stream {{
    server {{
        listen {NODE_CLIENT_SIDE_IP}:{NGINX_PORT} udp rcvbuf=4m;
        proxy_pass {SERVER_IP}:{ECHO_PORT};
        proxy_responses 1;
        proxy_timeout 30s;
    }}
}}
"""


NAT_RULES = f"""table ip bench_udp_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {NAT_VIP} udp dport 53 dnat to {SERVER_IP}:{ECHO_PORT}
    }}
}}
"""


def objects(endpoint: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": "bench"},
            "spec": {
                "clusterIP": KPX_VIP,
                "clusterIPs": [KPX_VIP],
                "ports": [{"name": "u", "protocol": "UDP", "port": 53, "targetPort": ECHO_PORT}],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "echo-x1",
                "namespace": "bench",
                "labels": {"kubernetes.io/service-name": "echo"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "u", "protocol": "UDP", "port": ECHO_PORT}],
            "endpoints": [{"addresses": [endpoint], "conditions": {"ready": True}}],
        },
    ]


def ask(ns: Ns, ip: str, port: int, timeout: float = 0.3) -> bytes | None:
    s = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(b"?ping", (ip, port))
        return s.recv(100)
    except OSError:
        return None
    finally:
        s.close()


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per CPU (/proc/stat): (busy, total) jiffies; busy excludes idle and iowait."""
    out: dict[str, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in fields[:8]]
                out[name[3:]] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


def cpu_busy(before: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Each CPU's busy share since `before`: with the processes' own CPU, it shows how much
    of a pinned core went to other work (the machine is shared)."""
    after = cpu_times()
    return {
        cpu: (after[cpu][0] - b[0]) / max(1, after[cpu][1] - b[1])
        for cpu, b in before.items()
        if cpu in after
    }


def saturation(
    chain: Chain, gen: str, mode: str, pids: list[int], echo_pid: int, size: int, args: Any
) -> dict[str, float]:
    """One saturation pass; with the CPU of the proxy, the client and the echo server."""
    ip, port = TARGETS[mode]
    tree = [p for pid in pids for p in process_tree(pid)]
    before, server_before = user_kernel_seconds(tree), cpu_seconds([echo_pid])
    machine = cpu_times()
    out = chain.client.run(
        "taskset", "-c", CLIENT_CPU, gen, "saturate", ip, str(port),
        str(args.flows), str(args.window), str(size), str(args.duration),
    )  # fmt: skip
    after = user_kernel_seconds(tree)
    busy = cpu_busy(machine)
    user = after[0] - before[0] if tree else math.nan
    used = user + after[1] - before[1] if tree else math.nan
    server = cpu_seconds([echo_pid]) - server_before
    result: dict[str, float] = json.loads(out)
    answered = result["answered"] or math.nan
    seconds = result["seconds"]
    result["proxy_cpu_us_per_datagram"] = used / answered * 1e6
    result["proxy_user_us_per_datagram"] = user / answered * 1e6
    # What one whole core would carry at that cost: the proxy's capacity where the client
    # and the server, not the proxy, bound the measured rate.
    cost = result["proxy_cpu_us_per_datagram"]
    result["proxy_capacity_per_s"] = 1e6 / cost if cost > 0 else math.nan
    result["proxy_core_busy"] = used / seconds
    result["server_cpu_s"] = server
    result["client_server_core_busy"] = (result["cpu_s"] + server) / seconds
    # The pinned cores' busy share from any work: the processes above, softirq, and whatever
    # else runs on the machine.
    result["proxy_core_total_busy"] = busy.get(PROXY_CPU, math.nan)
    result["client_core_total_busy"] = busy.get(CLIENT_CPU, math.nan)
    return result


def latency(chain: Chain, gen: str, mode: str, args: Any) -> dict[str, float]:
    """One socket, one 64-byte datagram in flight, `--rate` a second."""
    ip, port = TARGETS[mode]
    out = chain.client.run(
        "taskset", "-c", CLIENT_CPU, gen, "rate", ip, str(port), str(args.rate), "64",
        str(args.duration),
    )  # fmt: skip
    result: dict[str, float] = json.loads(out)
    return result


def hold_sessions(
    chain: Chain, mode: str, pid: int, count: int
) -> tuple[list[socket.socket], dict[str, float]]:
    """`count` sessions through the proxy, one exchange each, kept open; RSS per session."""
    ip, port = TARGETS[mode]
    before = rss_mb(process_tree(pid))
    socks: list[socket.socket] = []
    failed = 0
    with chain.client.entered():
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(1.0)
            try:
                s.connect((ip, port))
                s.send(b"x" * 64)
                s.recv(100)
                socks.append(s)
            except OSError:
                failed += 1
                s.close()
    time.sleep(1.0)
    after = rss_mb(process_tree(pid))
    held = len(socks)
    return socks, {
        "held": float(held),
        "failed": float(failed),
        "rss_before_mb": before,
        "rss_after_mb": after,
        "bytes_per_session": (after - before) * 1e6 / held if held else float("nan"),
    }


def retarget(chain: Chain, api: Api, samples: int) -> dict[str, float]:
    """PUT the slice A <-> B while one client port sends every ms; ms to the new answer."""
    path = "/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/echo-x1"
    s = chain.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((KPX_VIP, 53))
    s.settimeout(0.001)
    took: list[float] = []
    missed = 0
    current = b"A"
    try:
        for _ in range(samples):
            new, ip = (b"B", SERVER_IP_2) if current == b"A" else (b"A", SERVER_IP)
            with chain.node.entered():
                body = api.request("GET", path)
                body["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}}]
                start = time.perf_counter()
                api.request("PUT", path, body)
            seen = None
            while time.perf_counter() - start < 5.0:
                try:
                    s.send(b"?")
                    while True:
                        if s.recv(100)[:1] == new:
                            seen = (time.perf_counter() - start) * 1000
                            break
                except TimeoutError:
                    pass
                except OSError:
                    time.sleep(0.001)
                if seen is not None:
                    break
            if seen is None:
                missed += 1
            else:
                took.append(seen)
            current = new
            time.sleep(0.05)
    finally:
        s.close()
    return {
        "p50_ms": percentile(took, 50),
        "p99_ms": percentile(took, 99),
        "samples": float(len(took)),
        "not_seen_in_5s": float(missed),
    }


def one_run(
    chain: Chain, tmp: Path, gen: str, echo: subprocess.Popen[Any], args: Any
) -> dict[str, Any]:
    """Start nginx, the API server and kpx afresh (no session alive), measure, stop them."""
    tmp.mkdir()
    run: dict[str, Any] = {}
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    (tmp / "nginx.conf").write_text(nginx_conf(tmp))
    nginx = chain.node.popen(
        "taskset", "-c", PROXY_CPU, "nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp),
        **quiet,
    )  # fmt: skip
    api, kubeconfig = start_fake_apiserver(
        objects(SERVER_IP), tmp / "api", chain.node.popen, extra_history=4 * args.samples
    )
    with open(tmp / "kpx.log", "w") as log:
        kpx = chain.node.popen(
            "taskset", "-c", PROXY_CPU, sys.executable, "-m", "kpx.main", "--mode", "nftables",
            "--kubeconfig", str(kubeconfig), "--node-name", "node",
            "--metrics-bind-address", KPX_METRICS, "--healthz-bind-address", "127.0.0.1:10256",
            "--log-format", "json", "--log-level", "warning",
            "--udp-max-sessions", str(max(65536, 2 * args.sessions)),
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        owners = {"direct": echo, "nat": echo, "nginx": nginx, "kpx": kpx}
        for mode in MODES:
            ip, port = TARGETS[mode]
            wait_until(
                f"{mode} {ip}:{port} (kpx log {tmp / 'kpx.log'})",
                lambda ip=ip, port=port: ask(chain.client, ip, port) is not None,
                owners[mode],
                60,
            )
        pids = {"direct": [], "nat": [], "nginx": [nginx.pid], "kpx": [kpx.pid]}
        for size, label in ((64, "small"), (1200, "bulk")):
            run[label] = {
                m: saturation(chain, gen, m, pids[m], echo.pid, size, args) for m in MODES
            }
        run["latency"] = {m: latency(chain, gen, m, args) for m in MODES}
        for mode in MODES:
            run["latency"][mode]["added_p99_us"] = (
                run["latency"][mode]["p99_us"] - run["latency"]["direct"]["p99_us"]
            )
        run["sessions"] = {}
        for mode in ("nginx", "kpx"):
            unloaded = saturation(chain, gen, mode, pids[mode], echo.pid, 64, args)
            socks, held = hold_sessions(chain, mode, pids[mode][0], args.sessions)
            try:
                loaded = saturation(chain, gen, mode, pids[mode], echo.pid, 64, args)
            finally:
                for s in socks:
                    s.close()
            run["sessions"][mode] = {
                **held,
                "small_without_sessions": unloaded,
                "small_with_sessions": loaded,
            }
        client = Api(kubeconfig)
        try:
            run["retarget"] = retarget(chain, client, args.samples)
        finally:
            client.close()
    finally:
        for proc in (kpx, nginx, api):
            _stop(proc)
    run["targets"] = targets(run)
    return run


def _ratio(ours: float, peer: float) -> float:
    ok = math.isfinite(ours) and math.isfinite(peer) and peer > 0
    return ours / peer if ok else math.nan


def targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of issue 11's targets: kpx / nginx (or loaded / idle), the limit, met or not."""
    out: dict[str, dict[str, Any]] = {}
    for name, section, key, op, limit in GOALS:
        part = doc[section]
        ratio = _ratio(float(part["kpx"][key]), float(part["nginx"][key]))
        out[name] = {"ratio": ratio, "target": f"{op} {limit}", "met": _met(ratio, op, limit)}
        if key == "answers_per_s":
            out[name]["bound_by"] = {m: bound_by(part[m]) for m in ("nginx", "kpx")}
    name, op, limit = SESSIONS_GOAL
    kpx = doc["sessions"]["kpx"]
    loaded = float(kpx["small_with_sessions"]["answers_per_s"])
    # The pass right before the sessions were made (older results: the first 64-byte pass).
    unloaded = kpx.get("small_without_sessions") or doc["small"]["kpx"]
    ratio = _ratio(loaded, float(unloaded["answers_per_s"]))
    out[name] = {"ratio": ratio, "target": f"{op} {limit}", "met": _met(ratio, op, limit)}
    return out


def over_runs(per_run: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The targets over the runs: each ratio is the median of the runs' own ratios (kpx and
    nginx of one run met the same load on the shared machine; medians of each figure taken
    apart would pair figures of different runs), judged like one run's."""
    out: dict[str, dict[str, Any]] = {}
    for name, first in per_run[0].items():
        ratios = [run[name]["ratio"] for run in per_run]
        finite = [r for r in ratios if math.isfinite(r)]
        ratio = statistics.median(finite) if finite else math.nan
        op, limit = first["target"].split()
        out[name] = {
            "ratio": ratio,
            "target": first["target"],
            "met": _met(ratio, op, float(limit)),
            "runs": ratios,
        }
        if "bound_by" in first:
            out[name]["bound_by_runs"] = [run[name]["bound_by"] for run in per_run]
    return out


def bound_by(result: dict[str, float]) -> str:
    """What held a saturation pass's rate: the proxy's core, the client's and server's core,
    or other work on the machine (neither of ours was busy)."""
    if float(result["proxy_core_busy"]) >= BUSY:
        return "proxy core"
    if float(result["client_server_core_busy"]) >= BUSY:
        return "client/server core"
    total = max(float(result["proxy_core_total_busy"]), float(result["client_core_total_busy"]))
    return "other load on a pinned core" if total >= BUSY else "neither core (latency)"


def _met(ratio: float, op: str, limit: float) -> bool:
    return math.isfinite(ratio) and (ratio >= limit if op == ">=" else ratio <= limit)


def medians(runs: list[Any]) -> Any:
    """The runs' common shape with every number replaced by its median over the runs."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: medians([r[k] for r in runs]) for k in first if k != "targets"}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    values = [float(v) for v in runs if math.isfinite(float(v))]
    return statistics.median(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs, each with fresh proxies")
    parser.add_argument("--duration", type=float, default=4, help="seconds per pass")
    parser.add_argument("--flows", type=int, default=64, help="client sockets in saturation")
    parser.add_argument("--window", type=int, default=8, help="datagrams in flight per socket")
    parser.add_argument("--rate", type=float, default=2000, help="datagrams/s, latency pass")
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions held")
    parser.add_argument("--samples", type=int, default=50, help="re-targeting samples")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short passes")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.duration, args.sessions, args.samples, args.flows = 1, 1, 200, 3, 8
    missing = [t for t in ("nginx", "taskset", "ip", "nft", "gcc") if shutil.which(t) is None]
    if missing or not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        raise SystemExit(f"needs {missing or 'libnginx-mod-stream'} (apt-get install them)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    doc: dict[str, Any] = {"benchmark": "udp", "quick": args.quick, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-udp-") as tmpname, Chain() as chain:
        tmp = Path(tmpname)
        gen = build_udpgen(tmp)
        echo = chain.server.popen(
            "taskset", "-c", CLIENT_CPU, gen, "echo", str(ECHO_PORT), SERVER_IP, "A",
            SERVER_IP_2, "B", stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert echo.stdout is not None
        if echo.stdout.readline().strip() != "ready":
            raise SystemExit("echo server did not start")
        chain.node.nft(NAT_RULES)
        runs = []
        for index in range(args.runs):
            runs.append(one_run(chain, tmp / f"run{index + 1}", gen, echo, args))
            print(f"run {index + 1}:", file=sys.stderr)
            report(runs[-1], sys.stderr)
        _stop(echo)
    doc["runs"] = runs
    doc.update(medians(runs))
    doc["targets"] = over_runs([run["targets"] for run in runs])
    doc["targets_missed"] = [name for name, t in doc["targets"].items() if not t["met"]]
    print(f"medians of {len(runs)} runs:")
    report(doc, sys.stdout)
    if args.json:
        write_json(args.json, {**doc, "complete": True})


def report(doc: dict[str, Any], out: Any) -> None:
    def say(text: str) -> None:
        print(text, file=out)

    say("64-byte request/response, saturation: answers/s, proxy CPU us per datagram,")
    say("  proxy core busy (proxy / all work), client+server core busy (them / all work)")
    for label in ("small", "bulk"):
        if label == "bulk":
            say("1,200-byte datagrams: the same, and MB/s")
        for mode in MODES:
            r = doc[label][mode]
            say(
                f"  {mode:8}{r['answers_per_s']:>12,.0f}{r['proxy_cpu_us_per_datagram']:>8.1f}"
                f"{r['proxy_core_busy']:>7.2f} /{r['proxy_core_total_busy']:>5.2f}"
                f"{r['client_server_core_busy']:>7.2f} /{r['client_core_total_busy']:>5.2f}"
                + (f"{r['mb_per_s']:>8.1f}" if label == "bulk" else "")
            )
    say("latency at a fixed rate: p50, p99, p99 added over direct (us), lost")
    for mode in MODES:
        r = doc["latency"][mode]
        say(
            f"  {mode:8}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}{r['added_p99_us']:>10.0f}"
            f"{r['lost']:>6.0f}"
        )
    for mode, r in doc["sessions"].items():
        say(
            f"{mode}: {r['held']:.0f} sessions held, {r['bytes_per_session']:,.0f} bytes each; "
            f"answers/s with them held {r['small_with_sessions']['answers_per_s']:,.0f}"
            + (
                f", right before {r['small_without_sessions']['answers_per_s']:,.0f}"
                if "small_without_sessions" in r
                else ""
            )
        )
    r = doc["retarget"]
    say(f"kpx re-targeting after an endpoint change: p50 {r['p50_ms']:.1f} ms, "
        f"p99 {r['p99_ms']:.1f} ms over {r['samples']:.0f} samples")  # fmt: skip
    for name, t in doc["targets"].items():
        verdict = "met" if t["met"] else "MISSED"
        bound = t.get("bound_by")
        why = f"; bound by: {', '.join(f'{m} {b}' for m, b in bound.items())}" if bound else ""
        if "runs" in t:
            why = " (median of runs: " + ", ".join(f"{r:.2f}" for r in t["runs"]) + ")"
        say(f"  target {name}: {t['ratio']:.2f}x ({t['target']}) {verdict}{why}")


if __name__ == "__main__":
    main()
