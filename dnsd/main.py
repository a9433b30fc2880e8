"""dnsd: wire the stores, the zone index, the forwarder and the listeners together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
from collections.abc import Sequence

import structlog
from prometheus_client import REGISTRY
from prometheus_client.registry import Collector

from dnsd.autopath import AutoPath, read_resolv_search
from dnsd.build import build_forwarder, build_index, forward_options
from dnsd.clients import POD_ADDRESSES, PodClients
from dnsd.controller import ExtraSource, ZoneController
from dnsd.endpoint_names import EndpointNames
from dnsd.forward_channel import MergedRegistry
from dnsd.forward_process import ForwardProcess
from dnsd.handler import Handler, LazyNames, PodMode
from dnsd.isolation import NamespaceIsolation
from dnsd.metrics import DnsCollector, DnsStats
from dnsd.multicluster import MulticlusterRecords
from dnsd.records import RecordOptions
from dnsd.server import DnsServer
from dnsd.settings import DnsdSettings, load
from dnsd.transfer import ZoneTransfer, parse_networks
from dnsd.worker_metrics import WorkerCounters, WorkerLinks
from dnsd.worker_metrics import report as report_counters
from dnsd.zonal import ZonalNames
from kwatch.cluster import ClusterState
from kwatch.health import HealthServer
from kwatch.logs import configure_logging
from kwatch.models import keep_reference_names
from kwatch.resources import ENDPOINTSLICES, NAMESPACES, PODS, SERVICEIMPORTS, SERVICES
from kwatch.runtime import die_with_parent, release_free_memory, run, steady_heap, stop_event
from kwatch.supervisor import Supervisor

LOOP_PROBE_WAIT = 10.0  # seconds the loop probe waits for the forward child to be up

log = structlog.get_logger("dnsd")

USER_AGENT = "dnsd/0.1"


class Daemon:
    """One dnsd process: stores, zone, forwarder, DNS listeners and (worker 0) health/metrics."""

    def __init__(
        self,
        settings: DnsdSettings,
        *,
        worker: int = 0,
        links: WorkerLinks | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        # --workers: worker 0 adds the others' counters to its /metrics, which they send it.
        self.worker_counters: WorkerCounters | None = None
        self.worker_link: socket.socket | None = None
        if links is not None:
            if worker == 0:
                self.worker_counters = WorkerCounters(links.first())
            else:
                self.worker_link = links.of_worker(worker)
        resources = [SERVICES, ENDPOINTSLICES, NAMESPACES]
        per_client = settings.autopath or settings.namespace_isolation
        # Verified mode watches every pod, as CoreDNS does; autopath and isolation need only
        # each pod's IP and namespace: the same watch when it is there, else a slim one.
        pod_watch = PODS if settings.pods is PodMode.VERIFIED else POD_ADDRESSES
        if settings.pods is PodMode.VERIFIED or per_client:
            resources.append(pod_watch)
        if settings.multicluster:
            resources.append(SERVICEIMPORTS)
        # Endpoint targetRef names are read only for --endpoint-pod-names (12 MB at 100,000).
        keep_reference_names(settings.endpoint_pod_names)
        # Every background task (watches, the zone controller) runs under it; /healthz is
        # its liveness.
        self.supervisor = Supervisor(wedge_deadline=settings.task_deadline)
        self.state = ClusterState(resources, supervisor=self.supervisor)
        # Also the --forward-process child's values, so that it forwards as this process does.
        self.forward_options = forward_options(settings)
        self.index = build_index(self.forward_options)
        self.clients: PodClients | None = None
        if per_client:
            self.clients = PodClients()
            self.state.store(pod_watch).subscribe(self.clients.on_pod)
        options = RecordOptions(
            zones=tuple(settings.zone),
            ttl=settings.ttl,
            endpoint_pod_names=settings.endpoint_pod_names,
            ignore_empty_service=settings.ignore_empty_service,
            endpoint_ptrs=settings.endpoint_ptrs,
            external_zones=tuple(settings.external_zone),
            external_headless=settings.external_headless,
        )
        only = frozenset(settings.namespaces)

        def exposed(namespace: str) -> bool:
            return not only or namespace in only

        stores = (self.state.store(SERVICES), self.state.store(ENDPOINTSLICES))
        extra: tuple[ExtraSource, ...] = ()
        if settings.multicluster:
            extra = (
                MulticlusterRecords(
                    self.state.store(SERVICEIMPORTS),
                    stores[1],
                    options,
                    tuple(settings.multicluster),
                    exposed,
                ),
            )
        self.controller = ZoneController(
            self.index,
            options,
            self.state.store(SERVICES),
            self.state.store(ENDPOINTSLICES),
            self.state.store(NAMESPACES),
            pods=self.state.store(PODS) if PODS in self.state.stores else None,
            waits_for=[self.state.store(POD_ADDRESSES)]
            if POD_ADDRESSES in self.state.stores
            else [],
            pod_mode=settings.pods,
            only_namespaces=only,
            extra=extra,
            progress=self.supervisor.progress("zone-controller"),
        )
        self.forwarder = build_forwarder(self.forward_options, on_loop=self._found_loop)
        lazy: list[LazyNames] = []
        if settings.endpoint_names:
            lazy.append(EndpointNames(*stores, options, exposed))
        if settings.zonal:
            lazy.append(ZonalNames(*stores, options, exposed))
        self.stats = DnsStats()
        self.handler = Handler(
            self.index,
            upstream=self.forwarder,
            pod_mode=settings.pods,
            pod_exists=self.controller.pod_exists,
            max_udp_size=settings.max_udp_size,
            stats=self.stats,
            lazy=tuple(lazy),
            loadbalance=settings.loadbalance,
            clients=self.clients,
            autopath=(
                AutoPath(settings.zone, read_resolv_search(settings.resolv_conf))
                if settings.autopath
                else None
            ),
            isolation=(
                NamespaceIsolation(self.index, settings.shared_namespaces)
                if settings.namespace_isolation
                else None
            ),
        )
        transfer = (
            ZoneTransfer(self.index, parse_networks(settings.transfer_to))
            if settings.transfer_to
            else None
        )
        self.server = DnsServer(
            self.handler,
            settings.listen_addresses(),
            # Always: a successor (a rolling update's surge pod, the next worker) joins the
            # port while this process still answers on it.
            reuse_port=True,
            tcp_idle_timeout=settings.tcp_idle_timeout,
            tcp_max_connections=settings.tcp_max_connections,
            query_log_sample=settings.query_log_sample,
            transfer=transfer,
            slow_queue=settings.slow_queue,
            udp_thread_slice=settings.udp_thread_slice,
        )
        self.health: HealthServer | None = None
        self.failed = asyncio.Event()  # set when the DNS ports could not be bound after all
        self._collector = DnsCollector(self.stats, self.controller.zone_info)
        self.forward_process = (
            ForwardProcess(
                settings, self.forward_options, self.server, on_loop=self._child_found_loop
            )
            if settings.forward_process
            else None
        )

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

    def liveness(self) -> tuple[bool, str]:
        """Alive = every supervised task running, and the forward process up (if any)."""
        alive, text = self.supervisor.liveness()
        if self.forward_process is not None:
            child_alive, child_text = self.forward_process.liveness()
            if not child_alive:
                return False, child_text if alive else f"{text}; {child_text}"
        return alive, text

    def _found_loop(self, label: str) -> None:
        """This process's forwarder found `label`'s upstream looping (a probe can come back
        over TCP, or as a type the UDP threads keep): the child must not use it either."""
        self._remember_loop(label)
        if self.forward_process is not None:
            self.forward_process.tell_loop(label)

    def _child_found_loop(self, label: str) -> None:
        """The --forward-process child found it: this forwarder stops using it too."""
        self.forwarder.mark_looping(label)
        self._remember_loop(label)

    def _remember_loop(self, label: str) -> None:
        if label not in self.forward_options["looping"]:  # what a new child starts with
            self.forward_options["looping"].append(label)

    def _start_forward_process(self) -> None:
        if self.forward_process is not None:
            self.supervisor.spawn("forward-process", self.forward_process.run)
        if self.forwarder.loop_probes:
            self.supervisor.spawn("loop-probe", self._probe_loops, forever=False)

    async def _probe_loops(self) -> None:
        """Probe the upstreams for loops once listening, with the child (if any) up to see
        what comes back."""
        if self.forward_process is not None:
            await self.forward_process.up(LOOP_PROBE_WAIT)
        await self.forwarder.probe_loops()

    async def start(self) -> None:
        # The first process binds at once when the port is free: a conflict with anything
        # but another dnsd fails the start, and clients get SERVFAIL for cluster names until
        # the first sync, as CoreDNS does. Extra workers, and a first process whose port a
        # dnsd still serves (the pod it replaces, in a rolling update with a surge), join the
        # SO_REUSEPORT group only with a complete zone: bound earlier, the kernel would hash
        # some clients to a process that can only SERVFAIL.
        join_later = self.worker != 0 or self.server.port_in_use()
        if not join_later:
            await self.server.start()
            self._start_forward_process()
        elif self.worker == 0:
            log.info("port_in_use_joining_when_ready", addresses=self.settings.listen)
        await self.state.start(self.settings, USER_AGENT)
        self.supervisor.spawn("zone-controller", self.controller.run)
        if join_later:
            self.supervisor.spawn("listen", self._listen_when_ready, forever=False)
        REGISTRY.register(self._collector)
        link = self.worker_link
        if link is not None:
            self.supervisor.spawn("worker-metrics", lambda: report_counters(link, self._metrics()))
        if self.worker_counters is not None:
            self.worker_counters.attach(asyncio.get_running_loop())
        if self.worker == 0:
            metrics = self._metrics()
            self.health = HealthServer(
                self.settings.http_listen,
                ready=self.readiness,
                alive=self.liveness,
                registry=metrics,
                reuse_port=True,  # shared with a surge pod's dnsd, as the DNS port
            )
            await self.health.start()
            log.info("http_listening", address=self.health.host, port=self.health.port)

    def _metrics(self) -> Collector:
        """This process's registry, with its --forward-process child's and (worker 0) the
        other workers' counters added."""
        if self.forward_process is None and self.worker_counters is None:
            return REGISTRY
        forward, workers = self.forward_process, self.worker_counters
        return MergedRegistry(
            REGISTRY,
            lambda: [
                *(forward.metric_families() if forward is not None else []),
                *(workers.metric_families() if workers is not None else []),
            ],
        )

    async def _zone_built(self) -> None:
        await self.state.wait_synced()
        # The controller builds the zone right after the sync; the index has no event to await.
        while not self.index.ready:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def settle_heap(self) -> None:
        """Once the first zone is built: collect the start-up garbage and freeze the rest
        (gc.freeze), so a full collection, which holds the GIL the UDP threads need for
        every answer, walks what changed since instead of every record of the zone. The
        zone's parts make no cycles (tests/dnsd/test_heap.py): a later rebuild frees what it
        replaces by refcount, frozen or not."""
        await self._zone_built()
        gc.collect()
        gc.freeze()
        release_free_memory()

    async def _listen_when_ready(self) -> None:
        await self._zone_built()
        try:
            await self.server.start()
        except OSError as err:
            # Held by something that is not a dnsd (no SO_REUSEPORT, another user): fail as a
            # first process binding at once would, rather than run unready for good.
            log.error("listen_failed", worker=self.worker, problem=str(err))
            self.failed.set()
            return
        self._start_forward_process()
        log.info("worker_listening", worker=self.worker)

    @property
    def dns_port(self) -> int:
        return self.server.bound[0][1]

    async def lameduck(self, seconds: float) -> None:
        """CoreDNS's `health { lameduck }`: keep answering for `seconds` after SIGTERM.

        /healthz and /readyz go first, so that a successor on the same port (hostNetwork)
        answers the kubelet's probes; then, with one process per pod, the DNS sockets'
        SO_REUSEPORT groups are steered to the successor once it has joined
        (`DnsServer.steer_to_successor`), so that nothing waits in a queue that is about to
        close. Without a successor this process keeps answering everything until the end."""
        if self.health is not None:
            await self.health.stop()
            self.health = None
        steered = 0
        if self.settings.workers == 1 and self.server.listening:
            steered = self.server.steer_to_successor()
        log.info("lameduck", seconds=seconds, steered_sockets=steered)
        await asyncio.sleep(seconds)

    async def stop(self) -> None:
        if self.forward_process is not None:
            # First: the child holds the listener sockets too, so they close with it.
            await self.forward_process.stop()
        await self.server.stop()
        await self.supervisor.stop()
        await self.state.stop()
        await self.forwarder.close()
        if self.health is not None:
            await self.health.stop()
            self.health = None
        if self.worker_counters is not None:
            self.worker_counters.close(asyncio.get_running_loop())
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(self._collector)


