"""Convergence soak: both daemons watch an API server under churn and chaos; at the end every
DNS name and every kpx frontend must match what the API holds.

    .venv/bin/python -m bench.soak [--duration 1200] [--rate 50] [--services 300]
        [--warmup 120] [--chaos-period 60] [--settle 30] [--quick] [--json PATH]

The fake API server (tests/apiserver, real wire protocol) runs in this process; dnsd
(`--pods verified`) and kpx (`--mode ports`, no root needed) run as subprocesses with a
kubeconfig, as in a cluster. During `--duration` seconds, `--rate` writes per second spread
over Services (ClusterIP with one, two or unnamed ports, dual-stack, headless, ExternalName:
created, re-ported, re-targeted, deleted; about `--services` of them at any time),
EndpointSlices (endpoints added, removed, made not ready, given hostnames), Pods (created with
new names, deleted, re-addressed; as many as Services from the start, so that what the daemons
hold does not grow after the warm-up) and Namespaces (created, deleted). Every `--chaos-period`
the history is compacted and every watch dropped (each resumes from a compacted
resourceVersion: 410 and a relist); half a period later the watches are dropped alone; once,
half-way, the API server is stopped for 5 s (connections reset; the writes go on) and started
again.

When the writes stop, bench/soak_check.py compares (retrying for up to `--settle` seconds)
every DNS answer and every kpx frontend with what the API holds, including NXDOMAIN for every
name that existed during the run and no longer does. Zero differences is the pass mark. It
also reports each daemon's RSS after `--warmup` and when the writes stop, before the checker's
queries (growth in %; goal <= 5 %; dnsd's with its forward child's private memory added, and
its descriptors), open file descriptors (goal: no growth; for kpx beyond the
one listening socket `--mode ports` holds per frontend), the kwatch relist / watch restart /
task restart counters (the chaos reached both daemons) and `targets_missed`. Figures from a
shared machine are noise: the lead runs the real one. `--quick`: 60 s (or a shorter
`--duration`), 10 writes/s, 60 Services, chaos every third of the run (a smoke test of the
harness).
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
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode

from bench import soak_check
from bench.jsonout import write_json
from bench.procstat import forward_children, private_mb
from bench.soak_check import Seen, Snapshot
from tests.apiserver import FakeApiServer

ROOT = Path(__file__).resolve().parent.parent
ZONE = "cluster.local"
NODE = "node-a"


def free_port() -> int:
    """A port free for TCP and UDP alike (dnsd listens on both) at the time of asking."""
    while True:
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


# --- the churn ----------------------------------------------------------------------------------

# Kinds of Service the churn creates, with their weights: every record type dnsd serves and
# both address families kpx serves.
KINDS = {"v4": 55, "two_ports": 10, "unnamed": 5, "dual": 10, "headless": 10,
         "headless_dual": 5, "external": 5}  # fmt: skip


@dataclass
class Cluster:
    """What the churn has written, to pick the next write from (the API holds the truth)."""

    rng: random.Random
    target: int  # the Service (and Pod) count the churn keeps around, so memory can settle
    namespaces: list[str] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)  # ns/name -> Service
    kinds: dict[str, str] = field(default_factory=dict)  # ns/name -> KINDS key
    pods: dict[str, str] = field(default_factory=dict)  # ns/name -> IP
    seen: Seen = field(default_factory=Seen)
    writes: dict[str, int] = field(default_factory=dict)  # per kind of write
    next_ip: int = 1
    next_id: int = 0
    next_pod: int = 0

    def cluster_ips(self, dual: bool) -> list[str]:
        self.next_ip += 1
        n = self.next_ip
        ips = [f"10.96.{n // 250 % 250}.{n % 250 + 1}"] + ([f"fd00:96::{n:x}"] if dual else [])
        self.seen.ips.update(ips)
        return ips

    def count(self, kind: str, writes: int = 1) -> int:
        self.writes[kind] = self.writes.get(kind, 0) + writes
        return writes


def service_obj(cluster: Cluster, ns: str, name: str, kind: str) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [{"name": "http", "port": 80, "protocol": "TCP"}]
    if kind == "two_ports":
        ports.append({"name": "metrics", "port": 9090, "protocol": "TCP"})
    elif kind == "unnamed":
        ports = [{"port": 80, "protocol": "TCP"}]
    spec: dict[str, Any] = {"type": "ClusterIP", "ports": ports}
    if kind == "external":
        spec = {"type": "ExternalName", "externalName": f"{name}.{ns}.example.com"}
    elif kind.startswith("headless"):
        spec.update(clusterIP="None", clusterIPs=["None"])
    else:
        ips = cluster.cluster_ips(dual=kind == "dual")
        spec.update(clusterIP=ips[0], clusterIPs=ips)
    if kind in ("dual", "headless_dual"):
        spec.update(ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def slice_objs(cluster: Cluster, svc: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The Service's EndpointSlices (one per family), with random endpoints: 0-4, a fifth
    not ready, some with a hostname, sometimes without one of the Service's ports."""
    if kind == "external":
        return []
    rng = cluster.rng
    ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
    ports = [
        {"name": p.get("name", ""), "port": 8080 + i, "protocol": "TCP"}
        for i, p in enumerate(svc["spec"]["ports"])
    ]
    if len(ports) > 1 and rng.random() < 0.2:
        ports = ports[:1]  # the second port has no endpoints: kpx rejects it
    out = []
    for fam in (4, 6) if kind in ("dual", "headless_dual") else (4,):
        count = rng.randint(0, 4)
        base = rng.randint(0, 200)
        endpoints = []
        for i in range(count):
            n = base + i
            ip = f"10.{64 + n // 250}.{n % 250}.{i + 1}" if fam == 4 else f"fd00:64::{n:x}:{i + 1}"
            cluster.seen.ips.add(ip)
            endpoint: dict[str, Any] = {
                "addresses": [ip],
                "conditions": {"ready": rng.random() > 0.2},
                "nodeName": NODE,
            }
            if kind.startswith("headless") and rng.random() < 0.3:
                endpoint["hostname"] = f"web-{i}"
            endpoints.append(endpoint)
        out.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-v{fam}",
                    "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": f"IPv{fam}",
                "endpoints": endpoints,
                "ports": ports,
            }
        )
    return out


