"""Per-server certificates (trustme CA) and kubeconfig files that point at the fake."""

from __future__ import annotations

import base64
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trustme
import yaml

CONTEXT_NAME = "fake"


class TlsMaterial:
    """A CA, a server certificate for every loopback name and one client certificate.

    PEM files are written to `directory` so clients that only take paths can use them.
    """

    def __init__(self, directory: Path, server_names: Sequence[str] = ()) -> None:
        self.ca = trustme.CA(organization_name="fake-apiserver")
        # server_names: more SANs, for a server reached by a node name or a Service IP.
        self._server = self.ca.issue_cert("127.0.0.1", "::1", "localhost", *server_names)
        # kube-apiserver maps a client cert's CN to the user and O to groups.
        self._client = self.ca.issue_cert(
            "fake-admin", common_name="fake-admin", organization_name="system:masters"
        )
        self.ca_pem = self.ca.cert_pem.bytes()
        self.client_cert_pem = self._client.cert_chain_pems[0].bytes()
        self.client_key_pem = self._client.private_key_pem.bytes()
        self.ca_path = _write(directory / "ca.pem", self.ca_pem)
        self.client_cert_path = _write(directory / "client.pem", self.client_cert_pem)
        self.client_key_path = _write(directory / "client-key.pem", self.client_key_pem)

    def server_context(self) -> ssl.SSLContext:
        """Requests, but does not require, a client certificate signed by our CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self, client_cert: bool = False) -> ssl.SSLContext:
        """A client context trusting our CA (and presenting the client cert if asked)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        if client_cert:
            ctx.load_cert_chain(str(self.client_cert_path), str(self.client_key_path))
        return ctx


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig(
    server: str,
    ca_pem: bytes,
    *,
    token: str | None = None,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """A standard kubeconfig document with one cluster/user/context, all named "fake"."""
    user: dict[str, Any] = {}
    if client_cert_pem is not None and client_key_pem is not None:
        user["client-certificate-data"] = _b64(client_cert_pem)
        user["client-key-data"] = _b64(client_key_pem)
    if token is not None:
        user["token"] = token
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT_NAME,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": CONTEXT_NAME, "user": user}],
        "contexts": [
            {
                "name": CONTEXT_NAME,
                "context": {"cluster": CONTEXT_NAME, "user": CONTEXT_NAME, "namespace": namespace},
            }
        ],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }


def write_kubeconfig(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)  # it holds credentials, as kubectl's files do
    return path
