"""kpx replaced while it carries traffic (kpx/handover.py): the real daemon twice in a node
namespace, real nftables, 500 echo connections streaming through it from a client namespace
and new connections opened all along."""

from __future__ import annotations

import hashlib
import json
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.kpx.netns import Netns, Topology
from tests.kpx.test_nft_e2e import manifest, whoami
from tests.kpx.test_udp_netns import endpoint_slice, service, write
from tests.waiting import wait_for

VIP = "10.96.0.10"
CONNECTIONS = 500
CHUNK = 1024
# Bytes a connection may have sent and not seen echoed yet (keeps the pod's threads busy
# without letting any socket buffer fill up).
OUTSTANDING = 16 * CHUNK
KPX = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"


def kpx_argv(path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", KPX, "--manifests", str(path), "--node-name", "node-a",
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249",
        "--min-sync-period", "0.01", "--log-format", "json", *extra,
    ]  # fmt: skip


def events(log: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            found.append(entry)
    return found


class Stream:
    """One echo connection: a deterministic stream of distinct chunks out, digests of what
    went out and of what came back."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.chunks = 0
        self.sent = 0
        self.received = 0
        self.out = hashlib.sha256()
        self.back = hashlib.sha256()
        self.unsent = b""
        self.problem = ""
        self.eof = False

    def next_chunk(self) -> bytes:
        seed = hashlib.sha256(f"{self.index}:{self.chunks}".encode()).digest()
        self.chunks += 1
        return seed * (CHUNK // len(seed))

    def pump_out(self) -> None:
        if not self.unsent and self.sent - self.received < OUTSTANDING:
            self.unsent = self.next_chunk()
        if not self.unsent:
            return
        try:
            n = self.sock.send(self.unsent)
        except BlockingIOError:
            return
        except OSError as err:
            self.problem = f"send: {err}"
            return
        self.out.update(self.unsent[:n])
        self.sent += n
        self.unsent = self.unsent[n:]

    def pump_in(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as err:
            self.problem = f"recv: {err}"
            return
        if not data:
            self.eof = True
            if self.received < self.sent:
                self.problem = f"EOF after {self.received} of {self.sent} bytes"
            return
        self.back.update(data)
        self.received += len(data)


class Streams(threading.Thread):
    """`count` streams through VIP:80 from inside `ns`, pumping until `stop`, then drained
    and half-closed (each must see the backend's EOF after the last echoed byte)."""

    def __init__(self, ns: Netns, count: int) -> None:
        super().__init__(daemon=True)
        self.ns = ns
        self.count = count
        self.flowing = threading.Event()
        self.stop = threading.Event()
        self.streams: list[Stream] = []
        self.error = ""

    def run(self) -> None:
        try:
            with self.ns.entered():
                self._run()
        except Exception as err:
            self.error = repr(err)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for index in range(self.count):
            sock = socket.create_connection((VIP, 80), timeout=5)
            greeting = b""
            while not greeting.endswith(b"\n"):
                greeting += sock.recv(1)
            assert greeting == b"p1\n", greeting
            sock.setblocking(False)
            stream = Stream(index, sock)
            self.streams.append(stream)
            selector.register(sock, selectors.EVENT_READ, stream)
        self.flowing.set()
        turn = 0
        while not self.stop.is_set():
            # A tenth of the connections send per round: all of them have bytes in flight
            # at any moment, and the pod's threads keep up.
            for stream in self.streams[turn::10]:
                if not stream.problem:
                    stream.pump_out()
            turn = (turn + 1) % 10
            for key, _ in selector.select(0.005):
                key.data.pump_in()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for stream in self.streams:
                if stream.unsent and not stream.problem:
                    stream.pump_out()
            if all(s.received >= s.sent or s.problem for s in self.streams):
                break
            for key, _ in selector.select(0.05):
                key.data.pump_in()
        for stream in self.streams:
            if not stream.problem:
                stream.sock.shutdown(socket.SHUT_WR)
        while time.monotonic() < deadline and not all(s.eof or s.problem for s in self.streams):
            for key, _ in selector.select(0.05):
                key.data.pump_in()
        for stream in self.streams:
            selector.unregister(stream.sock)
            stream.sock.close()


class Probes(threading.Thread):
    """New connections to VIP:80, one after the other, until `stop`: each must be answered."""

    def __init__(self, ns: Netns) -> None:
        super().__init__(daemon=True)
        self.ns = ns
        self.stop = threading.Event()
        self.answered: list[float] = []  # when each answer came (time.monotonic)
        self.failures: list[str] = []

    def run(self) -> None:
        with self.ns.entered():
            while not self.stop.is_set():
                answer = whoami(self.ns, VIP, 80, timeout=2.0)
                if answer == "p1":
                    self.answered.append(time.monotonic())
                else:
                    self.failures.append(answer)
                time.sleep(0.005)


def test_500_streaming_connections_survive_a_kpx_replacement_byte_for_byte(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.start_whoami(8080)
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1]))
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    with old_log.open("w") as out:
        old = topo.node.popen(*kpx_argv(path), stdout=subprocess.DEVNULL, stderr=out)
    assert wait_for(lambda: whoami(topo.client, VIP, 80, 0.5) == "p1", 15)
    rules = topo.node.run("nft", "list", "table", "inet", "kpx")

    streams = Streams(topo.client, CONNECTIONS)
    probes = Probes(topo.client)
    streams.start()
    assert streams.flowing.wait(60), streams.error
    probes.start()
    time.sleep(0.5)  # every connection has bytes in flight
    with new_log.open("w") as out:
        new = topo.node.popen(*kpx_argv(path), stdout=subprocess.DEVNULL, stderr=out)
    replacing = time.monotonic()
    try:
        assert wait_for(lambda: events(old_log, "handover_completed"), 30), old_log.read_text()
        handed_over = time.monotonic()
        # The old kpx serves nothing now and waits for its pod's deletion.
        old.send_signal(signal.SIGTERM)
        assert old.wait(timeout=30) == 0
        old_gone = time.monotonic()
        time.sleep(0.5)  # the streams keep going through the new kpx alone
    finally:
        streams.stop.set()
        probes.stop.set()
        streams.join(60)
        probes.join(10)

    handed = events(old_log, "handover_completed")[0]
    adopted = events(new_log, "handover_completed")[0]
    print(
        f"\nhandover: {handed['connections']} connections in {handed['seconds'] * 1000:.1f} ms"
        f" (old side), adopted in {adopted['seconds'] * 1000:.1f} ms (new side); new"
        f" connections during the run: {len(probes.answered)} answered,"
        f" {len(probes.failures)} failed"
    )
    assert not streams.error
    assert len(streams.streams) == CONNECTIONS
    assert [s.problem for s in streams.streams if s.problem] == []
    assert all(s.eof for s in streams.streams)  # the half-close went through the new kpx
    assert all(s.received == s.sent and s.sent > 10 * CHUNK for s in streams.streams)
    assert all(s.out.digest() == s.back.digest() for s in streams.streams)
    assert handed["connections"] >= CONNECTIONS
    assert adopted["connections"] == handed["connections"]
    # New connections were answered before, during and after the replacement, none failed.
    assert probes.failures == []
    assert any(replacing <= t <= handed_over for t in probes.answered)
    assert any(t >= old_gone for t in probes.answered)

    # The old kpx's exit kept the rules: the new one serves from them, then cleans up.
    assert topo.node.run("nft", "list", "table", "inet", "kpx") == rules
    assert whoami(topo.client, VIP, 80) == "p1"
    new.send_signal(signal.SIGTERM)
    assert new.wait(timeout=40) == 0
    assert "kpx" not in topo.node.run("nft", "list", "tables")


