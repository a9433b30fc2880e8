"""Where a proxied connection's time goes, kpx against haproxy, in counts a busy CPU cannot skew.

    .venv/bin/python -m bench.conncost [--conns 2000] [--no-strace] [--python-calls]

The bench/proxy.py topology (client ns -- node ns -- server ns, haproxy `http-request return`
as the origin), with haproxy (`mode tcp`, one thread, splice as in bench/proxy.py) and kpx
(`--mode nftables --manifests`) in the node ns. A client process opens `--conns` connections
one after the other, each with one small request and `Connection: close`, read to the end:
- syscalls per connection of the proxy process, by name (`strace -c -f -p PID` attached for
  exactly that pass): deterministic, whatever else runs on the machine; then kpx's minus
  haproxy's, by name (`extra_syscalls`);
- user and kernel CPU microseconds per connection (utime/stime of the proxy, a pass without
  strace; clock ticks of 10 ms, so only meaningful for thousands of connections, and only a
  figure on an idle machine);
- `--python-calls`: Python function calls per connection in kpx's data path (kpx.proxy.Proxy
  run in this process, in the node ns, with the real round-robin picker, under cProfile for the
  pass only); the hottest functions by own calls.
Counts, not rates: the rate comparison is bench/proxy.py's job on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.netns_topology import NODE_CLIENT_SIDE_IP, SERVER_IP, Chain, netns_unavailable
from bench.procstat import CLK_TCK, _stat_fields
from bench.proxy import (
    HAPROXY_HTTP,
    HTTP_PORT,
    KPX_VIP,
    ORIGIN_CFG,
    bench_objects,
    connects,
    haproxy_cfg,
    start_kpx,
    wait_until,
)

CLIENT = r"""
import socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
bad = 0
for _ in range(n):
    s = socket.create_connection((ip, port), timeout=5)
    s.sendall(req)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    bad += not data.endswith(b"ok")
print(bad)
"""


def run_client(chain: Chain, ip: str, port: int, n: int) -> None:
    out = chain.client.run(sys.executable, "-c", CLIENT, ip, str(port), str(n))
    if out.strip() != "0":
        raise RuntimeError(f"{out.strip()} of {n} requests through {ip}:{port} failed")


def user_kernel_seconds(pid: int) -> tuple[float, float]:
    fields = _stat_fields(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


_STRACE_ROW = re.compile(r"^\s*[0-9.]+\s+[0-9.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def strace_counts(chain: Chain, pid: int, ip: str, port: int, n: int) -> dict[str, int]:
    """Syscalls of `pid` (every thread) while `n` connections go through it, by name."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        strace = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(pid), "-o", out.name], stderr=subprocess.PIPE
        )
        assert strace.stderr is not None
        # strace says "Process N attached" once it is attached to every thread.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"attached" not in strace.stderr.readline():
            pass
        time.sleep(0.2)
        try:
            run_client(chain, ip, port, n)
        finally:
            strace.send_signal(signal.SIGINT)
            strace.wait(timeout=10)
        counts: dict[str, int] = {}
        for line in out.read().splitlines():
            m = _STRACE_ROW.match(line)
            if m and m.group(3) != "total":
                counts[m.group(3)] = int(m.group(1))
    return counts


