"""The README's daemon references against the code: options, defaults, metrics, config examples.

Each daemon's argparse parser is built the way the daemon builds it (kwatch.settings.build_parser
on its settings model); every long option must have a row in the README's option tables, in the
daemon's own section or, for the options both daemons share, in the shared one, with the
default the model really has. Every metric the daemons register must be in a metrics table with
its type and labels, and every row of those tables must name a metric that exists.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel

import kpx.main  # noqa: F401  (registers, through its imports, every module-level kpx metric)
from dnsd import settings as dnsd_settings
from dnsd.main import Daemon
from dnsd.metrics import DnsCollector
from kpx import settings as kpx_settings
from kpx.metrics import ProxyStatsCollector, UdpStatsCollector
from kpx.proxy import ProxyStats
from kpx.udp_relay import UdpStats
from kpx.worker_metrics import WorkerCollector
from kpx.worker_pool import WorkerPool
from kwatch.settings import AccessSettings, build_parser, load_settings

README = Path(__file__).resolve().parent.parent / "README.md"
SHARED = "Where the objects come from (both daemons)"
DAEMONS: dict[str, tuple[type[BaseModel], str, str]] = {
    # daemon -> (settings model, environment prefix, parser description)
    "dnsd": (dnsd_settings.DnsdSettings, "DNSD", dnsd_settings.DESCRIPTION),
    "kpx": (kpx_settings.KpxSettings, "KPX", kpx_settings.DESCRIPTION),
}
# Metric name prefix -> README section that documents it.
METRIC_SECTIONS = {
    "kwatch_": SHARED,
    "dnsd_": "dnsd reference",
    "kpx_": "kpx reference",
    "kubeproxy_": "kpx reference",
}
DEFAULT_COLLECTOR_PREFIXES = ("process_", "python_")  # prometheus_client's own
UNSET, NONE, HOSTNAME = "*(unset)*", "*(none)*", "*(hostname)*"


# --- reading the README ---------------------------------------------------------------------------


def sections(text: str) -> dict[str, str]:
    """Level-2 sections by heading."""
    out: dict[str, str] = {}
    for chunk in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        heading, _, body = chunk.partition("\n")
        out[heading.strip()] = body
    return out


def table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def option_rows(section: str) -> dict[str, list[str]]:
    """`--flag` -> [flag, config key, env, default, example, meaning] of every option row."""
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.match(r"\| `(--[a-z0-9-]+)` \|", line)
        if match:
            cells = table_cells(line)
            assert len(cells) == 6, f"option row needs 6 cells: {line}"
            assert match.group(1) not in rows, f"{match.group(1)} documented twice"
            rows[match.group(1)] = cells
    return rows


def metric_rows(section: str) -> dict[str, tuple[str, frozenset[str]]]:
    """metric name -> (type, labels) of every metrics-table row."""
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in section.splitlines():
        match = re.match(r"\| `([a-z_:][a-z0-9_:]*)` \| (counter|gauge|histogram) \|", line)
        if match:
            labels_cell = table_cells(line)[2]
            labels = frozenset(re.findall(r"`([a-z_]+)`", labels_cell))
            assert labels or labels_cell == "—", f"labels: `a`, `b` or —: {line}"
            rows[match.group(1)] = (match.group(2), labels)
    return rows


@pytest.fixture(scope="module")
def readme() -> dict[str, str]:
    return sections(README.read_text())


# --- the options ----------------------------------------------------------------------------------


def long_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """`--flag` -> dest for every option of the parser but --help (`--no-x` is part of `--x`)."""
    out = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        longs = [o for o in longs if not (o.startswith("--no-") and len(longs) > 1)]
        if longs:
            out[longs[0]] = action.dest
    return out


def model_default(model: type[BaseModel], name: str) -> Any:
    if name == "config":
        return None
    field = model.model_fields[name]
    if field.default_factory is socket.gethostname:
        return HOSTNAME  # machine-dependent: the README names it
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def scalar_matches(text: str, value: Any) -> bool:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, int | float):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return text == str(value)


def default_matches(cell: str, default: Any) -> bool:
    if default == HOSTNAME:
        return cell == HOSTNAME
    if default is None:
        return cell == UNSET
    if isinstance(default, list) and not default:
        return cell == NONE
    match = re.fullmatch(r"`([^`]*)`", cell)
    if match is None:
        return False
    text = match.group(1)
    if isinstance(default, list):
        parts = text.split(",")
        return len(parts) == len(default) and all(map(scalar_matches, parts, default))
    return scalar_matches(text, default)


def option_problems(daemon: str, readme: dict[str, str]) -> list[str]:
    model, prefix, description = DAEMONS[daemon]
    parser = build_parser(model, daemon, description)
    shared_rows = option_rows(readme[SHARED])
    own_rows = option_rows(readme[f"{daemon} reference"])
    shared_names = {"config", *AccessSettings.model_fields}
    problems = []
    options = long_options(parser)
    for flag, dest in options.items():
        shared = dest in shared_names
        rows, where = (shared_rows, SHARED) if shared else (own_rows, f"{daemon} reference")
        row = rows.get(flag)
        if row is None:
            problems.append(f"{flag}: no row in README section {where!r}")
            continue
        key, env = ("—", "—") if dest == "config" else (f"`{dest}`", f"`{prefix}_{dest.upper()}`")
        if shared and dest != "config":
            env = f"`*_{dest.upper()}`"
        if row[1] != key:
            problems.append(f"{flag}: config key {row[1]}, expected {key}")
        if row[2] != env:
            problems.append(f"{flag}: env {row[2]}, expected {env}")
        default = model_default(model, dest)
        if not default_matches(row[3], default):
            problems.append(f"{flag}: README default {row[3]}, the settings say {default!r}")
        if not row[4].startswith(f"`{flag}"):
            problems.append(f"{flag}: the example should use the flag: {row[4]}")
    for flag in own_rows.keys() - options.keys():
        problems.append(f"{flag}: documented for {daemon} but not an option")
    return problems


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_every_option_is_documented_with_its_default(daemon: str, readme: dict[str, str]) -> None:
    assert option_problems(daemon, readme) == []


def test_shared_section_documents_only_shared_options(readme: dict[str, str]) -> None:
    shared = {f"--{n.replace('_', '-')}" for n in AccessSettings.model_fields} | {"--config"}
    assert set(option_rows(readme[SHARED])) == shared


def test_a_missing_or_wrong_row_is_reported(readme: dict[str, str]) -> None:
    """The check above can fail: drop the --ttl row and change --proxy-port's default."""
    edited = dict(readme)
    ttl_row = re.compile(r"^\| `--ttl` \|.*\n", flags=re.MULTILINE)
    edited["dnsd reference"] = ttl_row.sub("", readme["dnsd reference"])
    edited["kpx reference"] = readme["kpx reference"].replace("| `10262` |", "| `10263` |")
    assert any(p.startswith("--ttl: no row") for p in option_problems("dnsd", edited))
    assert any(p.startswith("--proxy-port: README default") for p in option_problems("kpx", edited))


