"""dnsd against knot serving the same records, with dnsperf, in the same run (issue 3).

    .venv/bin/python -m bench.dns [--services 10000] [--headless 1000] [--headless-endpoints 5]
        [--endpoints 100000] [--runs 3] [--duration 10] [--quick] [--json PATH] [--memory-only]
        [--objects realistic|minimal]

Generates one cluster state (default 10,000 Services in 100 namespaces, 1,000 of them headless
with 5 ready endpoints each, every other ClusterIP Service dual-stack, and EndpointSlices for
the ClusterIP Services holding the rest of `--endpoints`, 100,000 endpoints in all; those
produce no records, they are there for the RSS figure). `--objects realistic` (the default)
dresses every object as a real cluster's look (bench/realistic.py: labels, annotations,
last-applied-configuration, ownerReferences, managedFields, endpoint nodeName/zone/targetRef),
without changing any record; `--objects minimal` keeps only the fields dnsd reads. It writes
the state twice:
- as a manifest folder (`kind: List` JSON) for `dnsd --manifests`;
- as knot zone files with the records dnsd derives from it (cluster.local: A/AAAA, SRV at
  `_http._tcp.<svc>` and at the bare name, headless per-endpoint names; in-addr.arpa and
  ip6.arpa: PTR of ClusterIPs and headless endpoints; TTL 5 and SOA as CoreDNS's).
A dnsperf query file mixes names present in both (weights printed): A of ClusterIP Services,
A of headless Services and of their endpoint names, AAAA of dual-stack Services, SRV, PTR
(IPv4 and IPv6) and NXDOMAIN names inside cluster.local.

Before measuring, all three servers get the same sample of questions (20 per kind) and any
answer that differs (rcode, answer or additional records, TTLs included) is printed: the knot
zone must mirror dnsd, or the comparison is not fair.

Then, one server at a time (all three stay up, idle when not measured; the order is
interleaved per run so every round compares servers measured seconds apart):
  knot (knotd, its default workers), dnsd (one process), dnsd --workers 2
each gets
- a throughput pass: dnsperf with no rate limit for `--duration` s, the same `-c 20 -T 2 -q 300`
  for every server (`--clients/--threads/--outstanding`; the best for knot and for dnsd here):
  qps, lost queries, average latency at saturation, server CPU microseconds per query
  (utime+stime deltas of the server's processes from /proc divided by completed queries),
  and dnsperf's own CPU (the client is the ceiling on 2 cores);
- a latency pass: dnsperf `-Q <--latency-qps> -v` (a fixed offered load, the same for every
  server), p50/p99 of the per-query latencies it prints (this dnsperf, 2.10, has no histogram).
Ratios dnsd/knot are computed per round, then the median over rounds is printed.
Also: RSS of dnsd (one process) once ready at that scale, and PSS/RSS of the 2-worker dnsd.

Finally the propagation latency: the fake API server (`python -m tests.apiserver`, its own
process) loaded with the same objects, dnsd `--kubeconfig` on it; `--samples` times (default
50), alternately, create a new ClusterIP Service or replace one endpoint IP of a headless
Service's EndpointSlice over HTTPS (token and CA from the kubeconfig), and poll dnsd over UDP
(about every millisecond) until the answer carries the new address. Prints p50/p99/max of
write-sent -> answer-served (and how much of it was the API request itself).

`--quick`: 200 Services, 2 s passes, 1 run, 10 propagation samples, to smoke-test the harness
(seconds; the figures mean nothing). Figures, never assertions: this machine is shared.

`--json PATH` also writes what it printed (per-run figures, medians, ratios, RSS, propagation)
to PATH, for bench.report. `--memory-only` measures nothing but dnsd's RSS once ready at that
scale, from the manifests and via the fake API server (no knot, no dnsperf; seconds).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ipaddress
import json
import random
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.apiclient import Api, start_fake_apiserver
from bench.jsonout import write_json
from bench.procstat import CpuMeter, dnsd_footprint, process_tree, pss_mb, rss_mb
from bench.realistic import dress

ROOT = Path(__file__).resolve().parent.parent
ZONE = "cluster.local"
TTL = 5
DNSD = str(ROOT / ".venv" / "bin" / "dnsd")

_children: list[subprocess.Popen[Any]] = []


def _kill_children() -> None:
    for proc in _children:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    for proc in _children:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


atexit.register(_kill_children)


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kwargs)
    _children.append(proc)
    return proc


def _spawn_argv(*argv: str, **kwargs: Any) -> subprocess.Popen[Any]:
    return _spawn(list(argv), **kwargs)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# --- cluster state -------------------------------------------------------------------------


def endpoint_ip(n: int, base: int = 64) -> str:
    return f"10.{base + n // 65536}.{n // 256 % 256}.{n % 256}"


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


@dataclass
class Cluster:
    objects: list[dict[str, Any]] = field(default_factory=list)
    rr: list[str] = field(default_factory=list)  # cluster.local records, absolute names
    ptr: list[str] = field(default_factory=list)  # reverse records, absolute names
    # query pools: (name, type)
    pools: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    headless: list[tuple[str, str]] = field(default_factory=list)  # (ns, name)
    endpoints: int = 0


QUERY_WEIGHTS = {
    "A clusterIP": 30,
    "A headless (5 answers)": 5,
    "A headless endpoint name": 5,
    "AAAA dual-stack": 10,
    "SRV _http._tcp clusterIP": 10,
    "SRV _http._tcp headless (5 + 5 additional)": 5,
    "PTR IPv4": 15,
    "PTR IPv6": 5,
    "NXDOMAIN": 15,
}


def generate(
    services: int, headless: int, headless_eps: int, total_eps: int, namespaces: int = 100
) -> Cluster:
    """The Kubernetes objects and the records dnsd serves for them (mirrors dnsd/records.py:
    CoreDNS weights floor(100/N), SRV at the bare name too, dashed-IP names without hostname)."""
    c = Cluster()
    pools: dict[str, list[tuple[str, str]]] = {k: [] for k in QUERY_WEIGHTS}
    used_ns = min(namespaces, services) or 1
    for n in range(used_ns):
        c.objects.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{n}"}})
    headless = min(headless, services)
    step = services // headless if headless else 0
    clusterip_services = services - headless
    spread = max(0, total_eps - headless * headless_eps)
    per_cip, extra = divmod(spread, clusterip_services) if clusterip_services else (0, 0)
    cip_index = 0
    ep_counter = 0
    cip_ep_counter = 0
    for i in range(services):
        ns, name = f"ns{i % used_ns}", f"svc{i}"
        base = f"{name}.{ns}.svc.{ZONE}."
        is_headless = bool(step) and i % step == 0 and len(c.headless) < headless
        spec: dict[str, Any] = {
            "type": "ClusterIP",
            "selector": {"app": name},
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        }
        eps: list[dict[str, Any]] = []
        if is_headless:
            spec.update(clusterIP="None", clusterIPs=["None"])
            c.headless.append((ns, name))
            weight = max(1, 100 // headless_eps) if headless_eps else 100
            for k in range(headless_eps):
                ip = endpoint_ip(ep_counter)
                ep_counter += 1
                ep: dict[str, Any] = {
                    "addresses": [ip],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "name": f"{name}-{k}", "namespace": ns},
                }
                # StatefulSet-like (hostname) for every other one, generated dashed-IP otherwise
                named = len(c.headless) % 2 == 1  # the 1st, 3rd, ... headless Service
                label = f"{name}-{k}" if named else ip.replace(".", "-")
                if named:
                    ep["hostname"] = label
                eps.append(ep)
                owner = f"{label}.{base}"
                c.rr += [
                    f"{owner} A {ip}",
                    f"{base} A {ip}",
                    f"_http._tcp.{base} SRV 0 {weight} 8080 {owner}",
                    f"{base} SRV 0 {weight} 8080 {owner}",
                ]
                c.ptr.append(f"{reverse_name(ip)}. PTR {owner}")
                pools["A headless endpoint name"].append((owner, "A"))
                pools["PTR IPv4"].append((reverse_name(ip), "PTR"))
            if headless_eps:
                pools["A headless (5 answers)"].append((base, "A"))
                pools["SRV _http._tcp headless (5 + 5 additional)"].append(
                    (f"_http._tcp.{base}", "SRV")
                )
        else:
            ip4 = f"10.96.{i // 250}.{i % 250 + 1}"
            ips = [ip4]
            if i % 2 == 1:
                ips.append(f"fd00:96::{i:x}")
                spec["ipFamilyPolicy"] = "PreferDualStack"
                spec["ipFamilies"] = ["IPv4", "IPv6"]
            spec.update(clusterIP=ip4, clusterIPs=ips)
            for ip in ips:
                c.rr.append(f"{base} {'AAAA' if ':' in ip else 'A'} {ip}")
                c.ptr.append(f"{reverse_name(ip)}. PTR {base}")
                pools["PTR IPv6" if ":" in ip else "PTR IPv4"].append((reverse_name(ip), "PTR"))
            weight = 100 // len(ips)  # CoreDNS: one SRV record per ClusterIP in the count
            c.rr += [
                f"_http._tcp.{base} SRV 0 {weight} 80 {base}",
                f"{base} SRV 0 {weight} 80 {base}",
            ]
            pools["A clusterIP"].append((base, "A"))
            if len(ips) == 2:
                pools["AAAA dual-stack"].append((base, "AAAA"))
            pools["SRV _http._tcp clusterIP"].append((f"_http._tcp.{base}", "SRV"))
            count = per_cip + (1 if cip_index < extra else 0)
            cip_index += 1
            for _ in range(count):
                eps.append({"addresses": [endpoint_ip(cip_ep_counter, 128)], "conditions": {}})
                cip_ep_counter += 1
        pools["NXDOMAIN"].append((f"missing{i}.{ns}.svc.{ZONE}.", "A"))
        c.objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            }
        )
        if eps:
            c.objects.append(endpoint_slice(ns, name, eps))
        c.endpoints += len(eps)
    c.pools = {k: v for k, v in pools.items() if v}
    return c


def endpoint_slice(ns: str, svc: str, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc}-abcde",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": endpoints,
    }


def write_manifests(folder: Path, cluster: Cluster) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in cluster.objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    for kind, items in by_kind.items():
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        (folder / f"{kind.lower()}s.json").write_text(json.dumps(doc))


def soa(zone: str) -> str:
    return (
        f"{zone}. {TTL} SOA ns.dns.{ZONE}. hostmaster.{ZONE}. 1 7200 1800 86400 {TTL}\n"
        f"{zone}. {TTL} NS ns.dns.{ZONE}.\n"
    )


def write_knot(folder: Path, cluster: Cluster, port: int) -> Path:
    """Zone files and a knot.conf in `folder`; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{ZONE}.zone", "w") as f:
        f.write(f"$TTL {TTL}\n{soa(ZONE)}")
        f.write(f'dns-version.{ZONE}. TXT "1.1.0"\n')
        f.write("\n".join(cluster.rr) + "\n")
    v4 = [r for r in cluster.ptr if "in-addr.arpa." in r.split()[0]]
    v6 = [r for r in cluster.ptr if "ip6.arpa." in r.split()[0]]
    for zone, records in (("in-addr.arpa", v4), ("ip6.arpa", v6)):
        with open(folder / f"{zone}.zone", "w") as f:
            f.write(f"$TTL {TTL}\n{soa(zone)}")
            f.write("\n".join(records) + "\n")
    conf = folder / "knot.conf"
    conf.write_text(
        f"""server:
    rundir: "{folder}"
    listen: 127.0.0.1@{port}
log:
  - target: {folder}/knot.log
    any: warning
database:
    storage: "{folder}"
template:
  - id: default
    storage: "{folder}"
    file: "%s.zone"
    journal-content: none
    zonefile-sync: -1
zone:
  - domain: {ZONE}
  - domain: in-addr.arpa
  - domain: ip6.arpa
"""
    )
    return conf


