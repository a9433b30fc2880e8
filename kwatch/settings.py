"""Daemon settings: one pydantic model per daemon, filled from flags, environment and YAML.

Precedence, highest first: command-line flags, environment (`<PREFIX>_<FIELD>`, lists comma
separated), the YAML file given by `--config`, the model's defaults. Flags are generated from the
model's fields (`token_file` -> `--token-file`; list fields repeat; booleans get `--no-x`), so
the model is the single place that documents an option. Every invalid value is reported by its
flag name and where it came from, then the process exits with status 2.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from kwatch.health import parse_listen

M = TypeVar("M", bound=BaseModel)


def _valid_listen(value: str) -> str:
    parse_listen(value)  # ValueError: "expected HOST:PORT, got ..."
    return value


# A `HOST:PORT` (or `:PORT`, `[v6]:PORT`) setting, checked when the settings are loaded.
ListenAddress = Annotated[str, AfterValidator(_valid_listen)]


class SettingsError(Exception):
    """Settings could not be loaded; the message lists every problem, one per line."""


class AccessSettings(BaseModel):
    """Where the Kubernetes objects come from (shared by dnsd and kpx)."""

    model_config = ConfigDict(extra="forbid")

    kubeconfig: str | None = Field(
        None, description="kubeconfig file to reach the API server (default: in-cluster)"
    )
    context: str | None = Field(
        None, description="kubeconfig context, only with --kubeconfig (default: current)"
    )
    apiserver: str | None = Field(
        None, description="API server URL, with --token-file and --ca-file"
    )
    token_file: str | None = Field(None, description="bearer token file, only with --apiserver")
    ca_file: str | None = Field(
        None, description="CA bundle, only with --apiserver (default: the system CAs)"
    )
    manifests: Path | None = Field(
        None, description="YAML/JSON file or folder of manifests to serve instead of an API server"
    )
    api_timeout: float = Field(
        30.0, gt=0, description="seconds allowed for one list request to the API server"
    )
    watch_idle_timeout: float = Field(
        90.0,
        gt=0,
        description="seconds an open watch may stay silent (the API server sends a bookmark"
        " about every minute) before its connection is presumed dead and reopened",
    )
    api_backoff_max: float = Field(
        4.0,
        gt=0,
        description="longest pause between retries to an unreachable API server, before a"
        " jitter of up to 100%; Retry-After from the server wins when longer",
    )
    task_deadline: float = Field(
        60.0,
        gt=0,
        description="seconds a background task may leave received changes unapplied before"
        " liveness (/healthz) fails",
    )
    log_format: typing.Literal["auto", "json", "console"] = Field(
        "auto", description="log format: json, console, or auto (console on a TTY)"
    )
    log_level: typing.Literal["debug", "info", "warning", "error"] = Field(
        "info", description="lowest log level written"
    )

    @model_validator(mode="after")
    def _one_source(self) -> AccessSettings:
        chosen = [n for n in ("kubeconfig", "apiserver", "manifests") if getattr(self, n)]
        if len(chosen) > 1:
            raise ValueError(f"choose one of --kubeconfig, --apiserver, --manifests (got {chosen})")
        return self

    # An option of a source not chosen would be silently ignored: reject it, by its own name.
    @field_validator("context")
    @classmethod
    def _context_needs_kubeconfig(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _only_with("kubeconfig", value, info)

    @field_validator("token_file", "ca_file")
    @classmethod
    def _needs_apiserver(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _only_with("apiserver", value, info)


def _only_with(source: str, value: str | None, info: ValidationInfo) -> str | None:
    # `source` is declared before the fields that need it, so info.data holds it (unless it was
    # invalid itself, which is reported on its own).
    if value and source in info.data and not info.data[source]:
        raise ValueError(f"only used with {_flag(source)}, which is not set")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) in (list, tuple, set):
            return True
    return False


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return bool in typing.get_args(annotation)
    return False


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a Literal or Enum field, as typed on the command line."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(member.value) for member in annotation]
    return []


def _as_typed(value: Any) -> str:
    """A default as one would type it: `disabled`, `30`, `false`, `a,b`; `unset` for None."""
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple | set):
        return ",".join(_as_typed(v) for v in value) or "none"
    return str(value)


def _help(field: FieldInfo, default: Any, repeatable: bool) -> str:
    text = field.description or ""
    if repeatable:
        text += "; repeatable"
    if "default:" not in text:  # some descriptions say what unset means themselves
        text += f" (default: {_as_typed(default)})"
    return text.replace("%", "%%")  # argparse expands %(...)s in help


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file with settings (flags and environment win)"
    )
    for name, field in model.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()  # type: ignore[call-arg]
        repeatable = _is_list(field.annotation)
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        options["help"] = _help(field, default, repeatable)
        if _is_bool(field.annotation):
            options["action"] = argparse.BooleanOptionalAction
        elif repeatable:
            options["action"] = "append"
        choices = _choices(field.annotation)
        if choices:
            # Only shown: pydantic checks the value, so every source reports it the same way.
            options["metavar"] = "{" + ",".join(choices) + "}"
        parser.add_argument(_flag(name), **options)
    return parser


def load_settings(
    model: type[M],
    argv: Sequence[str] | None = None,
    *,
    env_prefix: str,
    prog: str,
    description: str = "",
    environ: dict[str, str] | None = None,
) -> M:
    """Parse flags, environment and --config YAML into `model`; raises SettingsError."""
    parser = build_parser(model, prog, description)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    origin: dict[str, str] = {}
    values: dict[str, Any] = {}
    if config_path:
        for key, value in _read_yaml(config_path).items():
            name = key.replace("-", "_")
            values[name] = value
            origin[name] = f"config {config_path}"
    env = os.environ if environ is None else environ
    for name, field in model.model_fields.items():
        raw = env.get(f"{env_prefix}_{name.upper()}")
        if raw is not None:
            if _is_list(field.annotation):
                values[name] = _comma_list(raw)
            else:
                values[name] = raw
            origin[name] = f"environment {env_prefix}_{name.upper()}"
    for name, value in args.items():
        if isinstance(value, list):  # a repeatable flag: each value may list several, too
            value = [item for one in value for item in _comma_list(one)]
        values[name] = value
        origin[name] = "flag"
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise SettingsError(_explain(err, origin)) from None


def _comma_list(raw: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: a list option's text, from the environment or a flag
    (as kube-proxy's --nodeport-addresses takes it). No list option's items hold a comma."""
    return [item for part in raw.split(",") if (item := part.strip())]


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SettingsError(f"--config {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of settings")
    return data


def _explain(err: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for problem in err.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        where = origin.get(field, "default")
        label = f"{_flag(field)} ({where})" if field else "settings"
        lines.append(f"invalid setting {label}: {problem['msg']}")
    return "\n".join(lines)


def settings_or_exit(
    model: type[M],
    argv: Sequence[str] | None,
    *,
    env_prefix: str,
    prog: str,
    description: str,
    environ: dict[str, str] | None = None,
) -> M:
    """`load_settings`, or the problems on stderr and exit status 2."""
    try:
        return load_settings(
            model,
            argv,
            env_prefix=env_prefix,
            prog=prog,
            description=description,
            environ=environ,
        )
    except SettingsError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