def measure(chain: Chain, label: str, pid: int, ip: str, port: int, args: Any) -> dict[str, Any]:
    run_client(chain, ip, port, 200)  # warm: pools, caches, the allocator
    u0, k0 = user_kernel_seconds(pid)
    run_client(chain, ip, port, args.conns)
    u1, k1 = user_kernel_seconds(pid)
    result: dict[str, Any] = {
        "user_us_per_conn": (u1 - u0) * 1e6 / args.conns,
        "kernel_us_per_conn": (k1 - k0) * 1e6 / args.conns,
    }
    if not args.no_strace:
        counts = strace_counts(chain, pid, ip, port, args.conns)
        per = {k: v / args.conns for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
        result["syscalls_per_conn"] = sum(per.values())
        result["by_syscall"] = {k: round(v, 2) for k, v in per.items() if v >= 0.01}
    print(f"{label:8} " + json.dumps(result))
    return result


def extra_syscalls(kpx: dict[str, Any], haproxy: dict[str, Any]) -> dict[str, float]:
    """kpx's syscalls per connection minus haproxy's, by name (where they differ), printed."""
    mine, theirs = kpx["by_syscall"], haproxy["by_syscall"]
    diff = {
        name: round(mine.get(name, 0.0) - theirs.get(name, 0.0), 2)
        for name in sorted(
            set(mine) | set(theirs), key=lambda n: -abs(mine.get(n, 0.0) - theirs.get(n, 0.0))
        )
    }
    diff = {name: d for name, d in diff.items() if d}
    print(
        f"kpx - haproxy syscalls per connection: "
        f"{kpx['syscalls_per_conn'] - haproxy['syscalls_per_conn']:+.2f} ("
        + ", ".join(f"{name} {d:+.2f}" for name, d in diff.items())
        + ")"
    )
    return diff


def python_calls(chain: Chain, args: Any) -> dict[str, Any]:
    """kpx's data path in this process under cProfile, for one pass of `--conns`."""
    from kpx.backends import Backend
    from kpx.balancer import FailureTracker, RoundRobinPicker
    from kpx.proxy import Proxy

    failures = FailureTracker(time.monotonic)
    picker = RoundRobinPicker(time.monotonic, random.Random(1), failures, None)
    picker.set_backends([Backend(SERVER_IP, HTTP_PORT)])

    class Frontends:
        def lookup(self, ip: str, port: int) -> RoundRobinPicker | None:
            return picker if (ip, port) == (KPX_VIP, 80) else None

    profile = cProfile.Profile()
    ready = threading.Event()
    port_box: list[int] = []
    loop_box: list[asyncio.AbstractEventLoop] = []
    done_box: list[asyncio.Event] = []

    async def serve() -> None:
        done_box.append(asyncio.Event())
        proxy = Proxy(Frontends())
        listener = await proxy.serve_port(NODE_CLIENT_SIDE_IP, 0, KPX_VIP, 80)
        port_box.append(listener.port)
        loop_box.append(asyncio.get_running_loop())
        ready.set()
        await done_box[0].wait()
        await proxy.stop()

    def loop_thread() -> None:
        import uvloop

        with chain.node.entered():
            uvloop.run(serve())

    thread = threading.Thread(target=loop_thread, daemon=True)
    thread.start()
    ready.wait(10)
    port = port_box[0]
    run_client(chain, NODE_CLIENT_SIDE_IP, port, 200)
    if args.callgrind_child:  # run under callgrind by `--instructions`: one pass, then exit
        run_client(chain, NODE_CLIENT_SIDE_IP, port, args.conns)
        _in_loop(loop_box[0], done_box[0].set)
        thread.join(30)
        return {}
    # cProfile hooks the thread that enables it: switch it on and off from the loop thread.
    gc_before = gc.get_stats()
    _in_loop(loop_box[0], profile.enable)
    run_client(chain, NODE_CLIENT_SIDE_IP, port, args.conns)
    _in_loop(loop_box[0], profile.disable)
    gc_after = gc.get_stats()
    _in_loop(loop_box[0], done_box[0].set)
    thread.join(10)
    stats = pstats.Stats(profile)
    if args.pstats:
        stats.dump_stats(args.pstats)
    total = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])[:15]  # type: ignore[attr-defined]
    result = {
        "python_calls_per_conn": total / args.conns,
        # Cyclic garbage the collector had to find, and its runs, per connection: objects
        # that reference counting alone would have freed at once cost nothing here.
        "gc_collected_per_conn": sum(
            a["collected"] - b["collected"] for a, b in zip(gc_after, gc_before, strict=True)
        )
        / args.conns,
        "gc_runs_per_1000_conns": [
            round((a["collections"] - b["collections"]) * 1000 / args.conns, 2)
            for a, b in zip(gc_after, gc_before, strict=True)
        ],
        "top": {f"{k[2]} ({Path(k[0]).name}:{k[1]})": round(v[1] / args.conns, 2) for k, v in top},
    }
    print("kpx python calls " + json.dumps(result, indent=1))
    return result


