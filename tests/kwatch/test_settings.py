import typing

import pytest
from pydantic import Field

from kwatch.settings import AccessSettings, SettingsError, load_settings


class DemoSettings(AccessSettings):
    ttl: int = Field(5, ge=0, le=3600, description="record TTL")
    zone: list[str] = Field(default_factory=lambda: ["cluster.local"], description="zones")
    pods: typing.Literal["disabled", "insecure", "verified"] = Field("disabled", description="")
    verbose: bool = Field(False, description="more logs")


def load(argv, env=None):
    return load_settings(DemoSettings, argv, env_prefix="DEMO", prog="demo", environ=env or {})


def test_defaults_match_the_model():
    s = load([])
    assert (s.ttl, s.zone, s.pods, s.verbose) == (5, ["cluster.local"], "disabled", False)


def test_flags_beat_environment_beat_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("ttl: 30\nzone: [a.local]\npods: insecure\ntoken-file: /t\n")
    s = load(["--config", str(config)], {"DEMO_TTL": "20"})
    assert (s.ttl, s.zone, s.pods, s.token_file) == (20, ["a.local"], "insecure", "/t")
    s = load(["--config", str(config), "--ttl", "10", "--zone", "x", "--zone", "y"])
    assert (s.ttl, s.zone) == (10, ["x", "y"])
    assert load(["--verbose"]).verbose and not load(["--no-verbose"]).verbose
    assert load([], {"DEMO_ZONE": "p.local,q.local"}).zone == ["p.local", "q.local"]


def test_each_bad_value_is_reported_by_flag_name_and_origin(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pods: sometimes\n")
    with pytest.raises(SettingsError) as err:
        load(["--config", str(config), "--ttl", "-1"])
    lines = str(err.value).splitlines()
    assert any(line.startswith("invalid setting --ttl (flag)") for line in lines)
    assert any(line.startswith(f"invalid setting --pods (config {config})") for line in lines)


def test_unknown_config_key_and_conflicting_sources_are_errors(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("tll: 5\n")
    with pytest.raises(SettingsError, match="--tll"):
        load(["--config", str(config)])
    with pytest.raises(SettingsError, match="choose one of"):
        load(["--kubeconfig", "/k", "--manifests", "/m"])


def test_broken_config_file_is_a_clear_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("ttl: [\n")
    with pytest.raises(SettingsError, match=str(config)):
        load(["--config", str(config)])
