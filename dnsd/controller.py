"""Keeps the zone index in step with the stores: record what changed, apply it in batches.

Store callbacks only note the affected Service / namespace keys (kwatch.store asks subscribers
to stay cheap); one task applies whatever accumulated, so a burst of events (a manifest reload,
a rollout touching many EndpointSlices) costs one re-encode per touched Service.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import structlog

from dnsd import answers as enc
from dnsd import external
from dnsd.handler import PodMode
from dnsd.metrics import DNS_PROGRAMMING, RECORDS_KEPT, ZONE_SYNC
from dnsd.records import RecordOptions, ServiceRecords, service_records
from dnsd.zone import ZoneIndex
from kwatch.models import EndpointSlice, Namespace, Pod, Service
from kwatch.runtime import release_free_memory
from kwatch.store import EventType, Store, StoreEvent
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
        self._dirty_services: set[str] = set()
        self._dirty_namespaces: set[str] = set()
        self._triggers: dict[str, float] = {}  # service key -> earliest unapplied change time
        self._building = False  # the first full build has started
        self._wake = asyncio.Event()
        # Told when a change waits and when it is in: the supervisor's liveness watches it.
        self.progress = progress or Progress()
        self.batches = 0
        self.last_batch_seconds = 0.0
        services.subscribe(self._on_service)
        slices.subscribe(self._on_slice)
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
            store.on_synced(self._wake.set)

    # --- store callbacks (cheap: note and wake) -------------------------------------------

    def _on_service(self, event: StoreEvent[Service]) -> None:
        self._dirty_services.add(event.key)
        self._noted()

    def _on_slice(self, event: StoreEvent[EndpointSlice]) -> None:
        for obj in (event.obj, event.old):
            if obj is not None and obj.service_name:
                self._dirty_services.add(f"{obj.metadata.namespace}/{obj.service_name}")
        new = event.obj
        if new.service_name and event.type is not EventType.DELETED:
            trigger = _trigger_time(new)
            if trigger is not None:
                key = f"{new.metadata.namespace}/{new.service_name}"
                self._triggers[key] = min(trigger, self._triggers.get(key, trigger))
        self._noted()

    def _on_namespace(self, event: StoreEvent[Namespace]) -> None:
        self._dirty_namespaces.add(event.key)
        self._noted()

    def _noted(self) -> None:
        if self.index.ready:  # before the first build, readiness (not liveness) says so
            self.progress.pending()
        self._wake.set()

    # --- applying -------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return all(s.synced for s in self._stores)

    async def run(self) -> None:
        # Restarted by the supervisor after a failure: whatever is still noted is applied.
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.synced:
                continue
            # A big batch (the first build, a relist after a long outage) is applied in
            # slices, yielding in between so queries keep being answered meanwhile.
            more = self.apply_pending(max_services=CHUNK)
            if more:
                self._wake.set()  # come straight back for the rest
                await asyncio.sleep(0)
            elif not (self._dirty_services or self._dirty_namespaces or self._extra_retry):
                self.progress.done()

    def apply_pending(self, max_services: int | None = None) -> bool:
        """Apply the changes noted so far (the first call takes everything); True when some
        were left for the next call because of `max_services`."""
        started = time.perf_counter()
        first = not self.index.ready
        if first and not self._building:
            self._building = True
            self._dirty_services |= set(self.services.keys())
            self._dirty_namespaces |= set(self.namespaces.keys())
        services = self._dirty_services
        if max_services is not None and len(services) > max_services:
            services = set(itertools.islice(services, max_services))
            self._dirty_services -= services
        else:
            self._dirty_services = set()
        namespaces, self._dirty_namespaces = self._dirty_namespaces, set()
        extra = [
            (source, source.take_dirty() | self._extra_retry.pop(i, set()))
            for i, source in enumerate(self.extra)
        ]
        more = bool(self._dirty_services)
        if not (services or namespaces or first or any(keys for _, keys in extra)):
            return more
        try:
            self._apply_batch(services, namespaces, extra)
        except BaseException:
            # Nothing is forgotten before it is applied: the next run takes it all again.
            self._dirty_services |= services
            self._dirty_namespaces |= namespaces
            for i, (_, keys) in enumerate(extra):
                self._extra_retry.setdefault(i, set()).update(keys)
            raise
        if not more:
            # Only a complete zone is served: until then cluster names are SERVFAIL.
            if not self.index.ready:
                release_free_memory()
            self.index.ready = True
        self.batches += 1
        self.last_batch_seconds = time.perf_counter() - started
        ZONE_SYNC.observe(self.last_batch_seconds)
        self._observe_programming(services, first)
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
        services: set[str],
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

    def _observe_programming(self, services: set[str], first: bool) -> None:
        if first:
            for key in services:
                self._triggers.pop(key, None)
            return  # the initial list reflects history, not a change we just programmed
        now = time.time()
        for key in services:
            trigger = self._triggers.pop(key, None)
            if trigger is None:
                continue
            service = self.services.get(key)
            kind = "headless" if service is not None and service.is_headless else "cluster_ip"
            DNS_PROGRAMMING.labels(kind).observe(max(0.0, now - trigger))

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


TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def _trigger_time(eps: EndpointSlice) -> float | None:
    """The EndpointSlice controller's last-change-trigger-time (RFC 3339) as a Unix time."""
    value = eps.metadata.annotations.get(TRIGGER_ANNOTATION)
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
