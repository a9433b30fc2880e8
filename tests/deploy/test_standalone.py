"""deploy/systemd: the units pass `systemd-analyze verify` without a warning, and their
command lines are accepted by the daemons' own settings parsers."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dnsd.settings import load as load_dnsd
from kpx.settings import load as load_kpx
from tests.deploy.manifests import DEPLOY, build, config_file

UNITS = ["dnsd.service", "kpx.service"]
PREFIX = "/opt/kpx-dnsd/"


def service_section(unit: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    return parser["Service"]


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The executables the units name, as empty stand-ins under tmp_path.
    bin_dir = tmp_path / "opt" / "kpx-dnsd" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "dnsd", "kpx", "dnsd-link-addresses"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    copies = []
    for unit in UNITS:
        text = (DEPLOY / "systemd" / unit).read_text().replace(PREFIX, f"{tmp_path}{PREFIX}")
        copy = tmp_path / unit
        copy.write_text(text)
        copies.append(str(copy))
    result = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def exec_start_args(unit: str) -> list[str]:
    argv = shlex.split(service_section(unit)["ExecStart"])
    assert argv[0].startswith(PREFIX)
    return argv[1:]


def test_dnsd_unit_flags_are_valid_dnsd_settings(tmp_path: Path) -> None:
    args = exec_start_args("dnsd.service")
    config = config_file(build("base"), "dnsd-config", "dnsd.yaml", tmp_path / "dnsd.yaml")
    args[args.index("--config") + 1] = str(config)
    settings = load_dnsd(args)
    assert settings.kubeconfig == "/etc/kpx-dnsd/dnsd.kubeconfig"
    pre = shlex.split(service_section("dnsd.service")["ExecStartPre"].removeprefix("+"))
    assert pre[1:] == [f"{PREFIX}bin/dnsd-link-addresses", "/etc/kpx-dnsd/dnsd.yaml"]
    assert service_section("dnsd.service")["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


def test_kpx_unit_flags_are_valid_kpx_settings(tmp_path: Path) -> None:
    args = [a.replace("%H", "node-a") for a in exec_start_args("kpx.service")]
    config = config_file(build("base"), "kpx-config", "kpx.yaml", tmp_path / "kpx.yaml")
    args[args.index("--config") + 1] = str(config)
    settings = load_kpx(args)
    assert settings.node_name == "node-a" and settings.mode == "nftables"
    assert service_section("kpx.service")["AmbientCapabilities"] == "CAP_NET_ADMIN"


def test_every_relative_link_in_the_deploy_guides_resolves() -> None:
    guides = [*DEPLOY.glob("**/*.md"), DEPLOY.parent / "README.md"]
    checked = 0
    for guide in guides:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", guide.read_text()):
            if "://" in target:
                continue
            assert (guide.parent / target).exists(), f"{guide.name}: {target}"
            checked += 1
    assert checked > 10