def start_kpx(topo: Topology, log: Path, manifest_path: Path, *extra: str) -> Any:
    with log.open("w") as out:
        return topo.node.popen(
            *kpx_argv(manifest_path, *extra), stdout=subprocess.DEVNULL, stderr=out
        )


def test_a_kpx_killed_mid_handover_leaves_its_successor_serving_from_whole_rules(
    netns_topology: Topology, tmp_path: Path
) -> None:
    """SIGKILL of the old kpx after it handed its listeners over and before the connections:
    the new one adopts nothing, says so, and serves as a kpx started from scratch would."""
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.start_whoami(8080)
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1]))
    old = start_kpx(topo, tmp_path / "old.log", path)
    assert wait_for(lambda: whoami(topo.client, VIP, 80, 0.5) == "p1", 15)
    rules = topo.node.run("nft", "list", "table", "inet", "kpx")

    # The successor's manifest is not there yet: it holds the listeners and waits to list.
    later = tmp_path / "later.yaml"
    new_log = tmp_path / "new.log"
    new = start_kpx(topo, new_log, later, "--handover-timeout", "1")
    assert wait_for(lambda: events(new_log, "handover_listeners_received"), 15)
    old.kill()
    assert old.wait(timeout=10) == -signal.SIGKILL
    assert topo.node.run("nft", "list", "table", "inet", "kpx") == rules  # left whole

    later.write_text(manifest([p1]))
    assert wait_for(lambda: whoami(topo.client, VIP, 80, 0.5) == "p1", 15)
    failed = events(new_log, "handover_failed")
    assert [f["step"] for f in failed] == ["connections"]
    assert topo.node.run("nft", "list", "table", "inet", "kpx") == rules
    new.send_signal(signal.SIGTERM)
    assert new.wait(timeout=40) == 0
    assert "kpx" not in topo.node.run("nft", "list", "tables")


