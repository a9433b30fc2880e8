"""The proxier's state of one protocol: what each frontend serves, as the proxy reads it.

`Frontends` holds the rules last applied per Service (kpx/rules.py computes them) and what
they add up to: per frontend address, its picker (the balancer's backend lists), its steering
verdict for the kernel, its masquerade class (kpx/source.py) and its firewall. It is the
proxy's `FrontendMap`: `lookup(ip, port)` is the hot path, a dict read.

Applying a Service (`set_service`) changes only what that Service claims; within a round
(`begin` ... `end`) the touched frontends are resolved once, and the backends no Service offers
any more (or offered again) are reported, so the proxy can drain (or keep) their connections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kpx.backends import Backend, Picker
from kpx.balancer import Balancer, LocalTrafficPicker, RoundRobinPicker
from kpx.rules import (
    ServiceRules,
    Steer,
    SteerKey,
    frontend_firewall,
    frontend_steer,
    short_circuit_list,
    unique_backends,
)
from kpx.source import FrontendClass

FrontendPicker = RoundRobinPicker | LocalTrafficPicker
# What one Service port claims for a steering key: its picker, steering, masquerade class and
# firewall (loadBalancerSourceRanges of this family; None: no firewall).
_Owner = tuple[FrontendPicker, Steer, FrontendClass, tuple[str, ...] | None]
BackendAddress = tuple[str, int]


class Frontends:
    """Per-Service rules applied, and the frontend maps they make."""

    def __init__(
        self, balancer: Balancer, local_client: Callable[[str], bool] | None = None
    ) -> None:
        self.balancer = balancer
        # Whether a client IP is on this node or in the cluster CIDRs; None disables the
        # externalTrafficPolicy Local short-circuit (external frontends: local endpoints only).
        self.local_client = local_client
        self._results: dict[str, ServiceRules] = {}
        # Per steering key, per Service port claiming it: its picker and its steering.
        self._owners: dict[SteerKey, dict[str, _Owner]] = {}
        self._by_address: dict[tuple[str, int], Picker] = {}
        self._by_node_port: dict[tuple[int, int], Picker] = {}
        # Keyed like the two maps above ((ip, port) or (family, port)): transparent mode's
        # per-connection question "whose address may the backend see" (kpx/source.py).
        self._classes: dict[Any, FrontendClass] = {}
        self.steering: dict[SteerKey, Steer] = {}
        # LB frontends with loadBalancerSourceRanges -> the ranges allowed (kpx/nft.py's
        # firewall sets); read whole by the nftables writer, which applies the difference.
        self.firewall: dict[SteerKey, tuple[str, ...]] = {}
        # How many Services offer each backend (ip, port); absent means it left everywhere.
        self._backend_refs: dict[BackendAddress, int] = {}
        # Sums of ServiceRules.no_local_internal / no_local_external over all Services.
        self.no_local_endpoints = {"internal": 0, "external": 0}
        # Kept incrementally so a sync costs O(changed Services), not O(all Services).
        self._health_checks: dict[str, tuple[int, int]] = {}
        # The round in progress: frontends to resolve, backends released and taken up.
        self._touched: set[SteerKey] = set()
        self._released: dict[BackendAddress, Backend] = {}
        self._added: dict[BackendAddress, Backend] = {}
        # Called with each Service key once its rules are applied (kpx/worker_feed.py).
        self.on_applied: Callable[[str], object] | None = None

    # --- FrontendMap (hot path) ---------------------------------------------------------------

    def lookup(self, ip: str, port: int) -> Picker | None:
        picker = self._by_address.get((ip, port))
        if picker is not None:
            return picker
        if ip.startswith("::ffff:") and "." in ip:  # IPv4-mapped, from a dual-stack socket
            return self.lookup(ip[7:], port)
        return self._by_node_port.get((6 if ":" in ip else 4, port))

    def frontend_class(self, ip: str, port: int) -> FrontendClass | None:
        """The masquerade class of the frontend `lookup(ip, port)` finds (kpx/source.py)."""
        found = self._classes.get((ip, port))
        if found is not None:
            return found
        if ip.startswith("::ffff:") and "." in ip:
            return self.frontend_class(ip[7:], port)
        return self._classes.get((6 if ":" in ip else 4, port))

    # --- reading ------------------------------------------------------------------------------

    def rules(self, key: str) -> ServiceRules | None:
        """The rules applied for Service `key` (None: it has no frontend here)."""
        return self._results.get(key)

    def service_keys(self) -> list[str]:
        """Services with applied rules."""
        return list(self._results)

    def health_checks(self) -> dict[str, tuple[int, int]]:
        """Service key -> (healthCheckNodePort, local ready endpoints) for eTP Local LBs."""
        return dict(self._health_checks)

    # --- applying -----------------------------------------------------------------------------

    def begin(self) -> None:
        """Start a round of `set_service` calls."""
        self._touched = set()
        self._released = {}
        self._added = {}

    def set_service(self, key: str, new: ServiceRules | None) -> None:
        """Make `new` the applied rules of `key`. What can fail (the balancer, the pickers)
        runs before anything changes, so a failure leaves `key` as it was."""
        old = self._results.get(key)
        self._touched |= self._apply(key, new)
        for backend in unique_backends(old):
            self._release(backend)
        for backend in unique_backends(new):
            addr = (backend.ip, backend.port)
            count = self._backend_refs.get(addr, 0)
            if count == 0:
                self._added[addr] = backend
            self._backend_refs[addr] = count + 1
        if self.on_applied is not None:
            self.on_applied(key)

    def end(self, steering: dict[SteerKey, Steer | None]) -> tuple[list[Backend], list[Backend]]:
        """Close the round (also after a failed `set_service`: whatever was applied counts):
        record the steering changes into `steering`; returns the backends no frontend offers
        any more and those offered again."""
        for steer_key in self._touched:
            self._resolve(steer_key, steering)
        removed = [b for addr, b in self._released.items() if addr not in self._backend_refs]
        # Released by one Service and taken up by another in this same round: never left.
        added = [b for addr, b in self._added.items() if addr not in self._released]
        self.begin()
        return removed, added

    def _release(self, backend: Backend) -> None:
        addr = (backend.ip, backend.port)
        count = self._backend_refs.get(addr, 0) - 1
        if count <= 0:
            self._backend_refs.pop(addr, None)
            self._released[addr] = backend
        else:
            self._backend_refs[addr] = count

    def _apply(self, key: str, new: ServiceRules | None) -> set[SteerKey]:
        planned: list[tuple[SteerKey, str, _Owner]] = []
        if new is not None:
            short_circuit = self.local_client is not None
            for port in new.ports:
                pickers = self.balancer.update(port.port_id, port.backends, port.affinity_timeout)
                for fe in port.frontends:
                    plain = pickers[(fe.scope, fe.family)]
                    picker: FrontendPicker = plain
                    if fe.scope == "external" and port.external_local and self.local_client:
                        inside = pickers[short_circuit_list(port, fe.family)]
                        picker = LocalTrafficPicker(plain, inside, self.local_client)
                    steer = frontend_steer(port, fe, short_circuit)
                    owner = (
                        picker,
                        steer,
                        fe.source_class(port.external_local),
                        frontend_firewall(port, fe),
                    )
                    planned.append((fe.steer_key, port.port_id, owner))
        touched: set[SteerKey] = set()
        old = self._results.pop(key, None)
        for rules, sign in ((old, -1), (new, 1)):
            if rules is not None:
                self.no_local_endpoints["internal"] += sign * rules.no_local_internal
                self.no_local_endpoints["external"] += sign * rules.no_local_external
        self._health_checks.pop(key, None)
        if new is not None and new.health_check_node_port:
            self._health_checks[key] = (new.health_check_node_port, new.local_ready_endpoints)
        new_ids = {p.port_id for p in new.ports} if new is not None else set()
        if old is not None:
            for port in old.ports:
                for fe in port.frontends:
                    self._owners.get(fe.steer_key, {}).pop(port.port_id, None)
                    touched.add(fe.steer_key)
                if port.port_id not in new_ids:
                    self.balancer.remove(port.port_id)
        for steer_key, port_id, owner in planned:
            self._owners.setdefault(steer_key, {})[port_id] = owner
            touched.add(steer_key)
        if new is not None:
            self._results[key] = new
        return touched

    def _resolve(self, steer_key: SteerKey, changes: dict[SteerKey, Steer | None]) -> None:
        """Point the lookup maps at the owner of `steer_key`; record steering changes."""
        family, ip, port = steer_key
        owners = self._owners.get(steer_key)
        picker: FrontendPicker | None = None
        state: Steer | None = None
        source_class: FrontendClass = "internal"
        firewall: tuple[str, ...] | None = None
        if owners:
            # Two Services claiming one address:port is a user error; the lowest port id wins
            # deterministically, and the other takes over if the winner goes away.
            picker, state, source_class, firewall = owners[min(owners)]
        else:
            self._owners.pop(steer_key, None)
        if firewall is None:
            self.firewall.pop(steer_key, None)
        else:
            self.firewall[steer_key] = firewall
        target = self._by_address if ip else self._by_node_port
        lookup_key: Any = (ip, port) if ip else (family, port)
        if picker is None:
            target.pop(lookup_key, None)
            self._classes.pop(lookup_key, None)
        else:
            target[lookup_key] = picker
            self._classes[lookup_key] = source_class
        if self.steering.get(steer_key) != state:
            if state is None:
                self.steering.pop(steer_key, None)
            else:
                self.steering[steer_key] = state
            changes[steer_key] = state