# --- the --config examples ------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_config_examples_load(daemon: str, readme: dict[str, str], tmp_path: Path) -> None:
    model, prefix, _ = DAEMONS[daemon]
    examples = re.findall(r"```yaml\n(.*?)```", readme[f"{daemon} reference"], flags=re.S)
    assert examples, f"no YAML example in the {daemon} reference"
    for number, example in enumerate(examples):
        path = tmp_path / f"example{number}.yaml"
        path.write_text(example)
        load_settings(model, ["--config", str(path)], env_prefix=prefix, prog=daemon, environ={})


# --- the metrics ----------------------------------------------------------------------------------


def exposed_name(name: str, kind: str) -> str:
    """The name a family is scraped under (prometheus_client strips a counter's `_total`)."""
    return f"{name}_total" if kind == "counter" else name


def registered_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Every metric family the daemons can expose: exposed name -> (type, labels)."""
    families = list(REGISTRY.collect())  # the module-level metrics, imported above
    # The collectors the daemons register at start, fed one value each so labels show.
    daemon = Daemon(dnsd_settings.load(["--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0"]))
    daemon.stats.answered(False, 1, b"\x00\x00\x81\x80", 0.001)
    daemon.stats.drop("example")
    families += DnsCollector(daemon.stats, daemon.controller.zone_info).collect()
    families += ProxyStatsCollector(ProxyStats()).collect()
    families += UdpStatsCollector(UdpStats(), lambda: 0).collect()
    families += WorkerCollector(WorkerPool(1, lambda _index: None, dict)).collect()  # type: ignore[arg-type]
    labels: dict[str, frozenset[str]] = {}
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").split(".")[0] not in ("dnsd", "kpx", "kwatch"):
            continue
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                for family in value.describe():
                    labels[family.name] = frozenset(value._labelnames)
    out = {}
    for family in families:
        if family.name.startswith(DEFAULT_COLLECTOR_PREFIXES):
            continue
        sampled = frozenset(k for s in family.samples for k in s.labels if k != "le")
        out[exposed_name(family.name, family.type)] = (
            family.type,
            labels.get(family.name, sampled),
        )
    return out


def test_every_metric_is_documented_with_its_type_and_labels(readme: dict[str, str]) -> None:
    registered = registered_metrics()
    assert len(registered) > 60
    documented = {name: metric_rows(readme[name]) for name in set(METRIC_SECTIONS.values())}
    problems = []
    for name, (kind, labels) in sorted(registered.items()):
        section = next((s for p, s in METRIC_SECTIONS.items() if name.startswith(p)), None)
        if section is None:
            problems.append(f"{name}: unknown prefix, add it to METRIC_SECTIONS and the README")
            continue
        row = documented[section].get(name)
        if row is None:
            problems.append(f"{name}: not in README section {section!r}")
        elif row != (kind, labels):
            problems.append(f"{name}: README says {row}, registered as {(kind, set(labels))}")
    for section, rows in documented.items():
        for name in rows.keys() - registered.keys():
            problems.append(f"{name}: in README section {section!r} but not registered")
    assert problems == []
