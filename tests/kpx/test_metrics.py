"""kpx's /metrics as a scraper sees it: a running kpx (ports mode, manifests, 127.0.0.0/8 only)
exposes kube-proxy's sync and network-programming histograms and the proxy's counters, and the
counters move when a connection is proxied."""

from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tests.waiting import wait_for

LIVE_IP, REFUSING_IP = "127.0.0.1", "127.0.0.2"  # one port: only 127.0.0.1 listens on it
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")
EXPECTED_NAMES = (
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "kubeproxy_network_programming_duration_seconds",
    "kpx_connections_active",
    "kpx_connections_total",
    "kpx_bytes_total",
    "kpx_backend_failures_total",
    "kpx_backend_retries_total",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_server() -> tuple[socket.socket, int]:
    """Says hello, then echoes until EOF; one thread per connection."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LIVE_IP, 0))
    srv.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"hello\n")
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return  # closed by the test
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return srv, srv.getsockname()[1]


def manifest(backend_port: int, trigger: float | None = None) -> str:
    annotations = {}
    if trigger is not None:
        stamp = datetime.fromtimestamp(trigger, UTC).isoformat().replace("+00:00", "Z")
        annotations["endpoints.kubernetes.io/last-change-trigger-time"] = stamp
    addresses = [LIVE_IP, REFUSING_IP] if trigger is None else [LIVE_IP, REFUSING_IP, "127.0.0.3"]
    docs: list[dict[str, Any]] = [
        {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": annotations,
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]} for ip in addresses],
            "ports": [{"name": "http", "port": backend_port}],
        },
    ]
    return yaml.safe_dump_all(docs)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def exchange(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"ping\n")
        client.shutdown(socket.SHUT_WR)
        received = b""
        while data := client.recv(65536):
            received += data
        return received


def test_metrics_expose_kube_proxys_histograms_and_count_proxied_connections(
    tmp_path: Path,
) -> None:
    backend, backend_port = echo_server()
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest(backend_port))
    metrics_port = free_port()
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    kpx = subprocess.Popen(
        [sys.executable, "-c", code, "--mode", "ports", "--manifests", str(path),
         "--node-name", "node-a", "--healthz-bind-address", "127.0.0.1:0",
         "--metrics-bind-address", f"127.0.0.1:{metrics_port}", "--min-sync-period", "0.01",
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "kpx.log").open("w"), text=True,
    )  # fmt: skip
    try:
        assert kpx.stdout is not None
        ready, _, _ = select.select([kpx.stdout], [], [], 20)
        line = kpx.stdout.readline() if ready else ""
        assert line.startswith("{"), (line, (tmp_path / "kpx.log").read_text())
        frontend_port = yaml.safe_load(line)["services"][0]["port"]

        before = scrape(metrics_port)
        names = {re.sub(r"(_bucket|_count|_sum|_created)?(\{.*)?$", "", k) for k in before}
        assert set(EXPECTED_NAMES) <= names
        assert before["kubeproxy_sync_proxy_rules_duration_seconds_count"] >= 1

        # Two connections over [live, refusing] in round robin: one of them meets the
        # refusing endpoint first and is retried on the live one before the client notices.
        assert [exchange(frontend_port) for _ in range(2)] == [b"hello\nping\n"] * 2
        after = wait_for(lambda: (s := scrape(metrics_port))["kpx_connections_active"] == 0 and s)
        assert after, "connections did not close"
        assert after["kpx_connections_total"] == before["kpx_connections_total"] + 2
        assert after["kpx_backend_failures_total"] == before["kpx_backend_failures_total"] + 1
        assert after["kpx_backend_retries_total"] == before["kpx_backend_retries_total"] + 1
        up, down = (
            'kpx_bytes_total{direction="to_backend"}',
            'kpx_bytes_total{direction="to_client"}',
        )
        assert after[up] == before[up] + 2 * len(b"ping\n")
        assert after[down] == before[down] + 2 * len(b"hello\nping\n")

        # An EndpointSlice change whose trigger time is 2 s old when written: the observed
        # programming latency counts from the annotation, not from when kpx read the file.
        triggered = time.time()
        time.sleep(2.0)
        count = "kubeproxy_network_programming_duration_seconds_count"
        total = "kubeproxy_network_programming_duration_seconds_sum"
        path.write_text(manifest(backend_port, trigger=triggered))
        programmed = wait_for(lambda: (s := scrape(metrics_port))[count] > before[count] and s)
        assert programmed, (tmp_path / "kpx.log").read_text()
        assert programmed[count] == before[count] + 1
        latency = programmed[total] - before[total]
        assert 2.0 <= latency < 2.0 + 5.0
        assert (
            programmed["kubeproxy_sync_proxy_rules_duration_seconds_count"]
            > after["kubeproxy_sync_proxy_rules_duration_seconds_count"]
        )
    finally:
        kpx.send_signal(signal.SIGTERM)
        status = kpx.wait(timeout=40)
        backend.close()
    assert status == 0, (tmp_path / "kpx.log").read_text()
