"""kpx's UDP relay against nginx's `stream` UDP proxy and the kernel's NAT (issue 11).

    .venv/bin/python -m bench.udp [--duration 5] [--sessions 10000] [--samples 50]
        [--rate 2000] [--quick] [--json PATH]

Topology (bench/netns_topology.py): client ns -- node ns -- server ns over veths. The server
ns runs two batched UDP echo servers (SERVER_IP and SERVER_IP_2, port 5353; each answers the
datagram with its first byte replaced by "A" or "B"). Paths from the client, one run:
  direct  client -> SERVER_IP:5353 (routed by the node)
  nat     client -> 10.96.0.11:53, an nftables `dnat` rule in the node (kube-proxy's way)
  nginx   client -> 10.233.1.1:5300, nginx `stream { listen udp; proxy_responses 1; }`
          (Debian's nginx-light + libnginx-mod-stream), one worker
  kpx     client -> 10.96.0.10:53, `kpx --mode nftables` fed by the fake API server
The proxies are pinned to CPU 0 (`taskset`), the client and the servers to CPU 1.
Per path:
- saturation, 64-byte request/response: `--flows` client sockets (sessions), each keeping
  `--window` datagrams in flight, for `--duration` s: answers/s, and proxy CPU per answered
  datagram (utime+stime of the proxy's processes / answers);
- the same with 1,200-byte datagrams (bulk), also in MB/s;
- latency at a fixed `--rate`: one socket, one datagram in flight, p50/p99; "added" is the
  path's p99 minus the direct path's;
- nginx and kpx: `--sessions` concurrent sessions (one socket each, one exchange each, then
  held): proxy RSS per session, then the 64-byte saturation pass again with those held;
- kpx only: re-targeting time, `--samples` times: a client sends every millisecond from one
  source port; the EndpointSlice is PUT moving the endpoint A <-> B; time from the PUT to the
  first answer from the new endpoint; p50/p99.
`--quick`: 1 s passes, 200 sessions, 3 samples: a smoke test of the harness, figures
meaningless. Figures, never assertions: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.apiclient import Api, start_fake_apiserver
from bench.jsonout import write_json
from bench.netns_topology import NODE_CLIENT_SIDE_IP, SERVER_IP, SERVER_IP_2, Chain, Ns
from bench.procstat import cpu_seconds, process_tree, rss_mb
from bench.proxy import _stop, percentile, wait_until

ROOT = Path(__file__).resolve().parent.parent
KPX = str(ROOT / ".venv" / "bin" / "kpx")
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

# Batched echo: recvmmsg/sendmmsg through kwatch.mmsg, answering with the first byte replaced.
ECHO = r"""
import select, socket, sys
from kwatch.mmsg import RecvBatch, SendBatch
socks = []
for ip, tag in zip(sys.argv[1::2], sys.argv[2::2]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((ip, 5353)); s.setblocking(False); socks.append((s, tag.encode()))
rx, tx = RecvBatch(64, 2048), SendBatch(64, 2048)
poll = select.epoll()
for s, _ in socks:
    poll.register(s.fileno(), select.EPOLLIN)
tags = {s.fileno(): tag for s, tag in socks}
print("ready", flush=True)
while True:
    for fd, _ in poll.poll():
        while True:
            n = rx.recv(fd)
            if n <= 0:
                break
            for i in range(n):
                data = rx.data(i)
                tx.add(tags[fd] + bytes(data[1:]), rx.name(i))
            tx.flush(fd)
            if n < rx.batch:
                break
"""

# Load generator: FLOWS connected sockets, WINDOW datagrams in flight each, for SECONDS.
LOAD = r"""
import json, select, socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
flows, window, size = map(int, sys.argv[3:6])
seconds = float(sys.argv[6])
payload = b"x" * size
socks, inflight = [], {}
poll = select.epoll()
for _ in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect((ip, port)); s.setblocking(False); socks.append(s)
    poll.register(s.fileno(), select.EPOLLIN); inflight[s.fileno()] = 0
by_fd = {s.fileno(): s for s in socks}
answered = bytes_in = 0
t0 = time.monotonic(); end = t0 + seconds; last_kick = t0
def top_up(fd):
    s = by_fd[fd]
    while inflight[fd] < window:
        try:
            s.send(payload)
        except (BlockingIOError, ConnectionRefusedError):
            return
        inflight[fd] += 1
for fd in by_fd:
    top_up(fd)
while True:
    now = time.monotonic()
    if now >= end:
        break
    if now - last_kick > 0.2:  # datagrams lost on the way: refill every window
        for fd in by_fd:
            inflight[fd] = 0; top_up(fd)
        last_kick = now
    for fd, _ in poll.poll(0.05):
        s = by_fd[fd]
        while True:
            try:
                data = s.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                break
            answered += 1; bytes_in += len(data)
            inflight[fd] = max(0, inflight[fd] - 1)
        top_up(fd)
took = time.monotonic() - t0
print(json.dumps({"answers_per_s": answered / took, "mb_per_s": bytes_in / took / 1e6,
                  "answered": answered, "seconds": took}))
"""


def nginx_conf(tmp: Path) -> str:
    return f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err warn;
events {{ worker_connections 65536; }}
stream {{
    server {{
        listen {NODE_CLIENT_SIDE_IP}:{NGINX_PORT} udp;
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


def saturation(chain: Chain, mode: str, pids: list[int], size: int, args: Any) -> dict[str, float]:
    ip, port = TARGETS[mode]
    tree = [p for pid in pids for p in process_tree(pid)]
    before = cpu_seconds(tree) if tree else 0.0
    out = chain.client.run(
        "taskset", "-c", CLIENT_CPU, sys.executable, "-c", LOAD, ip, str(port),
        str(args.flows), str(args.window), str(size), str(args.duration),
    )  # fmt: skip
    used = (cpu_seconds(tree) - before) if tree else float("nan")
    result: dict[str, float] = json.loads(out)
    answered = result["answered"] or float("nan")
    result["proxy_cpu_us_per_datagram"] = used / answered * 1e6 if tree else float("nan")
    return result


def latency(chain: Chain, mode: str, args: Any) -> dict[str, float]:
    ip, port = TARGETS[mode]
    s = chain.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((ip, port))
    s.settimeout(0.5)
    rtts: list[float] = []
    lost = 0
    interval = 1.0 / args.rate
    end = time.monotonic() + args.duration
    next_send = time.monotonic()
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            if now < next_send:
                time.sleep(next_send - now)
            next_send += interval
            t0 = time.perf_counter()
            try:
                s.send(b"x" * 64)
                s.recv(100)
                rtts.append((time.perf_counter() - t0) * 1e6)
            except OSError:
                lost += 1
    finally:
        s.close()
    return {
        "p50_us": percentile(rtts, 50),
        "p99_us": percentile(rtts, 99),
        "samples": float(len(rtts)),
        "lost": float(lost),
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5, help="seconds per pass")
    parser.add_argument("--flows", type=int, default=64, help="client sockets in saturation")
    parser.add_argument("--window", type=int, default=8, help="datagrams in flight per socket")
    parser.add_argument("--rate", type=float, default=2000, help="datagrams/s, latency pass")
    parser.add_argument("--sessions", type=int, default=10_000, help="sessions held")
    parser.add_argument("--samples", type=int, default=50, help="re-targeting samples")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short passes")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.sessions, args.samples, args.flows = 1, 200, 3, 8
    missing = [t for t in ("nginx", "taskset", "ip", "nft") if shutil.which(t) is None]
    if missing or not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        raise SystemExit(f"needs {missing or 'libnginx-mod-stream'} (apt-get install them)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    doc: dict[str, Any] = {"benchmark": "udp", "quick": args.quick, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-udp-") as tmpname, Chain() as chain:
        tmp = Path(tmpname)
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        echo = chain.server.popen(
            "taskset", "-c", CLIENT_CPU, sys.executable, "-u", "-c", ECHO,
            SERVER_IP, "A", SERVER_IP_2, "B", cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert echo.stdout is not None
        if echo.stdout.readline().strip() != "ready":
            raise SystemExit("echo server did not start")
        chain.node.nft(NAT_RULES)
        (tmp / "nginx.conf").write_text(nginx_conf(tmp))
        nginx = chain.node.popen(
            "taskset", "-c", PROXY_CPU, "nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp),
            **quiet,
        )  # fmt: skip
        api, kubeconfig = start_fake_apiserver(
            objects(SERVER_IP), tmp / "api", chain.node.popen, extra_history=4 * args.samples
        )
        log = open(tmp / "kpx.log", "w")
        kpx = chain.node.popen(
            "taskset", "-c", PROXY_CPU, KPX, "--mode", "nftables", "--kubeconfig", str(kubeconfig),
            "--node-name", "node", "--metrics-bind-address", KPX_METRICS,
            "--healthz-bind-address", "127.0.0.1:10256", "--log-format", "json",
            "--log-level", "warning", "--udp-max-sessions", str(max(65536, 2 * args.sessions)),
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
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
            doc[label] = {m: saturation(chain, m, pids[m], size, args) for m in MODES}
        doc["latency"] = {m: latency(chain, m, args) for m in MODES}
        for mode in MODES:
            doc["latency"][mode]["added_p99_us"] = (
                doc["latency"][mode]["p99_us"] - doc["latency"]["direct"]["p99_us"]
            )
        doc["sessions"] = {}
        for mode in ("nginx", "kpx"):
            socks, held = hold_sessions(chain, mode, pids[mode][0], args.sessions)
            try:
                loaded = saturation(chain, mode, pids[mode], 64, args)
            finally:
                for s in socks:
                    s.close()
            doc["sessions"][mode] = {**held, "small_with_sessions": loaded}
        client = Api(kubeconfig)
        try:
            doc["retarget"] = retarget(chain, client, args.samples)
        finally:
            client.close()
        for proc in (kpx, nginx, api, echo):
            _stop(proc)
    report(doc)
    if args.json:
        write_json(args.json, {**doc, "complete": True})


def report(doc: dict[str, Any]) -> None:
    print("64-byte request/response, saturation: answers/s, proxy CPU us per datagram")
    for mode in MODES:
        r = doc["small"][mode]
        print(f"  {mode:8}{r['answers_per_s']:>12,.0f}{r['proxy_cpu_us_per_datagram']:>10.1f}")
    print("1,200-byte datagrams: answers/s, MB/s, proxy CPU us per datagram")
    for mode in MODES:
        r = doc["bulk"][mode]
        print(
            f"  {mode:8}{r['answers_per_s']:>12,.0f}{r['mb_per_s']:>10.1f}"
            f"{r['proxy_cpu_us_per_datagram']:>10.1f}"
        )
    print("latency at a fixed rate: p50, p99, p99 added over direct (us)")
    for mode in MODES:
        r = doc["latency"][mode]
        print(f"  {mode:8}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}{r['added_p99_us']:>10.0f}")
    for mode, r in doc["sessions"].items():
        print(
            f"{mode}: {r['held']:.0f} sessions held, {r['bytes_per_session']:,.0f} bytes each; "
            f"answers/s with them held {r['small_with_sessions']['answers_per_s']:,.0f}"
        )
    r = doc["retarget"]
    print(f"kpx re-targeting after an endpoint change: p50 {r['p50_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms over {r['samples']:.0f} samples")  # fmt: skip


if __name__ == "__main__":
    main()
