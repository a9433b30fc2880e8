"""kube-proxy's health surfaces: the proxier `/healthz` and per-Service healthCheckNodePorts.

- `/healthz` and `/livez` on `--healthz-bind-address` (pkg/proxy/healthcheck/proxy_health.go):
  200 with `{"lastUpdated", "currentTime", "nodeEligible"}`, 503 when a change was queued and
  not applied within the health timeout. Starting up counts as healthy. `/healthz` (not
  `/livez`) is also 503 when this Node is being deleted or carries the cluster autoscaler's
  `ToBeDeletedByClusterAutoscaler` taint (`nodeEligible` false), so load balancers that probe
  it stop sending new connections to a node about to go (KEP-3836). Once kpx is stopping
  (SIGTERM: it accepts nothing new while it drains) both are 503 too.
- One HTTP server per `healthCheckNodePort` of a LoadBalancer Service with
  externalTrafficPolicy Local (service_health.go): any path answers 200 when this node has a
  ready endpoint of the Service and the proxy is healthy, else 503, with a JSON body and the
  `X-Load-Balancing-Endpoint-Weight` header, so cloud load balancers only send to nodes that
  can serve locally.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import Counter

from kwatch import metrics as kwatch_metrics
from kwatch.health import parse_listen
from kwatch.models import Node
from kwatch.store import EventType, Store, StoreEvent

log = structlog.get_logger("kpx.health")

# The cluster autoscaler's taint on a node it is about to remove (proxy_health.go ToBeDeletedTaint).
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

HEALTHZ = Counter("kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"])
LIVEZ = Counter("kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"])
HEALTH_CHECK_BIND_FAILURES = Counter(
    "kpx_health_check_bind_failures_total",
    "healthCheckNodePort listeners that failed to bind (each retry that fails counts)",
)


def _rfc3339(epoch: float) -> str:
    if epoch == 0:
        return "0001-01-01T00:00:00Z"  # Go's zero time, what kube-proxy prints before a sync
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def node_eligible(node: Node | None) -> bool:
    """proxy_health.go SyncNode: not eligible while being deleted or tainted by the autoscaler
    (any effect). An unknown Node (not listed yet, or no Nodes at all in manifest mode) is."""
    if node is None:
        return True
    if node.metadata.deletion_timestamp:
        return False
    return not any(taint.key == TO_BE_DELETED_TAINT for taint in node.spec.taints)


class NodeEligibility:
    """`nodeEligible` of this node, read from the Node store (the `node_eligible` callable of
    `ProxierHealthServer`)."""

    def __init__(self, nodes: Store[Any], node_name: str) -> None:
        self._nodes = nodes
        self.node_name = node_name
        # The Node was deleted from the API after being seen: the node is going away, even
        # though no object is left to carry a deletionTimestamp.
        self._deleted = False
        nodes.subscribe(self._on_node)

    def _on_node(self, event: StoreEvent[Any]) -> None:
        if event.key == self.node_name:
            self._deleted = event.type == EventType.DELETED

    def __call__(self) -> bool:
        return not self._deleted and node_eligible(self._nodes.get(self.node_name))


class ProxierHealth:
    """Tracks queued vs applied changes; unhealthy when one waits longer than `timeout`."""

    def __init__(
        self,
        timeout: float,
        clock: Callable[[], float] = time.time,
        alive: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self.timeout = timeout
        self._clock = clock
        # The supervisor's liveness: a dead, crash-looping or wedged background task.
        self._alive = alive
        self.last_updated = 0.0
        self._oldest_pending: float | None = None
        # Shutting down: kpx accepts no new connection while it drains, so load balancers
        # probing /healthz or a healthCheckNodePort must move away from this node now.
        self._stopping = False

    def queued(self) -> None:
        """A change is waiting to be applied (keeps the oldest such time)."""
        if self._oldest_pending is None:
            self._oldest_pending = self._clock()

    def updated(self) -> None:
        """Everything queued so far has been applied."""
        self.last_updated = self._clock()
        self._oldest_pending = None

    def stopping(self) -> None:
        """kpx stops accepting (SIGTERM): unhealthy from now on."""
        self._stopping = True

    def healthy(self) -> bool:
        if self._stopping:
            return False
        if self._alive is not None and not self._alive()[0]:
            return False
        pending = self._oldest_pending
        return pending is None or self._clock() - pending < self.timeout

    def body(self, node_eligible: bool) -> str:
        return json.dumps(
            {
                "lastUpdated": _rfc3339(self.last_updated),
                "currentTime": _rfc3339(self._clock()),
                "nodeEligible": node_eligible,
            }
        )


class ProxierHealthServer:
    """`/healthz` (health and node eligibility) and `/livez` (health only)."""

    def __init__(
        self,
        address: str,
        health: ProxierHealth,
        node_eligible: Callable[[], bool] = lambda: True,
        reuse_port: bool = False,
    ) -> None:
        self.host, self.port = parse_listen(address)
        # SO_REUSEPORT, for a handover (kpx/handover.py): the successor binds while we serve.
        self.reuse_port = reuse_port
        self.health = health
        self._node_eligible = node_eligible
        app = web.Application()
        app.add_routes([web.get("/healthz", self._healthz), web.get("/livez", self._livez)])
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, reuse_port=self.reuse_port
        )
        await site.start()
        if self.port == 0:
            self.port = _bound_port(site)

    async def stop(self) -> None:
        await self._runner.cleanup()

    def _respond(self, ok: bool, eligible: bool, counter: Counter) -> web.Response:
        status = 200 if ok else 503
        counter.labels(str(status)).inc()
        return web.Response(
            status=status,
            text=self.health.body(eligible),
            content_type="application/json",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def _healthz(self, _request: web.Request) -> web.Response:
        eligible = self._node_eligible()
        return self._respond(self.health.healthy() and eligible, eligible, HEALTHZ)

    async def _livez(self, _request: web.Request) -> web.Response:
        return self._respond(self.health.healthy(), self._node_eligible(), LIVEZ)


def service_health_body(service_key: str, local_endpoints: int, proxy_healthy: bool) -> str:
    namespace, _, name = service_key.partition("/")
    return json.dumps(
        {
            "service": {"namespace": namespace, "name": name},
            "localEndpoints": local_endpoints,
            "serviceProxyHealthy": proxy_healthy,
        }
    )


class ServiceHealthServers:
    """One listener per healthCheckNodePort and node address, reconciled with `sync()` after
    each table sync and with `set_hosts()` when the node's addresses change.

    A listener that cannot be bound (the port is taken, the address is not up yet) is retried
    with a doubling delay from `retry_base` to `retry_max` seconds until it binds or is no
    longer wanted; kube-proxy retries on its next sync, but kpx syncs only on changes. Each
    failure is one `health_check_port_failed` log line and one count of
    `kpx_health_check_bind_failures_total`.
    """

    def __init__(
        self,
        proxy_healthy: Callable[[], bool],
        hosts: list[str] | None = None,
        retry_base: float = 1.0,
        retry_max: float = 30.0,
        reuse_port: bool = False,
    ) -> None:
        self._hosts = _listen_hosts(hosts)
        # SO_REUSEPORT, for a handover (kpx/handover.py): the successor binds while we serve.
        self.reuse_port = reuse_port
        self._proxy_healthy = proxy_healthy
        self.retry_base = retry_base
        self.retry_max = retry_max
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        self._started = False
        # port -> host -> the bound site; a host missing here is not bound (yet).
        self._sites: dict[int, dict[str | None, web.TCPSite]] = {}
        # (port, host) -> the task retrying a failed bind.
        self._retries: dict[tuple[int, str | None], asyncio.Task[None]] = {}
        self._services: dict[int, tuple[str, int]] = {}  # port -> (service key, local count)

    @property
    def ports(self) -> dict[int, tuple[str, int]]:
        return dict(self._services)

    def bound(self) -> dict[int, list[str | None]]:
        """port -> the hosts it is listening on (None: every address)."""
        return {port: list(sites) for port, sites in self._sites.items() if sites}

    async def sync(self, checks: dict[str, tuple[int, int]]) -> None:
        """`checks`: service key -> (healthCheckNodePort, local ready endpoints)."""
        if not self._started:
            await self._runner.setup()
            self._started = True
        wanted = {port: (key, count) for key, (port, count) in sorted(checks.items())}
        for port in [p for p in self._services if p not in wanted]:
            self._services.pop(port)
            hosts = set(self._sites.get(port, {})) | {h for p, h in self._retries if p == port}
            for host in hosts:
                await self._close(port, host)
            self._sites.pop(port, None)
        for port, entry in wanted.items():
            new = port not in self._services
            self._services[port] = entry
            if new:
                for host in self._hosts:
                    await self._open(port, host)

    async def set_hosts(self, hosts: list[str] | None) -> None:
        """The addresses to listen on changed (the node's addresses inside
        --nodeport-addresses): close the listeners of the ones gone, open the new ones."""
        new_hosts = _listen_hosts(hosts)
        if new_hosts == self._hosts:
            return
        gone = [h for h in self._hosts if h not in new_hosts]
        added = [h for h in new_hosts if h not in self._hosts]
        self._hosts = new_hosts
        log.info("health_check_addresses_changed", hosts=new_hosts)
        for port in list(self._services):
            for host in gone:
                await self._close(port, host)
            for host in added:
                await self._open(port, host)

    async def stop(self) -> None:
        for task in self._retries.values():
            task.cancel()
        await asyncio.gather(*self._retries.values(), return_exceptions=True)
        self._retries.clear()
        if self._started:
            await self._runner.cleanup()
        self._sites.clear()
        self._services.clear()

    async def _open(self, port: int, host: str | None) -> None:
        if not await self._bind(port, host, self.retry_base):
            self._retries[(port, host)] = asyncio.create_task(self._retry(port, host))

    async def _close(self, port: int, host: str | None) -> None:
        task = self._retries.pop((port, host), None)
        if task is not None:
            task.cancel()
        site = self._sites.get(port, {}).pop(host, None)
        if site is not None:
            await site.stop()

    async def _retry(self, port: int, host: str | None) -> None:
        delay = self.retry_base
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)
            if await self._bind(port, host, delay):
                self._retries.pop((port, host), None)
                return

    async def _bind(self, port: int, host: str | None, retry_in: float) -> bool:
        """Listen on host:port; False (logged and counted) when the bind fails."""
        service = self._services.get(port, ("?", 0))[0]
        site = web.TCPSite(self._runner, host, port, reuse_address=True, reuse_port=self.reuse_port)
        try:
            await site.start()
        except OSError as err:
            HEALTH_CHECK_BIND_FAILURES.inc()
            log.error(
                "health_check_port_failed",
                service=service,
                port=port,
                host=host,
                problem=str(err),
                retry_in=retry_in,
            )
            return False
        except Exception:
            # Not a bind error: a bug. The retry loop must go on (it is not supervised on its
            # own); logged with its traceback and counted as a restart of this work.
            kwatch_metrics.TASK_RESTARTS.labels("health-check-port").inc()
            log.exception("health_check_port_crashed", service=service, port=port, host=host)
            return False
        self._sites.setdefault(port, {})[host] = site
        log.info("health_check_port_opened", service=service, port=port, host=host)
        return True

    async def _serve(self, request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = sockname[1] if sockname else 0
        entry = self._services.get(port)
        if entry is None:
            return web.Response(status=404)
        key, count = entry
        healthy = self._proxy_healthy()
        return web.Response(
            status=200 if count > 0 and healthy else 503,
            text=service_health_body(key, count, healthy),
            content_type="application/json",
            headers={
                "X-Content-Type-Options": "nosniff",
                "X-Load-Balancing-Endpoint-Weight": str(count),
            },
        )


def _listen_hosts(hosts: list[str] | None) -> list[str | None]:
    # None = every address (kube-proxy: the nodePortAddresses, default all); an empty list
    # (no local address in --nodeport-addresses) serves nothing.
    if hosts is None:
        return [None]
    return [*sorted(hosts)]


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0
