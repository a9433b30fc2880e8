"""Whose address a backend sees in transparent mode: the client's or the node's.

kube-proxy decides it with its masquerade rules (pkg/proxy/iptables and nftables proxier.go);
kpx makes the same decision per connection and, where kube-proxy would not masquerade, connects
to the backend from the client's address (kpx/dial.py binds an IP_TRANSPARENT socket to it):
- `--masquerade-all`: the node's address, always;
- a client on this node itself (host network, or a node address): the node's (the kernel picks
  it, as it would for the host's own connection);
- ClusterIPs (`internal`): the client's, except for off-cluster clients when the cluster CIDRs
  are known (kube-proxy masquerades those: "masquerade off-cluster traffic to cluster IP");
- NodePorts, externalIPs and LB IPs of `externalTrafficPolicy: Local` Services: the client's
  (pods are short-circuited to the cluster-wide endpoints with their own address, outside
  clients reach a local endpoint);
- the same of `externalTrafficPolicy: Cluster` Services: the node's (the endpoint may be on
  another node, whose reply must come back through this one);
- hairpin, a client whose chosen endpoint is itself: the node's (kpx/dial.py checks it per
  attempt, kube-proxy masquerades `ip saddr == endpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

# How kube-proxy classes a frontend for masquerading (see ServiceTable.frontend_class).
FrontendClass = Literal["internal", "external_local", "external_cluster"]


def keeps_client_address(
    frontend: FrontendClass,
    client_is_node: bool,
    client_in_cluster: bool | None,
    masquerade_all: bool,
) -> bool:
    """Whether the backend sees the client's address. `client_in_cluster` None: the cluster
    CIDRs are unknown (kube-proxy without a local-traffic detector masquerades no ClusterIP
    traffic)."""
    if masquerade_all or client_is_node:
        return False
    if frontend == "internal":
        return client_in_cluster is not False
    return frontend == "external_local"


class SourceAddresses:
    """`(frontend_ip, frontend_port, client_ip) -> address to connect from, or None` (the
    node's own): the proxy's per-connection question in transparent mode."""

    def __init__(
        self,
        frontend_class: Callable[[str, int], FrontendClass | None],
        node_addresses: Callable[[], set[str]],
        in_cluster: Callable[[str], bool] | None,
        masquerade_all: bool = False,
    ) -> None:
        self.frontend_class = frontend_class
        self.node_addresses = node_addresses
        self.in_cluster = in_cluster
        self.masquerade_all = masquerade_all

    def __call__(self, frontend_ip: str, frontend_port: int, client_ip: str) -> str | None:
        if self.masquerade_all:
            return None
        frontend = self.frontend_class(frontend_ip, frontend_port)
        if frontend is None:
            return None
        client_is_node = client_ip in self.node_addresses() or client_ip in ("127.0.0.1", "::1")
        in_cluster = None if self.in_cluster is None else self.in_cluster(client_ip)
        if keeps_client_address(frontend, client_is_node, in_cluster, self.masquerade_all):
            return client_ip
        return None
