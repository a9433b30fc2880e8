"""The cluster test's kubelet/runtime logic on its own: what a rendered DaemonSet becomes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import pods
from tests.cluster.runtime import in_root
from tests.deploy.manifests import build, find

FACTS = pods.NodeFacts(
    node_name="kind-worker",
    node_ip="172.18.0.3",
    pod_name="kpx-1",
    namespace="kpx-system",
    kubernetes_service=("10.96.0.1", 443),
    image_env={"PATH": "/opt/kpx-dnsd/bin:/usr/bin"},
    image_user=(65532, 65532),
)


def _rendered() -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    objects = build("overlays/kind")
    configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    return objects, configmaps


def test_dnsd_init_container_first_as_root_with_net_admin_only() -> None:
    objects, configmaps = _rendered()
    plans = pods.plan_pod(find(objects, "DaemonSet", "dnsd"), configmaps, FACTS)
    init, main = plans
    assert init.init and not main.init
    assert init.argv[0] == "dnsd-link-addresses"
    assert (init.uid, init.caps, init.no_new_privs) == (0, ["NET_ADMIN"], True)
    assert main.argv[:3] == ["/opt/kpx-dnsd/bin/python-dnsd", "-m", "dnsd.main"]
    assert (main.uid, main.gid, main.caps) == (65532, 65532, ["NET_BIND_SERVICE"])
    assert main.readonly_root
    targets = {path for _, path, _ in main.mounts}
    assert {"/etc/dnsd", "/tmp", pods.SA_MOUNT} <= targets
    assert {p.kind for p in main.probes} == {"readiness", "liveness"}


def test_kpx_args_expand_the_downward_api_and_env_from_overrides_the_kubelet_default() -> None:
    objects, configmaps = _rendered()
    (main,) = pods.plan_pod(find(objects, "DaemonSet", "kpx"), configmaps, FACTS)
    assert "--node-name=kind-worker" in main.argv
    assert main.env["KUBERNETES_SERVICE_HOST"] == "kind-control-plane"
    assert main.env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert main.env["PATH"] == FACTS.image_env["PATH"]
    assert main.caps == ["NET_ADMIN"] and not main.no_new_privs


def test_without_the_apiserver_configmap_the_kubelet_service_variables_stay() -> None:
    objects, configmaps = _rendered()
    del configmaps["kpx-dnsd-apiserver"]  # optional: true
    (main,) = pods.plan_pod(find(objects, "DaemonSet", "kpx"), configmaps, FACTS)
    assert main.env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"


def test_run_as_non_root_refuses_root_and_unknown_volumes_are_errors() -> None:
    objects, configmaps = _rendered()
    ds = copy.deepcopy(find(objects, "DaemonSet", "kpx"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    with pytest.raises(pods.PlanError, match="runAsNonRoot"):
        pods.plan_pod(ds, configmaps, FACTS)
    ds = copy.deepcopy(find(objects, "DaemonSet", "kpx"))
    ds["spec"]["template"]["spec"]["volumes"] = []
    with pytest.raises(pods.PlanError, match="volume config"):
        pods.plan_pod(ds, configmaps, FACTS)


def test_expand_and_capabilities() -> None:
    assert pods.expand("--n=$(A) $(B) $$(A)", {"A": "x"}) == "--n=x $(B) $(A)"
    assert pods.capabilities({"capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]}}) == [
        "NET_ADMIN"
    ]
    default = pods.capabilities({"capabilities": {"drop": ["NET_RAW"]}})
    assert "NET_RAW" not in default and "CHOWN" in default


def test_max_unavailable_rounds_percentages_up() -> None:
    ds: dict[str, Any] = {"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": "10%"}}}}
    assert pods.max_unavailable(ds, 4) == 1
    assert pods.max_unavailable(ds, 25) == 3
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = 1
    with pytest.raises(pods.PlanError, match="maxSurge"):
        pods.max_unavailable(ds, 4)
    ds["spec"]["updateStrategy"] = {"type": "OnDelete"}
    with pytest.raises(pods.PlanError):
        pods.max_unavailable(ds, 4)


def test_a_surge_rollout_starts_the_new_pod_first_node_by_node() -> None:
    ds: dict[str, Any] = {
        "spec": {"updateStrategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}
    }
    assert pods.rollout(ds, 4) == (1, True)
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = "50%"
    assert pods.rollout(ds, 4) == (2, True)
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] = 1
    with pytest.raises(pods.PlanError, match="both above 0"):
        pods.rollout(ds, 4)
    ds["spec"]["updateStrategy"]["rollingUpdate"] = {"maxSurge": 0, "maxUnavailable": 0}
    with pytest.raises(pods.PlanError, match="cannot progress"):
        pods.rollout(ds, 4)


def test_in_root_resolves_symlinks_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("/run")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "loop").symlink_to("loop")
    root = str(tmp_path)
    assert in_root(root, "/var/run/secrets/x") == f"{root}/run/secrets/x"
    assert in_root(root, "/etc/../run") == f"{root}/run"
    in_root(root, "/etc/loop/x")  # a loop ends (bounded), it does not hang


def test_fields_the_test_does_not_apply_fail_the_plan() -> None:
    objects, configmaps = _rendered()
    ds = copy.deepcopy(find(objects, "DaemonSet", "dnsd"))
    ds["spec"]["template"]["spec"]["securityContext"]["fsGroup"] = 2000
    with pytest.raises(pods.PlanError, match="fsGroup"):
        pods.plan_pod(ds, configmaps, FACTS)
    ds = copy.deepcopy(find(objects, "DaemonSet", "dnsd"))
    container = ds["spec"]["template"]["spec"]["containers"][0]
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    with pytest.raises(pods.PlanError, match="lifecycle"):
        pods.plan_pod(ds, configmaps, FACTS)
