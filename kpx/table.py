"""The service table: every frontend of one protocol this node serves, kept current from the
stores.

kpx keeps one table per protocol it proxies (TCP, UDP): the same Service yields TCP frontends
in one and UDP frontends in the other, so removing one protocol's port touches only that
table. Three parts, as dnsd's controller / zone / records:
- change tracking: kwatch/changes.py's `ChangeTracker` (Service and EndpointSlice events mark
  Services dirty, with their trigger times), plus this node's zone here (a change of its
  topology label recomputes everything, as kube-proxy does);
- the rules of one Service: kpx/rules.py (pure);
- the proxier's state, the proxy's `FrontendMap`: kpx/frontends.py.
`ServiceTable.sync()` is the glue: it recomputes the dirty Services and applies their rules,
and a Service is forgotten by the tracker only once its rules are applied.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from kpx import metrics
from kpx.backends import Backend
from kpx.balancer import Balancer
from kpx.endpoints import NodeInfo
from kpx.frontends import Frontends
from kpx.rules import (
    Protocol,
    ServiceRules,
    Steer,
    SteerKey,
    compute_service,
    sctp_ports,
    should_skip_service,
)
from kwatch.changes import ChangeTracker
from kwatch.models import Node, Service
from kwatch.store import EventType, Store, StoreEvent

log = structlog.get_logger("kpx.table")


@dataclass(slots=True)
class SyncResult:
    """What one `ServiceTable.sync()` changed."""

    services: int = 0  # Services recomputed
    # Steering changes (None = no longer a frontend). Endpoint changes that keep a
    # frontend's steering as it was are absent: they never reach the kernel.
    steering: dict[SteerKey, Steer | None] = field(default_factory=dict)
    # Trigger times (epoch seconds) of the EndpointSlice changes this sync applied.
    trigger_times: list[float] = field(default_factory=list)
    # Backends no frontend offers any more: the proxy drains their open connections.
    removed_backends: list[Backend] = field(default_factory=list)
    # Backends offered again after none offered them (or for the first time): a drain still
    # running for them is called off.
    added_backends: list[Backend] = field(default_factory=list)
    full: bool = False

    def merge(self, later: SyncResult) -> None:
        """Fold a later chunk's result into this one: a backend removed by one chunk and
        offered again by the next (or the reverse) never left."""
        self.services += later.services
        self.steering.update(later.steering)
        self.trigger_times.extend(later.trigger_times)
        self.full = self.full or later.full
        for backend in later.added_backends:
            if backend in self.removed_backends:
                self.removed_backends.remove(backend)
            else:
                self.added_backends.append(backend)
        for backend in later.removed_backends:
            if backend in self.added_backends:
                self.added_backends.remove(backend)
            else:
                self.removed_backends.append(backend)


class ServiceTable:
    """Per-Service rules kept current from the stores; the proxy's `FrontendMap`."""

    def __init__(
        self,
        services: Store[Any],
        slices: Store[Any],
        nodes: Store[Any] | None,
        node_name: str,
        balancer: Balancer,
        on_change: Callable[[], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        local_client: Callable[[str], bool] | None = None,
        protocol: Protocol = "TCP",
    ) -> None:
        self.protocol = protocol
        self._services = services
        self._slices = slices
        self._nodes = nodes
        self.node_name = node_name
        self.balancer = balancer
        self.frontends = Frontends(balancer, local_client)
        # What the proxy reads per connection: bound once (no delegation on the hot path).
        self.lookup = self.frontends.lookup
        self.frontend_class = self.frontends.frontend_class
        self.steering = self.frontends.steering
        self.firewall = self.frontends.firewall
        self.no_local_endpoints = self.frontends.no_local_endpoints
        # A full recompute also takes Services whose deletion is not applied yet.
        self.changes = ChangeTracker(
            services,
            slices,
            everything=lambda: {*self.frontends.service_keys(), *services.keys()},
            since=wall_clock(),  # trigger times from before this table are history
        )
        if on_change is not None:
            self.changes.listen(on_change)
        self._zone: str | None = None
        # SCTP ports per Service (counted by the TCP table only, logged once per Service).
        self._sctp: dict[str, int] = {}
        if nodes is not None:
            nodes.subscribe(self._on_node)

    @property
    def pending(self) -> bool:
        return self.changes.pending

    def health_checks(self) -> dict[str, tuple[int, int]]:
        """Service key -> (healthCheckNodePort, local ready endpoints) for eTP Local LBs."""
        return self.frontends.health_checks()

    def _on_node(self, event: StoreEvent[Any]) -> None:
        if event.key != self.node_name:
            return
        node: Node | None = None if event.type == EventType.DELETED else event.obj
        zone = node.zone if node is not None else None
        if zone != self._zone:
            # kube-proxy resyncs everything when its node's topology labels change.
            self.changes.mark_all()

    def _node_info(self) -> NodeInfo:
        node = self._nodes.get(self.node_name) if self._nodes is not None else None
        self._zone = node.zone if node is not None else None
        return NodeInfo(self.node_name, self._zone)

    def sync(self, max_services: int | None = None, result: SyncResult | None = None) -> SyncResult:
        """Recompute dirty Services, at most `max_services` of them (`pending` stays true for
        the rest); returns what changed for the kernel and metrics (written into `result`
        when given, so that a caller still learns what was applied when this raises).

        A Service leaves the dirty set only once its rules are applied: an exception half-way
        leaves the rest (and the one that failed) for the next call. A Service whose rules
        cannot be computed keeps its last good rules (logged, counted)."""
        if result is None:
            result = SyncResult()
        batch = self.changes.take(max_services)
        result.full = batch.full
        node = self._node_info()
        self.frontends.begin()
        try:
            for key in batch.keys:
                self.frontends.set_service(key, self._compute(key, node))  # raises unchanged
                result.trigger_times.extend(self.changes.applied(key))
                result.services += 1
        finally:
            # Whatever was applied is resolved, even when a later Service raised.
            result.removed_backends, result.added_backends = self.frontends.end(result.steering)
        return result

    def _compute(self, key: str, node: NodeInfo) -> ServiceRules | None:
        svc = self._services.get(key)
        if self.protocol == "TCP":
            self._note_sctp(key, svc)
        if svc is None:
            return None
        try:
            slices = self._slices.by_index("service", key)
            return compute_service(svc, slices, node, self.protocol)
        except Exception as err:
            # A Service kpx cannot make sense of keeps what it had; the others go on.
            metrics.SERVICE_COMPUTE_FAILURES.inc()
            log.warning("service_rules_kept", key=key, problem=f"{type(err).__name__}: {err}")
            return self.frontends.rules(key)

    def _note_sctp(self, key: str, svc: Service | None) -> None:
        count = sctp_ports(svc) if svc is not None and not should_skip_service(svc) else 0
        old = self._sctp.pop(key, 0)
        if count:
            self._sctp[key] = count
            if not old:
                log.info("sctp_ports_ignored", service=key, ports=count)
        if count != old:
            metrics.SCTP_PORTS_IGNORED.inc(count - old)
