"""Keeps the zone index in step with the stores: record what changed, apply it in batches.

Store callbacks only note the affected Service / namespace keys (kwatch.changes' tracker, shared
with kpx's service tables; kwatch.store asks subscribers to stay cheap); one task applies
whatever accumulated, so a burst of events (a manifest reload, a rollout touching many
EndpointSlices) costs one re-encode per touched Service.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from dnsd import answers as enc
from dnsd import external
from dnsd.handler import PodMode
from dnsd.metrics import DNS_PROGRAMMING, RECORDS_KEPT, ZONE_SYNC
from dnsd.records import RecordOptions, ServiceRecords, service_records
from dnsd.zone import ZoneIndex
from kwatch.changes import ChangeTracker, SyncLoop
from kwatch.models import EndpointSlice, Namespace, Pod, Service
from kwatch.runtime import release_free_memory
from kwatch.store import Store, StoreEvent
from kwatch.supervisor import Progress

log = structlog.get_logger("dnsd.controller")

APEX = "apex"
CHUNK = 500  # services re-encoded between two yields to the event loop (~60 ms measured)
NS_SERVICE = "kube-system/kube-dns"  # its ClusterIPs are the glue of ns.dns.<zone> (CoreDNS ns.go)


class ExtraSource(Protocol):
    """Zone sources besides Services, namespaces and the apex (dnsd.multicluster)."""

    stores: list[Store[Any]]  # synced before the first build

    def on_change(self, wake: Callable[[], None]) -> None: ...

    def take_dirty(self) -> set[str]: ...  # everything on the first call

    def records(self, source: str) -> ServiceRecords | None: ...


class ZoneController:
    def __init__(
        self,
        index: ZoneIndex,
        options: RecordOptions,
        services: Store[Service],
        slices: Store[EndpointSlice],
        namespaces: Store[Namespace],
        *,
        pods: Store[Pod] | None = None,
        waits_for: Sequence[Store[Any]] = (),
        pod_mode: PodMode = PodMode.DISABLED,
        only_namespaces: frozenset[str] = frozenset(),
        extra: tuple[ExtraSource, ...] = (),
        progress: Progress | None = None,
    ) -> None:
        self.index = index
        self.options = options
        self.services = services
        self.slices = slices
        self.namespaces = namespaces
        self.pods = pods
        self.pod_mode = pod_mode
        self.only_namespaces = only_namespaces  # CoreDNS `namespaces`: empty = all exposed
        # Services to re-encode and their EndpointSlice trigger times (the first batch takes
        # every Service); namespaces are noted here.
        self.changes = ChangeTracker(services, slices)
        self.changes.listen(self._pending)
        self._dirty_namespaces: set[str] = set()
        self._building = False  # the first full build has started
        # Told when a change waits and when it is in: the supervisor's liveness watches it.
        self.progress = progress or Progress()
        self.batches = 0
        self.last_batch_seconds = 0.0
        namespaces.subscribe(self._on_namespace)
        stores: list[Store[Any]] = [services, slices, namespaces]
        if pods is not None:
            stores.append(pods)
        self.extra = extra
        # Keys an extra source handed over for a batch that failed: taken again next time.
        self._extra_retry: dict[int, set[str]] = {}
        for source in extra:
            source.on_change(self._noted)
            stores.extend(source.stores)
        # Stores the zone does not read but must not be served before (the pod addresses of
        # --namespace-isolation: until they are in, every pod would look like a node).
        stores += waits_for
        self._stores = stores
        for store in stores:
            store.on_synced(self.changes.wake)
        self._loop = SyncLoop(
            self.changes,
            self._apply_chunk,
            name="zone",
            ready=lambda: self.synced,
            on_idle=self.progress.done,
        )

    # --- store callbacks (cheap: note and wake) -------------------------------------------

    def _on_namespace(self, event: StoreEvent[Namespace]) -> None:
        self._dirty_namespaces.add(event.key)
        self._noted()

    def _pending(self) -> None:
        if self.index.ready:  # before the first build, readiness (not liveness) says so
            self.progress.pending()

    def _noted(self) -> None:
        self._pending()
        self.changes.wake()

    # --- applying -------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return all(s.synced for s in self._stores)

    async def run(self) -> None:
        """Apply what changed whenever woken (restarted by the supervisor after a failure:
        whatever is still noted is applied)."""
        await self._loop.run()

    async def _apply_chunk(self) -> bool:
        # A big batch (the first build, a relist after a long outage) is applied in slices,
        # the loop yielding in between so queries keep being answered meanwhile.
        return self.apply_pending(max_services=CHUNK)

    def apply_pending(self, max_services: int | None = None) -> bool:
        """Apply the changes noted so far (the first call takes everything); True when some
        were left for the next call because of `max_services`."""
        started = time.perf_counter()
        first = not self.index.ready
        if first and not self._building:
            self._building = True
            self._dirty_namespaces |= set(self.namespaces.keys())
        services = self.changes.take(max_services).keys
        namespaces, self._dirty_namespaces = self._dirty_namespaces, set()
        extra = [
            (source, source.take_dirty() | self._extra_retry.pop(i, set()))
            for i, source in enumerate(self.extra)
        ]
        if not (services or namespaces or first or any(keys for _, keys in extra)):
            return False
        try:
            self._apply_batch(services, namespaces, extra)
        except BaseException:
            # Nothing is forgotten before it is applied: the next run takes it all again
            # (the Services' keys are still the tracker's: only `applied` forgets them).
            self.changes.failed()
            self._dirty_namespaces |= namespaces
            for i, (_, keys) in enumerate(extra):
                self._extra_retry.setdefault(i, set()).update(keys)
            raise
        triggers = {key: self.changes.applied(key) for key in services}
        more = self.changes.pending
        if not more:
            # Only a complete zone is served: until then cluster names are SERVFAIL.
            if not self.index.ready:
                release_free_memory()
            self.index.ready = True
        self.batches += 1
        self.last_batch_seconds = time.perf_counter() - started
        ZONE_SYNC.observe(self.last_batch_seconds)
        if not first:  # the initial list reflects history, not a change just programmed
            self._observe_programming(triggers)
        log.debug(
            "zone_updated",
            services=len(services),
            namespaces=len(namespaces),
            answers=len(self.index.answers),
            seconds=round(self.last_batch_seconds, 4),
        )
        return more

    def _apply_batch(
        self,
        services: list[str],
        namespaces: set[str],
        extra: list[tuple[ExtraSource, set[str]]],
    ) -> None:
        # A batch allocates many small objects and frees them again, none in reference cycles:
        # with the collector on, each allocation burst walks every tracked object (the stores'
        # included) for nothing. Measured: ~10% of a full build. Off only for the batch.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.index.begin_batch()
            for key in services:
                self._set_service(key)
            for source, keys in extra:
                for key in keys:
                    self._set_extra(source, key)
            for name in namespaces:
                self.index.set_source(f"namespace:{name}", self._namespace_records(name))
            self.index.set_source(APEX, self._apex_records())
            self.index.finish_batch()
        finally:
            if collecting:
                gc.enable()

    def _observe_programming(self, triggers: dict[str, list[float]]) -> None:
        """The earliest unapplied change of each Service, now in the zone."""
        now = time.time()
        for key, times in triggers.items():
            if not times:
                continue
            service = self.services.get(key)
            kind = "headless" if service is not None and service.is_headless else "cluster_ip"
            DNS_PROGRAMMING.labels(kind).observe(max(0.0, now - min(times)))

    def _set_service(self, key: str) -> None:
        try:
            records = self._records_for(key)
            self.index.set_source(key, records)
        except Exception as err:
            # One Service whose records cannot be built or encoded (a label over 63 bytes, a
            # name the wire form refuses) must not stop the zone: its last good records stay
            # (set_source touches nothing before everything is encoded), the rest is updated.
            RECORDS_KEPT.inc()
            log.warning(
                "service_records_kept",
                key=key,
                problem=f"{type(err).__name__}: {err}",
                previous="kept" if key in self.index.sources() else "none",
            )

    def _set_extra(self, source: ExtraSource, key: str) -> None:
        try:
            self.index.set_source(key, source.records(key))
        except Exception as err:
            log.warning("source_skipped", key=key, problem=repr(err))

    def _exposed(self, namespace: str) -> bool:
        return not self.only_namespaces or namespace in self.only_namespaces

    def _records_for(self, key: str) -> ServiceRecords | None:
        service = self.services.get(key)
        if service is None or not self._exposed(service.metadata.namespace):
            return None
        slices = self.slices.by_index("service", key)
        # Raises ValueError for a name the wire form cannot carry: _set_service keeps the
        # last good records then (returning None here would delete them).
        records = service_records(service, slices, self.options)
        if self.options.external_zones:
            external.add_service(records, service, slices, self.options)
        return records

    def _namespace_records(self, name: str) -> ServiceRecords | None:
        """`<ns>.svc.<zone>` exists for an existing namespace (dns-features 3.3); in the pod
        modes so does `<ns>.pod.<zone>` (CoreDNS findPods: empty pod name -> NODATA)."""
        if name not in self.namespaces or not self._exposed(name):
            return None
        records = ServiceRecords()
        for zone in self.index.zones:  # the --multicluster zones too
            records.names.add(f"{name}.svc.{zone}".lower())
            if self.pod_mode is not PodMode.DISABLED and zone in self.options.zones:
                records.names.add(f"{name}.pod.{zone}".lower())
        return records

    def _apex_records(self) -> ServiceRecords:
        records = ServiceRecords()
        dns_service = self.services.get(NS_SERVICE)
        ns_ips = dns_service.cluster_ips if dns_service is not None else []
        primary = self.options.zones[0]
        for zone in self.index.zones:  # the --multicluster zones too
            zone = zone.lower()
            answers, additional = enc.apex_rrsets(
                zone, primary, self.options.ttl, self.index.serial, ns_ips
            )
            records.answers.update(answers)
            records.additional.update(additional)
            for name in (zone, f"svc.{zone}", f"pod.{zone}", f"dns.{zone}"):
                records.names.add(name)
            for name, _ in answers:
                records.names.add(name)
        if self.options.external_zones:
            outside = external.outside_addresses(dns_service)[0] if dns_service else []
            for zone in self.options.external_zones:
                apex = external.apex_records(
                    zone, self.options.ttl, self.index.serial, outside or ns_ips
                )
                records.answers.update(apex.answers)
                records.additional.update(apex.additional)
                records.names |= apex.names
        return records

    def pod_exists(self, ip: str, namespace: str) -> bool:
        """`pods verified`: a pod with this IP exists in this namespace (CoreDNS findPods)."""
        if self.pods is None:
            return False
        return any(p.metadata.namespace == namespace for p in self.pods.by_index("ip", ip))

    def zone_info(self) -> dict[str, tuple[str, float]]:
        return {
            "dnsd_zone_answers": ("Precomputed (name, type) answers", len(self.index.answers)),
            "dnsd_zone_names": ("Names that exist in the served zones", len(self.index.existing)),
            "dnsd_zone_serial": ("SOA serial of the cluster zones", self.index.serial),
            "dnsd_zone_ready": (
                "1 once the stores synced and the zone is built",
                1 if self.index.ready else 0,
            ),
            "dnsd_zone_batches": ("Batches of store changes applied", self.batches),
            "dnsd_zone_last_batch_seconds": (
                "Time spent applying the last batch",
                self.last_batch_seconds,
            ),
        }
