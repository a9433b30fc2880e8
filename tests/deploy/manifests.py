"""Reading deploy/: kustomize builds (through `kubectl kustomize`), their objects, and the
files each kustomization references."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Every kustomization a user applies, plus base: each must build and validate.
KUSTOMIZATIONS = ["base", "overlays/kind", "kube-dns"]
COMPONENTS = [
    "components/dnsd-pods-verified",
    "components/dnsd-multicluster",
    "components/dnsd-autopath",
    "components/dnsd-namespace-isolation",
]
# The Kubernetes releases the manifests are checked against: the oldest we claim, the newest
# kubernetes-validate knows.
K8S_VERSIONS = ["1.29", "1.37"]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (which embeds kustomize) is not installed")
    return path


@functools.cache
def _build(directory: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", directory],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize build {directory} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def build(directory: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders for `directory` (relative to deploy/ or absolute)."""
    path = Path(directory)
    return [dict(doc) for doc in _build(str(path if path.is_absolute() else DEPLOY / path))]


def build_with_component(component: str, tmp_path: Path) -> list[dict[str, Any]]:
    """base with `component` added, as an overlay would use it."""
    overlay = tmp_path / "overlay"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize refuses absolute paths
                "resources": [os.path.relpath(DEPLOY / "base", overlay)],
                "components": [os.path.relpath(DEPLOY / component, overlay)],
            }
        )
    )
    return build(overlay)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def config_file(objects: list[dict[str, Any]], configmap: str, key: str, dest: Path) -> Path:
    """Write a ConfigMap's file to `dest` (as the pod would see it mounted)."""
    dest.write_text(find(objects, "ConfigMap", configmap)["data"][key])
    return dest


def container(daemonset: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    spec = daemonset["spec"]["template"]["spec"]
    for item in spec.get("initContainers" if init else "containers", []):
        if item["name"] == name:
            return dict(item)
    raise AssertionError(f"no container {name} in {daemonset['metadata']['name']}")


def kustomization_files() -> list[Path]:
    return sorted(DEPLOY.glob("**/kustomization.yaml"))


def referenced_resource_files() -> set[Path]:
    """Files (not directories) listed under `resources` of any kustomization in deploy/."""
    files: set[Path] = set()
    for kustomization in kustomization_files():
        data = yaml.safe_load(kustomization.read_text())
        for entry in data.get("resources", []):
            path = (kustomization.parent / entry).resolve()
            if path.is_file():
                files.add(path)
    return files
