"""Backend choice per Service port: round robin, ClientIP affinity and failure cool-down.

Pure code (an injected clock and random source, no I/O), driven by the service table on the
control path and called by the proxy once per accepted connection on the hot path.

Semantics follow kube-proxy's userspace round robin (pkg/proxy/userspace/roundrobin.go), the
mode kpx descends from:
- the endpoint list is shuffled whenever it changes and the index restarts at 0;
- `sessionAffinity: ClientIP` pins a client IP to an endpoint per Service *port* when the
  endpoint is picked; the timer counts from the client's last new connection; the pin is
  dropped when its endpoint leaves;
- after a failed dial the next attempt ignores affinity (sessionAffinityReset) and the endpoint
  that then answers becomes the client's new pin.
What kube-proxy cannot do: a backend whose connects keep failing is skipped for a short, growing
cool-down, shared by every Service that uses it.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kpx.backends import Backend

Clock = Callable[[], float]


class EventCount:
    """A count kpx/metrics.py exports (as a counter). Not a prometheus_client Counter: a
    `--workers` process (kpx/worker.py) balances too, and sends its counts to the control
    process instead of importing prometheus_client (4 MB of every worker's resident set)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


# Times a backend was put in (or kept in) failure cool-down after a failed connect.
COOLDOWNS = EventCount()

# How many backends `candidates` returns: the pick plus fallbacks. kube-proxy's userspace
# tryConnect made four attempts (250 ms, 500 ms, 1 s, 2 s).
DEFAULT_MAX_CANDIDATES = 4


@dataclass(slots=True)
class _Failure:
    count: int  # consecutive failed connects
    until: float  # skipped while clock() < until


class FailureTracker:
    """Cool-down per backend address: 1st failure `base` seconds, doubling up to `cap`.

    Keyed on (ip, port) so one dead pod is skipped by every Service port that reaches it.
    """

    def __init__(self, clock: Clock, base: float = 1.0, cap: float = 30.0) -> None:
        self._clock = clock
        self.base = base
        self.cap = cap
        self._failures: dict[tuple[str, int], _Failure] = {}

    def __bool__(self) -> bool:
        return bool(self._failures)

    def cooling(self, backend: Backend, now: float) -> bool:
        entry = self._failures.get((backend.ip, backend.port))
        return entry is not None and now < entry.until

    def cooling_until(self, backend: Backend) -> float:
        entry = self._failures.get((backend.ip, backend.port))
        return entry.until if entry is not None else 0.0

    def failed(self, backend: Backend) -> None:
        key = (backend.ip, backend.port)
        entry = self._failures.get(key)
        count = entry.count + 1 if entry is not None else 1
        delay = min(self.base * 2 ** (count - 1), self.cap)
        self._failures[key] = _Failure(count, self._clock() + delay)
        COOLDOWNS.inc()

    def succeeded(self, backend: Backend) -> None:
        if self._failures:
            self._failures.pop((backend.ip, backend.port), None)

    def prune(self) -> None:
        """Forget backends that have been quiet for a full `cap` after their cool-down."""
        now = self._clock()
        stale = [k for k, f in self._failures.items() if now > f.until + self.cap]
        for key in stale:
            del self._failures[key]


@dataclass(slots=True)
class _Pin:
    backend: Backend
    last_used: float


# Pins per Service port at most: the size of kube-proxy's nftables affinity sets (an nft set's
# default size). Beyond it the least recently used pin goes (its client is balanced anew).
DEFAULT_AFFINITY_MAX_ENTRIES = 65535

# ClientIP affinity pins dropped because a Service port's table was full.
AFFINITY_EVICTIONS = EventCount()


class AffinityTable:
    """ClientIP -> endpoint pins of one Service port (shared by all its frontends), bounded
    to `max_entries` with least-recently-used eviction: a flood of client addresses (a
    scan, a big NAT pool) cannot grow it without limit."""

    def __init__(
        self, clock: Clock, timeout: float, max_entries: int = DEFAULT_AFFINITY_MAX_ENTRIES
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self.max_entries = max_entries
        self._pins: OrderedDict[str, _Pin] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, client_ip: str, now: float) -> Backend | None:
        pin = self._pins.get(client_ip)
        if pin is None:
            return None
        if now - pin.last_used > self.timeout:
            del self._pins[client_ip]
            return None
        return pin.backend

    def record(self, client_ip: str, backend: Backend) -> None:
        # Every new connection restarts the timer (userspace roundrobin.go: lastUsed = now).
        pins = self._pins
        pins[client_ip] = _Pin(backend, self._clock())
        pins.move_to_end(client_ip)  # most recently used last
        while len(pins) > self.max_entries:
            pins.popitem(last=False)
            AFFINITY_EVICTIONS.inc()

    def keep_only(self, backends: set[Backend]) -> None:
        """Drop pins to endpoints that left, and stale ones (userspace: purged on each update)."""
        now = self._clock()
        gone = [
            ip
            for ip, pin in self._pins.items()
            if pin.backend not in backends or now - pin.last_used > self.timeout
        ]
        for ip in gone:
            del self._pins[ip]


class RoundRobinPicker:
    """The `Picker` for one backend list (one Service port, one traffic scope, one family)."""

    __slots__ = (
        "_affinity",
        "_backends",
        "_clock",
        "_failures",
        "_max",
        "_members",
        "_next",
        "_rng",
    )

    def __init__(
        self,
        clock: Clock,
        rng: random.Random,
        failures: FailureTracker,
        affinity: AffinityTable | None,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self._failures = failures
        self._affinity = affinity
        self._max = max_candidates
        self._backends: list[Backend] = []
        self._members: frozenset[Backend] = frozenset()
        self._next = 0

    @property
    def backends(self) -> list[Backend]:
        return list(self._backends)

    def set_backends(self, backends: Iterable[Backend]) -> bool:
        """Replace the list; shuffled and index reset only when membership changed.

        Returns whether it changed. Keeping order and index on a no-op update keeps the rotation
        fair when an unrelated port or field of the Service changed.
        """
        members = frozenset(backends)
        if members == self._members:
            return False
        ordered = sorted(members, key=lambda b: (b.ip, b.port))
        self._rng.shuffle(ordered)
        self._backends = ordered
        self._members = members
        self._next = 0
        return True

    def set_affinity(self, affinity: AffinityTable | None) -> None:
        self._affinity = affinity

    # --- Picker protocol (hot path) ---------------------------------------------------------

    def candidates(self, client_ip: str) -> list[Backend]:
        backends = self._backends
        n = len(backends)
        if n == 0:
            return []
        now = self._clock()
        failures = self._failures
        affinity = self._affinity
        if affinity is not None:
            pinned = affinity.get(client_ip, now)
            if pinned is not None and pinned in self._members:
                if not (failures and failures.cooling(pinned, now)):
                    affinity.record(client_ip, pinned)  # a new connection restarts the timer
                    return self._with_fallbacks(pinned, backends.index(pinned), now)
        picked = self._pick(now)
        if affinity is not None:
            # Pinned at pick time, as kube-proxy does (userspace NextEndpoint, nftables
            # `update @affinity`): the client's next connections, even ones opened before this
            # connect completes, go to the same endpoint. `report_success` moves the pin if a
            # fallback answered instead.
            affinity.record(client_ip, picked[0])
        return picked

    def _pick(self, now: float) -> list[Backend]:
        """Round robin past cooling backends: the pick, then its fallbacks."""
        backends = self._backends
        n = len(backends)
        failures = self._failures
        start = self._next
        if not failures:
            self._next = (start + 1) % n
            if n == 1:
                return [backends[0]]
            return [backends[(start + i) % n] for i in range(min(n, self._max))]
        for i in range(n):
            index = (start + i) % n
            if not failures.cooling(backends[index], now):
                self._next = (index + 1) % n
                return self._with_fallbacks(backends[index], index, now)
        # Everything is cooling down: trying beats refusing; soonest-recovering first.
        self._next = (start + 1) % n
        ordered = sorted(backends, key=failures.cooling_until)
        return ordered[: self._max]

    def offers(self, backend: Backend, client_ip: str) -> bool:
        """Whether `backend` is still in this list (a UDP session checks it after a sync)."""
        return backend in self._members

    def report_success(self, backend: Backend, client_ip: str) -> None:
        self._failures.succeeded(backend)
        if self._affinity is not None and backend in self._members:
            self._affinity.record(client_ip, backend)

    def report_failure(self, backend: Backend) -> None:
        self._failures.failed(backend)

    # --- internals ----------------------------------------------------------------------------

    def _with_fallbacks(self, first: Backend, index: int, now: float) -> list[Backend]:
        """`first`, then the following backends in rotation order, cooling ones last."""
        backends = self._backends
        n = len(backends)
        out = [first]
        cooling: list[Backend] = []
        failures = self._failures
        for i in range(1, n):
            if len(out) >= self._max:
                break
            backend = backends[(index + i) % n]
            if failures and failures.cooling(backend, now):
                cooling.append(backend)
            else:
                out.append(backend)
        out.extend(cooling[: self._max - len(out)])
        return out


class LocalTrafficPicker:
    """The `Picker` of an external frontend (NodePort, externalIP, LB IP) of a Service with
    externalTrafficPolicy: Local.

    Clients from outside get this node's endpoints only; clients on this node (host processes)
    and pods (the cluster CIDRs) get the endpoints ClusterIP traffic would get. This is
    kube-proxy's short-circuit: "locally-originated pod -> external destination traffic ... is
    subject to neither form of traffic policy, which simulates going up-and-out to an external
    load-balancer and coming back in" (iptables/proxier.go, the EXT chain).
    """

    __slots__ = ("external", "internal", "is_local_client")

    def __init__(
        self,
        external: RoundRobinPicker,
        internal: RoundRobinPicker,
        is_local_client: Callable[[str], bool],
    ) -> None:
        self.external = external
        self.internal = internal
        self.is_local_client = is_local_client

    def _for(self, client_ip: str) -> RoundRobinPicker:
        return self.internal if self.is_local_client(client_ip) else self.external

    def candidates(self, client_ip: str) -> list[Backend]:
        return self._for(client_ip).candidates(client_ip)

    def offers(self, backend: Backend, client_ip: str) -> bool:
        return self._for(client_ip).offers(backend, client_ip)

    def report_success(self, backend: Backend, client_ip: str) -> None:
        self._for(client_ip).report_success(backend, client_ip)

    def report_failure(self, backend: Backend) -> None:
        self.external.report_failure(backend)  # the failure tracker is shared


# Which backend list of a Service port a picker serves: (scope, family 4|6), scope "internal"
# (ClusterIPs), "external" (NodePorts, externalIPs, LB IPs) or "cluster" (the short-circuit
# list of an externalTrafficPolicy Local port when "internal" is the local one too).
ListKey = tuple[str, int]


class _ServicePort:
    __slots__ = ("affinity", "pickers")

    def __init__(self) -> None:
        self.affinity: AffinityTable | None = None
        self.pickers: dict[ListKey, RoundRobinPicker] = {}


class Balancer:
    """Owns every picker; keeps their state (rotation, pins, cool-downs) across updates."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        cooldown_base: float = 1.0,
        cooldown_cap: float = 30.0,
        affinity_max_entries: int = DEFAULT_AFFINITY_MAX_ENTRIES,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._max = max_candidates
        self.failures = FailureTracker(clock, cooldown_base, cooldown_cap)
        self.affinity_max_entries = affinity_max_entries
        self._ports: dict[str, _ServicePort] = {}

    def __len__(self) -> int:
        return len(self._ports)

    def affinity_entries(self) -> int:
        """ClientIP pins held over every Service port (the kpx_affinity_entries gauge)."""
        return sum(len(e.affinity) for e in list(self._ports.values()) if e.affinity is not None)

    def update(
        self,
        port_id: str,
        lists: Mapping[ListKey, Iterable[Backend]],
        affinity_timeout: float | None,
    ) -> dict[ListKey, RoundRobinPicker]:
        """Set the backend lists of Service port `port_id`; returns its picker per list.

        Pickers of lists that still exist are the same objects as before, so the proxy's
        references and the rotation survive; pins to endpoints absent from every list go.
        """
        entry = self._ports.get(port_id)
        if entry is None:
            entry = self._ports[port_id] = _ServicePort()
        if affinity_timeout is None:
            entry.affinity = None
        elif entry.affinity is None:
            entry.affinity = AffinityTable(self._clock, affinity_timeout, self.affinity_max_entries)
        else:
            entry.affinity.timeout = affinity_timeout
        pickers: dict[ListKey, RoundRobinPicker] = {}
        everyone: set[Backend] = set()
        for key, backends in lists.items():
            picker = entry.pickers.get(key)
            if picker is None:
                picker = RoundRobinPicker(
                    self._clock, self._rng, self.failures, entry.affinity, self._max
                )
            picker.set_affinity(entry.affinity)
            picker.set_backends(backends)
            everyone.update(picker.backends)
            pickers[key] = picker
        entry.pickers = pickers
        if entry.affinity is not None:
            entry.affinity.keep_only(everyone)
        return dict(pickers)

    def remove(self, port_id: str) -> None:
        self._ports.pop(port_id, None)

    def sweep(self) -> None:
        """Periodic housekeeping: expire stale pins and forgotten failures."""
        for entry in self._ports.values():
            if entry.affinity is not None:
                members: set[Backend] = set()
                for picker in entry.pickers.values():
                    members.update(picker.backends)
                entry.affinity.keep_only(members)
        self.failures.prune()
