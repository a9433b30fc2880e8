"""Convergence soak: both daemons watch an API server under churn and chaos; at the end every
DNS name and every kpx frontend must match what the API holds.

    .venv/bin/python -m bench.soak [--duration 1200] [--rate 50] [--services 300]
        [--warmup 120] [--quick] [--json PATH]

The fake API server (tests/apiserver, real wire protocol) runs in this process; dnsd and kpx
(`--mode ports`, no root needed) run as subprocesses with a kubeconfig, as in a cluster.
During `--duration` seconds, `--rate` writes per second spread over Services (created,
re-ported, deleted), EndpointSlices (endpoints added, removed, made not ready), Pods and
Namespaces; every minute the history is compacted (watches resuming from an old
resourceVersion get 410 and relist) and, half a minute later, every watch is dropped; once,
half-way, the API server is stopped for 5 s (connections reset) and started again.

At the end, after the writes stop, the checker compares (retrying for up to 30 s):
- DNS: every Service's `<svc>.<ns>.svc.cluster.local` A answer (its ClusterIP; for headless
  Services its ready endpoint addresses; NXDOMAIN for every Service deleted during the run);
- kpx: every frontend of /debug/services (ClusterIP:port and its state, `serve` with ready
  endpoints, else `reject`) against the Services and EndpointSlices the API holds.
Zero differences is the pass mark. It also reports each daemon's RSS after `--warmup` and at
the end (growth in %; goal <= 5 %) and open file descriptors (goal: no growth; for kpx beyond
the one listening socket `--mode ports` holds per frontend). Figures from a
shared machine are noise: the lead runs the real one. `--quick`: 60 s (or a shorter `--duration`),
10 writes/s, chaos every third of the run (a smoke test of the harness).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode

from bench.jsonout import write_json
from tests.apiserver import FakeApiServer

ROOT = Path(__file__).resolve().parent.parent
ZONE = "cluster.local"
NODE = "node-a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the cluster's objects ----------------------------------------------------------------------


@dataclass
class Cluster:
    """What the churn has written, to pick the next write from (the API holds the truth)."""

    rng: random.Random
    namespaces: list[str] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # ns/name -> Service
    deleted: set[str] = field(default_factory=set)  # ns/name of Services deleted
    pods: set[str] = field(default_factory=set)
    next_ip: int = 1
    next_id: int = 0

    def cluster_ip(self) -> str:
        self.next_ip += 1
        n = self.next_ip
        return f"10.96.{n // 250 % 250}.{n % 250 + 1}"


def service_obj(ns: str, name: str, ip: str, port: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"name": "http", "port": port, "protocol": "TCP"}]}
    spec.update(clusterIP=ip, clusterIPs=[ip])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def slice_obj(ns: str, name: str, rng: random.Random) -> dict[str, Any]:
    count = rng.randint(0, 4)
    base = rng.randint(0, 200)
    endpoints = [
        {
            "addresses": [f"10.{64 + (base + i) // 250}.{(base + i) % 250}.{i + 1}"],
            "conditions": {"ready": rng.random() > 0.2},
            "nodeName": NODE,
        }
        for i in range(count)
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def namespace_obj(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def pod_obj(ns: str, name: str, n: int) -> dict[str, Any]:
    ip = f"10.200.{n // 250 % 250}.{n % 250 + 1}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": NODE},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"},
    }


def initial(cluster: Cluster, services: int) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i in range(10):
        cluster.namespaces.append(f"ns{i}")
        objs.append(namespace_obj(f"ns{i}"))
    for i in range(services):
        ns = cluster.namespaces[i % 10]
        name = f"svc{i}"
        svc = service_obj(ns, name, cluster.cluster_ip(), 80)
        if i % 5 == 0:  # every fifth headless: DNS answers its endpoints
            svc["spec"].update(clusterIP="None", clusterIPs=["None"])
        cluster.services[f"{ns}/{name}"] = svc
        objs += [svc, slice_obj(ns, name, cluster.rng)]
    cluster.next_id = services
    return objs


def churn_once(api: FakeApiServer, cluster: Cluster) -> None:
    """One write, chosen at random among the kinds a busy cluster sees."""
    rng = cluster.rng
    roll = rng.random()
    keys = list(cluster.services)
    if roll < 0.45 and keys:  # endpoints move: the most common write
        ns, name = rng.choice(keys).split("/")
        api.apply(slice_obj(ns, name, rng))
    elif roll < 0.60:  # a new Service with its slice
        ns = rng.choice(cluster.namespaces)
        name = f"svc{cluster.next_id}"
        cluster.next_id += 1
        svc = service_obj(ns, name, cluster.cluster_ip(), 80)
        if rng.random() < 0.2:
            svc["spec"].update(clusterIP="None", clusterIPs=["None"])
        api.apply(svc)
        api.apply(slice_obj(ns, name, rng))
        cluster.services[f"{ns}/{name}"] = svc
        cluster.deleted.discard(f"{ns}/{name}")
    elif roll < 0.72 and len(keys) > 20:  # a Service goes
        key = rng.choice(keys)
        ns, name = key.split("/")
        api.delete("services", ns, name)
        with contextlib.suppress(KeyError):
            api.delete("endpointslices", ns, f"{name}-1")
        del cluster.services[key]
        cluster.deleted.add(key)
    elif roll < 0.80 and keys:  # a Service changes its port
        key = rng.choice(keys)
        svc = cluster.services[key]
        svc["spec"]["ports"][0]["port"] = rng.choice([80, 81, 443, 8443])
        api.apply(svc)
    elif roll < 0.95:  # pods come and go
        ns = rng.choice(cluster.namespaces)
        name = f"pod{rng.randint(0, 300)}"
        key = f"{ns}/{name}"
        if key in cluster.pods:
            api.delete("pods", ns, name)
            cluster.pods.discard(key)
        else:
            api.apply(pod_obj(ns, name, rng.randint(0, 60000)))
            cluster.pods.add(key)
    else:  # an empty namespace appears or goes
        name = f"extra{rng.randint(0, 20)}"
        if api.get("namespaces", None, name) is None:
            api.apply(namespace_obj(name))
        else:
            api.delete("namespaces", None, name)


# --- the daemons ---------------------------------------------------------------------------------


@dataclass
class Daemons:
    dnsd: subprocess.Popen[bytes]
    kpx: subprocess.Popen[bytes]
    dns_port: int
    metrics_port: int
    dnsd_http: int


def start_daemons(kubeconfig: Path, logs: Path) -> Daemons:
    dns_port, dnsd_http, metrics, healthz = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dnsd = subprocess.Popen(
        [sys.executable, "-m", "dnsd.main", "--kubeconfig", str(kubeconfig),
         "--listen", f"127.0.0.1:{dns_port}", "--http-listen", f"127.0.0.1:{dnsd_http}",
         "--upstream", "127.0.0.1:9", "--log-level", "warning", "--log-format", "json"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=(logs / "dnsd.log").open("wb"),
    )  # fmt: skip
    kpx = subprocess.Popen(
        # kpx.main has no __main__ block: the entry point, as the `kpx` script calls it.
        [sys.executable, "-c", "import sys; from kpx.main import main; sys.exit(main())",
         "--mode", "ports", "--kubeconfig", str(kubeconfig),
         "--node-name", NODE, "--metrics-bind-address", f"127.0.0.1:{metrics}",
         "--healthz-bind-address", f"127.0.0.1:{healthz}", "--log-level", "warning",
         "--log-format", "json"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=(logs / "kpx.log").open("wb"),
    )  # fmt: skip
    return Daemons(dnsd, kpx, dns_port, metrics, dnsd_http)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()
    except OSError:
        return 0, ""


def wait_ready(daemons: Daemons, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    urls = [
        f"http://127.0.0.1:{daemons.dnsd_http}/readyz",
        f"http://127.0.0.1:{daemons.metrics_port}/readyz",
    ]
    while time.monotonic() < deadline:
        if all(http_get(u)[0] == 200 for u in urls):
            return
        for name, proc in (("dnsd", daemons.dnsd), ("kpx", daemons.kpx)):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited early with status {proc.returncode}")
        time.sleep(0.2)
    raise SystemExit("the daemons did not become ready")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(daemons: Daemons) -> dict[str, dict[str, float]]:
    out = {
        name: {"rss_mb": rss_kb(proc.pid) / 1024, "fds": fd_count(proc.pid)}
        for name, proc in (("dnsd", daemons.dnsd), ("kpx", daemons.kpx))
    }
    # --mode ports holds one listening socket per frontend: those fds follow the Services.
    code, text = http_get(f"http://127.0.0.1:{daemons.metrics_port}/debug/services")
    out["kpx"]["frontends"] = len(json.loads(text)) if code == 200 else 0
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the checker ---------------------------------------------------------------------------------


def expected_state(
    api: FakeApiServer,
) -> tuple[dict[str, list[str] | str], dict[str, str], set[str]]:
    """(DNS name -> sorted A answers, kpx frontend -> state, Service keys held)."""
    slices: dict[str, list[dict[str, Any]]] = {}
    for sl in api.list_objects("endpointslices"):
        meta = sl["metadata"]
        owner = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if owner:
            slices.setdefault(f"{meta['namespace']}/{owner}", []).append(sl)
    names: dict[str, list[str] | str] = {}
    frontends: dict[str, str] = {}
    held: set[str] = set()
    for svc in api.list_objects("services"):
        meta, spec = svc["metadata"], svc["spec"]
        key = f"{meta['namespace']}/{meta['name']}"
        held.add(key)
        ready = sorted(
            {
                addr
                for sl in slices.get(key, [])
                for ep in sl.get("endpoints") or []
                if (ep.get("conditions") or {}).get("ready", True) is not False
                for addr in ep.get("addresses") or []
            }
        )
        name = f"{meta['name']}.{meta['namespace']}.svc.{ZONE}"
        if spec.get("clusterIP") == "None":
            # Headless without a ready endpoint: NXDOMAIN, as CoreDNS answers.
            names[name] = ready or "NXDOMAIN"
            continue
        names[name] = [spec["clusterIP"]]
        for port in spec.get("ports") or []:
            frontends[f"{spec['clusterIP']}:{port['port']}"] = "serve" if ready else "reject"
    return names, frontends, held


def ask_a(port: int, name: str) -> list[str] | str:
    query = dns.message.make_query(name, "A")
    for _ in range(3):
        try:
            reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=1.0)
        except dns.exception.Timeout:
            continue
        if reply.rcode() != dns.rcode.NOERROR:
            return dns.rcode.to_text(reply.rcode())
        return sorted(rr.address for rrset in reply.answer for rr in rrset if rr.rdtype == 1)
    return "TIMEOUT"


def differences(api: FakeApiServer, daemons: Daemons, cluster: Cluster) -> list[str]:
    names, frontends, held = expected_state(api)
    diffs = []
    for name, want in sorted(names.items()):
        got = ask_a(daemons.dns_port, name)
        # A headless Service without ready endpoints: NODATA (NOERROR, no answer).
        if got != want:
            diffs.append(f"dns {name}: want {want} got {got}")
    for key in sorted(cluster.deleted - held):
        ns, svc = key.split("/")
        name = f"{svc}.{ns}.svc.{ZONE}"
        got = ask_a(daemons.dns_port, name)
        if got != "NXDOMAIN":
            diffs.append(f"dns {name} (deleted): want NXDOMAIN got {got}")
    code, text = http_get(f"http://127.0.0.1:{daemons.metrics_port}/debug/services")
    rows = json.loads(text) if code == 200 else []
    served = {row["frontend"]: row["state"] for row in rows}
    for frontend in sorted(set(served) | set(frontends)):
        if served.get(frontend) != frontends.get(frontend):
            diffs.append(
                f"kpx {frontend}: want {frontends.get(frontend)} got {served.get(frontend)}"
            )
    return diffs


# --- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster(random.Random(args.seed))
    tmp = Path(tempfile.mkdtemp(prefix="kpx-dnsd-soak-"))
    api = FakeApiServer(history_limit=200_000, bookmark_interval=5.0)
    api.start()
    api.load(initial(cluster, args.services))
    kubeconfig = api.write_kubeconfig(tmp / "kubeconfig.yaml")
    daemons = start_daemons(kubeconfig, tmp)
    chaos: list[str] = []
    try:
        wait_ready(daemons, 120)
        start = time.monotonic()
        warm: dict[str, dict[str, float]] | None = None
        next_compact = start + args.chaos_period
        next_drop = start + args.chaos_period / 2
        restart_at = start + args.duration / 2
        writes = 0
        while (now := time.monotonic()) - start < args.duration:
            if warm is None and now - start >= args.warmup:
                warm = sample(daemons)
            if now >= next_compact:
                api.compact()
                chaos.append(f"{now - start:.0f}s compact")
                next_compact += args.chaos_period
            if now >= next_drop:
                api.drop_watches()
                chaos.append(f"{now - start:.0f}s drop_watches")
                next_drop += args.chaos_period
            if restart_at and now >= restart_at:
                api.stop()
                chaos.append(f"{now - start:.0f}s api_stop")
                time.sleep(5)  # writes go on below, applied to the stopped server's state
                api.start()
                chaos.append(f"{time.monotonic() - start:.0f}s api_start")
                restart_at = 0
            due = int((time.monotonic() - start) * args.rate)
            while writes < due:
                churn_once(api, cluster)
                writes += 1
            time.sleep(0.01)
        end_sample = sample(daemons)
        warm = warm or end_sample
        deadline = time.monotonic() + 30
        diffs = differences(api, daemons, cluster)
        settle = 0.0
        while diffs and time.monotonic() < deadline:
            time.sleep(1)
            diffs = differences(api, daemons, cluster)
        settle = 30 - max(0.0, deadline - time.monotonic()) if diffs else 0.0
        alive = {
            "dnsd": http_get(f"http://127.0.0.1:{daemons.dnsd_http}/healthz")[0],
            "kpx": http_get(f"http://127.0.0.1:{daemons.metrics_port}/healthz")[0],
        }
        names, frontends, _ = expected_state(api)
        return {
            "complete": True,
            "duration_s": args.duration,
            "writes": writes,
            "rate": args.rate,
            "chaos": chaos,
            "names_checked": len(names) + len(cluster.deleted),
            "frontends_checked": len(frontends),
            "differences": len(diffs),
            "first_differences": diffs[:20],
            "settle_s": settle,
            "healthz": alive,
            "warm": warm,
            "end": end_sample,
            "rss_growth_pct": {
                d: 100 * (end_sample[d]["rss_mb"] - warm[d]["rss_mb"]) / warm[d]["rss_mb"]
                for d in warm
            },
            "fd_growth": {
                "dnsd": end_sample["dnsd"]["fds"] - warm["dnsd"]["fds"],
                # Beyond one listener per frontend.
                "kpx": (end_sample["kpx"]["fds"] - end_sample["kpx"]["frontends"])
                - (warm["kpx"]["fds"] - warm["kpx"]["frontends"]),
            },
            "logs": str(tmp),
        }
    finally:
        stop(daemons.kpx)
        stop(daemons.dnsd)
        api.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0)
    parser.add_argument("--rate", type=float, default=50.0, help="writes per second")
    parser.add_argument("--services", type=int, default=300, help="Services at the start")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before RSS base")
    parser.add_argument("--chaos-period", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="60 s smoke run")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    if args.quick:  # 60 s at most (a shorter --duration is kept), chaos every third of it
        args.duration = min(args.duration, 60.0)
        args.rate, args.warmup, args.chaos_period = 10.0, args.duration / 4, args.duration / 3
        args.services = min(args.services, 60)
    result = run(args)
    print(f"soak: {result['writes']} writes in {result['duration_s']:.0f}s, chaos: "
          + ", ".join(result["chaos"]))  # fmt: skip
    print(
        f"checked {result['names_checked']} DNS names and {result['frontends_checked']} kpx"
        f" frontends: {result['differences']} differences"
    )
    for line in result["first_differences"]:
        print("  differs:", line)
    for daemon in ("dnsd", "kpx"):
        warm, end = result["warm"][daemon], result["end"][daemon]
        print(
            f"{daemon}: RSS {warm['rss_mb']:.1f} MB after warm-up -> {end['rss_mb']:.1f} MB"
            f" ({result['rss_growth_pct'][daemon]:+.1f} %), open fds {warm['fds']:.0f} ->"
            f" {end['fds']:.0f} (growth {result['fd_growth'][daemon]:+.0f}"
            + (" beyond one listener per frontend" if daemon == "kpx" else "")
            + f"), /healthz {result['healthz'][daemon]}"
        )
    if result["differences"]:
        print("logs:", result["logs"])
    else:
        shutil.rmtree(result["logs"], ignore_errors=True)
    if args.json:
        write_json(args.json, result)
    if result["differences"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
