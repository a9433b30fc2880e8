"""dnsd settings: CoreDNS's defaults, flags, environment, and clear errors."""

from __future__ import annotations

import pytest

from dnsd.handler import PodMode
from dnsd.settings import DnsdSettings, parse_hostport
from kwatch.settings import SettingsError, load_settings


def load(*argv: str, env: dict[str, str] | None = None) -> DnsdSettings:
    return load_settings(
        DnsdSettings, list(argv), env_prefix="DNSD", prog="dnsd", environ=env or {}
    )


def test_defaults_are_corednss():
    s = load()
    assert s.zone == ["cluster.local"] and s.ttl == 5 and s.pods is PodMode.DISABLED
    assert s.listen == ["0.0.0.0:53"] and s.http_listen == ":9153" and s.workers == 1
    assert s.cache_size == 9984 and s.cache_max_ttl == 3600 and s.cache_max_negative_ttl == 1800
    assert s.max_concurrent == 1000 and s.forward_timeout == 2.0
    assert not s.endpoint_pod_names and not s.ignore_empty_service and s.namespaces == []


def test_repeatable_flags_and_environment_lists():
    s = load(
        "--zone",
        "Cluster.Local.",
        "--zone",
        "example.internal",
        "--listen",
        "[::1]:53",
        "--listen",
        "127.0.0.1:5353",
        env={"DNSD_UPSTREAM": "192.0.2.1,192.0.2.2:5353"},
    )
    assert s.zone == ["cluster.local", "example.internal"]
    assert s.listen_addresses() == [("::1", 53), ("127.0.0.1", 5353)]
    assert s.upstream_addresses() == [("192.0.2.1", 53), ("192.0.2.2", 5353)]


def test_stub_domains_map_a_zone_to_its_servers():
    s = load(
        "--stub-domain",
        "acme.local=10.0.0.53",
        "--stub-domain",
        "acme.local=[fd00::53]:5353",
        "--stub-domain",
        "corp.example=10.1.0.1:54",
    )
    assert s.stub_domains() == {
        "acme.local": [("10.0.0.53", 53), ("fd00::53", 5353)],
        "corp.example": [("10.1.0.1", 54)],
    }


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--ttl", "3601"], "--ttl"),
        (["--pods", "sometimes"], "--pods"),
        (["--zone", "a..b"], "--zone"),
        (["--listen", "nowhere"], "--listen"),
        (["--stub-domain", "acme.local"], "--stub-domain"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(SettingsError) as err:
        load(*argv)
    assert flag in str(err.value)


def test_hostport_forms():
    assert parse_hostport("10.0.0.1") == ("10.0.0.1", 53)
    assert parse_hostport("10.0.0.1:5353") == ("10.0.0.1", 5353)
    assert parse_hostport("fd00::1") == ("fd00::1", 53)
    assert parse_hostport("[fd00::1]:54") == ("fd00::1", 54)
