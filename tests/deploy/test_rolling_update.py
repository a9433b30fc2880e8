"""kpx's DaemonSet rollout and uninstall, replayed with real nftables in a network-namespace
node: kpx runs under kpx-keep-rules as in the pod; the kubelet's SIGTERM to the old pod leaves
the rules in place, the next kpx takes them over, and the uninstall setting
(KPX_ON_STOP=clean) removes them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import DEPLOY
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
