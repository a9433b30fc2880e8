"""The fake API server's optional RBAC: service-account tokens authenticate as their account,
and only what the bound roles grant is allowed (403 otherwise)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.apiserver import FakeApiServer
from tests.apiserver.authz import Rbac, Request, service_account_user

READER = service_account_user("kpx-system", "reader")

OBJECTS: list[dict[str, Any]] = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "reader"},
        "rules": [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"], "resourceNames": ["n1"]},
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "reader"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "reader",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "kpx-system"}],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "pods", "namespace": "team"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "pods", "namespace": "team"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
        "subjects": [{"kind": "Group", "name": "system:serviceaccounts:kpx-system"}],
    },
]


def test_cluster_role_binding_grants_only_its_verbs() -> None:
    rbac = Rbac(OBJECTS)
    assert rbac.allows(READER, Request("list", "", "services", None, None))
    assert rbac.allows(READER, Request("watch", "", "services", "ns", None))
    assert not rbac.allows(READER, Request("create", "", "services", "ns", None))
    assert not rbac.allows(READER, Request("list", "discovery.k8s.io", "services", None, None))
    assert not rbac.allows(
        service_account_user("other", "reader"), Request("list", "", "services", None, None)
    )


def test_resource_names_limit_to_the_named_object() -> None:
    rbac = Rbac(OBJECTS)
    assert rbac.allows(READER, Request("get", "", "nodes", None, "n1"))
    assert not rbac.allows(READER, Request("get", "", "nodes", None, "n2"))
    assert not rbac.allows(READER, Request("get", "", "nodes", None, None))


def test_role_binding_grants_in_its_namespace_only_and_matches_groups() -> None:
    rbac = Rbac(OBJECTS)
    assert rbac.allows(READER, Request("create", "", "pods", "team", None))
    assert not rbac.allows(READER, Request("create", "", "pods", "other", None))
    assert not rbac.allows(
        service_account_user("else", "x"), Request("create", "", "pods", "team", None)
    )


def test_tokens_authenticate_until_revoked_and_count_their_use() -> None:
    rbac = Rbac(OBJECTS)
    rbac.set_token("t-1", READER)
    assert rbac.authenticate("t-1") == READER
    assert rbac.authenticate("t-2") is None
    rbac.revoke("t-1")
    assert rbac.authenticate("t-1") is None
    assert rbac.used["t-1"] == 1


@pytest.fixture
def srv() -> Iterator[tuple[FakeApiServer, Rbac]]:
    rbac = Rbac(OBJECTS)
    rbac.set_token("reader-token", READER)
    with FakeApiServer(token="admin", rbac=rbac) as server:
        yield server, rbac


def _request(
    server: FakeApiServer, path: str, token: str, method: str = "GET", body: Any = None
) -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context(cafile=str(server.ca_path))
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_server_answers_403_for_what_the_role_does_not_grant(
    srv: tuple[FakeApiServer, Rbac],
) -> None:
    server, rbac = srv
    assert _request(server, "/api/v1/services", "reader-token")[0] == 200
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}
    status, body = _request(
        server, "/api/v1/namespaces/a/services", "reader-token", "POST", service
    )
    assert status == 403
    assert body["reason"] == "Forbidden"
    assert READER in body["message"]
    assert _request(server, "/api/v1/endpoints", "reader-token")[0] in (403, 404)
    # the admin token is not subject to RBAC
    assert _request(server, "/api/v1/namespaces/a/services", "admin", "POST", service)[0] == 201
    assert (READER, Request("create", "", "services", "a", None)) in rbac.denied


def test_unknown_and_revoked_tokens_get_401(srv: tuple[FakeApiServer, Rbac]) -> None:
    server, rbac = srv
    assert _request(server, "/api/v1/services", "nobody")[0] == 401
    rbac.revoke("reader-token")
    assert _request(server, "/api/v1/services", "reader-token")[0] == 401


def test_the_rendered_roles_grant_the_daemons_reads_and_nothing_else() -> None:
    from tests.deploy.manifests import build

    rbac = Rbac(build("overlays/kind"))
    dnsd = service_account_user("kpx-system", "dnsd")
    kpx = service_account_user("kpx-system", "kpx")
    slices = ("discovery.k8s.io", "endpointslices")
    for user, reads in (
        (dnsd, [("", "services"), ("", "namespaces"), slices]),
        (kpx, [("", "services"), ("", "nodes"), slices]),
    ):
        for group, resource in reads:
            for verb in ("list", "watch"):
                assert rbac.allows(user, Request(verb, group, resource, None, None))
            for verb in ("create", "update", "patch", "delete"):
                assert not rbac.allows(user, Request(verb, group, resource, "shop", "x"))
        assert not rbac.allows(user, Request("list", "", "pods", None, None))
        assert not rbac.allows(user, Request("get", "", "secrets", "kpx-system", "x"))
    assert not rbac.allows(kpx, Request("list", "", "namespaces", None, None))
