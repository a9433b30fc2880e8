"""deploy/: every manifest validates against the Kubernetes schemas (offline, through
kubernetes-validate), every kustomization builds, and the pieces agree with each other and with
what the daemons accept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dnsd.settings import DnsdSettings
from dnsd.settings import load as load_dnsd
from kpx.settings import KpxSettings
from kpx.settings import load as load_kpx
from tests.deploy.manifests import (
    COMPONENTS,
    DEPLOY,
    K8S_VERSIONS,
    KUSTOMIZATIONS,
    build,
    build_with_component,
    config_file,
    container,
    find,
    kustomization_files,
    referenced_resource_files,
)

LINK_ADDRESSES = DEPLOY / "image" / "dnsd-link-addresses"


def validate(objects: list[dict[str, Any]], version: str) -> None:
    for obj in objects:
        name = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(str(p) for p in err.absolute_path)
            raise AssertionError(f"{name} (k8s {version}): {path}: {err.message}") from None


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_build_validates_against_the_kubernetes_schemas(
    kustomization: str, version: str
) -> None:
    objects = build(kustomization)
    assert objects
    validate(objects, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_builds_and_validates(component: str, version: str, tmp_path: Path) -> None:
    validate(build_with_component(component, tmp_path), version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_resource_file_validates_on_its_own(version: str) -> None:
    files = referenced_resource_files()
    assert files
    for path in sorted(files):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path} is empty"
        validate(docs, version)


def test_no_yaml_in_deploy_escapes_validation() -> None:
    """Each YAML file under deploy/ is a kustomization, a resource one of them lists (and so
    validated above), or one of the few non-Kubernetes files named here."""
    not_kubernetes = {DEPLOY / "kind" / "kind-config.yaml"}
    covered = set(kustomization_files()) | referenced_resource_files() | not_kubernetes
    demo = DEPLOY / "demo"  # the demo cluster's manifests are dnsd/kpx input, tested elsewhere
    loose = [
        p.relative_to(DEPLOY)
        for p in DEPLOY.glob("**/*.y*ml")
        if demo not in p.parents and p.resolve() not in covered
    ]
    assert loose == []


def test_base_holds_both_daemons_with_their_accounts_roles_and_config() -> None:
    objects = build("base")
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [
        ("ClusterRole", "kpx-dnsd:dnsd"),
        ("ClusterRole", "kpx-dnsd:kpx"),
        ("ClusterRoleBinding", "kpx-dnsd:dnsd"),
        ("ClusterRoleBinding", "kpx-dnsd:kpx"),
        ("ConfigMap", "dnsd-config"),
        ("ConfigMap", "kpx-config"),
        ("DaemonSet", "dnsd"),
        ("DaemonSet", "kpx"),
        ("Namespace", "kpx-system"),
        ("ServiceAccount", "dnsd"),
        ("ServiceAccount", "kpx"),
    ]
    assert all(
        o["metadata"].get("namespace") == "kpx-system"
        for o in objects
        if o["kind"] in ("ConfigMap", "DaemonSet", "ServiceAccount")
    )


@pytest.mark.parametrize("kustomization", ["base", "overlays/kind"])
def test_references_between_objects_resolve(kustomization: str) -> None:
    objects = build(kustomization)
    names = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects}
    for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        assert ("ClusterRole", None, binding["roleRef"]["name"]) in names
        for subject in binding["subjects"]:
            assert ("ServiceAccount", subject["namespace"], subject["name"]) in names
    for ds in (o for o in objects if o["kind"] == "DaemonSet"):
        namespace = ds["metadata"]["namespace"]
        spec = ds["spec"]["template"]["spec"]
        assert ("ServiceAccount", namespace, spec["serviceAccountName"]) in names
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", namespace, volume["configMap"]["name"]) in names
        for item in spec["containers"] + spec.get("initContainers", []):
            for source in item.get("envFrom", []):
                ref = source["configMapRef"]
                assert ref.get("optional") or ("ConfigMap", namespace, ref["name"]) in names


def test_the_kind_overlay_tells_both_daemons_where_the_api_server_is() -> None:
    """kpx cannot reach the API through a Service address it has yet to program."""
    objects = build("overlays/kind")
    data = find(objects, "ConfigMap", "kpx-dnsd-apiserver")["data"]
    assert data == {
        "KUBERNETES_SERVICE_HOST": "kind-control-plane",
        "KUBERNETES_SERVICE_PORT": "6443",
    }
    for name in ("dnsd", "kpx"):
        env_from = container(find(objects, "DaemonSet", name), name)["envFrom"]
        assert {"configMapRef": {"name": "kpx-dnsd-apiserver", "optional": True}} in env_from
    for ds in (o for o in objects if o["kind"] == "DaemonSet"):
        for item in ds["spec"]["template"]["spec"]["containers"]:
            assert item["image"] == "kpx-dnsd:dev"


@pytest.mark.parametrize("kustomization", ["base", "overlays/kind"])
def test_configmaps_are_settings_the_daemons_accept(kustomization: str, tmp_path: Path) -> None:
    objects = build(kustomization)
    dnsd_config = config_file(objects, "dnsd-config", "dnsd.yaml", tmp_path / "dnsd.yaml")
    dnsd = load_dnsd(["--config", str(dnsd_config)])
    assert isinstance(dnsd, DnsdSettings)
    kpx_config = config_file(objects, "kpx-config", "kpx.yaml", tmp_path / "kpx.yaml")
    kpx = load_kpx(["--config", str(kpx_config), "--node-name", "node-a"])
    assert isinstance(kpx, KpxSettings)
    assert kpx.mode == "nftables"
    if kustomization == "overlays/kind":
        assert kpx.cluster_cidrs == ["10.244.0.0/16"]


def test_a_broken_configmap_would_be_caught(tmp_path: Path) -> None:
    """The check above really runs the daemons' validation (a typo exits with status 2)."""
    bad = tmp_path / "dnsd.yaml"
    bad.write_text("zone: [cluster.local]\nlisten: [169.254.20.10:53]\ncahce_size: 10\n")
    with pytest.raises(SystemExit) as exit_info:
        load_dnsd(["--config", str(bad)])
    assert exit_info.value.code == 2


