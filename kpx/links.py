"""Which addresses share a link with each other on this node (its connected routes).

Transparent mode's one deviation from kube-proxy: a backend on the same link as its client (a
bridge CNI puts a node's pods on one L2 segment, `10.244.1.0/24 dev cbr0`) answers the client's
address directly over that link, never through the node's IP stack, so kpx could not take the
reply back. kube-proxy needs br_netfilter for the same reason. Such a connection is made from
the node's address instead (the client's own connection is still kept whole). Routed CNIs
(one /32 route per pod veth: Calico, Cilium, ptp) put every pod on a link of its own.

The same holds for a backend that is one of this node's own addresses (a host-network endpoint
here, such as the API server behind `kubernetes.default` on a control-plane node): its reply to
the client's address is generated locally and routed straight to the pod, so that connection,
too, is made from the node's address (kube-proxy's conntrack un-DNATs that reply instead).

`SharedLinks.refresh()` reads the main table's on-link routes without a gateway (`ip -j route`),
housekeeping calls `refresh_off_loop` like the local-address refresh.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
from collections.abc import Callable

import structlog

log = structlog.get_logger("kpx.links")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_LIMIT = 65536


def connected_routes(listings: list[str]) -> list[tuple[Network, str]]:
    """(network, device) of every on-link route without a gateway in `ip -j route` outputs,
    most specific first; `default` and link-local routes are left out (they say nothing about
    which pods share a segment)."""
    found: list[tuple[Network, str]] = []
    for listing in listings:
        for route in json.loads(listing or "[]"):
            dst, dev = route.get("dst"), route.get("dev")
            if not dst or dst == "default" or not dev or "gateway" in route or "via" in route:
                continue
            if route.get("type", "unicast") != "unicast":
                continue
            try:
                net = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            if net.is_link_local:
                continue
            found.append((net, dev))
    found.sort(key=lambda item: -item[0].prefixlen)
    return found


def read_connected_routes() -> list[tuple[Network, str]] | None:
    """This node's connected routes (`ip -j route`, both families); None if unknown."""
    listings = []
    for family in ("-4", "-6"):
        try:
            listings.append(
                subprocess.run(
                    ["ip", "-j", family, "route", "show", "table", "main"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout
            )
        except (OSError, subprocess.SubprocessError) as err:
            log.error("connected_routes_unknown", problem=str(err))
            return None
    try:
        return connected_routes(listings)
    except ValueError as err:
        log.error("connected_routes_unknown", problem=str(err))
        return None


class SharedLinks:
    """`(client, backend) -> bool`: the backend's reply to the client would not come back
    through kpx: both addresses are reached through the same connected route, or the backend
    is an address of this node (`node_addresses`)."""

    def __init__(
        self,
        routes: list[tuple[Network, str]] | None = None,
        node_addresses: Callable[[], set[str]] | None = None,
    ) -> None:
        self.routes = routes or []
        self.node_addresses = node_addresses
        self._cache: dict[str, int] = {}

    def refresh(self) -> bool:
        """Re-read the connected routes; whether they changed. Blocks on `ip`: from the
        event loop, use `refresh_off_loop`."""
        return self.update(read_connected_routes())

    async def refresh_off_loop(self) -> bool:
        """`refresh` with the `ip -j route` subprocesses run in a thread: the data-plane loop
        never waits on them (the routes are swapped in on the loop)."""
        return self.update(await asyncio.to_thread(read_connected_routes))

    def update(self, routes: list[tuple[Network, str]] | None) -> bool:
        """Take `routes` (None: unknown, kept as they were); whether they changed."""
        if routes is None or routes == self.routes:
            return False
        self.routes = routes
        self._cache.clear()
        return True

    def _route_of(self, ip: str) -> int:
        known = self._cache.get(ip)
        if known is not None:
            return known
        index = -1
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            addr = None
        if addr is not None:
            for i, (net, _dev) in enumerate(self.routes):
                if addr.version == net.version and addr in net:
                    index = i
                    break
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        self._cache[ip] = index
        return index

    def __call__(self, a: str, b: str) -> bool:
        if self.node_addresses is not None and b in self.node_addresses():
            return True
        route = self._route_of(a)
        return route >= 0 and route == self._route_of(b)
