"""dnsd settings: CoreDNS's defaults, flags, environment, and clear errors."""

from __future__ import annotations

import pytest

from dnsd.handler import PodMode
from dnsd.main import Daemon, main
from dnsd.settings import DnsdSettings, parse_hostport
from dnsd.settings import load as load_or_exit
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
        (["--transfer-to", "10.0.0.0/33"], "--transfer-to"),
        (["--prefetch-percentage", "5"], "--prefetch-percentage"),
        (["--serve-stale", "-1"], "--serve-stale"),
        (["--shared-namespaces", "kube-system"], "--shared-namespaces"),
        (["--namespace-isolation", "--shared-namespaces", "a.b"], "--shared-namespaces"),
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


STUBS = {"corp.example": [("10.1.0.53", 53), ("10.1.0.54", 5353)], "acme.local": [("fd00::53", 53)]}
STUBS_ONE_LINE = "corp.example=10.1.0.53,10.1.0.54:5353,acme.local=fd00::53"


def test_stub_domains_mean_the_same_from_flags_environment_and_config(tmp_path):
    flags = load(
        "--stub-domain",
        "corp.example=10.1.0.53,10.1.0.54:5353",
        "--stub-domain",
        "acme.local=fd00::53",
    )
    env = load(env={"DNSD_STUB_DOMAIN": STUBS_ONE_LINE})
    config = tmp_path / "dnsd.yaml"
    config.write_text(
        "stub_domain: ['corp.example=10.1.0.53,10.1.0.54:5353', 'acme.local=fd00::53']\n"
    )
    config_list = load("--config", str(config))
    config.write_text(f"stub-domain: '{STUBS_ONE_LINE}'\n")
    config_string = load("--config", str(config))
    flag_string = load("--stub-domain", STUBS_ONE_LINE)
    for s in (flags, env, config_list, config_string, flag_string):
        assert s.stub_domains() == STUBS


@pytest.mark.parametrize(
    "value,problem",
    [
        ("10.1.0.53", "expected ZONE=ADDR[:PORT]"),
        ("corp.example=", "expected ZONE=ADDR[:PORT]"),
        ("=10.1.0.53", "expected ZONE=ADDR[:PORT]"),
        ("corp.example=dns.corp.example", "'dns.corp.example'"),
        ("corp.example=10.1.0.53:0", "'10.1.0.53:0'"),
        ("corp..example=10.1.0.53", "corp..example"),
    ],
)
def test_a_bad_stub_domain_names_the_option_and_where_it_came_from(tmp_path, value, problem):
    with pytest.raises(SettingsError) as err:
        load(env={"DNSD_STUB_DOMAIN": value})
    assert "invalid setting --stub-domain (environment DNSD_STUB_DOMAIN)" in str(err.value)
    assert problem in str(err.value)
    config = tmp_path / "dnsd.yaml"
    config.write_text(f"stub_domain: ['{value}']\n")
    with pytest.raises(SettingsError, match=rf"--stub-domain \(config {config}\)"):
        load("--config", str(config))


@pytest.mark.parametrize(
    "value",
    [
        "resolver.example",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:dns",
        "10.0.0.1:",
        "[10.0.0.1]:53",
        "[fd00::1",
        "[fd00::1]53",
        "[fd00::1]:",
        "10.0.0.1,nowhere",
    ],
)
def test_a_bad_upstream_stops_the_start_with_status_2(value, capsys):
    # dnsd.settings.load is the first thing main() does; it never starts the daemon.
    with pytest.raises(SystemExit) as exit_:
        load_or_exit(["--upstream", value], environ={})
    assert exit_.value.code == 2
    assert "dnsd: invalid setting --upstream (flag)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # the same value from the environment
        load_or_exit([], environ={"DNSD_UPSTREAM": value})
    assert exit_.value.code == 2
    assert "--upstream (environment DNSD_UPSTREAM)" in capsys.readouterr().err


def test_upstreams_take_ipv4_and_ipv6_with_or_without_a_port():
    s = load("--upstream", "[::1]:53", "--upstream", "fd00::2,[fd00::3]")
    assert s.upstream_addresses() == [("::1", 53), ("fd00::2", 53), ("fd00::3", 53)]


def test_help_shows_plain_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--pods {disabled,insecure,verified}" in text
    assert "(default: disabled)" in text and "PodMode" not in text
    assert "(default: cluster.local)" in text and "['" not in text
    assert "(default: 0.0.0.0:53)" in text and "(default: auto)" in text


def test_the_options_of_issue_15_from_flags_and_environment():
    s = load(
        "--transfer-to",
        "10.0.0.0/8",
        "--prefetch",
        "10",
        "--serve-stale",
        "3600",
        "--autopath",
        env={"DNSD_NAMESPACE_ISOLATION": "true", "DNSD_SHARED_NAMESPACES": "kube-system,Mon"},
    )
    assert s.transfer_to == ["10.0.0.0/8"] and s.prefetch == 10 and s.serve_stale == 3600
    assert s.autopath and s.namespace_isolation
    assert s.shared_namespaces == ["kube-system", "mon"]
    off = load()
    assert not off.autopath and not off.namespace_isolation and off.transfer_to == []
    assert off.prefetch == 0 and off.serve_stale == 0
    assert (off.prefetch_duration, off.prefetch_percentage) == (60, 10)  # CoreDNS's defaults


def test_forward_policy_is_random_by_default_and_reaches_the_forwarder():
    assert load().forward_policy == "random"  # CoreDNS forward's default
    assert load("--forward-policy", "round_robin").forward_policy == "round_robin"
    assert load(env={"DNSD_FORWARD_POLICY": "sequential"}).forward_policy == "sequential"
    with pytest.raises(SettingsError) as err:
        load(env={"DNSD_FORWARD_POLICY": "fastest"})
    assert "--forward-policy" in str(err.value)
    argv = ["--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0"]
    daemon = Daemon(load(*argv, "--forward-policy", "sequential"))
    assert daemon.forwarder.policy == "sequential"
