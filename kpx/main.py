"""kpx entry point: `Daemon`, the composition root, builds the parts (watches, tables, steering
writer, proxy, UDP path, health and metrics servers, housekeeping) and owns their lifetimes: watch
Services/EndpointSlices/this Node, program steering, proxy TCP and UDP (the UDP parts are
assembled in kpx/udp_path.py and share the watches and the health state).

Start-up order follows kube-proxy: health and metrics servers first (starting up counts as
healthy), then the watches; no rule is programmed before every store holds its first complete
list (a half-listed cluster would reject Services whose slices were not listed yet), and the
proxy accepts only once the first sync is done. Its port is claimed before anything else, so a
kpx that cannot start (a second one on this node) fails without touching the running one's
table. SIGTERM: report unhealthy (/healthz, healthCheckNodePorts), stop accepting, drain,
remove the rules (only rules this process wrote), exit.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import REGISTRY

from kpx import metrics
from kpx import settings as kpx_settings
from kpx.balancer import Balancer
from kpx.endpoints import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL
from kpx.handover import HandoverServer, HandoverSession, HandoverSource
from kpx.health import (
    NodeEligibility,
    ProxierHealth,
    ProxierHealthServer,
    ServiceHealthServers,
)
from kpx.links import SharedLinks
from kpx.local import LocalClients, addresses_in, local_addresses
from kpx.metrics import SOURCE_ADDRESS_MODE, register_proxy_stats
from kpx.nft import NftWriter
from kpx.policyroute import PolicyRouteError, PolicyRouting
from kpx.ports import PortsWriter
from kpx.proxy import Listener
from kpx.proxy_setup import build_proxy
from kpx.settings import KpxSettings
from kpx.stalls import GcPauses, LoopLag
from kpx.sync import RuleSyncer, SteeringWriter
from kpx.table import ServiceTable
from kpx.transparent import transparent_problem
from kpx.udp_path import UdpPath
from kpx.worker_channel import WorkerConfig
from kpx.worker_feed import FedWriter, rules_snapshot
from kpx.worker_metrics import SummedWorkerStats, WorkerCollector
from kpx.worker_pool import WorkerPool
from kwatch.cluster import ClusterState
from kwatch.health import HealthServer
from kwatch.logs import configure_logging
from kwatch.models import keep_reference_names
from kwatch.resources import ENDPOINTSLICES, NODES, SERVICES
from kwatch.runtime import release_free_memory, run, stop_event
from kwatch.store import Store
from kwatch.supervisor import Supervisor

log = structlog.get_logger("kpx.main")

USER_AGENT = "kpx/0.1"
# kube-proxy's informer selector (cmd/kube-proxy/app/server.go); the table filters too, for
# manifest mode, which does not apply selectors.
LABEL_SELECTOR = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
# Seconds open connections may finish on SIGTERM when --drain-timeout is not set.
DEFAULT_STOP_DRAIN = 30.0


def main(argv: Sequence[str] | None = None) -> int:
    settings = kpx_settings.load(argv)
    configure_logging(settings.log_format, settings.log_level, daemon="kpx")
    return run(serve(settings))


def _redirect_listen_hosts() -> list[str]:
    """One redirect listener per family the host has (the proxy's listeners are v6-only)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return ["0.0.0.0", "::"]
    except OSError:
        return ["0.0.0.0"]


async def _transparent_mode(settings: KpxSettings, routing: PolicyRouting) -> bool | None:
    """Whether kpx keeps clients' addresses (installing the policy routing it needs);
    None: `--source-address-mode transparent` was asked for and cannot be had (exit)."""
    if settings.mode != "nftables" or settings.source_address_mode == "node":
        return False
    problem = await transparent_problem()
    if problem is None:
        try:
            await routing.install()
        except PolicyRouteError as err:
            problem = f"policy routing: {err}"
    if problem is None:
        return True
    if settings.source_address_mode == "transparent":
        log.error("kpx_start_failed", problem=problem, source_address_mode="transparent")
        return None
    # The one line that says why backends see the node's address on this node.
    log.warning("transparent_mode_unavailable", problem=problem, source_address_mode="node")
    return False


class Daemon:
    """One kpx process: the watches, the TCP and UDP service tables, the steering writer, the
    proxy, the health and metrics servers and the housekeeping, built in `__init__` by one
    method per part, run by `run` under one supervisor, and stopped in reverse order."""

    def __init__(
        self,
        settings: KpxSettings,
        *,
        transparent: bool,
        addresses: set[str] | None,
        listen_hosts: Sequence[str],
        routing: PolicyRouting,
    ) -> None:
        self.settings = settings
        # Connections keep their clients' addresses (policy routing installed).
        self.transparent = transparent
        # The redirect listeners' hosts, one per address family the node has.
        self.listen_hosts = list(listen_hosts)
        self.routing = routing
        # Every background task (watches, sync loop, housekeeping) runs under it: restarted
        # after an unexpected exception, and visible in /healthz and /livez when dead or
        # crash-looping.
        self.supervisor = Supervisor(wedge_deadline=settings.task_deadline)
        # This process wrote steering rules, so it removes them on exit.
        self.programmed = False
        # A handover (kpx/handover.py): health ports are shared with SO_REUSEPORT while two
        # kpx run; `handover` is this kpx's session with the one it replaces, `handed_over`
        # is set once this kpx gave everything to its successor.
        # (No handover with --workers above 1: the listeners are the workers'.)
        self.reuse_port = (
            settings.mode == "nftables" and bool(settings.handover_socket) and settings.workers == 1
        )
        self.handover: HandoverSession | None = None
        self.handover_server: HandoverServer | None = None
        self.handed_over = asyncio.Event()
        self._stopped = False
        self._build_watches()
        self._build_tables(addresses)
        self._build_proxy()
        self._build_udp()
        self._build_writer()
        self._build_servers()
        # --workers N: the TCP data plane runs in N worker processes (`_build_workers`).
        self.pool: WorkerPool | None = None
        if settings.workers > 1:
            self._build_workers()
        loop = asyncio.get_running_loop()
        self.gc_pauses = GcPauses(on_slow_full=lambda: loop.call_soon_threadsafe(gc.freeze))
        self.loop_lag = LoopLag(loop)

    @classmethod
    async def create(cls, settings: KpxSettings) -> Daemon | None:
        """The daemon for `settings`, after deciding the source-address mode (which may
        install policy routes); None when `--source-address-mode transparent` cannot be had."""
        listen_hosts = _redirect_listen_hosts()
        routing = PolicyRouting(6 if ":" in host else 4 for host in listen_hosts)
        transparent = await _transparent_mode(settings, routing)
        if transparent is None:
            return None
        for name in ("transparent", "node"):
            SOURCE_ADDRESS_MODE.labels(name).set(1 if (name == "transparent") == transparent else 0)
        addresses = await asyncio.to_thread(local_addresses)
        return cls(
            settings,
            transparent=transparent,
            addresses=addresses,
            listen_hosts=listen_hosts,
            routing=routing,
        )

    # -- the parts -----------------------------------------------------------------------

    def _build_watches(self) -> None:
        settings = self.settings
        keep_reference_names(False)  # kpx never reads endpoint targetRef names (12 MB at 100,000)
        self.state = ClusterState(
            [SERVICES, ENDPOINTSLICES, NODES],
            selectors={
                SERVICES: (LABEL_SELECTOR, None),
                ENDPOINTSLICES: (LABEL_SELECTOR, None),
                # Only our own Node: its zone label drives topology hints.
                NODES: (None, f"metadata.name={settings.node_name}"),
            },
            supervisor=self.supervisor,
        )
        self.stores = (
            self.state.store(SERVICES),
            self.state.store(ENDPOINTSLICES),
            self.state.store(NODES),
        )
        metrics.count_changes(self.stores[0], self.stores[1])

    def _build_tables(self, addresses: set[str] | None) -> None:
        settings = self.settings
        self.balancer = Balancer(
            max_candidates=len(settings.connect_timeouts),
            cooldown_base=settings.cooldown_base,
            cooldown_cap=settings.cooldown_max,
            affinity_max_entries=settings.affinity_max_entries,
        )
        self.local_clients = LocalClients(settings.cluster_cidrs, addresses)
        self.table = ServiceTable(
            *self.stores,
            settings.node_name,
            self.balancer,
            local_client=self.local_clients,
        )
        # `primary` becomes this Node's InternalIPs once the Node is listed (`_primary_cidrs`);
        # updated in place, so the housekeeping loop sees it too.
        self.nodeport_cidrs = [] if settings.nodeport_primary else list(settings.nodeport_addresses)

    def _build_proxy(self) -> None:
        self.proxy, self.shared_links = build_proxy(
            self.table, self.local_clients, self.settings, self.transparent
        )
        self._collector = register_proxy_stats(self.proxy.stats)

    def _build_udp(self) -> None:
        settings = self.settings
        supervisor = self.supervisor
        # The UDP syncer tracks its own queued/applied changes: a UDP table kept failing must
        # make /healthz fail although the TCP syncer succeeds.
        self.udp_health = ProxierHealth(settings.health_timeout)
        self.health = ProxierHealth(
            settings.health_timeout, alive=_alive_with_udp(supervisor.liveness, self.udp_health)
        )
        self.udp = UdpPath(
            settings,
            self.stores,
            self.local_clients,
            self.udp_health,
            self.transparent,
            self.shared_links,
            on_synced=lambda: supervisor.mark_healthy("kpx-sync-udp"),
        )
        balancer, udp = self.balancer, self.udp

        def affinity_entries() -> int:
            # With --workers, each worker pins the TCP clients it accepted (kpx/worker.py
            # reports them every STATS_PERIOD); UDP stays in this process.
            workers = self.pool.slots if self.pool is not None else ()
            return (
                balancer.affinity_entries()
                + udp.balancer.affinity_entries()
                + sum(slot.counter("affinity_entries") for slot in workers)
            )

        metrics.AFFINITY_ENTRIES.set_function(affinity_entries)

    def _build_writer(self) -> None:
        settings = self.settings
        table = self.table
        self.writer: SteeringWriter
        self.ports_writer: PortsWriter | None = None
        self.nft_writer: NftWriter | None = None
        if settings.mode == "nftables":
            self.writer = self.nft_writer = NftWriter(
                settings.proxy_port,
                self.nodeport_cidrs,
                cluster_cidrs=settings.cluster_cidrs,
                transparent=self.transparent,
                firewall=lambda: table.firewall,
            )
        else:
            self.writer = self.ports_writer = PortsWriter(self.proxy, settings.ports_bind_address)
        self.service_health = ServiceHealthServers(
            self.health.healthy,
            hosts=addresses_in(self.nodeport_cidrs, self.local_clients.addresses),
            reuse_port=self.reuse_port,
        )
        self.syncer = RuleSyncer(
            table,
            self.writer,
            self.health,
            self.service_health,
            on_backend_removed=self.proxy.close_backend,
            on_backend_added=self.proxy.restore_backend,
            min_sync_period=settings.min_sync_period,
            on_synced=lambda: self.supervisor.mark_healthy("kpx-sync"),
        )

    def _build_servers(self) -> None:
        settings = self.settings
        self.metrics_server = HealthServer(
            settings.metrics_bind_address,
            ready=self.readiness,
            alive=self.supervisor.liveness,
            extra_routes=[
                web.get("/proxyMode", self._proxy_mode),
                web.get("/debug/services", self._debug_services),
            ],
            reuse_port=self.reuse_port,
        )
        self.healthz = ProxierHealthServer(
            settings.healthz_bind_address,
            self.health,
            NodeEligibility(self.state.store(NODES), settings.node_name),
            reuse_port=self.reuse_port,
        )

    def _build_workers(self) -> None:
        """--workers N: N processes accept and relay the TCP connections (kpx/worker.py); this
        one watches, syncs and programs nftables, feeding every worker the rules it applied
        before nftables steers to them (kpx/worker_feed.py). Its own proxy never listens."""
        settings, table = self.settings, self.table

        def config(index: int) -> WorkerConfig:
            return WorkerConfig(
                index=index,
                listen_hosts=tuple(self.listen_hosts),
                proxy_port=settings.proxy_port,
                transparent=self.transparent,
                connect_timeouts=tuple(settings.connect_timeouts),
                max_connections=settings.max_connections,
                drain_timeout=settings.drain_timeout,
                idle_timeout=settings.idle_timeout,
                cooldown_base=settings.cooldown_base,
                cooldown_max=settings.cooldown_max,
                affinity_max_entries=settings.affinity_max_entries,
                cluster_cidrs=tuple(settings.cluster_cidrs),
                masquerade_all=settings.masquerade_all,
                housekeeping_period=settings.sync_period,
                log_format=settings.log_format,
                log_level=settings.log_level,
            )

        pool = self.pool = WorkerPool(
            settings.workers, config, lambda: rules_snapshot(table.frontends)
        )
        self.syncer.writer = FedWriter(self.writer, table.frontends, pool)
        REGISTRY.unregister(self._collector)
        self._collector = register_proxy_stats(SummedWorkerStats(pool))
        summed = SummedWorkerStats(pool)
        self._worker_balancers = lambda name: float(getattr(summed, name))
        metrics.BALANCER_EVENTS.sources.append(self._worker_balancers)
        self._worker_collector = WorkerCollector(pool)
        REGISTRY.register(self._worker_collector)

    def _claim_for_workers(self) -> list[Listener]:
        """--workers N: claim the proxy port as `_claim_ports` does (a plain bind fails while
        another kpx listens there), then free it for the workers' SO_REUSEPORT group."""
        assert self.pool is not None
        for host in self.listen_hosts:
            self.proxy.bind_redirect(host, self.settings.proxy_port).close()
        self.pool.start(self.supervisor.spawn)
        return []

    async def _proxy_mode(self, _request: web.Request) -> web.Response:
        return web.Response(text=self.settings.mode)

    async def _debug_services(self, _request: web.Request) -> web.Response:
        rows = _assignments(self.ports_writer, self.udp)
        return web.Response(text=json.dumps(rows, indent=1) + "\n", content_type="application/json")

    def readiness(self) -> tuple[bool, str]:
        """Ready = every store listed, the first TCP and UDP rule syncs done, and no handover
        under way (kpx/handover.py: while two kpx share the health ports, a probe may reach
        either, so neither says ready until the handover is over)."""
        ok, text = self.state.readiness()
        if ok and (self.syncer.syncs == 0 or not self.udp.synced):
            return False, "waiting for the first rule sync"
        if ok and self.pool is not None and self.pool.listening < len(self.pool.slots):
            return False, "waiting for the workers"
        if ok and self.handover is not None:
            return False, "taking the connections over from the previous kpx"
        if ok and self.handover_server is not None and self.handover_server.busy:
            return False, "handing the connections over to the next kpx"
        return ok, text

    # -- running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Start, serve until `stop` is set, stop; the exit status."""
        status = 0
        try:
            listeners = await self._claim_ports()
            await self._start_servers_and_watches()
            synced = asyncio.create_task(self.state.wait_synced())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({synced, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():
                await self._first_sync()
                self._settle_memory()
                await self._serve(listeners)
            handed_over = asyncio.create_task(self.handed_over.wait())
            await asyncio.wait({stopped, handed_over}, return_when=asyncio.FIRST_COMPLETED)
            handed_over.cancel()
            if self.handed_over.is_set():
                # The successor holds every socket now: serve nothing, and stay until
                # stopped (a DaemonSet's container that exits is restarted, and the old
                # version would take the node back).
                await self._stop(status)
                log.info("kpx_handed_over", waiting_for="SIGTERM")
                await stopped
            synced.cancel()
        except OSError as err:
            log.error("kpx_start_failed", problem=str(err))
            status = 1
        finally:
            await self._stop(status)
        return status

    async def _claim_ports(self) -> list[Listener]:
        """nftables mode: claim the proxy port before anything else: if another kpx holds
        it, fail here, before the first sync rewrites (and the exit path deletes) its table."""
        settings = self.settings
        if settings.mode != "nftables":
            return []
        if self.pool is not None:
            listeners = self._claim_for_workers()
            await self.udp.claim(
                self.listen_hosts, settings.proxy_port, self.routing, self.transparent
            )
            return listeners
        if settings.handover_socket:
            # A kpx running here hands its listeners over (the rest once this one serves).
            self.handover = await HandoverSession.connect(
                settings.handover_socket, settings.handover_timeout
            )
        port = settings.proxy_port
        udp_sockets: list[socket.socket] = []
        if self.handover is not None and self.handover.tcp:
            bound = [self.proxy.adopt_listener(sock) for sock in self.handover.tcp]
            udp_sockets = self.handover.udp
        else:
            bound = [self.proxy.bind_redirect(host, port) for host in self.listen_hosts]
        await self.udp.claim(
            self.listen_hosts, port, self.routing, self.transparent, handed_over=udp_sockets
        )
        if udp_sockets and self.udp.enabled:
            # Read once the predecessor's sessions are here (`_take_over`): a datagram read
            # earlier would start a second session for a client that has one there.
            self.udp.relay.hold(True)
        return bound

    async def _start_servers_and_watches(self) -> None:
        settings = self.settings
        await self.healthz.start()
        await self.metrics_server.start()
        await self.state.start(settings, USER_AGENT)
        log.info(
            "kpx_started",
            mode=settings.mode,
            source_address_mode="transparent" if self.transparent else "node",
            node=settings.node_name,
            proxy_port=settings.proxy_port,
        )

    async def _first_sync(self) -> None:
        """Every store listed: resolve `--nodeport-addresses primary`, program the rules."""
        settings = self.settings
        log.info(
            "stores_synced",
            services=len(self.state.store(SERVICES)),
            endpointslices=len(self.state.store(ENDPOINTSLICES)),
        )
        if settings.nodeport_primary:
            self.nodeport_cidrs[:] = _primary_cidrs(self.state.store(NODES), settings.node_name)
            if self.nft_writer is not None:
                self.nft_writer.nodeport_cidrs = list(self.nodeport_cidrs)
            self.udp.set_nodeport_cidrs(self.nodeport_cidrs)
            hosts = addresses_in(self.nodeport_cidrs, self.local_clients.addresses)
            await self.service_health.set_hosts(hosts)
        self.programmed = True
        for sync_once in (self.syncer.sync_once, self.udp.sync_once):
            try:
                await sync_once()
            except Exception as err:  # the sync loops retry
                log.error("sync_failed", problem=str(err) or type(err).__name__)

    def _settle_memory(self) -> None:
        """What is alive now (modules, every store's first list) lives about as long as the
        process: collect the start-up garbage, then keep the rest out of every later
        collection, so a full collection walks only what changed since (the data path itself
        makes no cyclic garbage: tests/kpx/test_proxy_gc.py)."""
        gc.collect()
        gc.freeze()
        release_free_memory()
        self.gc_pauses.install()
        self.loop_lag.start()

    async def _serve(self, listeners: Sequence[Listener]) -> None:
        """Accept, and run the sync loops and the housekeeping under the supervisor."""
        # Listen only once the table is filled: until then a redirected client is refused by
        # the kernel (nothing listens yet) rather than accepted and reset for an unknown
        # frontend.
        for listener in listeners:
            await self.proxy.accept_on(listener)
        supervisor = self.supervisor
        supervisor.spawn("kpx-sync", self.syncer.run)
        supervisor.spawn("kpx-sync-udp", self.udp.run)
        supervisor.spawn("housekeeping", self._housekeeping)
        ports_writer = self.ports_writer
        if ports_writer is not None:
            udp, syncer = self.udp, self.syncer
            supervisor.spawn(
                "print-assignments",
                lambda: _print_assignments(syncer, lambda: _assignments(ports_writer, udp)),
            )
        await self._take_over()

    async def _take_over(self) -> None:
        """Adopt the established connections of the kpx this one replaces (now that this one
        accepts), then serve handovers to the next one."""
        settings = self.settings
        if self.handover is not None:
            await self.handover.take_connections(
                self.proxy.make_relay, self.udp.relay.adopt_session, settings.handover_timeout
            )
            if self.handover.udp and self.udp.enabled:
                self.udp.relay.hold(False)
            self.handover = None
        if not self.reuse_port:
            return
        source = HandoverSource.of(self.proxy, self.udp.relay if self.udp.enabled else None)
        server = self.handover_server = HandoverServer(
            settings.handover_socket, source, settings.handover_timeout
        )

        async def serve_handovers() -> None:
            await server.run()
            self.handed_over.set()

        self.supervisor.spawn("handover", serve_handovers, forever=False)

    def _housekeeping(self) -> Coroutine[Any, Any, None]:
        return _housekeeping(
            (self.balancer, self.udp.balancer),
            self.local_clients,
            self.service_health,
            self.nodeport_cidrs,
            self.settings.sync_period,
            self.shared_links if self.transparent else None,
        )

    async def _stop(self, status: int) -> None:
        if self._stopped:
            return
        self._stopped = True
        # Handed over: the successor programmed the same rules and routes, and keeps them.
        keep_rules = self.handed_over.is_set()
        if self.handover is not None:
            self.handover.close()  # the kpx this one was to replace carries on
            self.handover = None
        log.info("kpx_stopping")
        # From now on nothing new is accepted: /healthz and the healthCheckNodePorts say so
        # (503) for the whole drain, so load balancers stop sending clients here.
        self.health.stopping()
        await self.supervisor.stop()
        await self.state.stop()
        # Stop accepting and drain while the rules stay: new connections are steered to a
        # closed port and reset at once instead of hanging; then the table goes.
        drain = self.settings.drain_timeout
        if drain is None:
            drain = DEFAULT_STOP_DRAIN
        if self.pool is not None:
            await self.pool.stop(drain if status == 0 else 0.0)
        # Handed over, only connects that outlasted --handover-timeout are left: reset.
        await self.proxy.stop(drain if status == 0 and not keep_rules else 0.0)
        await self.udp.stop(self.programmed and not keep_rules)
        if self.programmed and not keep_rules:
            await self.writer.remove()
            if self.transparent:
                await self.routing.remove()
        await self.service_health.stop()
        await self.metrics_server.stop()
        await self.healthz.stop()
        REGISTRY.unregister(self._collector)
        if self.pool is not None:
            REGISTRY.unregister(self._worker_collector)
            metrics.BALANCER_EVENTS.sources.remove(self._worker_balancers)
        self.loop_lag.stop()
        self.gc_pauses.uninstall()
        log.info("kpx_stopped")


async def serve(settings: KpxSettings, stop: asyncio.Event | None = None) -> int:
    """Run one kpx until `stop` (default: SIGTERM or SIGINT); the exit status."""
    stop = stop or stop_event()
    daemon = await Daemon.create(settings)
    if daemon is None:
        return 1
    return await daemon.run(stop)


def _primary_cidrs(nodes: Store[Any], node_name: str) -> list[str]:
    """`--nodeport-addresses primary`: this Node's InternalIPs as host CIDRs, read once at
    start as kube-proxy does; none known: every local address, said in one warning."""
    node = nodes.get(node_name)
    found = []
    for address in node.status.addresses if node is not None else ():
        if address.type != "InternalIP":
            continue
        try:
            found.append(str(ipaddress.ip_network(address.address)))
        except ValueError:
            continue
    if not found:
        log.warning("nodeport_primary_unknown", node=node_name, fallback="all local addresses")
    else:
        log.info("nodeport_addresses_primary", addresses=found)
    return found


def _alive_with_udp(
    liveness: Callable[[], tuple[bool, str]], udp_health: ProxierHealth
) -> Callable[[], tuple[bool, str]]:
    """The supervisor's liveness, failing too while a UDP change waits past the timeout."""

    def alive() -> tuple[bool, str]:
        ok, text = liveness()
        if ok and not udp_health.healthy():
            return False, "a queued UDP change waited longer than the health timeout"
        return ok, text

    return alive


async def _housekeeping(
    balancers: Sequence[Balancer],
    local_clients: LocalClients,
    service_health: ServiceHealthServers,
    nodeport_addresses: Sequence[str],
    period: float,
    shared_links: SharedLinks | None = None,
) -> None:
    while True:
        await asyncio.sleep(period)
        for balancer in balancers:
            balancer.sweep()
        if shared_links is not None:
            await shared_links.refresh_off_loop()
        # Addresses come and go (DHCP, LB IPs bound on the node): the local-client check
        # follows them, and so do the healthCheckNodePort listeners (a no-op without
        # --nodeport-addresses: they listen on every address then).
        if await local_clients.refresh_off_loop():
            hosts = addresses_in(nodeport_addresses, local_clients.addresses)
            await service_health.set_hosts(hosts)


def _assignments(tcp: PortsWriter | None, udp: UdpPath) -> list[dict[str, object]]:
    """--mode ports: every frontend's local port, TCP then UDP."""
    rows: list[dict[str, object]] = []
    if tcp is not None:
        rows += [{**row, "protocol": "TCP"} for row in tcp.assignments()]
    return rows + udp.assignments()


async def _print_assignments(
    syncer: RuleSyncer, assignments: Callable[[], list[dict[str, object]]]
) -> None:
    """--mode ports: print the frontend -> local port table whenever it changes."""
    last: list[dict[str, object]] = []
    while True:
        await asyncio.sleep(0.5)
        rows = assignments()
        if rows != last and syncer.syncs:
            last = rows
            print(json.dumps({"services": rows}), file=sys.stdout, flush=True)


if __name__ == "__main__":
    sys.exit(main())
