"""Run both daemons on the bundled demo cluster (deploy/demo/) and show them working.

Started by `./scripts/demo.sh`. Everything stays on loopback:
- three small HTTP backends on 127.0.10.1-3:8080 (the pods of shop/web);
- a tiny upstream DNS server on 127.0.0.1 that owns example.com (dnsd forwards the
  ExternalName target payments.example.com there instead of to the machine's resolvers);
- dnsd on 127.0.0.1:10053 (UDP+TCP), health/metrics on :9153;
- kpx in `ports` mode (no root, no nftables): each Service frontend bound on a local port,
  listed at http://127.0.0.1:10249/debug/services.
Then it asks real questions with `dig` and sends real HTTP requests through kpx, and keeps
both daemons running until Ctrl-C (or exits at once with --once, as the test suite does).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from dnslib.server import DNSServer
from dnslib.zoneresolver import ZoneResolver

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DNS_PORT = 10053
DNSD_HTTP = "127.0.0.1:9153"
KPX_METRICS = "127.0.0.1:10249"
KPX_HEALTHZ = "127.0.0.1:10256"
BACKENDS = {"web-0": "127.0.10.1", "web-1": "127.0.10.2", "web-2": "127.0.10.3"}
# Documentation addresses (RFC 5737): they only appear inside DNS answers.
UPSTREAM_ZONE = """
example.com.          300 IN SOA ns.example.com. hostmaster.example.com. 1 7200 1800 86400 60
payments.example.com. 300 IN A   192.0.2.10
"""

QUESTIONS = [
    ("web.shop.svc.cluster.local", "A", "ClusterIP Service"),
    ("web.shop.svc.cluster.local", "AAAA", "its IPv6 ClusterIP (dual-stack)"),
    ("_http._tcp.web.shop.svc.cluster.local", "SRV", "named port"),
    ("db.data.svc.cluster.local", "A", "headless: ready endpoints only (db-2 is not ready)"),
    ("db-0.db.data.svc.cluster.local", "A", "a StatefulSet pod's own name"),
    ("10.10.96.10.in-addr.arpa", "PTR", "reverse of the ClusterIP"),
    ("payments.shop.svc.cluster.local", "A", "ExternalName: CNAME, then the target via upstream"),
    ("nothere.shop.svc.cluster.local", "A", "no such Service"),
]


class Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        pod = self.server.pod_name  # type: ignore[attr-defined]
        body = f"hello from {pod} ({self.server.server_address[0]})\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


def start_backends() -> list[http.server.ThreadingHTTPServer]:
    servers = []
    for pod, ip in BACKENDS.items():
        server = http.server.ThreadingHTTPServer((ip, 8080), Backend)
        server.pod_name = pod  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    return servers


def start_upstream() -> DNSServer:
    resolver = ZoneResolver(UPSTREAM_ZONE)
    server = DNSServer(resolver, port=0, address="127.0.0.1", logger=_QuietLogger())
    server.start_thread()
    return server


class _QuietLogger:
    def __getattr__(self, _name: str) -> object:
        return lambda *_a, **_k: None


def start_daemons(upstream_port: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    dnsd = [
        str(VENV_BIN / "dnsd"),
        "--manifests",
        str(ROOT / "deploy/demo"),
        "--listen",
        f"127.0.0.1:{DNS_PORT}",
        "--http-listen",
        DNSD_HTTP,
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--log-format",
        "json",
    ]
    kpx = [
        str(VENV_BIN / "kpx"),
        "--mode",
        "ports",
        "--manifests",
        str(ROOT / "deploy/demo"),
        "--node-name",
        "demo-node",
        "--ports-bind-address",
        "127.0.0.1",
        "--metrics-bind-address",
        KPX_METRICS,
        "--healthz-bind-address",
        KPX_HEALTHZ,
        "--log-format",
        "json",
    ]
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, argv in (("dnsd", dnsd), ("kpx", kpx)):
        out = open(logs / f"{name}.log", "wb")
        procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a daemon exited early; see .demo/*.log (waiting for {url})")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {seconds}s; see .demo/*.log")


def show_dns() -> None:
    print(f"\n== dnsd: dig @127.0.0.1 -p {DNS_PORT} ...")
    dig = shutil.which("dig")
    for name, qtype, what in QUESTIONS:
        if dig:
            out = subprocess.run(
                [
                    dig,
                    "@127.0.0.1",
                    "-p",
                    str(DNS_PORT),
                    name,
                    qtype,
                    "+noall",
                    "+answer",
                    "+comments",
                    "+time=2",
                    "+tries=1",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            status = next(
                (
                    ln.split("status: ")[1].split(",")[0]
                    for ln in out.splitlines()
                    if "status: " in ln
                ),
                "?",
            )
            answers = [ln for ln in out.splitlines() if ln and not ln.startswith(";")]
        else:  # dnspython, when dig is not installed
            import dns.message
            import dns.query

            reply = dns.query.udp(
                dns.message.make_query(name, qtype), "127.0.0.1", port=DNS_PORT, timeout=2
            )
            status = dns.rcode.to_text(reply.rcode())
            answers = [str(rr) for rr in reply.answer]
        print(f"\n; {what}\n; {name} {qtype} -> {status}")
        for line in answers:
            print("  " + " ".join(line.split()))


def show_proxy() -> None:
    with urllib.request.urlopen(f"http://{KPX_METRICS}/debug/services", timeout=5) as resp:
        rows = json.load(resp)
    print("\n== kpx (ports mode): Service frontends and the local ports serving them")
    for row in rows:
        state = {
            "serve": "endpoints",
            "drop": "no endpoint on this node (Local policy: clients wait, unanswered)",
        }.get(row.get("state") or "", "no endpoints (connections reset)")
        print(f"  {row['frontend']:24} -> {row['address']}:{row['port']}  {state}")
    by_frontend = {row["frontend"]: row for row in rows}
    for frontend, label in (
        ("10.96.10.10:80", "shop/web ClusterIP"),
        ("nodeport/4:30080", "shop/web-public NodePort"),
    ):
        row = by_frontend.get(frontend)
        if row is None:
            continue
        url = f"http://{row['address']}:{row['port']}/"
        print(f"\n; {label} {frontend}: six requests through kpx ({url})")
        for _ in range(6):
            with urllib.request.urlopen(url, timeout=5) as resp:
                print("  " + resp.read().decode().strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="show the answers, then stop")
    args = parser.parse_args()
    backends = start_backends()
    upstream = start_upstream()
    procs = start_daemons(upstream.server.server_address[1], ROOT / ".demo")
    try:
        wait_ready(f"http://{DNSD_HTTP}/readyz", procs)
        wait_ready(f"http://{KPX_METRICS}/readyz", procs)
        show_dns()
        show_proxy()
        if not args.once:
            print(
                f"\nBoth daemons keep running: dig @127.0.0.1 -p {DNS_PORT} <name>, "
                f"curl http://{KPX_METRICS}/debug/services, metrics on "
                f"http://{DNSD_HTTP}/metrics and http://{KPX_METRICS}/metrics; "
                "logs in .demo/. Ctrl-C stops everything."
            )
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.poll() is None for p in procs):
                    time.sleep(0.5)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        upstream.stop()
        for server in backends:
            server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
