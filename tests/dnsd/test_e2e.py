"""The `dnsd` command as a subprocess: manifest mode, --workers, and the fake API server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.apiserver import FakeApiServer
from tests.dnsd.helpers import (
    endpoint,
    endpoint_slice,
    free_udp_tcp_port,
    headless_pool,
    namespace,
    service,
    write_manifest,
)

Z = "cluster.local"


class DnsdProcess:
    def __init__(
        self, args: list[str], log: Path, port: int | None = None, upstream: str | None = None
    ) -> None:
        self.port = free_udp_tcp_port() if port is None else port
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dnsd.main",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--http-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--upstream",
                upstream or f"127.0.0.1:{free_udp_tcp_port()}",
                "--forward-timeout",
                "0.2",
                *args,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def ask(self, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        if tcp:
            return dns.query.tcp(query, "127.0.0.1", port=self.port, timeout=1)
        return dns.query.udp(query, "127.0.0.1", port=self.port, timeout=1)

    def answers(self, name: str, rdtype: str = "A") -> list[str] | str:
        """Sorted rdata, or the rcode's name when the answer is negative."""
        msg = self.ask(name, rdtype)
        if msg.rcode() != dns.rcode.NOERROR:
            return dns.rcode.to_text(msg.rcode())
        return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)

    def wait_for(self, check: Callable[[], bool], timeout: float = 10.0) -> float:
        """Poll `check` until it holds; returns the seconds it took."""
        started = time.monotonic()
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if check():
                    return time.monotonic() - started
            except dns.exception.Timeout:
                pass
            assert time.monotonic() - started < timeout, self.log.read_text()[-3000:]
            time.sleep(0.02)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


@pytest.fixture
def run_dnsd(tmp_path: Path) -> Iterator[Callable[..., DnsdProcess]]:
    started: list[DnsdProcess] = []

    def run(*args: str, port: int | None = None, upstream: str | None = None) -> DnsdProcess:
        process = DnsdProcess(list(args), tmp_path / f"dnsd{len(started)}.log", port, upstream)
        started.append(process)
        return process

    yield run
    for process in started:
        process.stop()


CLUSTER = [
    namespace("default"),
    service("web", ips=["10.96.0.5"], ports=[{"name": "http", "port": 80}]),
]


