"""kpx settings: kube-proxy defaults, flags, environment, KubeProxyConfiguration files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpx.settings import KpxSettings, parse_duration, parse_durations
from kwatch.settings import SettingsError, load_settings


def load(argv: list[str], env: dict[str, str] | None = None) -> KpxSettings:
    return load_settings(KpxSettings, argv, env_prefix="KPX", prog="kpx", environ=env or {})


def test_defaults_are_kube_proxys():
    s = load([])
    assert s.mode == "nftables"
    assert s.healthz_bind_address == "0.0.0.0:10256"
    assert s.metrics_bind_address == "127.0.0.1:10249"
    assert s.nodeport_addresses == []
    assert s.connect_timeouts == [0.25, 0.5, 1.0, 2.0]
    assert s.idle_timeout is None  # kube-proxy never closes an idle TCP connection
    assert s.health_timeout == 60.0
    assert s.node_name  # the hostname


def test_flags_and_environment():
    s = load(
        [
            "--mode",
            "ports",
            "--node-name",
            "Node-A",
            "--nodeport-addresses",
            "10.0.0.0/8",
            "--nodeport-addresses",
            "fd00::/64",
            "--connect-timeouts",
            "0.1",
            "--connect-timeouts",
            "300ms",
            "--min-sync-period",
            "10ms",
        ],
        {"KPX_PROXY_PORT": "15001", "KPX_DRAIN_TIMEOUT": "1m"},
    )
    assert s.mode == "ports" and s.node_name == "node-a"
    assert s.nodeport_addresses == ["10.0.0.0/8", "fd00::/64"]
    assert s.connect_timeouts == [0.1, 0.3]
    assert s.min_sync_period == pytest.approx(0.01)
    assert s.proxy_port == 15001 and s.drain_timeout == 60.0


def test_bad_values_name_the_flag():
    with pytest.raises(SettingsError, match="--nodeport-addresses"):
        load(["--nodeport-addresses", "banana"])
    with pytest.raises(SettingsError, match="--mode"):
        load(["--mode", "ipvs"])
    with pytest.raises(SettingsError, match="--healthz-bind-address"):
        load(["--healthz-bind-address", "nowhere"])
    with pytest.raises(SettingsError, match="--connect-timeouts"):
        load(["--connect-timeouts", "0"])


def test_kube_proxy_configuration_file(tmp_path: Path):
    config = tmp_path / "kube-proxy.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "mode: iptables\n"
        "healthzBindAddress: 0.0.0.0:12345\n"
        "metricsBindAddress: 127.0.0.1:12346\n"
        "nodePortAddresses: [192.168.0.0/16]\n"
        "minSyncPeriod: 1s\n"
        "clusterCIDR: 10.244.0.0/16,fd00:244::/56\n"
        "syncPeriod: 1m30s\n"
        "conntrack: {maxPerCore: 32768}\n"
    )
    s = load(["--config", str(config), "--metrics-bind-address", "127.0.0.1:9999"])
    assert s.mode == "nftables"
    assert s.healthz_bind_address == "0.0.0.0:12345"
    assert s.metrics_bind_address == "127.0.0.1:9999"  # flags win
    assert s.nodeport_addresses == ["192.168.0.0/16"]
    assert s.min_sync_period == 1.0 and s.sync_period == 90.0
    assert s.cluster_cidrs == ["10.244.0.0/16", "fd00:244::/56"]


def test_own_keys_in_a_config_file_still_reject_unknown_ones(tmp_path: Path):
    config = tmp_path / "kpx.yaml"
    config.write_text("proxy-port: 20000\n")
    assert load(["--config", str(config)]).proxy_port == 20000
    config.write_text("no_such_option: 1\n")
    with pytest.raises(SettingsError, match="no-such-option"):
        load(["--config", str(config)])


def test_go_durations():
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("1h2m3s") == 3723.0
    assert parse_duration("2.5") == 2.5
    assert parse_duration("soon") == "soon"
    assert parse_duration(3) == 3


@pytest.mark.parametrize(
    "form",
    ["0.1,300ms,1s", "0.1, 300ms ,1s", "0.1,,300ms,1s,"],
)
def test_connect_timeouts_take_the_same_comma_separated_forms_from_flag_env_and_config(
    form: str, tmp_path: Path
):
    expected = pytest.approx([0.1, 0.3, 1.0])
    assert load(["--connect-timeouts", form]).connect_timeouts == expected
    assert load([], {"KPX_CONNECT_TIMEOUTS": form}).connect_timeouts == expected
    config = tmp_path / "kpx.yaml"
    config.write_text(f"connect_timeouts: '{form}'\n")
    assert load(["--config", str(config)]).connect_timeouts == expected
    # Lists and repeats of such texts too: YAML lists, repeated flags.
    config.write_text("connect-timeouts: [0.1, 300ms, '1s']\n")
    assert load(["--config", str(config)]).connect_timeouts == expected
    repeated = ["--connect-timeouts", "0.1,300ms", "--connect-timeouts", "1s"]
    assert load(repeated).connect_timeouts == expected
    config.write_text("connect_timeouts: 2\n")  # one number: one attempt
    assert load(["--config", str(config)]).connect_timeouts == [2.0]


def test_bad_connect_timeouts_are_a_clear_error_naming_the_entry_and_its_source(tmp_path: Path):
    with pytest.raises(SettingsError, match=r"--connect-timeouts \(flag\).*'soon' is not a"):
        load(["--connect-timeouts", "0.1,soon"])
    with pytest.raises(SettingsError, match=r"\(environment KPX_CONNECT_TIMEOUTS\).*'-1'.*> 0"):
        load([], {"KPX_CONNECT_TIMEOUTS": "0.5,-1"})
    config = tmp_path / "kpx.yaml"
    config.write_text("connect_timeouts: '0.5,0s'\n")
    with pytest.raises(SettingsError, match=r"--connect-timeouts \(config .*'0s'.*> 0"):
        load(["--config", str(config)])
    config.write_text("connect_timeouts: [true]\n")
    with pytest.raises(SettingsError, match="True is not a duration"):
        load(["--config", str(config)])
    with pytest.raises(SettingsError, match="at least one timeout"):
        load(["--connect-timeouts", ","])
    with pytest.raises(ValueError, match="'1x' is not a duration"):
        parse_durations("1x")


def test_idle_timeout_from_flag_environment_and_config(tmp_path: Path):
    assert load(["--idle-timeout", "5m"]).idle_timeout == 300.0
    assert load([], {"KPX_IDLE_TIMEOUT": "90"}).idle_timeout == 90.0
    config = tmp_path / "kpx.yaml"
    config.write_text("idle_timeout: 1h\n")
    assert load(["--config", str(config)]).idle_timeout == 3600.0
    with pytest.raises(SettingsError, match="--idle-timeout"):
        load(["--idle-timeout", "0"])


def test_nodeport_addresses_primary_from_a_flag_or_a_kube_proxy_configuration(
    tmp_path: Path,
) -> None:
    assert load(["--nodeport-addresses", "primary"]).nodeport_primary
    assert not load(["--nodeport-addresses", "10.0.0.0/8"]).nodeport_primary
    config = tmp_path / "kube-proxy.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "nodePortAddresses: [primary]\n"
        "masqueradeAll: true\n"
    )
    s = load(["--config", str(config)])
    assert s.nodeport_addresses == ["primary"] and s.nodeport_primary
    assert s.masquerade_all is True


def test_nodeport_addresses_primary_stands_alone() -> None:
    with pytest.raises(SettingsError, match="primary stands alone"):
        load(["--nodeport-addresses", "primary,10.0.0.0/8"])


def test_source_address_mode_choices() -> None:
    assert load([]).source_address_mode == "auto"
    assert load(["--source-address-mode", "node"]).source_address_mode == "node"
    assert load([], {"KPX_SOURCE_ADDRESS_MODE": "transparent"}).source_address_mode == "transparent"
    with pytest.raises(SettingsError, match="--source-address-mode"):
        load(["--source-address-mode", "keep"])


def test_workers_refuse_a_handover_asked_for_and_ports_mode():
    assert load([]).workers == 1
    assert load(["--workers", "2"]).workers == 2  # the default handover socket is just not used
    assert load([], {"KPX_WORKERS": "3"}).workers == 3
    with pytest.raises(SettingsError, match="handover"):
        load(["--workers", "2", "--handover-socket", "@kpx/other"])
    assert load(["--workers", "2", "--handover-socket", ""]).handover_socket == ""
    with pytest.raises(SettingsError, match="nftables"):
        load(["--workers", "2", "--mode", "ports"])
    with pytest.raises(SettingsError, match="--workers"):
        load(["--workers", "0"])
