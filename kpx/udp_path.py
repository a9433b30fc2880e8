"""The UDP half of kpx, assembled: its service table, relay, steering writer and syncer.

kpx/main.py builds one `UdpPath` next to its TCP parts; both share the watches, the health
state, the local-client check and the policy routing (kpx/policyroute.py). In nftables mode
UDP always needs what TCP needs only for `--source-address-mode transparent`: a transparent
socket (IP_TRANSPARENT: CAP_NET_ADMIN in kpx's own process, not only in `nft`) and the
policy routes, since REDIRECT loses a datagram's original destination. Where kpx cannot have
them, `claim` logs `udp_proxy_disabled` once, removes a UDP table an earlier kpx may have
left, and UDP Services are left alone while TCP is served as usual; `kpx_udp_enabled` says
which. In transparent mode sessions send from the client's address where kube-proxy would keep
it (kpx/source.py, the same decision as for TCP).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from prometheus_client import REGISTRY, Gauge

from kpx.balancer import Balancer
from kpx.health import ProxierHealth
from kpx.links import SharedLinks
from kpx.local import LocalClients
from kpx.metrics import register_udp_stats
from kpx.policyroute import PolicyRouteError, PolicyRouting
from kpx.settings import KpxSettings
from kpx.source import SourceAddresses
from kpx.sync import RuleSyncer, SteeringWriter
from kpx.table import ServiceTable
from kpx.udp_nft import UdpNftWriter
from kpx.udp_ports import UdpPortsWriter
from kpx.udp_relay import UdpRelay
from kwatch.store import Store

log = structlog.get_logger("kpx.udp")

UDP_ENABLED = Gauge(
    "kpx_udp_enabled",
    "1 when kpx proxies UDP Services, 0 when it cannot here (see udp_proxy_disabled)",
)


class UdpPath:
    def __init__(
        self,
        settings: KpxSettings,
        stores: tuple[Store[Any], Store[Any], Store[Any]],
        local_clients: LocalClients,
        health: ProxierHealth,
        transparent: bool = False,
        same_link: SharedLinks | None = None,
        on_synced: Callable[[], object] | None = None,
    ) -> None:
        services, slices, nodes = stores
        self.balancer = Balancer(
            cooldown_base=settings.cooldown_base,
            cooldown_cap=settings.cooldown_max,
            affinity_max_entries=settings.affinity_max_entries,
        )
        self.table = ServiceTable(
            services,
            slices,
            nodes,
            settings.node_name,
            self.balancer,
            local_client=local_clients,
            protocol="UDP",
        )
        source = SourceAddresses(
            self.table.frontend_class,
            lambda: local_clients.addresses,
            local_clients.in_cluster if settings.cluster_cidrs else None,
            settings.masquerade_all,
        )
        self.relay = UdpRelay(
            self.table,
            idle_timeout=settings.udp_timeout,
            max_sessions=settings.udp_max_sessions,
            source_address=source if transparent else None,
            same_link=same_link,
        )
        self.ports_writer: UdpPortsWriter | None = None
        self.writer: SteeringWriter
        if settings.mode == "nftables":
            # `primary` is resolved by kpx/main.py once the Node is listed: set_nodeport_cidrs.
            cidrs = [] if settings.nodeport_primary else settings.nodeport_addresses
            table = self.table
            self.writer = UdpNftWriter(
                self.relay,
                settings.proxy_port,
                cidrs,
                cluster_cidrs=settings.cluster_cidrs,
                firewall=lambda: table.firewall,
            )
        else:
            self.writer = self.ports_writer = UdpPortsWriter(
                self.relay, settings.ports_bind_address
            )
        self.syncer = RuleSyncer(
            self.table,
            self.writer,
            health,
            None,  # healthCheckNodePorts do not depend on the protocol: the TCP syncer's
            on_backend_removed=self.relay.close_backend,
            min_sync_period=settings.min_sync_period,
            observe_programming=False,  # the TCP syncer sees the same EndpointSlice changes
            on_synced=on_synced,
        )
        self.enabled = True
        self._routing: PolicyRouting | None = None
        UDP_ENABLED.set(1)
        self._collector = register_udp_stats(self.relay.stats, lambda: len(self.relay.sessions))

    async def claim(
        self,
        hosts: Sequence[str],
        port: int,
        routing: PolicyRouting,
        routed: bool,
        handed_over: Sequence[socket.socket] = (),
    ) -> None:
        """nftables mode, at start: the transparent sockets and the policy routes (`routed`:
        transparent mode installed them already), or UDP off. `handed_over`: the sockets the
        kpx this one replaces used (kpx/handover.py), taken instead of binding new ones."""
        try:
            for sock in handed_over:
                self.relay.adopt_transparent(sock)
            for host in hosts if not handed_over else ():
                self.relay.serve_transparent(host, port)
        except OSError as err:
            await self._disable("no transparent socket (needs CAP_NET_ADMIN in kpx)", str(err))
            return
        if not routed:
            try:
                await routing.install()
            except PolicyRouteError as err:
                await self._disable("policy routing", str(err))
                return
            # Installed for UDP alone (node mode): removed by `stop`, as transparent mode's
            # are by kpx/main.py.
            self._routing = routing

    async def _disable(self, reason: str, problem: str) -> None:
        log.error("udp_proxy_disabled", reason=reason, problem=problem)
        self.enabled = False
        UDP_ENABLED.set(0)
        await self.relay.stop()
        await self.writer.remove()  # a table a capable kpx left would steer into nothing

    def set_nodeport_cidrs(self, cidrs: Sequence[str]) -> None:
        """`--nodeport-addresses primary`, resolved: the next (first) sync renders them."""
        if isinstance(self.writer, UdpNftWriter):
            self.writer.nodeport_cidrs = list(cidrs)

    @property
    def synced(self) -> bool:
        return not self.enabled or self.syncer.syncs > 0

    async def sync_once(self) -> None:
        if self.enabled:
            await self.syncer.sync_once()

    async def run(self) -> None:
        if self.enabled:
            await self.syncer.run()

    def assignments(self) -> list[dict[str, Any]]:
        return self.ports_writer.assignments() if self.ports_writer is not None else []

    async def stop(self, programmed: bool) -> None:
        await self.relay.stop()
        if programmed and self.enabled:
            await self.writer.remove()
            if self._routing is not None:
                await self._routing.remove()  # logs its own failures
        REGISTRY.unregister(self._collector)
