"""kpx's DaemonSet rollout and uninstall, replayed with real nftables in a network-namespace
node: kpx runs under kpx-keep-rules as in the pod. The DaemonSet surges (maxSurge 1): the new
pod starts next to the old one and takes its sockets over (kpx/handover.py), and the old pod's
deletion then cuts nothing. Without a handover the kubelet's SIGTERM to the old pod leaves
the rules in place, the next kpx takes them over, and the uninstall setting
(KPX_ON_STOP=clean) removes them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kpx.settings import load as load_kpx
from tests.deploy.manifests import DEPLOY, build, config_file, container, find
from tests.kpx.netns import Topology, netns_available

KEEP_RULES = DEPLOY / "image" / "kpx-keep-rules"
KPX = "import sys; from kpx.main import main; sys.exit(main(sys.argv[1:]))"
CLUSTER_IP = "10.96.0.10"


@pytest.fixture
def topology() -> Iterator[Topology]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with Topology() as topology:
        yield topology


def cluster(pod_ip: str) -> str:
    return yaml.safe_dump_all(
        [
            {
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "clusterIP": CLUSTER_IP,
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                },
            },
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "web-1",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [pod_ip], "nodeName": "node-b"}],
                "ports": [{"name": "http", "port": 8080}],
            },
        ]
    )


def whoami(topology: Topology, timeout: float = 0.5) -> str:
    sock = topology.client.socket(socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect((CLUSTER_IP, 80))
        return sock.makefile().readline().strip()
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    finally:
        sock.close()


def serving(topology: Topology, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if whoami(topology) == "p1":
            return True
        time.sleep(0.05)
    return False


def table(topology: Topology) -> str:
    return topology.node.run("nft", "list", "table", "inet", "kpx", check=False)


def test_rollout_keeps_the_rules_and_uninstall_removes_them(
    topology: Topology, tmp_path: Path
) -> None:
    pod = topology.add_pod("p1")
    pod.start_whoami(8080)
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(cluster(pod.ipv4))
    argv = [
        "sh", str(KEEP_RULES), sys.executable, "-c", KPX, "--manifests", str(manifest),
        "--node-name", "node-a", "--healthz-bind-address", "127.0.0.1:10256",
        "--metrics-bind-address", "127.0.0.1:10249", "--min-sync-period", "0.01",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KPX_ON_STOP"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    old = topology.node.popen(*argv, env=env, **quiet)
    assert serving(topology)
    rules = table(topology)
    assert CLUSTER_IP in rules

    # The rollout: the kubelet sends SIGTERM to the old container's PID 1 (the wrapper).
    old.send_signal(signal.SIGTERM)
    assert old.wait(timeout=30) == 128 + signal.SIGKILL
    assert table(topology) == rules  # still steering
    assert whoami(topology) == "refused"  # nobody listens: refused at once, not a hang

    # The new pod, from the DaemonSet after `set env KPX_ON_STOP=clean` (the uninstall step).
    new = topology.node.popen(*argv, env={**env, "KPX_ON_STOP": "clean"}, **quiet)
    assert serving(topology)
    assert table(topology) == rules  # taken over as it was

    # `kubectl delete`: SIGTERM again, now forwarded: drain, remove the table, exit 0.
    new.send_signal(signal.SIGTERM)
    assert new.wait(timeout=40) == 0
    assert "kpx" not in topology.node.run("nft", "list", "tables")


def test_the_daemonset_surges_one_pod_per_node_that_can_share_the_node_with_the_old_one(
    tmp_path: Path,
) -> None:
    objects = build("base")
    ds = find(objects, "DaemonSet", "kpx")
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    spec = ds["spec"]["template"]["spec"]
    # With hostNetwork a declared port is a hostPort: the scheduler would keep the surge pod
    # off the node its old pod holds it on.
    for item in spec["containers"] + spec.get("initContainers", []):
        assert "ports" not in item, item["name"]
    main = container(ds, "kpx")
    assert main["readinessProbe"]["initialDelaySeconds"] >= 5
    settings = load_kpx(
        ["--config", str(config_file(objects, "kpx-config", "kpx.yaml", tmp_path / "k.yaml"))]
    )
    assert settings.mode == "nftables" and settings.handover_socket == "@kpx/handover"


def events(log: Path, name: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if f'"event": "{name}"' in line]


def test_surge_rollout_hands_the_connections_over_and_the_old_pods_deletion_cuts_nothing(
    topology: Topology, tmp_path: Path
) -> None:
    pod = topology.add_pod("p1")
    pod.start_whoami(8080)
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text(cluster(pod.ipv4))
    argv = [
        "sh", str(KEEP_RULES), sys.executable, "-c", KPX, "--manifests", str(manifest),
        "--node-name", "node-a", "--healthz-bind-address", "127.0.0.1:10256",
        "--metrics-bind-address", "127.0.0.1:10249", "--min-sync-period", "0.01",
        "--log-format", "json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KPX_ON_STOP"}
    old_log, new_log = tmp_path / "old.log", tmp_path / "new.log"
    with old_log.open("w") as err:
        old = topology.node.popen(*argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
    assert serving(topology)
    rules = table(topology)
    held = topology.client.socket(socket.AF_INET)
    held.settimeout(5)
    held.connect((CLUSTER_IP, 80))
    assert held.makefile("rb").readline() == b"p1\n"

    # The surge pod starts while the old one runs: same ports, same node.
    with new_log.open("w") as err:
        new = topology.node.popen(*argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while not events(old_log, "handover_completed") and time.monotonic() < deadline:
        assert whoami(topology, timeout=2) == "p1"  # new connections served throughout
    assert events(old_log, "handover_completed"), old_log.read_text()
    assert events(new_log, "handover_completed")
    assert new.poll() is None and old.poll() is None  # the old pod waits for its deletion

    # The kubelet's probes on the shared ports reach the new kpx alone now (the old one closed
    # its health ports): ready, and its metrics count the handover.
    def http(path: str) -> tuple[int, str]:
        def get() -> tuple[int, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:10249{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()

        return topology.node.call(get)

    assert http("/readyz")[0] == 200
    metrics = http("/metrics")[1]
    assert 'kpx_handover_total{result="completed",role="new"} 1.0' in metrics
    adopted = re.search(r'kpx_handover_connections_total\{event="adopted"\} (\S+)', metrics)
    assert adopted and float(adopted[1]) >= 1  # the held one (and any probe under way)

    # The new pod is ready: the DaemonSet controller deletes the old one (SIGTERM -> SIGKILL).
    old.send_signal(signal.SIGTERM)
    assert old.wait(timeout=30) == 128 + signal.SIGKILL
    held.sendall(b"still here\n")
    assert held.recv(64) == b"still here\n"  # carried by the new kpx
    held.close()
    assert table(topology) == rules
    assert whoami(topology) == "p1"
    new.send_signal(signal.SIGTERM)
    assert new.wait(timeout=30) == 128 + signal.SIGKILL
    assert table(topology) == rules  # kept for the next one, as ever
