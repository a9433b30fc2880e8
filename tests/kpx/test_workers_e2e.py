"""`--workers 2` end to end in nftables mode (kpx/worker.py, kpx/worker_pool.py): the real
daemon in the node namespace, two worker processes sharing the proxy port, real pods, a real
client, real nftables."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from tests.kpx.netns import Netns, Topology
from tests.kpx.test_nft_e2e import PROXY_PORT, manifest, whoami, write_atomically
from tests.waiting import wait_for

METRICS = ("127.0.0.1", 10249)


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(child) for child in text.split()}


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def scrape(node: Netns) -> str:
    sock = node.socket()
    sock.settimeout(5)
    try:
        sock.connect(METRICS)
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks).decode()


def worker_metric(text: str, name: str) -> dict[str, float]:
    found = re.findall(rf'^{name}{{worker="(\d+)"}} (\S+)$', text, re.M)
    return {worker: float(value) for worker, value in found}


def served_once_counted(node: Netns, total: int) -> dict[str, float]:
    """Connections per worker, once the workers' stats (sent about once a second) count
    `total` in all; {} until then."""
    counts = worker_metric(scrape(node), "kpx_worker_connections_total")
    return counts if sum(counts.values()) >= total else {}


def start_kpx(topo: Topology, path: Path, log_path: Path) -> subprocess.Popen[str]:
    code = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
    return topo.node.popen(
        sys.executable, "-c", code, "--workers", "2",
        "--manifests", str(path), "--node-name", "node-a", "--proxy-port", str(PROXY_PORT),
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address",
        f"{METRICS[0]}:{METRICS[1]}", "--min-sync-period", "0.01", "--log-format", "json",
        stdout=log_path.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_two_workers_share_the_port_follow_changes_and_restart(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1, p2 = topo.add_pod("p1"), topo.add_pod("p2")
    p1.start_whoami(8080)
    p2.start_whoami(8080)
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1, p2]))
    log_path = tmp_path / "kpx.log"
    kpx = start_kpx(topo, path, log_path)
    try:
        assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80, 0.5) in ("p1", "p2"))
        workers = children(kpx.pid)
        assert len(workers) == 2, log_path.read_text()
        # SO_REUSEPORT spreads the connections (by their 4-tuple hash) over both workers.
        seen = Counter(whoami(topo.client, "10.96.0.10", 80) for _ in range(40))
        assert set(seen) == {"p1", "p2"}
        served = wait_for(lambda: served_once_counted(topo.node, 41))
        assert served and set(served) == {"0", "1"} and min(served.values()) > 0, served
        summed = re.search(r"^kpx_connections_total (\S+)$", scrape(topo.node), re.M)
        assert summed and float(summed[1]) == sum(served.values())  # the workers', summed

        # p1 leaves: every worker stops sending to it (each has its own picker).
        write_atomically(path, manifest([p2]))
        assert wait_for(
            lambda: all(whoami(topo.client, "10.96.0.10", 80) == "p2" for _ in range(4))
        )
        before = worker_metric(scrape(topo.node), "kpx_worker_connections_total")
        assert {whoami(topo.client, "10.96.0.10", 80) for _ in range(30)} == {"p2"}
        after = wait_for(lambda: served_once_counted(topo.node, int(sum(before.values())) + 30))
        assert all(after[w] > before[w] for w in ("0", "1")), (before, after)

        # A worker killed: the other serves on, the dead one is started again with the rules.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(children(kpx.pid) - {victim}) == 2, timeout=20)
        assert wait_for(
            lambda: worker_metric(scrape(topo.node), "kpx_worker_up") == {"0": 1.0, "1": 1.0}
        )
        restarts = worker_metric(scrape(topo.node), "kpx_worker_restarts_total")
        assert sorted(restarts.values()) == [0.0, 1.0]
        assert {whoami(topo.client, "10.96.0.10", 80) for _ in range(20)} == {"p2"}

        # The control process killed: its workers go with it (PR_SET_PDEATHSIG).
        workers = children(kpx.pid)
        kpx.kill()
        kpx.wait(timeout=10)
        assert wait_for(lambda: not any(alive(pid) for pid in workers), timeout=20)
        assert whoami(topo.client, "10.96.0.10", 80) == "refused"  # nobody listens
    finally:
        if kpx.poll() is None:
            kpx.send_signal(signal.SIGTERM)
            kpx.wait(timeout=40)


def test_two_workers_stop_cleanly_on_sigterm(netns_topology: Topology, tmp_path: Path) -> None:
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.start_whoami(8080)
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1]))
    log_path = tmp_path / "kpx.log"
    kpx = start_kpx(topo, path, log_path)
    try:
        assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80, 0.5) == "p1")
        workers = children(kpx.pid)
        assert len(workers) == 2
    finally:
        kpx.send_signal(signal.SIGTERM)
        status = kpx.wait(timeout=40)
    assert status == 0, log_path.read_text()
    assert not any(alive(pid) for pid in workers)
    assert "kpx" not in topo.node.run("nft", "list", "tables")  # table removed on clean exit


def test_the_workers_clientip_pins_are_in_kpx_affinity_entries(
    netns_topology: Topology, tmp_path: Path
) -> None:
    """With --workers the TCP clients are pinned in the workers, not in the control process
    that serves /metrics: the gauge adds what each worker reports."""
    topo = netns_topology
    p1, p2 = topo.add_pod("p1"), topo.add_pod("p2")
    p1.start_whoami(8080)
    p2.start_whoami(8080)
    docs = list(yaml.safe_load_all(manifest([p1, p2])))
    for doc in docs:
        if doc["kind"] == "Service" and doc["metadata"]["name"] == "web":
            doc["spec"]["sessionAffinity"] = "ClientIP"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    log_path = tmp_path / "kpx.log"
    kpx = start_kpx(topo, path, log_path)

    def pins() -> float:
        found = re.search(r"^kpx_affinity_entries (\S+)$", scrape(topo.node), re.M)
        return float(found[1]) if found else -1.0

    try:
        assert wait_for(lambda: whoami(topo.client, "10.96.0.10", 80, 0.5) in ("p1", "p2"))
        for _ in range(20):  # from one client address, spread over both workers
            assert whoami(topo.client, "10.96.0.10", 80) in ("p1", "p2")
        # Each worker that accepted one pins that client: 1 or 2 pins (one per worker).
        assert wait_for(lambda: pins() >= 1.0), pins()
        assert pins() <= 2.0
    finally:
        kpx.send_signal(signal.SIGTERM)
        kpx.wait(timeout=40)
