"""Kubeconfig access: static credentials read without the official client, the rest through it.

Every access is checked by listing Services from the fake API server with it, as a daemon does.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
import yaml

from kwatch.access import AccessError, ClusterAccess, from_kubeconfig, static_kubeconfig
from kwatch.client import ApiClient, ApiError
from kwatch.resources import SERVICES


async def lists(access: ClusterAccess) -> bool:
    client = ApiClient(access, request_timeout=5)
    try:
        page = await client.list_page(SERVICES, {"limit": "1"})
        return page.resource_version != ""
    finally:
        await client.close()


def edit(path: Path, change) -> Path:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_token_kubeconfig_is_read_without_the_official_loader(kubeconfig):
    access = static_kubeconfig(str(kubeconfig))
    assert access is not None and access.token() == "t0k3n"
    assert await lists(access)


async def test_client_certificate_data_is_loaded_and_left_on_no_disk(api_server, tmp_path):
    path = api_server.write_kubeconfig(tmp_path / "kc.yaml", client_cert=True)
    access = static_kubeconfig(str(path))
    assert access is not None and access.token() is None
    assert await lists(access)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kc.yaml"]


async def test_ca_and_token_files_are_relative_to_the_kubeconfig(kubeconfig, tmp_path):
    doc = yaml.safe_load(kubeconfig.read_text())
    cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
    (tmp_path / "ca.pem").write_bytes(base64.b64decode(cluster.pop("certificate-authority-data")))
    cluster["certificate-authority"] = "ca.pem"
    (tmp_path / "token").write_text(user.pop("token") + "\n")
    user["tokenFile"] = "token"
    path = tmp_path / "relative.yaml"
    path.write_text(yaml.safe_dump(doc))
    access = from_kubeconfig(str(path))
    assert access.token() == "t0k3n"
    assert await lists(access)


async def test_exec_plugins_go_through_the_official_loader(kubeconfig):
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "t0k3n"},
    }

    def to_exec(doc) -> None:
        doc["users"][0]["user"] = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": ["-c", f"print({json.dumps(json.dumps(credential))})"],
                "interactiveMode": "Never",
            }
        }

    path = edit(kubeconfig, to_exec)
    assert static_kubeconfig(str(path)) is None
    access = from_kubeconfig(str(path))
    assert access.token() == "t0k3n"
    assert await lists(access)


async def test_insecure_skip_tls_verify_needs_no_ca(kubeconfig):
    def insecure(doc) -> None:
        cluster = doc["clusters"][0]["cluster"]
        cluster.pop("certificate-authority-data")
        cluster["insecure-skip-tls-verify"] = True

    access = static_kubeconfig(str(edit(kubeconfig, insecure)))
    assert access is not None
    assert await lists(access)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update({"current-context": "nope"}), "no contexts entry named 'nope'"),
        (lambda d: d["clusters"][0]["cluster"].pop("server"), "has no server"),
        (
            lambda d: d["clusters"][0]["cluster"].update({"certificate-authority-data": "!!"}),
            "cannot load TLS material",
        ),
    ],
)
def test_a_broken_kubeconfig_is_a_clear_error(kubeconfig, change, problem):
    path = edit(kubeconfig, change)
    with pytest.raises(AccessError, match=problem):
        from_kubeconfig(str(path))


def test_a_missing_kubeconfig_is_a_clear_error(tmp_path):
    with pytest.raises(AccessError, match="No such file"):
        from_kubeconfig(str(tmp_path / "absent.yaml"))


async def test_the_server_rejects_a_wrong_static_token(kubeconfig):
    path = edit(kubeconfig, lambda d: d["users"][0]["user"].update(token="wrong"))
    access = static_kubeconfig(str(path))
    assert access is not None
    with pytest.raises(ApiError) as err:
        await lists(access)
    assert err.value.code == 401