async def serve(settings: DnsdSettings, worker: int, links: WorkerLinks | None = None) -> int:
    stop = stop_event()
    daemon = Daemon(settings, worker=worker, links=links)
    try:
        await daemon.start()
    except OSError as err:
        log.error("listen_failed", problem=str(err))
        await daemon.stop()
        return 1
    log.info("dnsd_started", worker=worker, zones=settings.zone, pods=str(settings.pods))
    daemon.supervisor.spawn("settle-heap", daemon.settle_heap, forever=False)
    stopping = asyncio.ensure_future(stop.wait())
    failing = asyncio.ensure_future(daemon.failed.wait())
    await asyncio.wait((stopping, failing), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    failing.cancel()
    if daemon.failed.is_set():
        await daemon.stop()
        return 1
    log.info("dnsd_stopping", worker=worker)
    if settings.lameduck > 0:
        await daemon.lameduck(settings.lameduck)
    await daemon.stop()
    return 0


def _fork_workers(count: int) -> tuple[int, list[int]]:
    """Fork `count - 1` workers sharing the DNS ports through SO_REUSEPORT; each watches the
    API itself (like running that many CoreDNS replicas on one address). Worker 0 alone serves
    /healthz and /metrics."""
    children: list[int] = []
    for worker in range(1, count):
        pid = os.fork()
        if pid == 0:
            die_with_parent()
            return worker, []
        children.append(pid)
    return 0, children


def main(argv: Sequence[str] | None = None) -> int:
    steady_heap()  # before the first list: the watches' churn otherwise fragments the heap
    settings = load(argv)
    configure_logging(settings.log_format, settings.log_level, "dnsd")
    # The UDP threads answer cluster names and the event loop the rest, under one GIL: a
    # thread that wants it waits until the holder blocks or this interval has passed.
    sys.setswitchinterval(settings.gil_switch_interval)
    links = WorkerLinks(settings.workers) if settings.workers > 1 else None
    worker, children = _fork_workers(settings.workers)
    try:
        status = run(serve(settings, worker, links))
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