def write_queries(path: Path, cluster: Cluster, count: int, seed: int = 1) -> dict[str, int]:
    rng = random.Random(seed)
    kinds = list(cluster.pools)
    weights = [QUERY_WEIGHTS[k] for k in kinds]
    picked = rng.choices(kinds, weights=weights, k=count)
    mix: dict[str, int] = dict.fromkeys(kinds, 0)
    with open(path, "w") as f:
        for kind in picked:
            name, qtype = rng.choice(cluster.pools[kind])
            f.write(f"{name} {qtype}\n")
            mix[kind] += 1
    return mix


# --- servers -------------------------------------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (bounded tries)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def dns_query(name: str, qtype: int, qid: int) -> bytes:
    header = qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    labels = b"".join(
        len(p).to_bytes(1, "big") + p.encode() for p in name.rstrip(".").split(".") if p
    )
    return header + labels + b"\x00" + qtype.to_bytes(2, "big") + b"\x00\x01"


QTYPE_A, QTYPE_TXT = 1, 16


def answers_udp(port: int, name: str = f"dns-version.{ZONE}", qtype: int = QTYPE_TXT) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(dns_query(name, qtype, 4242), ("127.0.0.1", port))
            data = s.recv(4096)
        except OSError:
            return False
    return len(data) > 12 and data[3] & 0x0F == 0 and data[6:8] != b"\x00\x00"


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_until(what: str, check: Any, proc: subprocess.Popen[Any], timeout: float) -> float:
    """Poll `check()` until true; returns seconds waited. Bounded by `timeout`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} before it was ready")
        if check():
            return time.perf_counter() - t0
        time.sleep(0.1)
    raise SystemExit(f"{what} not ready after {timeout:.0f} s")


@dataclass
class Server:
    label: str
    proc: subprocess.Popen[Any]
    port: int
    ready_s: float = 0.0
    log: Path | None = None


def start_knot(tmp: Path, cluster: Cluster, timeout: float) -> Server:
    port = free_port()
    conf = write_knot(tmp / "knot", cluster, port)
    proc = _spawn(["knotd", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server("knot", proc, port, log=tmp / "knot" / "knot.log")
    server.ready_s = wait_until("knotd", lambda: answers_udp(port), proc, timeout)
    return server


def start_dnsd(
    tmp: Path, label: str, source: list[str], workers: int, timeout: float, probe: str
) -> tuple[Server, int]:
    """dnsd on free ports; ready = /readyz 200 (worker 0 only) AND `probe` (a name of the
    cluster) answered NOERROR from 16 source ports, so SO_REUSEPORT reaches every worker and
    no worker still building its zone (SERVFAIL) is measured."""
    port, http_port = free_port(), free_port()
    log = tmp / f"{label.replace(' ', '_')}.log"
    argv = [
        DNSD,
        *source,
        "--listen",
        f"127.0.0.1:{port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--upstream",
        f"127.0.0.1:{free_port()}",  # nothing listens: nothing leaves the machine
        "--log-format",
        "json",
        "--log-level",
        "warning",
    ]
    if workers > 1:
        argv += ["--workers", str(workers)]
    with open(log, "w") as logf:
        proc = _spawn(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(label, proc, port, log=log)
    ready_url = f"http://127.0.0.1:{http_port}/readyz"
    server.ready_s = wait_until(
        label,
        lambda: http_ok(ready_url) and all(answers_udp(port, probe, QTYPE_A) for _ in range(16)),
        proc,
        timeout,
    )
    return server, http_port


def compare_answers(
    cluster: Cluster, ports: dict[str, int], per_pool: int, seed: int = 2
) -> tuple[int, list[str]]:
    """Ask every server the same sampled questions; compare rcode and the sorted answer and
    additional records (TTLs included). Returns (questions, differences)."""
    from dnslib import DNSRecord

    rng = random.Random(seed)
    asked = 0
    diffs: list[str] = []
    for pool in cluster.pools.values():
        for name, qtype in rng.sample(pool, min(per_pool, len(pool))):
            seen: dict[str, tuple[Any, ...]] = {}
            for label, port in ports.items():
                query = DNSRecord.question(name, qtype)
                try:
                    reply = DNSRecord.parse(query.send("127.0.0.1", port, timeout=2))
                except (OSError, ValueError) as err:
                    seen[label] = ("error", str(err))
                    continue
                seen[label] = (
                    reply.header.rcode,
                    sorted(str(rr).lower() for rr in reply.rr),
                    sorted(str(rr).lower() for rr in reply.ar if rr.rtype != 41),
                )
            asked += 1
            first, *rest = seen.items()
            for label, value in rest:
                if value != first[1]:
                    diffs.append(f"{name} {qtype}: {first[0]} {first[1]} vs {label} {value}")
    return asked, diffs


# --- dnsperf -------------------------------------------------------------------------------

_NUM = r"([0-9.]+)"


def _grab(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else float("nan")


def dnsperf(
    port: int,
    queries: Path,
    duration: float,
    *,
    clients: int,
    threads: int,
    outstanding: int,
    qps: int | None = None,
) -> tuple[dict[str, float], list[float], str]:
    argv = [
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(queries),
        "-l",
        str(duration),
        "-c",
        str(clients),
        "-T",
        str(threads),
        "-q",
        str(outstanding),
        "-t",
        "2",
    ]
    if qps is not None:
        argv += ["-Q", str(qps), "-v"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"dnsperf failed ({out.returncode}): {out.stderr[-1500:]}")
    text = out.stdout
    result = {
        "sent": _grab(r"Queries sent:\s+" + _NUM, text),
        "completed": _grab(r"Queries completed:\s+" + _NUM, text),
        "lost": _grab(r"Queries lost:\s+" + _NUM, text),
        "qps": _grab(r"Queries per second:\s+" + _NUM, text),
        "avg_latency_ms": _grab(r"Average Latency \(s\):\s+" + _NUM, text) * 1000,
        "client_cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }
    latencies: list[float] = []
    if qps is not None:
        for line in text.splitlines():
            if line.startswith("> "):
                parts = line.split()
                with contextlib.suppress(ValueError, IndexError):
                    latencies.append(float(parts[-1]) * 1000)
    codes = re.search(r"Response codes:\s+(.*)", text)
    return result, latencies, codes.group(1) if codes else "?"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def measure(server: Server, queries: Path, args: argparse.Namespace) -> dict[str, float]:
    meter = CpuMeter(server.proc.pid).start()
    thr, _, codes = dnsperf(
        server.port,
        queries,
        args.duration,
        clients=args.clients,
        threads=args.threads,
        outstanding=args.outstanding,
    )
    cpu = meter.stop()
    lat, samples, _ = dnsperf(
        server.port,
        queries,
        args.latency_duration,
        clients=args.clients,
        threads=1,
        outstanding=args.outstanding,
        qps=args.latency_qps,
    )
    completed = thr["completed"] or float("nan")
    return {
        "qps": thr["qps"],
        "lost": thr["lost"],
        "lost_pct": 100 * thr["lost"] / thr["sent"] if thr["sent"] else float("nan"),
        "avg_ms_saturated": thr["avg_latency_ms"],
        "cpu_us_per_query": cpu / completed * 1e6,
        "server_cpu_pct": 100 * cpu / meter.wall,
        "dnsperf_cpu_pct": 100 * thr["client_cpu_s"] / meter.wall,
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "lat_lost": lat["lost"],
        "_codes": codes,  # type: ignore[dict-item]
    }


# --- propagation ---------------------------------------------------------------------------


def poll_until(port: int, name: str, ip: str, deadline: float) -> float | None:
    """Query `name` A about every millisecond until the answer holds `ip`; the time it was
    first seen (perf_counter), or None at the deadline."""
    want = socket.inet_aton(ip)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        s.settimeout(0.05)
        qid = 0
        while time.perf_counter() < deadline:
            qid = (qid + 1) & 0xFFFF
            s.send(dns_query(name, QTYPE_A, qid))
            try:
                while True:
                    data = s.recv(4096)
                    if data[:2] == qid.to_bytes(2, "big"):
                        break
            except TimeoutError:
                continue
            if data[3] & 0x0F == 0 and want in data[12:]:
                return time.perf_counter()
            time.sleep(0.001)
    return None


def propagation(
    tmp: Path, cluster: Cluster, samples: int, timeout: float
) -> tuple[dict[str, float], list[str]]:
    api, kubeconfig = start_fake_apiserver(
        cluster.objects, tmp / "api", _spawn_argv, extra_history=10 * samples + 100
    )
    notes: list[str] = []
    probe = cluster.pools["A clusterIP"][-1][0]
    server, _ = start_dnsd(tmp, "dnsd-api", ["--kubeconfig", str(kubeconfig)], 1, timeout, probe)
    footprint_api = dnsd_footprint(server.proc.pid)
    client = Api(kubeconfig)
    total: list[float] = []
    api_part: list[float] = []
    by_kind: dict[str, list[float]] = {"service created": [], "endpoint replaced": []}
    failures = 0
    try:
        for n in range(samples):
            if n % 2 == 0 or not cluster.headless:
                kind = "service created"
                ns, name = "ns0", f"prop{n}"
                ip = f"10.97.{n // 250}.{n % 250 + 1}"
                body: dict[str, Any] = {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "clusterIP": ip,
                        "clusterIPs": [ip],
                        "ports": [{"name": "http", "protocol": "TCP", "port": 80}],
                    },
                }
                method, path = "POST", f"/api/v1/namespaces/{ns}/services"
                qname = f"{name}.{ns}.svc.{ZONE}"
            else:
                kind = "endpoint replaced"
                ns, svc = cluster.headless[(n // 2) % len(cluster.headless)]
                path = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{svc}-abcde"
                body = client.request("GET", path)  # not timed
                ip = endpoint_ip(n, 200)
                body["endpoints"][0]["addresses"] = [ip]
                method = "PUT"
                qname = f"{svc}.{ns}.svc.{ZONE}"
            t0 = time.perf_counter()
            client.request(method, path, body)
            t_api = time.perf_counter()
            seen = poll_until(server.port, qname, ip, t0 + 5.0)
            if seen is None:
                failures += 1
                continue
            total.append((seen - t0) * 1000)
            api_part.append((t_api - t0) * 1000)
            by_kind[kind].append((seen - t0) * 1000)
            time.sleep(0.05)  # let the zone settle; samples are independent
    finally:
        client.close()
        _stop(server.proc)
        _stop(api)
    if failures:
        notes.append(f"{failures} of {samples} changes not visible within 5 s")
    result = {
        "samples": float(len(total)),
        "p50_ms": percentile(total, 50),
        "p99_ms": percentile(total, 99),
        "max_ms": max(total) if total else float("nan"),
        "api_request_p50_ms": percentile(api_part, 50),
        "rss_via_api_mb": footprint_api["total_mb"],  # the forward child's private memory too
        "rss_via_api_child_mb": footprint_api["child_private_mb"],
        "dnsd_ready_s": server.ready_s,
    }
    for kind, values in by_kind.items():
        result[f"{kind} p50_ms"] = percentile(values, 50)
    return result, notes


def memory_only(tmp: Path, cluster: Cluster, timeout: float) -> dict[str, float]:
    """dnsd's RSS once ready (one process, nothing else measured), from the manifest folder
    and then via the fake API server, each started alone and stopped."""
    probe = cluster.pools["A clusterIP"][-1][0]
    manifests = ["--manifests", str(tmp / "manifests")]
    server, _ = start_dnsd(tmp, "dnsd", manifests, 1, timeout, probe)
    try:
        manifests_mem, ready_manifests = dnsd_footprint(server.proc.pid), server.ready_s
    finally:
        _stop(server.proc)
    api, kubeconfig = start_fake_apiserver(cluster.objects, tmp / "api", _spawn_argv)
    try:
        source = ["--kubeconfig", str(kubeconfig)]
        server, _ = start_dnsd(tmp, "dnsd-api", source, 1, timeout, probe)
        try:
            api_mem, ready_api = dnsd_footprint(server.proc.pid), server.ready_s
        finally:
            _stop(server.proc)
        # The in-cluster code path: URL, ServiceAccount-style token and CA files, so the
        # official client's kubeconfig loader (about 35 MB) is never imported.
        server, _ = start_dnsd(tmp, "dnsd-token", token_access(kubeconfig), 1, timeout, probe)
        try:
            token_mem = dnsd_footprint(server.proc.pid)
        finally:
            _stop(server.proc)
    finally:
        _stop(api)
    return {
        # dnsd's RSS plus its forward child's private memory (bench.procstat.dnsd_footprint)
        "rss_manifests_mb": manifests_mem["total_mb"],
        "ready_manifests_s": ready_manifests,
        "rss_api_mb": api_mem["total_mb"],
        "ready_api_s": ready_api,
        "rss_token_mb": token_mem["total_mb"],
        "child_private_mb": token_mem["child_private_mb"],
    }


def token_access(kubeconfig: Path) -> list[str]:
    """`--apiserver/--token-file/--ca-file` flags for the server a kubeconfig points at."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    folder = kubeconfig.parent
    (folder / "ca.pem").write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    (folder / "token").write_text(config["users"][0]["user"]["token"])
    return [
        "--apiserver",
        cluster["server"],
        "--token-file",
        str(folder / "token"),
        "--ca-file",
        str(folder / "ca.pem"),
    ]