def test_dnsd_serves_a_manifest_and_exits_cleanly_on_sigterm(run_dnsd, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", CLUSTER)
    dnsd = run_dnsd("--manifests", str(manifest))
    dnsd.wait_for(lambda: dnsd.answers(f"web.default.svc.{Z}") == ["10.96.0.5"])
    assert dnsd.ask(f"web.default.svc.{Z}", tcp=True).answer
    assert dnsd.stop() == 0
    assert b'"event": "dnsd_stopping"' in dnsd.log.read_bytes()


def test_bad_settings_exit_with_status_2_naming_the_flag(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dnsd.main", "--ttl", "99999", "--manifests", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "--ttl" in result.stderr


def test_every_workers_counters_are_on_the_first_workers_metrics(run_dnsd, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", CLUSTER)
    dnsd = run_dnsd("--manifests", str(manifest), "--workers", "2")
    dnsd.wait_for(lambda: "worker_listening" in dnsd.log.read_text())
    lines = [json.loads(line) for line in dnsd.log.read_text().splitlines() if "{" in line]
    http = next(line["port"] for line in lines if line.get("event") == "http_listening")
    sample = 'dnsd_dns_requests_total{proto="udp",type="A"}'

    def counted() -> float:
        url = f"http://127.0.0.1:{http}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    time.sleep(1.5)  # both workers' earlier queries (the waits above) reported
    before = counted()
    for _ in range(40):  # each from a fresh source port: the kernel spreads them over both
        assert dnsd.answers(f"web.default.svc.{Z}") == ["10.96.0.5"]
    # Worker 0 alone would see about half of them.
    dnsd.wait_for(lambda: counted() - before == 40, timeout=5)
    assert dnsd.stop() == 0


def test_workers_share_the_port_and_stop_together(run_dnsd, tmp_path):
    manifest = write_manifest(tmp_path / "m.yaml", CLUSTER)
    dnsd = run_dnsd("--manifests", str(manifest), "--workers", "2")
    dnsd.wait_for(lambda: dnsd.answers(f"web.default.svc.{Z}") == ["10.96.0.5"])
    # The second worker joins the port only once its own zone is complete.
    dnsd.wait_for(lambda: "worker_listening" in dnsd.log.read_text())
    children = Path(f"/proc/{dnsd.proc.pid}/task/{dnsd.proc.pid}/children").read_text().split()
    forward_children = [
        c for c in children if b"forward_child" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    workers = [c for c in children if c not in forward_children]
    assert len(workers) == 1  # (besides the --forward-process child)
    # Both workers are ready: every one of many queries (spread by SO_REUSEPORT over the
    # source port) is answered.
    for _ in range(40):
        assert dnsd.answers(f"web.default.svc.{Z}") == ["10.96.0.5"]
    # With the first process frozen, the second one still answers the queries the kernel
    # hashes to it (each query below comes from a fresh source port).
    os.kill(dnsd.proc.pid, signal.SIGSTOP)
    try:
        answered = 0
        for _ in range(20):
            query = dns.message.make_query(f"web.default.svc.{Z}", "A")
            try:
                dns.query.udp(query, "127.0.0.1", port=dnsd.port, timeout=0.2)
                answered += 1
            except dns.exception.Timeout:
                pass
        assert 0 < answered < 20
    finally:
        os.kill(dnsd.proc.pid, signal.SIGCONT)
    assert dnsd.stop() == 0
    deadline = time.monotonic() + 5
    while Path(f"/proc/{children[0]}").exists() and time.monotonic() < deadline:
        try:
            os.waitpid(int(children[0]), os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    status = Path(f"/proc/{children[0]}/status")
    assert not status.exists() or "zombie" in status.read_text()


def test_loadbalance_turns_headless_answers_over_udp_and_tcp(run_dnsd, tmp_path):
    pool = [namespace("default"), *headless_pool("pool", [f"10.1.0.{i}" for i in range(1, 5)])]
    dnsd = run_dnsd("--manifests", str(write_manifest(tmp_path / "m.yaml", pool)),
                    "--loadbalance")  # fmt: skip
    name = f"pool.default.svc.{Z}"
    dnsd.wait_for(lambda: len(dnsd.answers(name)) == 4)
    for tcp in (False, True):
        firsts = set()
        for _ in range(40):  # dnspython picks a random ID per query
            msg = dnsd.ask(name, tcp=tcp)
            order = [rd.to_text() for rrset in msg.answer for rd in rrset]
            assert sorted(order) == [f"10.1.0.{i}" for i in range(1, 5)]
            firsts.add(order[0])
        assert len(firsts) == 4, (tcp, firsts)


# --- a rolling update with a surge: the successor joins the port, the old one lameducks -----


def _fresh_port_answer(port: int, name: str) -> str | None:
    """One query from a new source port (so SO_REUSEPORT hashes it afresh): the A record's
    address, or None if nothing answered within a second."""
    try:
        msg = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1)
    except dns.exception.Timeout:
        return None
    return next((rd.to_text() for rrset in msg.answer for rd in rrset), msg.rcode())


def _logged(process: DnsdProcess, event: str) -> bool:
    return f'"event": "{event}"'.encode() in process.log.read_bytes()


def test_a_successor_takes_the_port_over_and_no_query_is_lost(run_dnsd, tmp_path):
    """The old dnsd serves web as 10.96.0.5, its successor (same port) as 10.96.0.6, so each
    answer says who gave it. The successor joins only with its zone built; on SIGTERM the old
    one steers the port to it and keeps answering what it already holds for --lameduck."""
    name = f"web.default.svc.{Z}"
    old = run_dnsd("--manifests", str(write_manifest(tmp_path / "old.yaml", CLUSTER)),
                   "--lameduck", "3")  # fmt: skip
    old.wait_for(lambda: old.answers(name) == ["10.96.0.5"])
    successor_cluster = [
        namespace("default"),
        service("web", ips=["10.96.0.6"], ports=[{"name": "http", "port": 80}]),
    ]
    new = run_dnsd("--manifests", str(write_manifest(tmp_path / "new.yaml", successor_cluster)),
                   "--lameduck", "3", port=old.port)  # fmt: skip
    new.wait_for(lambda: _logged(new, "worker_listening"))
    assert _logged(new, "port_in_use_joining_when_ready")
    # Both in the group: the kernel's hash spreads fresh source ports over the two.
    before = [_fresh_port_answer(old.port, name) for _ in range(60)]
    assert set(before) == {"10.96.0.5", "10.96.0.6"}, before
    old.proc.send_signal(signal.SIGTERM)
    old.wait_for(lambda: _logged(old, "lameduck"))
    assert b'"steered_sockets": 2' in old.log.read_bytes()  # UDP and TCP
    # Lameduck: the old process still runs, and every query goes to the successor.
    during = [_fresh_port_answer(old.port, name) for _ in range(60)]
    assert old.proc.poll() is None, "the old dnsd left before its lameduck ended"
    assert set(during) == {"10.96.0.6"}, during
    assert old.proc.wait(10) == 0
    after = [_fresh_port_answer(new.port, name) for _ in range(20)]
    assert set(after) == {"10.96.0.6"}, after


def test_a_port_held_by_something_else_fails_the_start_once_the_zone_is_built(run_dnsd, tmp_path):
    """Not a dnsd (no SO_REUSEPORT): dnsd waits for its zone as for a successor's port, then
    its bind fails, and it exits 1 as it would binding at once, instead of running unready."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        dnsd = run_dnsd("--manifests", str(write_manifest(tmp_path / "m.yaml", CLUSTER)),
                        port=port)  # fmt: skip
        assert dnsd.proc.wait(15) == 1
    assert _logged(dnsd, "port_in_use_joining_when_ready") and _logged(dnsd, "listen_failed")


def test_lameduck_without_a_successor_keeps_answering_then_exits(run_dnsd, tmp_path):
    name = f"web.default.svc.{Z}"
    dnsd = run_dnsd("--manifests", str(write_manifest(tmp_path / "m.yaml", CLUSTER)),
                    "--lameduck", "2")  # fmt: skip
    dnsd.wait_for(lambda: dnsd.answers(name) == ["10.96.0.5"])
    assert not _logged(dnsd, "port_in_use_joining_when_ready")
    signalled = time.monotonic()
    dnsd.proc.send_signal(signal.SIGTERM)
    dnsd.wait_for(lambda: _logged(dnsd, "lameduck"))
    answers = []
    while time.monotonic() - signalled < 1.5:
        answers.append(_fresh_port_answer(dnsd.port, name))
        time.sleep(0.05)
    assert answers and set(answers) == {"10.96.0.5"}, answers
    assert dnsd.proc.wait(10) == 0
    assert time.monotonic() - signalled >= 2.0


# --- against the fake API server, through a kubeconfig ---------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.start()
        yield server


def test_api_changes_are_visible_in_the_next_answer(run_dnsd, api, tmp_path):
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    api.create(namespace("default"))
    api.create(service("web", ips=["10.96.0.5"], ports=[{"name": "http", "port": 80}]))
    api.create(service("db", headless=True, ports=[{"name": "pg", "port": 5432}]))
    api.create(
        endpoint_slice(
            "db-1",
            "db",
            [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2")],
            ports=[{"name": "pg", "port": 5432}],
        )
    )
    api.create(service("ext", external_name="web.default.svc.cluster.local"))
    dnsd = run_dnsd("--kubeconfig", str(kubeconfig))
    dnsd.wait_for(lambda: dnsd.answers(f"web.default.svc.{Z}") == ["10.96.0.5"], timeout=20)
    assert dnsd.answers(f"db.default.svc.{Z}") == ["10.1.0.1", "10.1.0.2"]
    assert dnsd.answers("5.0.96.10.in-addr.arpa", "PTR") == [f"web.default.svc.{Z}."]
    srv = dnsd.answers(f"_pg._tcp.db.default.svc.{Z}", "SRV")
    assert srv == [f"0 50 5432 10-1-0-2.db.default.svc.{Z}.", f"0 50 5432 db-0.db.default.svc.{Z}."]
    assert dnsd.answers(f"ext.default.svc.{Z}") == ["10.96.0.5", f"web.default.svc.{Z}."]

    latencies = []
    # A service is added.
    api.create(service("new", ips=["10.96.0.7"]))
    latencies.append(dnsd.wait_for(lambda: dnsd.answers(f"new.default.svc.{Z}") == ["10.96.0.7"]))
    # An endpoint turns not-ready.
    api.update(
        endpoint_slice(
            "db-1",
            "db",
            [endpoint("10.1.0.1", hostname="db-0"), endpoint("10.1.0.2", ready=False)],
            ports=[{"name": "pg", "port": 5432}],
        )
    )
    latencies.append(dnsd.wait_for(lambda: dnsd.answers(f"db.default.svc.{Z}") == ["10.1.0.1"]))
    assert dnsd.answers(f"10-1-0-2.db.default.svc.{Z}") == "NXDOMAIN"
    # The ExternalName now points elsewhere.
    api.update(service("ext", external_name="new.default.svc.cluster.local"))
    latencies.append(
        dnsd.wait_for(
            lambda: dnsd.answers(f"ext.default.svc.{Z}") == ["10.96.0.7", f"new.default.svc.{Z}."]
        )
    )
    # A service is deleted.
    api.delete("services", "default", "web")
    latencies.append(dnsd.wait_for(lambda: dnsd.answers(f"web.default.svc.{Z}") == "NXDOMAIN"))
    assert dnsd.answers(f"default.svc.{Z}") == []  # the namespace still exists: NODATA
    assert max(latencies) < 2.0, latencies


def test_every_record_kind_from_the_api_server(run_dnsd, api, tmp_path):
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    for obj in [
        namespace("default"),
        service(
            "dual",
            ips=["10.96.0.8", "fd00::8"],
            ports=[{"name": "dns", "port": 53, "protocol": "UDP"}],
        ),
        service("db", headless=True, ports=[{"name": "pg", "port": 5432}]),
        endpoint_slice(
            "db-v4",
            "db",
            [endpoint("10.1.0.1", hostname="db-0")],
            ports=[{"name": "pg", "port": 15432}],
        ),
        endpoint_slice(
            "db-v6",
            "db",
            [endpoint("fd00::1:1", hostname="db-0")],
            ports=[{"name": "pg", "port": 15432}],
            address_type="IPv6",
        ),
        service("ext", external_name="dual.default.svc.cluster.local"),
    ]:
        api.create(obj)
    dnsd = run_dnsd("--kubeconfig", str(kubeconfig), "--pods", "insecure", "--ttl", "7")
    dnsd.wait_for(lambda: dnsd.answers(f"dual.default.svc.{Z}") == ["10.96.0.8"], timeout=20)
    base = f"default.svc.{Z}"
    assert dnsd.answers(f"dual.{base}", "AAAA") == ["fd00::8"]
    # CoreDNS weighs over both ClusterIPs' records (backend_lookup.go SRV()): 100 / 2.
    assert dnsd.answers(f"_dns._udp.dual.{base}", "SRV") == [f"0 50 53 dual.{base}."]
    assert dnsd.answers(f"db.{base}", "A") == ["10.1.0.1"]
    assert dnsd.answers(f"db-0.db.{base}", "AAAA") == ["fd00::1:1"]
    # db-0's IPv4 and IPv6 addresses are two records of CoreDNS's SRV() count, one answered.
    assert dnsd.answers(f"_pg._tcp.db.{base}", "SRV") == [f"0 50 15432 db-0.db.{base}."]
    v6_reverse = "8" + ".0" * 29 + ".d.f.ip6.arpa"
    assert dnsd.answers(v6_reverse, "PTR") == [f"dual.{base}."]
    assert dnsd.answers("1.0.1.10.in-addr.arpa", "PTR") == [f"db-0.db.{base}."]
    assert dnsd.answers(f"ext.{base}", "AAAA") == [f"dual.{base}.", "fd00::8"]
    assert dnsd.answers(f"dns-version.{Z}", "TXT") == ['"1.1.0"']
    assert dnsd.answers(Z, "NS") == [f"ns.dns.{Z}."]
    soa = dnsd.ask(Z, "SOA").answer[0][0]
    assert soa.mname.to_text() == f"ns.dns.{Z}." and soa.minimum == 7
    assert dnsd.answers(f"10-244-1-5.default.pod.{Z}") == ["10.244.1.5"]
    assert dnsd.answers(f"nope.{base}") == "NXDOMAIN"
    nodata = dnsd.ask(f"db.{base}", "TXT")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0][0].minimum == 7
    answer = dnsd.ask(f"_pg._tcp.db.{base}", "SRV", tcp=True)
    assert sorted(rd.to_text() for rrset in answer.additional for rd in rrset) == [
        "10.1.0.1",
        "fd00::1:1",
    ]
