"""dnsd: wire the stores, the zone index, the forwarder and the listeners together."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

import structlog
from prometheus_client import REGISTRY

from dnsd.cache import DnsCache
from dnsd.controller import ZoneController
from dnsd.forward import Forwarder, read_resolv_conf
from dnsd.handler import Handler, PodMode
from dnsd.metrics import DnsCollector, DnsStats
from dnsd.records import RecordOptions
from dnsd.server import DnsServer
from dnsd.settings import DnsdSettings, load
from dnsd.zone import ZoneIndex
from kwatch.cluster import ClusterState
from kwatch.health import HealthServer
from kwatch.logs import configure_logging
from kwatch.models import keep_reference_names
from kwatch.resources import ENDPOINTSLICES, NAMESPACES, PODS, SERVICES
from kwatch.runtime import run, stop_event

log = structlog.get_logger("dnsd")

USER_AGENT = "dnsd/0.1"


class Daemon:
    """One dnsd process: stores, zone, forwarder, DNS listeners and (worker 0) health/metrics."""

    def __init__(self, settings: DnsdSettings, *, worker: int = 0) -> None:
        self.settings = settings
        self.worker = worker
        resources = [SERVICES, ENDPOINTSLICES, NAMESPACES]
        if settings.pods is PodMode.VERIFIED:
            resources.append(PODS)  # verified mode watches every pod, as CoreDNS does
        # Endpoint targetRef names are read only for --endpoint-pod-names (12 MB at 100,000).
        keep_reference_names(settings.endpoint_pod_names)
        self.state = ClusterState(resources)
        self.index = ZoneIndex(settings.zone, settings.ttl)
        self.controller = ZoneController(
            self.index,
            RecordOptions(
                zones=tuple(settings.zone),
                ttl=settings.ttl,
                endpoint_pod_names=settings.endpoint_pod_names,
                ignore_empty_service=settings.ignore_empty_service,
                endpoint_ptrs=settings.endpoint_ptrs,
            ),
            self.state.store(SERVICES),
            self.state.store(ENDPOINTSLICES),
            self.state.store(NAMESPACES),
            pods=self.state.store(PODS) if PODS in self.state.stores else None,
            pod_mode=settings.pods,
            only_namespaces=frozenset(settings.namespaces),
        )
        upstreams = settings.upstream_addresses() or read_resolv_conf(settings.resolv_conf)
        cache = (
            DnsCache(
                max_entries=settings.cache_size,
                max_ttl=settings.cache_max_ttl,
                max_negative_ttl=settings.cache_max_negative_ttl,
            )
            if settings.cache_size > 0
            else None
        )
        self.forwarder = Forwarder(
            upstreams,
            stub_domains=settings.stub_domains(),
            cache=cache,
            timeout=settings.forward_timeout,
            max_inflight=settings.max_concurrent,
        )
        self.stats = DnsStats()
        self.handler = Handler(
            self.index,
            upstream=self.forwarder,
            pod_mode=settings.pods,
            pod_exists=self.controller.pod_exists,
            max_udp_size=settings.max_udp_size,
            stats=self.stats,
        )
        self.server = DnsServer(
            self.handler,
            settings.listen_addresses(),
            reuse_port=settings.workers > 1,
            tcp_idle_timeout=settings.tcp_idle_timeout,
            tcp_max_connections=settings.tcp_max_connections,
            query_log_sample=settings.query_log_sample,
        )
        self.health: HealthServer | None = None
        self._collector = DnsCollector(self.stats, self.controller.zone_info)
        self._tasks: list[asyncio.Task[None]] = []

    def readiness(self) -> tuple[bool, str]:
        """Ready = every store synced, the zone built, and the DNS sockets bound."""
        synced, text = self.state.readiness()
        if not synced:
            return False, text
        if not self.index.ready:
            return False, "building the zone"
        if not self.server.listening:
            return False, "not listening"
        return True, "ok"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.worker == 0:
            # The first process binds at once: a port conflict fails the start, and clients
            # get SERVFAIL for cluster names until the first sync, as CoreDNS does.
            await self.server.start()
        await self.state.start(self.settings, USER_AGENT)
        self._tasks.append(loop.create_task(self.controller.run()))
        if self.worker != 0:
            # Extra workers join the SO_REUSEPORT group only with a complete zone: bound
            # earlier, the kernel would hash some clients to a worker that can only SERVFAIL.
            self._tasks.append(loop.create_task(self._listen_when_ready()))
        if self.worker == 0:
            REGISTRY.register(self._collector)
            self.health = HealthServer(self.settings.http_listen, ready=self.readiness)
            await self.health.start()
            log.info("http_listening", address=self.health.host, port=self.health.port)

    async def _listen_when_ready(self) -> None:
        await self.state.wait_synced()
        # The controller builds the zone right after the sync; the index has no event to await.
        while not self.index.ready:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        try:
            await self.server.start()
        except OSError as err:
            log.error("listen_failed", worker=self.worker, problem=str(err))
            return
        log.info("worker_listening", worker=self.worker)

    @property
    def dns_port(self) -> int:
        return self.server.bound[0][1]

    async def stop(self) -> None:
        await self.server.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.state.stop()
        await self.forwarder.close()
        if self.health is not None:
            await self.health.stop()
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(self._collector)


async def serve(settings: DnsdSettings, worker: int) -> int:
    stop = stop_event()
    daemon = Daemon(settings, worker=worker)
    try:
        await daemon.start()
    except OSError as err:
        log.error("listen_failed", problem=str(err))
        await daemon.stop()
        return 1
    log.info("dnsd_started", worker=worker, zones=settings.zone, pods=str(settings.pods))
    await stop.wait()
    log.info("dnsd_stopping", worker=worker)
    await daemon.stop()
    return 0


def _die_with_parent() -> None:
    """A worker must not outlive the first process (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _fork_workers(count: int) -> tuple[int, list[int]]:
    """Fork `count - 1` workers sharing the DNS ports through SO_REUSEPORT; each watches the
    API itself (like running that many CoreDNS replicas on one address). Worker 0 alone serves
    /healthz and /metrics."""
    children: list[int] = []
    for worker in range(1, count):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            return worker, []
        children.append(pid)
    return 0, children


def main(argv: Sequence[str] | None = None) -> int:
    settings = load(argv)
    configure_logging(settings.log_format, settings.log_level, "dnsd")
    worker, children = _fork_workers(settings.workers)
    try:
        status = run(serve(settings, worker))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