def test_dnsd_listens_on_the_kube_dns_cluster_ip_and_the_link_local_address(tmp_path: Path) -> None:
    objects = build("base")
    settings = load_dnsd(
        ["--config", str(config_file(objects, "dnsd-config", "dnsd.yaml", tmp_path / "d.yaml"))]
    )
    kube_dns = find(build("kube-dns"), "Service", "kube-dns")
    hosts = [host for host, port in settings.listen_addresses()]
    assert kube_dns["spec"]["clusterIP"] in hosts
    assert "169.254.20.10" in hosts
    assert {port for host, port in settings.listen_addresses()} == {53}
    assert kube_dns["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] == "dnsd"


def test_the_init_container_puts_exactly_the_listen_addresses_on_dnsd0(tmp_path: Path) -> None:
    objects = build("base")
    config = config_file(objects, "dnsd-config", "dnsd.yaml", tmp_path / "dnsd.yaml")
    init = container(find(objects, "DaemonSet", "dnsd"), "link-addresses", init=True)
    assert init["command"][0] == "dnsd-link-addresses"
    dnsd_args = container(find(objects, "DaemonSet", "dnsd"), "dnsd")["args"]
    assert init["command"][1] == "/etc/dnsd/dnsd.yaml"
    assert dnsd_args[0] == "--config=/etc/dnsd/dnsd.yaml"
    result = subprocess.run(
        [sys.executable, str(LINK_ADDRESSES), str(config), *init["command"][2:], "--dry-run"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.splitlines() == [
        "ip link add dnsd0 type dummy",
        "ip addr replace 169.254.20.10/32 dev dnsd0",
        "ip addr replace 10.96.0.10/32 dev dnsd0",
        "ip link set dnsd0 up",
    ]


def _security(item: dict[str, Any]) -> dict[str, Any]:
    return dict(item.get("securityContext", {}))


@pytest.mark.parametrize(
    ("name", "capability", "probe_ports", "no_new_privs"),
    [
        ("dnsd", "NET_BIND_SERVICE", {9153}, True),
        # kpx's nft gets NET_ADMIN through two execs, which no_new_privs would stop
        # (test_image_scripts.py::test_nft_gets_net_admin_through_kpx_keep_rules_and_python).
        ("kpx", "NET_ADMIN", {10256, 10249}, False),
    ],
)
def test_daemonsets_run_unprivileged_on_every_node_with_one_capability(
    name: str, capability: str, probe_ports: set[int], no_new_privs: bool
) -> None:
    ds = find(build("base"), "DaemonSet", name)
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    main = container(ds, name)
    security = _security(main)
    assert "privileged" not in security and "runAsUser" not in security
    assert security["allowPrivilegeEscalation"] is not no_new_privs
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": [capability]}
    for init in spec.get("initContainers", []):
        assert "privileged" not in _security(init)
        assert _security(init)["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    probes = [main["livenessProbe"], main["readinessProbe"]]
    assert {p["httpGet"]["port"] for p in probes} == probe_ports
    assert main["resources"]["requests"] and main["resources"]["limits"]["memory"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"


def test_dnsd_probes_and_port_match_its_http_listen(tmp_path: Path) -> None:
    objects = build("base")
    settings = load_dnsd(
        ["--config", str(config_file(objects, "dnsd-config", "dnsd.yaml", tmp_path / "d.yaml"))]
    )
    main = container(find(objects, "DaemonSet", "dnsd"), "dnsd")
    port = int(settings.http_listen.rsplit(":", 1)[1])
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}


def test_kpx_probes_node_name_and_rolling_update(tmp_path: Path) -> None:
    objects = build("base")
    ds = find(objects, "DaemonSet", "kpx")
    main = container(ds, "kpx")
    settings = load_kpx(
        ["--config", str(config_file(objects, "kpx-config", "kpx.yaml", tmp_path / "k.yaml"))]
    )
    # /livez is /healthz minus "the Node is being deleted" (kpx/health.py), as kube-proxy's.
    assert main["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}
    assert settings.healthz_bind_address == "0.0.0.0:10256"
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 10249}
    assert settings.metrics_bind_address == "0.0.0.0:10249"
    assert "--node-name=$(NODE_NAME)" in main["args"]
    node_name = next(e for e in main["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # The table survives the swap: SIGTERM is turned into SIGKILL (test_image_scripts.py).
    # python-kpx: the interpreter copy with cap_net_admin, for transparent mode.
    assert main["command"] == ["kpx-keep-rules", "/opt/kpx-dnsd/bin/python-kpx", "-m", "kpx.main"]
    # The surge rollout and its handover: tests/deploy/test_rolling_update.py.


def test_the_pods_verified_component_grants_pods_and_switches_the_mode(tmp_path: Path) -> None:
    objects = build_with_component("components/dnsd-pods-verified", tmp_path)
    rules = find(objects, "ClusterRole", "kpx-dnsd:dnsd")["rules"]
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]} in rules
    env = container(find(objects, "DaemonSet", "dnsd"), "dnsd")["env"]
    assert {"name": "DNSD_PODS", "value": "verified"} in env
    base_rules = find(build("base"), "ClusterRole", "kpx-dnsd:dnsd")["rules"]
    assert all("pods" not in rule["resources"] for rule in base_rules)


def test_the_multicluster_component_grants_serviceimports_and_sets_the_zone(
    tmp_path: Path,
) -> None:
    objects = build_with_component("components/dnsd-multicluster", tmp_path)
    rules = find(objects, "ClusterRole", "kpx-dnsd:dnsd")["rules"]
    grant = {
        "apiGroups": ["multicluster.x-k8s.io"],
        "resources": ["serviceimports"],
        "verbs": ["list", "watch"],
    }
    assert grant in rules
    args = container(find(objects, "DaemonSet", "dnsd"), "dnsd")["args"]
    assert "--multicluster=clusterset.local" in args
    base_rules = find(build("base"), "ClusterRole", "kpx-dnsd:dnsd")["rules"]
    assert all("serviceimports" not in rule["resources"] for rule in base_rules)


@pytest.mark.parametrize(
    ("component", "env"),
    [
        ("components/dnsd-autopath", [{"name": "DNSD_AUTOPATH", "value": "true"}]),
        (
            "components/dnsd-namespace-isolation",
            [
                {"name": "DNSD_NAMESPACE_ISOLATION", "value": "true"},
                {"name": "DNSD_SHARED_NAMESPACES", "value": "kube-system"},
            ],
        ),
    ],
)
def test_the_per_client_components_grant_pods_and_switch_the_option(
    component: str, env: list[dict[str, str]], tmp_path: Path
) -> None:
    objects = build_with_component(component, tmp_path)
    rules = find(objects, "ClusterRole", "kpx-dnsd:dnsd")["rules"]
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]} in rules
    got = container(find(objects, "DaemonSet", "dnsd"), "dnsd")["env"]
    assert all(entry in got for entry in env)


def test_the_dnsd_components_combine(tmp_path: Path) -> None:
    """Each adds its environment variables by name: none replaces another's."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    components = [
        "components/dnsd-autopath",
        "components/dnsd-namespace-isolation",
        "components/dnsd-pods-verified",
    ]
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY / "base", overlay)],
                "components": [os.path.relpath(DEPLOY / c, overlay) for c in components],
            }
        )
    )
    env = container(find(build(overlay), "DaemonSet", "dnsd"), "dnsd")["env"]
    names = {entry["name"] for entry in env}
    assert {"DNSD_AUTOPATH", "DNSD_NAMESPACE_ISOLATION", "DNSD_PODS"} <= names
