"""`--workers N`, control side: after each recompute of the TCP table, the Services whose
applied rules changed go to every worker (kpx/worker_pool.py) before nftables is programmed.

`FedWriter` wraps the steering writer the syncer calls (kpx/sync.py `SteeringWriter`): its
`sync` first publishes the changed Services' rules and waits until every worker applied them,
then updates nftables. So no rule steers a connection to a frontend a worker does not know
yet, and a change is in every worker when the kernel is; the programming latency
(kubeproxy_network_programming_duration_seconds) includes the workers' acknowledgements.
Only what changed travels: the table's `Frontends` reports every Service it applies
(`on_applied`), and a worker that (re)starts gets every Service's rules at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kpx.frontends import Frontends
from kpx.rules import ServiceRules, Steer, SteerKey
from kpx.sync import SteeringWriter
from kpx.worker_pool import WorkerPool


def rules_snapshot(frontends: Frontends) -> dict[str, ServiceRules | None]:
    """Every Service's applied rules (a new worker's first message)."""
    return {key: frontends.rules(key) for key in frontends.service_keys()}


class FedWriter:
    """A `SteeringWriter` that feeds the workers before the kernel."""

    def __init__(self, inner: SteeringWriter, frontends: Frontends, pool: WorkerPool) -> None:
        self.inner = inner
        self.frontends = frontends
        self.pool = pool
        # Services applied since the last publish.
        self._changed: set[str] = set()
        frontends.on_applied = self._applied

    def _applied(self, key: str) -> None:
        self._changed.add(key)

    @property
    def needs_full(self) -> bool:
        return self.inner.needs_full

    @needs_full.setter
    def needs_full(self, value: bool) -> None:
        self.inner.needs_full = value

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool:
        if self._changed:
            keys, self._changed = self._changed, set()
            try:
                await self.pool.publish({key: self.frontends.rules(key) for key in keys})
            except BaseException:
                self._changed |= keys
                raise
        return await self.inner.sync(steering, changed)

    async def remove(self) -> None:
        await self.inner.remove()
