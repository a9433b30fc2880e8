"""kpx entry point: watch Services/EndpointSlices/this Node, program steering, proxy TCP and UDP
(the UDP parts are assembled in kpx/udp_path.py and share the watches and the health state).

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
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import REGISTRY

from kpx import metrics
from kpx import settings as kpx_settings
from kpx.balancer import Balancer
from kpx.endpoints import HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL
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
from kpx.proxy import Proxy
from kpx.settings import KpxSettings
from kpx.source import SourceAddresses
from kpx.stalls import GcPauses, LoopLag
from kpx.sync import RuleSyncer, SteeringWriter
from kpx.table import ServiceTable
from kpx.transparent import transparent_problem
from kpx.udp_path import UdpPath
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


async def serve(settings: KpxSettings, stop: asyncio.Event | None = None) -> int:
    stop = stop or stop_event()
    listen_hosts = _redirect_listen_hosts()
    routing = PolicyRouting(6 if ":" in host else 4 for host in listen_hosts)
    transparent = await _transparent_mode(settings, routing)
    if transparent is None:
        return 1
    source_mode = "transparent" if transparent else "node"
    for name in ("transparent", "node"):
        SOURCE_ADDRESS_MODE.labels(name).set(1 if name == source_mode else 0)
    # Every background task (watches, sync loop, housekeeping) runs under it: restarted after
    # an unexpected exception, and visible in /healthz and /livez when dead or crash-looping.
    supervisor = Supervisor(wedge_deadline=settings.task_deadline)
    keep_reference_names(False)  # kpx never reads endpoint targetRef names (12 MB at 100,000)
    state = ClusterState(
        [SERVICES, ENDPOINTSLICES, NODES],
        selectors={
            SERVICES: (LABEL_SELECTOR, None),
            ENDPOINTSLICES: (LABEL_SELECTOR, None),
            # Only our own Node: its zone label drives topology hints.
            NODES: (None, f"metadata.name={settings.node_name}"),
        },
        supervisor=supervisor,
    )
    balancer = Balancer(
        max_candidates=len(settings.connect_timeouts),
        cooldown_base=settings.cooldown_base,
        cooldown_cap=settings.cooldown_max,
        affinity_max_entries=settings.affinity_max_entries,
    )
    addresses = await asyncio.to_thread(local_addresses)
    local_clients = LocalClients(settings.cluster_cidrs, addresses)
    table = ServiceTable(
        state.store(SERVICES),
        state.store(ENDPOINTSLICES),
        state.store(NODES),
        settings.node_name,
        balancer,
        local_client=local_clients,
    )
    shared_links = SharedLinks(node_addresses=lambda: local_clients.addresses)
    if transparent:
        shared_links.refresh()
    source = SourceAddresses(
        table.frontend_class,
        lambda: local_clients.addresses,
        local_clients.in_cluster if settings.cluster_cidrs else None,
        settings.masquerade_all,
    )
    proxy = Proxy(
        table,
        connect_ladder=settings.connect_timeouts,
        max_connections=settings.max_connections,
        drain_timeout=settings.drain_timeout,
        idle_timeout=settings.idle_timeout,
        transparent=transparent,
        source_address=source if transparent else None,
        same_link=shared_links,
    )
    collector = register_proxy_stats(proxy.stats)
    loop = asyncio.get_running_loop()
    gc_pauses = GcPauses(on_slow_full=lambda: loop.call_soon_threadsafe(gc.freeze))
    loop_lag = LoopLag(loop)
    # The UDP syncer tracks its own queued/applied changes: a UDP table kept failing must make
    # /healthz fail although the TCP syncer succeeds.
    udp_health = ProxierHealth(settings.health_timeout)
    health = ProxierHealth(
        settings.health_timeout, alive=_alive_with_udp(supervisor.liveness, udp_health)
    )
    stores = (state.store(SERVICES), state.store(ENDPOINTSLICES), state.store(NODES))
    udp = UdpPath(
        settings,
        stores,
        local_clients,
        udp_health,
        transparent,
        shared_links,
        on_synced=lambda: supervisor.mark_healthy("kpx-sync-udp"),
    )
    metrics.AFFINITY_ENTRIES.set_function(
        lambda: balancer.affinity_entries() + udp.balancer.affinity_entries()
    )
    writer: SteeringWriter
    ports_writer: PortsWriter | None = None
    # `primary` becomes this Node's InternalIPs once the Node is listed (`_primary_cidrs`);
    # updated in place, so the housekeeping loop sees it too.
    nodeport_cidrs = [] if settings.nodeport_primary else list(settings.nodeport_addresses)
    nft_writer: NftWriter | None = None
    if settings.mode == "nftables":
        writer = nft_writer = NftWriter(
            settings.proxy_port,
            nodeport_cidrs,
            cluster_cidrs=settings.cluster_cidrs,
            transparent=transparent,
            firewall=lambda: table.firewall,
        )
    else:
        writer = ports_writer = PortsWriter(proxy, settings.ports_bind_address)
    service_health = ServiceHealthServers(
        health.healthy, hosts=addresses_in(nodeport_cidrs, addresses)
    )
    syncer = RuleSyncer(
        table,
        writer,
        health,
        service_health,
        on_backend_removed=proxy.close_backend,
        on_backend_added=proxy.restore_backend,
        min_sync_period=settings.min_sync_period,
        on_synced=lambda: supervisor.mark_healthy("kpx-sync"),
    )

    async def proxy_mode(_request: web.Request) -> web.Response:
        return web.Response(text=settings.mode)

    async def debug_services(_request: web.Request) -> web.Response:
        rows = _assignments(ports_writer, udp)
        return web.Response(text=json.dumps(rows, indent=1) + "\n", content_type="application/json")

    def ready() -> tuple[bool, str]:
        ok, text = state.readiness()
        if ok and (syncer.syncs == 0 or not udp.synced):
            return False, "waiting for the first rule sync"
        return ok, text

    metrics_server = HealthServer(
        settings.metrics_bind_address,
        ready=ready,
        alive=supervisor.liveness,
        extra_routes=[
            web.get("/proxyMode", proxy_mode),
            web.get("/debug/services", debug_services),
        ],
    )
    healthz = ProxierHealthServer(
        settings.healthz_bind_address,
        health,
        NodeEligibility(state.store(NODES), settings.node_name),
    )
    status = 0
    programmed = False  # this process wrote steering rules, so it removes them on exit
    try:
        bound = []
        if settings.mode == "nftables":
            # Claim the proxy port before anything else: if another kpx holds it, fail here,
            # before the first sync rewrites (and the exit path deletes) its table.
            bound = [proxy.bind_redirect(h, settings.proxy_port) for h in listen_hosts]
            await udp.claim(listen_hosts, settings.proxy_port, routing, transparent)
        await healthz.start()
        await metrics_server.start()
        await state.start(settings, USER_AGENT)
        log.info(
            "kpx_started",
            mode=settings.mode,
            source_address_mode=source_mode,
            node=settings.node_name,
            proxy_port=settings.proxy_port,
        )
        synced = asyncio.create_task(state.wait_synced())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({synced, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            log.info(
                "stores_synced",
                services=len(state.store(SERVICES)),
                endpointslices=len(state.store(ENDPOINTSLICES)),
            )
            if settings.nodeport_primary:
                nodeport_cidrs[:] = _primary_cidrs(state.store(NODES), settings.node_name)
                if nft_writer is not None:
                    nft_writer.nodeport_cidrs = list(nodeport_cidrs)
                udp.set_nodeport_cidrs(nodeport_cidrs)
                hosts = addresses_in(nodeport_cidrs, local_clients.addresses)
                await service_health.set_hosts(hosts)
            programmed = True
            for sync_once in (syncer.sync_once, udp.sync_once):
                try:
                    await sync_once()
                except Exception as err:  # run() below retries
                    log.error("sync_failed", problem=str(err) or type(err).__name__)
            # What is alive now (modules, every store's first list) lives about as long as the
            # process: collect the start-up garbage, then keep the rest out of every later
            # collection, so a full collection walks only what changed since (the data path
            # itself makes no cyclic garbage: tests/kpx/test_proxy_gc.py).
            gc.collect()
            gc.freeze()
            release_free_memory()
            gc_pauses.install()
            loop_lag.start()
            # Listen only once the table is filled: until then a redirected client is refused
            # by the kernel (nothing listens yet) rather than accepted and reset for an
            # unknown frontend.
            for listener in bound:
                await proxy.accept_on(listener)
            supervisor.spawn("kpx-sync", syncer.run)
            supervisor.spawn("kpx-sync-udp", udp.run)
            supervisor.spawn(
                "housekeeping",
                lambda: _housekeeping(
                    (balancer, udp.balancer),
                    local_clients,
                    service_health,
                    nodeport_cidrs,
                    settings.sync_period,
                    shared_links if transparent else None,
                ),
            )
            if ports_writer is not None:
                writer_ = ports_writer
                supervisor.spawn(
                    "print-assignments",
                    lambda: _print_assignments(syncer, lambda: _assignments(writer_, udp)),
                )
        await stopped
        synced.cancel()
    except OSError as err:
        log.error("kpx_start_failed", problem=str(err))
        status = 1
    finally:
        log.info("kpx_stopping")
        # From now on nothing new is accepted: /healthz and the healthCheckNodePorts say so
        # (503) for the whole drain, so load balancers stop sending clients here.
        health.stopping()
        await supervisor.stop()
        await state.stop()
        # Stop accepting and drain while the rules stay: new connections are steered to a
        # closed port and reset at once instead of hanging; then the table goes.
        drain = settings.drain_timeout
        if drain is None:
            drain = DEFAULT_STOP_DRAIN
        await proxy.stop(drain if status == 0 else 0.0)
        await udp.stop(programmed)
        if programmed:
            await writer.remove()
            if transparent:
                await routing.remove()
        await service_health.stop()
        await metrics_server.stop()
        await healthz.stop()
        REGISTRY.unregister(collector)
        loop_lag.stop()
        gc_pauses.uninstall()
        log.info("kpx_stopped")
    return status


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
