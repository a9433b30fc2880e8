import enum
import re
import typing

import pytest
from pydantic import Field

from kwatch.settings import (
    AccessSettings,
    SettingsError,
    build_parser,
    load_settings,
    settings_or_exit,
)


class Speed(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class DemoSettings(AccessSettings):
    ttl: int = Field(5, ge=0, le=3600, description="record TTL")
    zone: list[str] = Field(default_factory=lambda: ["cluster.local"], description="zones")
    pods: typing.Literal["disabled", "insecure", "verified"] = Field("disabled", description="")
    verbose: bool = Field(False, description="more logs")
    speed: Speed = Field(Speed.FAST, description="how fast")


def load(argv, env=None):
    return load_settings(DemoSettings, argv, env_prefix="DEMO", prog="demo", environ=env or {})


def test_defaults_match_the_model():
    s = load([])
    assert (s.ttl, s.zone, s.pods, s.verbose) == (5, ["cluster.local"], "disabled", False)


def test_flags_beat_environment_beat_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "ttl: 30\nzone: [a.local]\npods: insecure\napiserver: https://k:6443\ntoken-file: /t\n"
    )
    s = load(["--config", str(config)], {"DEMO_TTL": "20"})
    assert (s.ttl, s.zone, s.pods, s.token_file) == (20, ["a.local"], "insecure", "/t")
    s = load(["--config", str(config), "--ttl", "10", "--zone", "x", "--zone", "y"])
    assert (s.ttl, s.zone) == (10, ["x", "y"])
    assert load(["--verbose"]).verbose and not load(["--no-verbose"]).verbose
    assert load([], {"DEMO_ZONE": "p.local,q.local"}).zone == ["p.local", "q.local"]


def test_environment_lists_ignore_blanks_around_commas():
    assert load([], {"DEMO_ZONE": " p.local, q.local ,,"}).zone == ["p.local", "q.local"]


def test_a_list_flag_takes_commas_like_the_environment_and_can_repeat():
    """`--zone a,b` is two zones, as DEMO_ZONE=a,b is (kube-proxy's list flags take commas)."""
    assert load(["--zone", "p.local,q.local", "--zone", " r.local"]).zone == [
        "p.local",
        "q.local",
        "r.local",
    ]


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


def test_options_of_a_source_not_chosen_are_errors_naming_the_option():
    for argv, flag, needs in [
        (["--token-file", "/t"], "--token-file", "--apiserver"),
        (["--ca-file", "/ca"], "--ca-file", "--apiserver"),
        (["--manifests", "/m", "--token-file", "/t"], "--token-file", "--apiserver"),
        (["--context", "kind"], "--context", "--kubeconfig"),
        (["--apiserver", "https://k:6443", "--context", "kind"], "--context", "--kubeconfig"),
    ]:
        with pytest.raises(SettingsError) as err:
            load(argv)
        assert f"invalid setting {flag} (flag)" in str(err.value)
        assert needs in str(err.value)
    with pytest.raises(SettingsError, match=r"--ca-file \(environment DEMO_CA_FILE\)"):
        load([], {"DEMO_CA_FILE": "/ca"})


def test_options_of_the_chosen_source_are_accepted():
    s = load(["--apiserver", "https://k:6443", "--token-file", "/t", "--ca-file", "/ca"])
    assert (s.apiserver, s.token_file, s.ca_file) == ("https://k:6443", "/t", "/ca")
    assert load(["--kubeconfig", "/k", "--context", "kind"]).context == "kind"


def test_an_option_of_another_source_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        settings_or_exit(
            DemoSettings, ["--context", "kind"], env_prefix="DEMO", prog="demo", description=""
        )
    assert exit_.value.code == 2
    assert "demo: invalid setting --context (flag)" in capsys.readouterr().err


def help_defaults(monkeypatch) -> dict[str, list[str]]:
    """`--flag` -> the texts of its `(default: ...)` in --help."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside the help texts
    text = build_parser(DemoSettings, "demo", "").format_help()
    # One entry per option: its line, and the next one when the help starts there.
    entries = re.split(r"\n(?=  -)", text.partition("options:\n")[2])
    return {
        re.findall(r"--[a-z-]+", entry)[0]: re.findall(r"\(default: ([^)]*)\)", entry)
        for entry in entries
        if "--" in entry and "--help" not in entry
    }


def test_help_shows_defaults_as_they_are_typed(monkeypatch):
    defaults = help_defaults(monkeypatch)
    assert defaults["--speed"] == ["fast"]  # an Enum: its value, not Speed.FAST
    assert defaults["--pods"] == ["disabled"]  # a Literal: no quotes
    assert defaults["--zone"] == ["cluster.local"]  # a list: comma separated, no brackets
    assert defaults["--verbose"] == ["false"]
    assert defaults["--api-timeout"] == ["30"]
    assert defaults["--apiserver"] == ["unset"]
    assert defaults["--kubeconfig"] == ["in-cluster"]  # said by the description, not repeated
    assert defaults["--config"] == []


def test_help_names_the_choices_of_enum_and_literal_options(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    text = build_parser(DemoSettings, "demo", "").format_help()
    assert "--speed {fast,slow}" in text
    assert "--log-format {auto,json,console}" in text