def namespace_obj(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def pod_obj(ns: str, name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": NODE},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"},
    }


def address_pod(cluster: Cluster, key: str) -> dict[str, Any]:
    """The Pod `key` ("ns/name") with a new random address."""
    n = cluster.rng.randint(0, 60000)
    ip = cluster.pods[key] = f"10.200.{n // 250 % 250}.{n % 250 + 1}"
    ns, name = key.split("/")
    cluster.seen.pods.add((ns, ip))
    return pod_obj(ns, name, ip)


def new_pod(cluster: Cluster, ns: str) -> dict[str, Any]:
    cluster.next_pod += 1
    return address_pod(cluster, f"{ns}/pod{cluster.next_pod - 1}")


def new_service(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    kind = cluster.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    svc = service_obj(cluster, ns, name, kind)
    key = f"{ns}/{name}"
    cluster.services[key], cluster.kinds[key] = svc, kind
    cluster.seen.services.add(key)
    return [svc, *slice_objs(cluster, svc, kind)]


def initial(cluster: Cluster) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i in range(10):
        cluster.namespaces.append(f"ns{i}")
        cluster.seen.namespaces.add(f"ns{i}")
        objs.append(namespace_obj(f"ns{i}"))
    for i in range(cluster.target):
        objs += new_service(cluster, cluster.namespaces[i % 10], f"svc{i}")
    cluster.next_id = cluster.target
    # As many Pods as Services from the start: a population that grew from none for the
    # whole run (as the churn once made it: 170 Pods at 2 minutes, 430 at 19) looks like a
    # leak in the RSS after warm-up.
    objs += [new_pod(cluster, cluster.namespaces[i % 10]) for i in range(cluster.target)]
    return objs


def churn_once(api: FakeApiServer, cluster: Cluster) -> int:
    """One change, chosen at random among the kinds a busy cluster sees; returns the writes
    it took (a new Service comes with its slices, a deleted one takes them along)."""
    rng = cluster.rng
    roll = rng.random()
    keys = list(cluster.services)
    if roll < 0.40:  # endpoints move: the most common write
        key = rng.choice(keys)
        slices = slice_objs(cluster, cluster.services[key], cluster.kinds[key])
        for sl in slices:
            api.apply(sl)
        return cluster.count("endpointslice", len(slices))
    if roll < 0.62:  # a Service comes or goes, keeping about `target` of them
        if rng.random() < 0.5 + (cluster.target - len(keys)) / (2 * cluster.target):
            name = f"svc{cluster.next_id}"
            cluster.next_id += 1
            objs = new_service(cluster, rng.choice(cluster.namespaces), name)
            for obj in objs:
                api.apply(obj)
            return cluster.count("service_create", len(objs))
        key = rng.choice(keys)
        ns, name = key.split("/")
        api.delete("services", ns, name)
        deleted = 1
        for fam in (4, 6):
            if api.get("endpointslices", ns, f"{name}-v{fam}") is not None:
                api.delete("endpointslices", ns, f"{name}-v{fam}")
                deleted += 1
        del cluster.services[key], cluster.kinds[key]
        return cluster.count("service_delete", deleted)
    if roll < 0.72:  # a Service changes its port, or an ExternalName its target
        key = rng.choice(keys)
        spec = cluster.services[key]["spec"]
        if spec["type"] == "ExternalName":
            spec["externalName"] = f"{rng.choice(['a', 'b', 'c'])}.{key.replace('/', '.')}.example"
        else:
            spec["ports"][0]["port"] = rng.choice([80, 81, 443, 8443])
        api.apply(cluster.services[key])
        return cluster.count("service_update")
    if roll < 0.95:  # pods change address, come and go, keeping about `target` of them
        pods = list(cluster.pods)
        if pods and rng.random() < 0.2:
            api.apply(address_pod(cluster, rng.choice(pods)))
            return cluster.count("pod_apply")
        if not pods or rng.random() < 0.5 + (cluster.target - len(pods)) / (2 * cluster.target):
            api.apply(new_pod(cluster, rng.choice(cluster.namespaces)))
            return cluster.count("pod_apply")
        key = rng.choice(pods)
        ns, name = key.split("/")
        api.delete("pods", ns, name)
        del cluster.pods[key]
        return cluster.count("pod_delete")
    name = f"extra{rng.randint(0, 20)}"  # an empty namespace appears or goes
    cluster.seen.namespaces.add(name)
    if api.get("namespaces", None, name) is None:
        api.apply(namespace_obj(name))
    else:
        api.delete("namespaces", None, name)
    return cluster.count("namespace")


def snapshot(api: FakeApiServer) -> Snapshot:
    return Snapshot(
        services=api.list_objects("services"),
        slices=api.list_objects("endpointslices"),
        pods=api.list_objects("pods"),
        namespaces=api.list_objects("namespaces"),
    )


class NxdomainUpstream:
    """dnsd's upstream: NXDOMAIN to every query, so names dnsd does not own (reverse names of
    addresses no Service holds any more) get a definite answer instead of a timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.5)
        while not self.closed:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = dns.message.make_response(dns.message.from_wire(data))
            except dns.exception.DNSException:
                continue
            reply.set_rcode(dns.rcode.NXDOMAIN)
            with contextlib.suppress(OSError):
                self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.closed = True
        self.thread.join()
        self.sock.close()


# --- the daemons ---------------------------------------------------------------------------------


@dataclass
class Daemons:
    dnsd: subprocess.Popen[bytes]
    kpx: subprocess.Popen[bytes]
    dns_port: int
    metrics_port: int
    dnsd_http: int


def start_daemons(kubeconfig: Path, logs: Path, upstream: int) -> Daemons:
    dns_port, dnsd_http, metrics, healthz = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dnsd = subprocess.Popen(
        [sys.executable, "-m", "dnsd.main", "--kubeconfig", str(kubeconfig),
         "--listen", f"127.0.0.1:{dns_port}", "--http-listen", f"127.0.0.1:{dnsd_http}",
         "--upstream", f"127.0.0.1:{upstream}", "--pods", "verified",
         "--log-level", "warning", "--log-format", "json"],
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


def start_ready(kubeconfig: Path, logs: Path, upstream: int) -> Daemons:
    """Both daemons started and ready; started again (on other ports) when one exits at
    once, as when another process took a port between asking and binding."""
    for attempt in range(3):
        daemons = start_daemons(kubeconfig, logs, upstream)
        try:
            wait_ready(daemons, 120)
            return daemons
        except EarlyExit as err:
            stop(daemons.kpx)
            stop(daemons.dnsd)
            if attempt == 2:
                raise SystemExit(str(err)) from err
            print(f"soak: {err}, starting again", file=sys.stderr)
    raise AssertionError("unreachable")


class EarlyExit(Exception):
    pass


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
                raise EarlyExit(f"{name} exited early with status {proc.returncode}")
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


def sample(daemons: Daemons, at: float) -> dict[str, dict[str, float]]:
    out = {
        name: {"t": round(at, 1), "rss_mb": rss_kb(proc.pid) / 1024, "fds": fd_count(proc.pid)}
        for name, proc in (("dnsd", daemons.dnsd), ("kpx", daemons.kpx))
    }
    # dnsd's --forward-process child (on by default) answers the forwarded names: its private
    # memory and its descriptors are dnsd's too (bench.procstat.dnsd_footprint).
    for child in forward_children(daemons.dnsd.pid):
        out["dnsd"]["rss_mb"] += private_mb([child]) * 1e6 / 2**20
        with contextlib.suppress(OSError):
            out["dnsd"]["fds"] += fd_count(child)
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


# --- the run -------------------------------------------------------------------------------------

WATCH_METRICS = ("kwatch_relists_total", "kwatch_watch_restarts_total",
                 "kwatch_task_restarts_total", "kwatch_api_errors_total")  # fmt: skip


def watch_counters(url: str) -> dict[str, float]:
    """The kwatch counters of one daemon's /metrics, summed over their labels."""
    _, text = http_get(url)
    out = dict.fromkeys(WATCH_METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class Chaos:
    """Every `period`: a compaction, then every watch dropped so that each resumes from a
    resourceVersion older than the compaction (410, relist); half a period later the watches
    are dropped alone (resumed without a relist); once, half-way, the API server stops for
    `outage` seconds (connections reset; the writes go on) and starts again."""

    api: FakeApiServer
    period: float
    restart_at: float
    outage: float = 5.0
    events: list[str] = field(default_factory=list)
    next_compact: float = 0.0
    next_drop: float = 0.0
    down_until: float = 0.0

    def __post_init__(self) -> None:
        self.next_compact, self.next_drop = self.period, self.period / 2

    def step(self, t: float) -> None:
        if t >= self.next_compact:
            self.api.compact()
            self.api.drop_watches()
            self.events.append(f"{t:.0f}s compact+drop")
            self.next_compact += self.period
        if t >= self.next_drop:
            self.api.drop_watches()
            self.events.append(f"{t:.0f}s drop")
            self.next_drop += self.period
        if self.restart_at and t >= self.restart_at:
            self.api.stop()
            self.events.append(f"{t:.0f}s api_stop")
            self.down_until, self.restart_at = t + self.outage, 0.0
        if self.down_until and t >= self.down_until:
            self.api.start()
            self.events.append(f"{t:.0f}s api_start")
            self.down_until = 0.0


def churn(
    args: argparse.Namespace, api: FakeApiServer, cluster: Cluster, daemons: Daemons
) -> tuple[int, list[dict[str, dict[str, float]]], Chaos]:
    """`args.duration` seconds of writes at `args.rate` with the chaos; samples both daemons'
    RSS and fds every `args.sample_every` seconds. Returns (writes, samples, chaos)."""
    chaos = Chaos(api, args.chaos_period, args.duration / 2)
    samples = []
    writes = 0
    start = time.monotonic()
    next_sample = 0.0
    while (t := time.monotonic() - start) < args.duration:
        chaos.step(t)
        if t >= next_sample:
            samples.append(sample(daemons, t))
            next_sample += args.sample_every
        while writes < int(t * args.rate):
            writes += churn_once(api, cluster)
        time.sleep(0.01)
    if chaos.down_until:
        api.start()
    return writes, samples, chaos


def memory_figures(
    warm: dict[str, dict[str, float]], end: dict[str, dict[str, float]]
) -> dict[str, Any]:
    return {
        "rss_growth_pct": {
            d: 100 * (end[d]["rss_mb"] - warm[d]["rss_mb"]) / warm[d]["rss_mb"] for d in warm
        },
        "fd_growth": {
            "dnsd": end["dnsd"]["fds"] - warm["dnsd"]["fds"],
            # Beyond one listener per frontend (--mode ports).
            "kpx": (end["kpx"]["fds"] - end["kpx"]["frontends"])
            - (warm["kpx"]["fds"] - warm["kpx"]["frontends"]),
        },
    }


def targets_missed(result: dict[str, Any]) -> list[str]:
    missed = []
    if result["differences"]:
        missed.append(f"differences: {result['differences']} (target 0)")
    for d in ("dnsd", "kpx"):
        if result["rss_growth_pct"][d] > 5:
            missed.append(f"{d} RSS growth {result['rss_growth_pct'][d]:+.1f} % (target <= 5 %)")
        if result["fd_growth"][d] > 0:
            missed.append(f"{d} open fds grew by {result['fd_growth'][d]:.0f} (target 0)")
        if result["healthz"][d] != 200:
            missed.append(f"{d} /healthz {result['healthz'][d]} (target 200)")
        if not result["watch"][d]["kwatch_relists_total"]:
            missed.append(f"{d} never relisted: the compactions did not reach it")
    if result["achieved_rate"] < 0.95 * result["rate"]:
        missed.append(f"write rate {result['achieved_rate']:.1f}/s (target {result['rate']}/s)")
    return missed


def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = Cluster(random.Random(args.seed), target=args.services)
    tmp = Path(tempfile.mkdtemp(prefix="kpx-dnsd-soak-"))
    api = FakeApiServer(history_limit=200_000, bookmark_interval=5.0)
    api.start()
    api.load(initial(cluster))
    kubeconfig = api.write_kubeconfig(tmp / "kubeconfig.yaml")
    upstream = NxdomainUpstream()
    try:
        daemons = start_ready(kubeconfig, tmp, upstream.port)
    except BaseException:
        upstream.close()
        api.close()
        raise
    try:
        writes, samples, chaos = churn(args, api, cluster, daemons)
        # The end of the churn, before the checker's queries: dnsd forwards the reverse
        # names nobody owns and caches the upstream's answers, memory the churn did not use.
        end = sample(daemons, args.duration)
        check = soak_check.check(
            snapshot(api),
            cluster.seen,
            daemons.dns_port,
            f"http://127.0.0.1:{daemons.metrics_port}/debug/services",
            deadline_s=args.settle,
        )
        after_check = sample(daemons, args.duration + check.settle_s)
        warm = next((s for s in samples if s["dnsd"]["t"] >= args.warmup), samples[-1])
        result: dict[str, Any] = {
            "complete": True,
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "duration_s": args.duration,
            "rate": args.rate,
            "writes": writes,
            "achieved_rate": writes / args.duration,
            "writes_by_kind": cluster.writes,
            "services_at_end": len(cluster.services),
            "chaos": chaos.events,
            "questions_checked": check.questions,
            "frontends_checked": check.frontends,
            "differences": len(check.differences),
            "first_differences": check.differences[:30],
            "check_passes": check.passes,
            "coverage": check.coverage,
            "settle_s": check.settle_s,
            "healthz": {
                "dnsd": http_get(f"http://127.0.0.1:{daemons.dnsd_http}/healthz")[0],
                "kpx": http_get(f"http://127.0.0.1:{daemons.metrics_port}/healthz")[0],
            },
            "watch": {
                "dnsd": watch_counters(f"http://127.0.0.1:{daemons.dnsd_http}/metrics"),
                "kpx": watch_counters(f"http://127.0.0.1:{daemons.metrics_port}/metrics"),
            },
            "warm": warm,
            "end": end,
            "after_check": after_check,
            "peak_rss_mb": {d: max(s[d]["rss_mb"] for s in [*samples, end]) for d in end},
            **memory_figures(warm, end),
            "samples": samples,
            "logs": str(tmp),
        }
        result["targets_missed"] = targets_missed(result)
        return result
    finally:
        stop(daemons.kpx)
        stop(daemons.dnsd)
        upstream.close()
        api.close()


def report(result: dict[str, Any]) -> None:
    print(
        f"soak: {result['writes']} writes in {result['duration_s']:.0f}s"
        f" ({result['achieved_rate']:.1f}/s), chaos: " + ", ".join(result["chaos"])
    )
    print(
        f"checked {result['questions_checked']} DNS questions and"
        f" {result['frontends_checked']} kpx frontends: {result['differences']} differences"
        f" ({result['check_passes']} passes, {result['settle_s']:.1f}s)"
    )
    print("  covered:", ", ".join(f"{k} {v}" for k, v in result["coverage"].items()))
    for line in result["first_differences"]:
        print("  differs:", line)
    for daemon in ("dnsd", "kpx"):
        warm, end = result["warm"][daemon], result["end"][daemon]
        watch = result["watch"][daemon]
        print(
            f"{daemon}: RSS {warm['rss_mb']:.1f} MB after warm-up -> {end['rss_mb']:.1f} MB"
            f" ({result['rss_growth_pct'][daemon]:+.1f} %, peak"
            f" {result['peak_rss_mb'][daemon]:.1f}), open fds {warm['fds']:.0f} ->"
            f" {end['fds']:.0f} (growth {result['fd_growth'][daemon]:+.0f}"
            + (" beyond one listener per frontend" if daemon == "kpx" else "")
            + f"), /healthz {result['healthz'][daemon]}, relists"
            f" {watch['kwatch_relists_total']:.0f}, watch restarts"
            f" {watch['kwatch_watch_restarts_total']:.0f}, task restarts"
            f" {watch['kwatch_task_restarts_total']:.0f}"
        )
    print("targets missed:", "; ".join(result["targets_missed"]) or "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0)
    parser.add_argument("--rate", type=float, default=50.0, help="writes per second")
    parser.add_argument("--services", type=int, default=300, help="Services kept around")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before RSS base")
    parser.add_argument("--chaos-period", type=float, default=60.0)
    parser.add_argument("--sample-every", type=float, default=10.0, help="RSS / fd samples")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to converge")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="60 s smoke run")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    if args.quick:  # 60 s at most (a shorter --duration is kept), chaos every third of it
        args.duration = min(args.duration, 60.0)
        args.rate, args.warmup, args.chaos_period = 10.0, args.duration / 4, args.duration / 3
        args.services, args.sample_every = min(args.services, 60), 2.0
    result = run(args)
    report(result)
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