# --- main ----------------------------------------------------------------------------------


def fmt(v: float) -> str:
    return f"{v:,.2f}" if isinstance(v, float) else str(v)


Doc = dict[str, Any]
Runs = dict[str, list[dict[str, float]]]  # server label -> figures of each run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--headless", type=int, default=1_000)
    parser.add_argument("--headless-endpoints", type=int, default=5)
    parser.add_argument(
        "--endpoints",
        type=int,
        default=100_000,
        help="endpoints in all: the headless ones, the rest spread over the ClusterIP Services",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10, help="seconds per throughput pass")
    parser.add_argument("--latency-qps", type=int, default=20_000)
    parser.add_argument("--latency-duration", type=float, default=5)
    parser.add_argument("--clients", type=int, default=20, help="dnsperf -c")
    parser.add_argument("--threads", type=int, default=2, help="dnsperf -T (throughput pass)")
    parser.add_argument(
        "--outstanding",
        type=int,
        default=300,
        help="dnsperf -q: 100 caps dnsd by Little's law (its latency under load is higher), "
        "1,000 makes knot drop queries; 300 gave both their best in quick trials",
    )
    parser.add_argument("--queries", type=int, default=200_000, help="lines in the query file")
    parser.add_argument("--samples", type=int, default=50, help="propagation samples")
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--skip-propagation", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short passes")
    parser.add_argument(
        "--objects",
        choices=["realistic", "minimal"],
        default="realistic",
        help="objects shaped as a real cluster's (managedFields, labels, ...) or minimal ones",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument(
        "--memory-only", action="store_true", help="only dnsd's RSS once ready (no knot/dnsperf)"
    )
    args = parser.parse_args()
    if args.quick:
        args.services, args.headless, args.endpoints = 200, 20, 500
        args.runs, args.duration, args.latency_duration = 1, 2, 1
        args.latency_qps, args.queries, args.samples = 2_000, 5_000, 10
        args.ready_timeout = 60
    for tool in () if args.memory_only else ("knotd", "dnsperf"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs `{tool}` (apt-get install knot dnsperf)")
    return args


def build_cluster(tmp: Path, args: argparse.Namespace) -> tuple[Cluster, dict[str, int]]:
    """The cluster state, written as manifests, and the dnsperf query file: its mix of kinds."""
    t0 = time.perf_counter()
    cluster = generate(args.services, args.headless, args.headless_endpoints, args.endpoints)
    if args.objects == "realistic":
        dress(cluster.objects)
    write_manifests(tmp / "manifests", cluster)
    mix = write_queries(tmp / "queries.txt", cluster, args.queries)
    print(
        f"cluster: {args.services:,} Services ({len(cluster.headless):,} headless x "
        f"{args.headless_endpoints} endpoints), {cluster.endpoints:,} endpoints, "
        f"{len(cluster.rr) + len(cluster.ptr):,} records, {args.objects} objects; generated in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return cluster, mix


def describe(args: argparse.Namespace, cluster: Cluster) -> Doc:
    """The start of the --json document: the arguments and the cluster's size."""
    return {
        "benchmark": "dns",
        "quick": args.quick,
        "args": vars(args),
        "cluster": {
            "services": args.services,
            "headless": len(cluster.headless),
            "headless_endpoints": args.headless_endpoints,
            "endpoints": cluster.endpoints,
            "records": len(cluster.rr) + len(cluster.ptr),
            "objects": args.objects,
        },
    }


def memory_step(tmp: Path, cluster: Cluster, args: argparse.Namespace, doc: Doc) -> None:
    """--memory-only: dnsd's RSS once ready, from the manifests and via the API server."""
    mem = memory_only(tmp, cluster, args.ready_timeout)
    print(
        "dnsd RSS + its forward child's private memory "
        f"({mem['child_private_mb']:,.1f} MB) once ready: "
        f"{mem['rss_manifests_mb']:,.1f} MB from the manifests "
        f"(ready in {mem['ready_manifests_s']:.1f} s), {mem['rss_api_mb']:,.1f} MB via "
        f"the API server with --kubeconfig (ready in {mem['ready_api_s']:.1f} s), "
        f"{mem['rss_token_mb']:,.1f} MB with --apiserver/--token-file as in-cluster"
    )
    if args.json:
        write_json(args.json, {**doc, "mode": "memory", "memory": mem, "complete": True})


def announce_passes(args: argparse.Namespace, mix: dict[str, int], doc: Doc) -> None:
    doc["query_mix"] = {k: v / args.queries for k, v in mix.items()}
    print("query mix: " + ", ".join(f"{k} {100 * v / args.queries:.0f}%" for k, v in mix.items()))
    print(
        f"dnsperf: -c {args.clients} -T {args.threads} -q {args.outstanding} "
        f"-l {args.duration:g} (throughput), -Q {args.latency_qps} -T 1 -v "
        f"-l {args.latency_duration:g} (latency)\n"
    )


def start_servers(
    tmp: Path, cluster: Cluster, args: argparse.Namespace, servers: list[Server]
) -> tuple[Server, dict[str, float]]:
    """knot, dnsd and dnsd --workers 2 on the same state, appended to `servers` as each comes
    up (the caller stops them); returns the one-process dnsd and the RSS figures once ready."""
    servers.append(start_knot(tmp, cluster, args.ready_timeout))
    manifests = ["--manifests", str(tmp / "manifests")]
    probe = cluster.pools["A clusterIP"][-1][0]
    one, _ = start_dnsd(tmp, "dnsd", manifests, 1, args.ready_timeout, probe)
    servers.append(one)
    ready = dnsd_footprint(one.proc.pid)
    two, _ = start_dnsd(tmp, "dnsd --workers 2", manifests, 2, args.ready_timeout, probe)
    servers.append(two)
    pids2 = process_tree(two.proc.pid)
    rss = {
        "dnsd_ready_mb": ready["total_mb"],  # with the forward child's private memory
        "child_private_mb": ready["child_private_mb"],
        "workers2_rss_mb": rss_mb(pids2),
        "workers2_pss_mb": pss_mb(pids2),
        "workers2_processes": len(pids2),
    }
    for s in servers:
        print(f"{s.label}: ready in {s.ready_s:.1f} s on 127.0.0.1:{s.port}")
    return one, rss


def check_answers(cluster: Cluster, servers: list[Server], doc: Doc) -> None:
    """The same sampled questions to every server: the differences are printed."""
    asked, diffs = compare_answers(cluster, {s.label: s.port for s in servers}, 20)
    doc["ready_s"] = {s.label: s.ready_s for s in servers}
    doc["answers"] = {"asked": asked, "differ": len(diffs), "examples": diffs[:10]}
    print(f"same answers from all three: {asked - len(diffs)} of {asked} sampled questions")
    for diff in diffs[:10]:
        print(f"  differs: {diff}")
    print()


def measure_runs(servers: list[Server], tmp: Path, args: argparse.Namespace, doc: Doc) -> Runs:
    """`--runs` rounds of a throughput and a latency pass per server, the order rotated."""
    results: Runs = {s.label: [] for s in servers}
    for run in range(args.runs):
        order = servers[run % len(servers) :] + servers[: run % len(servers)]
        for s in order:
            r = measure(s, tmp / "queries.txt", args)
            codes = r.pop("_codes")
            results[s.label].append(r)
            doc.setdefault("response_codes", {}).setdefault(s.label, []).append(codes)
            print(
                f"run {run + 1} {s.label:17} "
                + ", ".join(f"{k}={fmt(v)}" for k, v in r.items())
                + f"  [{codes}]"
            )
    return results


def summarize(results: Runs, servers: list[Server], args: argparse.Namespace, doc: Doc) -> None:
    """Medians per server and the median of the per-run ratios dnsd/knot, printed and kept."""
    knot = results["knot"]
    print(f"\nmedians of {args.runs} runs:")
    keys = list(knot[0])
    print(f"  {'':20}" + "".join(f"{s.label:>18}" for s in servers))
    for key in keys:
        row = "".join(
            f"{statistics.median(r[key] for r in results[s.label]):>18,.2f}" for s in servers
        )
        print(f"  {key:20}{row}")
    doc["servers"] = [s.label for s in servers]
    doc["runs"] = results
    doc["medians"] = {
        s.label: {k: statistics.median(r[k] for r in results[s.label]) for k in keys}
        for s in servers
    }
    doc["ratios_vs_knot"] = {}
    for label in ("dnsd", "dnsd --workers 2"):
        ratios = {
            key: statistics.median(
                d[key] / k[key] for d, k in zip(results[label], knot, strict=True)
            )
            for key in ("qps", "cpu_us_per_query", "p99_ms")
        }
        print(
            f"  {label} / knot: qps {ratios['qps']:.2f}x, CPU per query "
            f"{ratios['cpu_us_per_query']:.2f}x, p99 {ratios['p99_ms']:.2f}x (median of per-run "
            "ratios)"
        )
        doc["ratios_vs_knot"][label] = ratios


def report_rss(rss: dict[str, float], doc: Doc) -> None:
    print(
        f"  dnsd RSS + its forward child's private memory: {rss['dnsd_ready_mb']:,.1f} MB "
        f"once ready (the child {rss['child_private_mb']:,.1f} MB), "
        f"{rss['dnsd_after_runs_mb']:,.1f} MB after the runs; --workers 2: RSS "
        f"{rss['workers2_rss_mb']:,.1f} MB / PSS {rss['workers2_pss_mb']:,.1f} MB for "
        f"{rss['workers2_processes']} processes"
    )
    doc["rss"] = {
        key: rss[key]
        for key in (
            "dnsd_ready_mb",
            "child_private_mb",
            "dnsd_after_runs_mb",
            "workers2_rss_mb",
            "workers2_pss_mb",
            "workers2_processes",
        )
    }


def propagation_step(tmp: Path, cluster: Cluster, args: argparse.Namespace, doc: Doc) -> None:
    """API write -> new answer served, via the fake API server (unless --skip-propagation)."""
    doc["propagation"] = None
    if args.json:
        write_json(args.json, {**doc, "complete": False})  # kept if propagation fails
    if args.skip_propagation:
        return
    prop, notes = propagation(tmp, cluster, args.samples, args.ready_timeout)
    print(
        f"\npropagation (API write sent -> new answer served; {int(prop['samples'])} "
        "samples, Service creates and EndpointSlice updates alternating):"
    )
    for key, value in prop.items():
        print(f"  {key:28} {value:>10,.2f}")
    for note in notes:
        print(f"  note: {note}")
    doc["propagation"] = {**prop, "notes": notes}


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmpname:
        tmp = Path(tmpname)
        cluster, mix = build_cluster(tmp, args)
        doc = describe(args, cluster)
        if args.memory_only:
            memory_step(tmp, cluster, args, doc)
            return
        announce_passes(args, mix, doc)
        servers: list[Server] = []
        try:
            one, rss = start_servers(tmp, cluster, args, servers)
            check_answers(cluster, servers, doc)
            results = measure_runs(servers, tmp, args, doc)
            rss["dnsd_after_runs_mb"] = dnsd_footprint(one.proc.pid, wait_s=0)["total_mb"]
        finally:
            for s in servers:
                _stop(s.proc)
        summarize(results, servers, args, doc)
        report_rss(rss, doc)
        propagation_step(tmp, cluster, args, doc)
        print(
            "\n  targets: dnsd qps >= 0.75x knot, CPU per query <= 1.5x knot, "
            "propagation p99 <= 100 ms, RSS <= 164 MB (10k Services / 100k endpoints)"
        )
        if args.quick:
            print("  (--quick: tiny cluster, short passes: the figures are a smoke test only)")
        if args.json:
            write_json(args.json, {**doc, "complete": True})


if __name__ == "__main__":
    main()
