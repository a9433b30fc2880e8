import asyncio
import os

from kwatch.cluster import ClusterState
from kwatch.manifest import ManifestSource
from kwatch.resources import ENDPOINTSLICES, NAMESPACES, SERVICES
from kwatch.settings import AccessSettings
from kwatch.store import Store

SERVICE_A = """
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
"""
SERVICE_B_NO_NAMESPACE = """
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.2}
"""
DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"""


def stores():
    return {r: Store(r.name) for r in (SERVICES, ENDPOINTSLICES, NAMESPACES)}


def test_multi_document_file_with_list_and_default_namespace(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "---\n".join(
            [
                SERVICE_A,
                SERVICE_B_NO_NAMESPACE,
                DEPLOYMENT,
                "kind: List\nitems:\n- {kind: Namespace, metadata: {name: shop}}\n",
            ]
        )
    )
    s = stores()
    assert ManifestSource(path, s).load()
    assert sorted(s[SERVICES].keys()) == ["default/b", "shop/a"]
    assert s[NAMESPACES].keys() == ["shop"]
    assert all(store.synced for store in s.values())


def test_folder_of_files_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text(SERVICE_A)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ns.json").write_text('{"kind": "Namespace", "metadata": {"name": "x"}}')
    (tmp_path / "notes.txt").write_text("not a manifest: {")
    s = stores()
    assert ManifestSource(tmp_path, s).load()
    assert s[SERVICES].keys() == ["shop/a"] and s[NAMESPACES].keys() == ["x"]


def test_broken_file_keeps_the_last_good_state(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(SERVICE_A)
    s = stores()
    source = ManifestSource(path, s)
    assert source.load()
    path.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    assert not source.load()
    assert s[SERVICES].keys() == ["shop/a"]
    path.unlink()
    assert not source.load()
    assert s[SERVICES].keys() == ["shop/a"]


def test_invalid_object_is_skipped_and_its_last_good_version_kept(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(SERVICE_A + "---\n" + SERVICE_B_NO_NAMESPACE)
    s = stores()
    source = ManifestSource(path, s)
    source.load()
    path.write_text(
        SERVICE_A.replace("10.96.0.1", "10.96.0.999") + "---\n" + SERVICE_B_NO_NAMESPACE
    )
    assert source.load()
    assert s[SERVICES].get("shop/a").spec.cluster_ip == "10.96.0.1"
    assert s[SERVICES].get("default/b") is not None


def test_removed_object_is_deleted_on_reload(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(SERVICE_A + "---\n" + SERVICE_B_NO_NAMESPACE)
    s = stores()
    events = []
    s[SERVICES].subscribe(lambda e: events.append((e.type.value, e.key)))
    source = ManifestSource(path, s)
    source.load()
    path.write_text(SERVICE_A)
    source.load()
    assert events[-1] == ("DELETED", "default/b")


async def test_file_changes_are_picked_up_while_running(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(SERVICE_A)
    state = ClusterState([SERVICES, ENDPOINTSLICES])
    await state.start(AccessSettings(manifests=path), "test")
    try:
        await asyncio.wait_for(state.wait_synced(), 5)
        assert state.readiness() == (True, "ok")
        changed = asyncio.Event()
        state.store(SERVICES).subscribe(lambda e: changed.set())
        path.write_text(SERVICE_A + "---\n" + SERVICE_B_NO_NAMESPACE)
        # mtime granularity: make sure the change is visible even within one clock tick
        os.utime(path, ns=(0, 10**9))
        await asyncio.wait_for(changed.wait(), 5)
        assert sorted(state.store(SERVICES).keys()) == ["default/b", "shop/a"]
    finally:
        await state.stop()


async def test_missing_manifest_at_start_is_not_ready(tmp_path):
    state = ClusterState([SERVICES])
    await state.start(AccessSettings(manifests=tmp_path / "absent.yaml"), "test")
    try:
        await asyncio.sleep(0.2)
        ready, why = state.readiness()
        assert not ready and "services" in why
    finally:
        await state.stop()


def test_broken_json_file_is_reported_and_keeps_state(tmp_path):
    (tmp_path / "a.yaml").write_text(SERVICE_A)
    s = stores()
    source = ManifestSource(tmp_path, s)
    assert source.load()
    (tmp_path / "b.json").write_text('{"kind": "Namespace", "metadata": ')
    assert not source.load()
    assert s[SERVICES].keys() == ["shop/a"] and s[NAMESPACES].keys() == []


def test_yaml_that_json_cannot_hold_is_skipped_as_invalid_and_dates_read_as_text(tmp_path):
    """Objects are parsed from a JSON copy of the document (memory, see _detached): a
    mapping with integer keys cannot be copied and is reported invalid like any bad object,
    and an unquoted date in a label is read as the text it was written as."""
    path = tmp_path / "cluster.yaml"
    proxy_label = "service.kubernetes.io/service-proxy-name"  # a label the models keep
    path.write_text(
        SERVICE_A.replace("ports:", "selector: {1: one}, ports:")
        + "---\n"
        + SERVICE_B_NO_NAMESPACE.replace(
            "{name: b}", f"{{name: b, labels: {{{proxy_label}: 2024-01-31}}}}"
        )
    )
    s = stores()
    assert ManifestSource(path, s).load()
    assert s[SERVICES].get("shop/a") is None
    assert s[SERVICES].get("default/b").metadata.labels == {proxy_label: "2024-01-31"}
