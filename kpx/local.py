"""This node's own addresses, and which clients count as "local" for traffic policies.

kube-proxy treats traffic from the node itself (`addrtype --src-type LOCAL`) and from pods
(detect-local, by default the cluster CIDR) as in-cluster when it reaches an
externalTrafficPolicy: Local frontend; `LocalClients` answers that question for the proxy,
with the same inputs the nftables rules use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
from collections.abc import Sequence

import structlog

log = structlog.get_logger("kpx.local")


def local_addresses() -> set[str] | None:
    """Every address on this host's interfaces (`ip -j addr`); None if unknown."""
    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        links = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        log.error("local_addresses_unknown", problem=str(err))
        return None
    found: set[str] = set()
    for link in links:
        for info in link.get("addr_info", []):
            try:
                found.add(ipaddress.ip_address(info["local"]).compressed)
            except (KeyError, ValueError):
                continue
    return found


def addresses_in(cidrs: Sequence[str], addresses: set[str] | None) -> list[str] | None:
    """The local addresses inside `cidrs` (healthCheckNodePort listeners); None means all."""
    if not cidrs or addresses is None:
        return None
    networks = [ipaddress.ip_network(c) for c in cidrs]
    found = sorted(a for a in addresses if any(ipaddress.ip_address(a) in n for n in networks))
    if not found:
        log.warning("no_local_address_in_nodeport_addresses", cidrs=list(cidrs))
    return found


class LocalClients:
    """`is_local(ip)`: the client is this node or inside the cluster CIDRs."""

    def __init__(self, cluster_cidrs: Sequence[str] = (), addresses: set[str] | None = None):
        self.networks = [ipaddress.ip_network(c) for c in cluster_cidrs]
        self.addresses: set[str] = set(addresses or ())
        self._cache: dict[str, bool] = {}

    def refresh(self) -> bool:
        """Re-read this host's addresses; whether they changed. Blocks on `ip`: from the
        event loop, use `refresh_off_loop`."""
        return self.update(local_addresses())

    async def refresh_off_loop(self) -> bool:
        """`refresh` with the `ip -j addr` subprocess run in a thread: the data-plane loop
        never waits on it."""
        return self.update(await asyncio.to_thread(local_addresses))

    def update(self, found: set[str] | None) -> bool:
        """Take `found` (None: unknown, kept as it was) as this host's addresses."""
        if found is None or found == self.addresses:
            return False
        self.addresses = found
        self._cache.clear()
        return True

    def __call__(self, ip: str) -> bool:
        known = self._cache.get(ip)
        if known is not None:
            return known
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        local = addr.compressed in self.addresses or any(addr in n for n in self.networks)
        if len(self._cache) > 65536:  # bounded: client IPs are many on a busy LB
            self._cache.clear()
        self._cache[ip] = local
        return local

    def in_cluster(self, ip: str) -> bool:
        """Inside the cluster CIDRs (this node's own addresses aside): a pod."""
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
        return self(ip) and ip not in self.addresses
