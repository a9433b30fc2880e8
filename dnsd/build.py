"""Parts built from the settings by more than one process: the parent daemon (dnsd.main) and
the --forward-process child (dnsd.forward_child) forward alike because both call these."""

from __future__ import annotations

from dnsd.cache import DnsCache
from dnsd.forward import Forwarder, read_resolv_conf
from dnsd.settings import DnsdSettings
from dnsd.zone import ZoneIndex


def build_cache(settings: DnsdSettings) -> DnsCache | None:
    """The cache in front of the upstreams; None with --cache-size 0."""
    if settings.cache_size <= 0:
        return None
    return DnsCache(
        max_entries=settings.cache_size,
        max_ttl=settings.cache_max_ttl,
        max_negative_ttl=settings.cache_max_negative_ttl,
        prefetch=settings.prefetch,
        prefetch_duration=settings.prefetch_duration,
        prefetch_percentage=settings.prefetch_percentage,
        stale_for=settings.serve_stale,
    )


def build_forwarder(settings: DnsdSettings) -> Forwarder:
    """The forwarder with its own cache: --upstream (else --resolv-conf), stub domains, policy."""
    upstreams = settings.upstream_addresses() or read_resolv_conf(settings.resolv_conf)
    return Forwarder(
        upstreams,
        stub_domains=settings.stub_domains(),
        cache=build_cache(settings),
        timeout=settings.forward_timeout,
        max_inflight=settings.max_concurrent,
        policy=settings.forward_policy,
    )


def build_index(settings: DnsdSettings) -> ZoneIndex:
    """An empty zone index of the configured zones (the controller fills the parent's)."""
    return ZoneIndex(settings.zone, settings.ttl, settings.external_zone, settings.multicluster)