def callgrind_total(path: Path) -> float:
    """Instructions executed (Ir), from a callgrind output file."""
    m = re.search(r"^(?:totals|summary): (\d+)", path.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no totals in {path}")
    return float(m.group(1))


def valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def haproxy_instructions(chain: Chain, tmp: Path, conns: int) -> float:
    """Every instruction haproxy ran from start to exit with `conns` connections (+1 probe)."""
    out = tmp / f"haproxy-{conns}.callgrind"
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    haproxy = chain.node.popen(
        *valgrind(out), "haproxy", "-db", "-f", str(tmp / "haproxy.cfg"), **quiet
    )
    deadline = time.monotonic() + 120
    while True:  # refused until it listens: those never reach haproxy's code
        try:
            run_client(chain, NODE_CLIENT_SIDE_IP, HAPROXY_HTTP, 1)
            break
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    run_client(chain, NODE_CLIENT_SIDE_IP, HAPROXY_HTTP, conns)
    haproxy.terminate()
    haproxy.wait(120)
    return callgrind_total(out)


def kpx_instructions(tmp: Path, conns: int) -> float:
    """Every instruction of this script's --only-python pass (kpx's data path in-process, 200
    warm-up connections, then `conns`), from start to exit, under callgrind."""
    out = tmp / f"kpx-{conns}.callgrind"
    argv = [sys.executable, "-m", "bench.conncost", "--only-python", "--callgrind-child"]
    subprocess.run(
        [*valgrind(out), *argv, "--conns", str(conns)],
        check=True,
        timeout=1800,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return callgrind_total(out)


def instructions(chain: Chain, tmp: Path, args: Any) -> dict[str, float]:
    """User-space instructions per connection, exact whatever else the machine does: each
    program run twice under callgrind, with `--conns` and with 4x as many connections; the
    difference over the extra connections cancels start-up and exit. The kernel's share is
    not counted (see the syscalls)."""
    few, many = args.conns, 4 * args.conns
    result = {
        "haproxy_instructions_per_conn": (
            haproxy_instructions(chain, tmp, many) - haproxy_instructions(chain, tmp, few)
        )
        / (many - few),
        "kpx_instructions_per_conn": (kpx_instructions(tmp, many) - kpx_instructions(tmp, few))
        / (many - few),
    }
    print("user-space instructions " + json.dumps(result))
    return result


def _in_loop(loop: asyncio.AbstractEventLoop, call: Any) -> None:
    """Run `call` on the loop's thread and wait for it."""
    finished = threading.Event()

    def run() -> None:
        call()
        finished.set()

    loop.call_soon_threadsafe(run)
    finished.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=2000)
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--python-calls", action="store_true")
    parser.add_argument("--only-python", action="store_true", help="just --python-calls")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--pstats", metavar="PATH", help="with --python-calls: save the profile")
    parser.add_argument(
        "--instructions", action="store_true", help="only user-space instructions (callgrind)"
    )
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="bench-conncost-") as tmpname, Chain() as chain:
        tmp = Path(tmpname)
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        (tmp / "origin.cfg").write_text(ORIGIN_CFG)
        (tmp / "haproxy.cfg").write_text(haproxy_cfg(1, True))
        (tmp / "manifests").mkdir()
        (tmp / "manifests" / "bench.json").write_text(
            json.dumps({"apiVersion": "v1", "kind": "List", "items": bench_objects()})
        )
        origin = chain.server.popen("haproxy", "-db", "-f", str(tmp / "origin.cfg"), **quiet)
        wait_until("origin", lambda: connects(chain.node, SERVER_IP, HTTP_PORT), origin, 30)
        doc: dict[str, Any] = {"conns": args.conns}
        if args.instructions:
            doc["instructions"] = instructions(chain, tmp, args)
        elif args.only_python:
            doc["kpx_python"] = python_calls(chain, args)
        else:
            haproxy = chain.node.popen("haproxy", "-db", "-f", str(tmp / "haproxy.cfg"), **quiet)
            kpx = start_kpx(chain, ["--manifests", str(tmp / "manifests")], tmp, "kpx", 60)
            time.sleep(0.5)
            doc["haproxy"] = measure(
                chain, "haproxy", haproxy.pid, NODE_CLIENT_SIDE_IP, HAPROXY_HTTP, args
            )
            doc["kpx"] = measure(chain, "kpx", kpx.pid, KPX_VIP, 80, args)
            if not args.no_strace:
                doc["extra_syscalls"] = extra_syscalls(doc["kpx"], doc["haproxy"])
            if args.python_calls:
                doc["kpx_python"] = python_calls(chain, args)
            os.kill(kpx.pid, signal.SIGTERM)
            kpx.wait(30)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
