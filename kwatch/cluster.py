"""The set of stores a daemon needs, kept current from an API server or a manifest source."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from kwatch.access import AccessError, ClusterAccess, explicit, from_kubeconfig, in_cluster
from kwatch.backoff import Backoff
from kwatch.client import ApiClient
from kwatch.manifest import ManifestSource
from kwatch.reflector import Reflector
from kwatch.resources import ENDPOINTSLICES, PODS, Resource
from kwatch.settings import AccessSettings
from kwatch.store import Indexer, Store, pod_ips, slice_service_key
from kwatch.supervisor import Supervisor

log = structlog.get_logger("kwatch.cluster")

# Indexes every daemon gets for free: slices by owning Service, pods by IP.
DEFAULT_INDEXERS: dict[Resource, dict[str, Indexer]] = {
    ENDPOINTSLICES: {"service": slice_service_key},
    PODS: {"ip": pod_ips},
}


def access_from_settings(settings: AccessSettings) -> ClusterAccess:
    """Raises AccessError with a message naming the problem."""
    if settings.kubeconfig:
        return from_kubeconfig(settings.kubeconfig, settings.context)
    if settings.apiserver:
        return explicit(settings.apiserver, settings.token_file, settings.ca_file)
    return in_cluster()


class ClusterState:
    """Stores for `resources`, fed by reflectors (API) or one manifest source."""

    def __init__(
        self,
        resources: list[Resource],
        selectors: dict[Resource, tuple[str | None, str | None]] | None = None,
        backoff: Callable[[], Backoff] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.stores: dict[Resource, Store[Any]] = {
            r: Store(r.name, DEFAULT_INDEXERS.get(r)) for r in resources
        }
        self.selectors = selectors or {}
        self.backoff = backoff  # a fresh Backoff per reflector; tests pass a fast one
        # The daemon's supervisor: the watches restart under it after an unexpected error.
        self.supervisor = supervisor or Supervisor()
        self._own_supervisor = supervisor is None
        self.client: ApiClient | None = None
        self._tasks: list[str] = []
        self._synced = asyncio.Event()
        for store in self.stores.values():
            store.on_synced(self._check_synced)

    def store(self, resource: Resource) -> Store[Any]:
        return self.stores[resource]

    @property
    def synced(self) -> bool:
        return all(s.synced for s in self.stores.values())

    def readiness(self) -> tuple[bool, str]:
        waiting = [r.name for r, s in self.stores.items() if not s.synced]
        if waiting:
            return False, "waiting for initial sync of " + ", ".join(waiting)
        return True, "ok"

    async def start(self, settings: AccessSettings, user_agent: str) -> None:
        """Start feeding the stores in the background; returns at once."""
        if self.backoff is None:
            maximum = settings.api_backoff_max
            self.backoff = lambda: Backoff(initial=min(0.8, maximum), maximum=maximum)
        if settings.manifests:
            source = ManifestSource(settings.manifests, self.stores)
            self._spawn(source.run, "manifest")
        else:
            self._spawn(
                lambda: self._connect_and_watch(settings, user_agent), "connect", forever=False
            )

    async def wait_synced(self) -> None:
        """Return once every store holds its first complete state."""
        await self._synced.wait()

    def _check_synced(self) -> None:
        if self.synced:
            self._synced.set()

    async def stop(self) -> None:
        if self._own_supervisor:
            await self.supervisor.stop()
        self._tasks.clear()
        if self.client is not None:
            await self.client.close()

    def _new_backoff(self) -> Backoff:
        return self.backoff() if self.backoff is not None else Backoff()

    async def _connect_and_watch(self, settings: AccessSettings, user_agent: str) -> None:
        if self.client is not None:
            return  # restarted after the reflectors were started: they are supervised
        backoff = self._new_backoff()
        last_problem = ""
        while True:
            try:
                access = access_from_settings(settings)
                break
            except AccessError as err:
                # A kubeconfig or token that is not there yet may be mounted later.
                if str(err) != last_problem:
                    log.error("cluster_access_failed", problem=str(err))
                    last_problem = str(err)
                await asyncio.sleep(backoff.next())
        log.info("cluster_access", source=access.description, server=access.server)
        self.client = ApiClient(access, user_agent=user_agent, request_timeout=settings.api_timeout)
        for resource, store in self.stores.items():
            label, field = self.selectors.get(resource, (None, None))
            reflector = Reflector(
                self.client,
                resource,
                store,
                label_selector=label,
                field_selector=field,
                idle_timeout=settings.watch_idle_timeout,
                backoff=self._new_backoff(),
            )
            self._spawn(reflector.run, f"watch-{resource.name}")

    def _spawn(
        self, factory: Callable[[], Coroutine[Any, Any, None]], name: str, forever: bool = True
    ) -> None:
        self.supervisor.spawn(name, factory, forever=forever)
        self._tasks.append(name)
