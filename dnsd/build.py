"""Parts built from the settings by more than one process: the parent daemon (dnsd.main) and
the --forward-process child (dnsd.forward_child) forward alike because both build them from
the same plain values.

The parent turns its settings into those values once (`forward_options`: upstreams read from
resolv.conf there, stub domains parsed there) and hands the child the same dictionary as JSON,
so the child never imports the settings model, pydantic or the API object models: it stays a
small process (measured in dnsd/forward_child.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dnsd.cache import DnsCache
from dnsd.forward import Forwarder, read_resolv_conf
from dnsd.zone import ZoneIndex

if TYPE_CHECKING:
    from dnsd.settings import DnsdSettings

ForwardOptions = dict[str, Any]  # JSON-able: lists where a tuple was, no other change


def forward_options(settings: DnsdSettings) -> ForwardOptions:
    """The forwarder's and the zone index's values: --upstream (else --resolv-conf), stub
    domains, policy, cache; the zones the index is made of."""
    cache = None
    if settings.cache_size > 0:
        cache = {
            "max_entries": settings.cache_size,
            "max_ttl": settings.cache_max_ttl,
            "max_negative_ttl": settings.cache_max_negative_ttl,
            "prefetch": settings.prefetch,
            "prefetch_duration": settings.prefetch_duration,
            "prefetch_percentage": settings.prefetch_percentage,
            "stale_for": settings.serve_stale,
        }
    return {
        "upstreams": settings.upstream_addresses() or read_resolv_conf(settings.resolv_conf),
        "stub_domains": settings.stub_domains(),
        "cache": cache,
        "timeout": settings.forward_timeout,
        "max_inflight": settings.max_concurrent,
        "policy": settings.forward_policy,
        # The loop probes' names (dnsd/forward_loop.py), the same in the child, and the
        # upstreams found looping so far (the parent adds to it; a new child starts with them).
        "loop_seed": secrets.randbits(31) if settings.loop_detect else None,
        "looping": [],
        "zones": list(settings.zone),
        "ttl": settings.ttl,
        "external_zones": list(settings.external_zone),
        "multicluster": list(settings.multicluster),
    }


def _addresses(values: Any) -> list[tuple[str, int]]:
    return [(str(host), int(port)) for host, port in values]


def build_forwarder(
    options: ForwardOptions, on_loop: Callable[[str], None] | None = None
) -> Forwarder:
    """The forwarder with its own cache (none for --cache-size 0); `on_loop` is told the
    label of an upstream it finds looping."""
    cache = options["cache"]
    forwarder = Forwarder(
        _addresses(options["upstreams"]),
        stub_domains={
            zone: _addresses(servers) for zone, servers in options["stub_domains"].items()
        },
        cache=DnsCache(**cache) if cache is not None else None,
        timeout=options["timeout"],
        max_inflight=options["max_inflight"],
        policy=options["policy"],
        loop_seed=options.get("loop_seed"),
        on_loop=on_loop,
    )
    for label in options.get("looping", ()):
        forwarder.mark_looping(label)
    return forwarder


def build_index(options: ForwardOptions) -> ZoneIndex:
    """An empty zone index of the configured zones (the controller fills the parent's)."""
    return ZoneIndex(
        options["zones"], options["ttl"], options["external_zones"], options["multicluster"]
    )