def test_a_successor_killed_mid_handover_leaves_the_running_kpx_serving_and_replaceable(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.start_whoami(8080)
    path = tmp_path / "cluster.yaml"
    path.write_text(manifest([p1]))
    old_log = tmp_path / "old.log"
    old = start_kpx(topo, old_log, path)
    assert wait_for(lambda: whoami(topo.client, VIP, 80, 0.5) == "p1", 15)
    held = topo.client.socket()
    held.settimeout(5)
    held.connect((VIP, 80))
    assert held.recv(3) == b"p1\n"

    doomed_log = tmp_path / "doomed.log"
    doomed = start_kpx(topo, doomed_log, tmp_path / "missing.yaml")
    assert wait_for(lambda: events(doomed_log, "handover_listeners_received"), 15)
    doomed.kill()
    doomed.wait(timeout=10)
    assert wait_for(lambda: events(old_log, "handover_failed"), 10)
    # Still the old kpx's: its connection and new ones are served.
    held.sendall(b"still here\n")
    assert held.recv(64) == b"still here\n"
    assert whoami(topo.client, VIP, 80) == "p1"

    # The next successor takes over as if nothing happened, the held connection with it.
    new = start_kpx(topo, tmp_path / "new.log", path)
    assert wait_for(lambda: events(old_log, "handover_completed"), 30)
    old.send_signal(signal.SIGTERM)
    assert old.wait(timeout=30) == 0
    held.sendall(b"moved\n")
    assert held.recv(64) == b"moved\n"
    held.close()
    assert whoami(topo.client, VIP, 80) == "p1"
    new.send_signal(signal.SIGTERM)
    assert new.wait(timeout=40) == 0


# A UDP pod server answering each datagram with the source port it came from: the same port
# throughout means the same session (kpx's socket to the endpoint) throughout.
UDP_PEER_PORT = r"""
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = srv.recvfrom(65535)
    srv.sendto(str(peer[1]).encode() + b"|" + data, peer)
"""


def test_a_udp_session_moves_to_the_new_kpx_with_its_endpoint_socket(
    netns_topology: Topology, tmp_path: Path
) -> None:
    topo = netns_topology
    p1 = topo.add_pod("p1")
    p1.spawn_python(UDP_PEER_PORT, "5353")
    udp = [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
    path = tmp_path / "cluster.yaml"
    write(
        path,
        [
            service("dns", "10.96.0.20", udp),
            endpoint_slice("dns", [p1], [{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        ],
    )
    for family in ("iptables", "ip6tables"):  # tproxy, not the bridged path (test_udp_netns)
        topo.node.sysctl(f"net.bridge.bridge-nf-call-{family}", "0")
    client = topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("0.0.0.0", 12345))
    client.settimeout(1.0)

    def ask(n: int) -> str:
        client.sendto(b"%d" % n, ("10.96.0.20", 53))
        answer, source = client.recvfrom(1000)
        assert source == ("10.96.0.20", 53)
        port, _, echoed = answer.partition(b"|")
        assert echoed == b"%d" % n
        return port.decode()

    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    old = start_kpx(topo, old_log, path)
    try:

        def answered() -> str | None:
            try:
                return ask(0)
            except TimeoutError:
                return None

        first = wait_for(answered, 15)
        assert first
        new = start_kpx(topo, new_log, path)
        ports, n = {first}, 1
        deadline = time.monotonic() + 30
        while not events(old_log, "handover_completed") and time.monotonic() < deadline:
            ports.add(ask(n))  # every datagram answered, by the same session
            n += 1
        handed = events(old_log, "handover_completed")
        assert handed and handed[0]["udp_sessions"] == 1
        assert events(new_log, "handover_completed")[0]["udp_sessions"] == 1
        old.send_signal(signal.SIGTERM)
        assert old.wait(timeout=30) == 0
        for _ in range(20):
            ports.add(ask(n))
            n += 1
        assert ports == {first}  # one endpoint socket from the first datagram to the last
        new.send_signal(signal.SIGTERM)
        assert new.wait(timeout=40) == 0
    finally:
        client.close()
