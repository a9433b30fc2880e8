"""One TCP data plane's parts as both the single kpx process (kpx/main.py) and each worker
(kpx/worker.py, `--workers N`) assemble them: the links a backend may share with the node
(kpx/links.py), transparent mode's source-address rule (kpx/source.py) and the `Proxy`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kpx.backends import FrontendMap
from kpx.links import SharedLinks
from kpx.local import LocalClients
from kpx.proxy import Proxy
from kpx.source import FrontendClass, SourceAddresses


class ClassifiedFrontends(FrontendMap, Protocol):
    def frontend_class(self, ip: str, port: int) -> FrontendClass | None: ...


class ProxyOptions(Protocol):
    """What the proxy takes from the settings (KpxSettings, or a worker's WorkerConfig)."""

    @property
    def connect_timeouts(self) -> Sequence[float]: ...
    @property
    def max_connections(self) -> int | None: ...
    @property
    def drain_timeout(self) -> float | None: ...
    @property
    def idle_timeout(self) -> float | None: ...
    @property
    def cluster_cidrs(self) -> Sequence[str]: ...
    @property
    def masquerade_all(self) -> bool: ...


def build_proxy(
    frontends: ClassifiedFrontends,
    local_clients: LocalClients,
    options: ProxyOptions,
    transparent: bool,
) -> tuple[Proxy, SharedLinks]:
    """The proxy over `frontends`, and the shared-link view its dials consult (refreshed here
    once in transparent mode; the caller refreshes it from then on)."""
    shared_links = SharedLinks(node_addresses=lambda: local_clients.addresses)
    if transparent:
        shared_links.refresh()
    source = SourceAddresses(
        frontends.frontend_class,
        lambda: local_clients.addresses,
        local_clients.in_cluster if options.cluster_cidrs else None,
        options.masquerade_all,
    )
    proxy = Proxy(
        frontends,
        connect_ladder=options.connect_timeouts,
        max_connections=options.max_connections,
        drain_timeout=options.drain_timeout,
        idle_timeout=options.idle_timeout,
        transparent=transparent,
        source_address=source if transparent else None,
        same_link=shared_links,
    )
    return proxy, shared_links
