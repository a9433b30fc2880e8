"""UDP through kpx in transparent mode across the two-node cluster of tests/kpx/cluster_netns.py
(the real daemon on n1): whose address the endpoint sees follows kube-proxy's rules as for TCP
(kpx/source.py), and the answer always comes from the ClusterIP the pod sent to."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

from tests.kpx.cluster_netns import EXTERNAL_V4, LB_V4, Cluster, ClusterPod
from tests.kpx.netns import Netns
from tests.kpx.test_transparent_e2e import (  # noqa: F401  (pytest fixtures)
    Kpx,
    _service,
    cluster,
    workdir,
)
from tests.kpx.test_udp_netns import UDP_PEER
from tests.waiting import wait_for


def _udp_slice(service: str, pods: list[ClusterPod], family: int = 4) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{family}",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": f"IPv{family}",
        "endpoints": [
            {
                "addresses": [p.ipv4 if family == 4 else p.ipv6],
                "nodeName": f"n{p.node}",
                "conditions": {"ready": True},
            }
            for p in pods
        ],
        "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
    }


def udp_ask(pod: Netns, ip: str, port: int = 53) -> str:
    """The address the endpoint saw, checking the answer came from ip:port; or "timeout"."""
    sock = pod.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    try:
        sock.sendto(b"q", (ip, port))
        data, source = sock.recvfrom(200)
    except TimeoutError:
        return "timeout"
    finally:
        sock.close()
    assert source[:2] == (ip, port), source
    seen, _, echoed = data.removeprefix(b"seen|").partition(b"|")
    assert echoed == b"q"
    return seen.decode()


def test_udp_endpoints_see_whom_kube_proxy_would_show_them(
    cluster: Cluster,  # noqa: F811
    workdir: Path,  # noqa: F811
) -> None:
    pods = {
        "a1": cluster.add_pod("a1", 1),
        "a2": cluster.add_pod("a2", 1),
        "b1": cluster.add_pod("b1", 2),
    }
    for pod in pods.values():
        pod.spawn_python(UDP_PEER)
    a1, a2, b1 = pods["a1"], pods["a2"], pods["b1"]
    dns = [{"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
    docs = [
        _service("remote", ["10.96.0.80", "fd00:96::80"], ports=dns),
        _udp_slice("remote", [b1]),
        _udp_slice("remote", [b1], 6),
        _service("local", ["10.96.0.81"], ports=dns),
        _udp_slice("local", [a2]),
        _service("hairpin", ["10.96.0.82"], ports=dns),
        _udp_slice("hairpin", [a1]),
        _service(
            "local-lb",
            ["10.96.0.83"],
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            ports=[{**dns[0], "nodePort": 30053}],
        ),
        _udp_slice("local-lb", [a2]),
        _service(
            "cluster-np",
            ["10.96.0.84"],
            type="NodePort",
            ports=[{**dns[0], "nodePort": 30054}],
        ),
        _udp_slice("cluster-np", [b1]),
    ]
    lb = next(d for d in docs if d["metadata"]["name"] == "local-lb" and d["kind"] == "Service")
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": LB_V4}]}}
    (workdir / "cluster.yaml").write_text(yaml.safe_dump_all(docs))
    kpx = Kpx(cluster, workdir)
    node_addresses = cluster.node_addresses(1)
    try:
        # Pod -> ClusterIP, endpoint on the other node: the pod's own address.
        assert wait_for(lambda: udp_ask(a1, "10.96.0.80") != "timeout", timeout=20)
        assert udp_ask(a1, "10.96.0.80") == a1.ipv4
        assert wait_for(lambda: udp_ask(a1, "fd00:96::80") == a1.ipv6)  # IPv6 alike
        # An endpoint on the same node (its own routed veth, as with Calico or ptp): the same.
        assert udp_ask(a1, "10.96.0.81") == a1.ipv4
        # Hairpin, the pod reaching itself: the node's address, as for TCP.
        assert udp_ask(a1, "10.96.0.82") in node_addresses
        # From outside: externalTrafficPolicy Local keeps the client's address (LB IP and
        # NodePort, the endpoint is on this node); Cluster policy shows the node's.
        external = cluster.external
        assert wait_for(lambda: udp_ask(external, LB_V4) == EXTERNAL_V4)
        assert udp_ask(external, cluster.node_ipv4(1), 30053) == EXTERNAL_V4
        assert udp_ask(external, cluster.node_ipv4(1), 30054) == cluster.node_ipv4(1)
        assert 'kpx_source_address_mode{mode="transparent"} 1.0' in kpx.metrics()
        assert "kpx_udp_enabled 1.0" in kpx.metrics()
    finally:
        assert kpx.stop() == 0, kpx.log_path.read_text()[-3000:]
