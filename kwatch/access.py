"""How to reach the API server: URL, TLS context and a source of bearer tokens.

Three ways, as kube-proxy and CoreDNS offer them:
- in-cluster: KUBERNETES_SERVICE_HOST/PORT, the service-account CA, and the projected token,
  re-read as the kubelet rotates it;
- a kubeconfig (path + context) through the official `kubernetes` package's loader, so client
  certificates, static tokens, exec plugins and auth-provider refresh all work; the package
  (35 MB of RSS) is imported only in this mode;
- an explicit URL with a token file and an optional CA file.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Bound service-account tokens rotate (default 1 h lifetime, refreshed at 80%); client-go
# re-reads the file every minute, and so do we.
TOKEN_REREAD_SECONDS = 60.0


class AccessError(Exception):
    """Cluster access cannot be configured (missing file, bad kubeconfig, ...)."""


TokenSource = Callable[[], str | None]


@dataclass
class ClusterAccess:
    server: str  # https://host:port, no trailing slash
    ssl_context: ssl.SSLContext | None  # None only for plain http:// servers
    token: TokenSource  # returns the current bearer token, or None (client-cert auth)
    description: str  # for logs: where this access came from

    def auth_headers(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}


class FileToken:
    """A bearer token read from a file and re-read periodically (rotation)."""

    def __init__(self, path: Path, reread_seconds: float = TOKEN_REREAD_SECONDS) -> None:
        self.path = path
        self.reread_seconds = reread_seconds
        self._value: str | None = None
        self._read_at = 0.0
        self()  # fail fast on a missing file

    def __call__(self) -> str | None:
        now = time.monotonic()
        if self._value is None or now - self._read_at >= self.reread_seconds:
            try:
                self._value = self.path.read_text().strip()
            except OSError as err:
                if self._value is None:
                    raise AccessError(f"cannot read token file {self.path}: {err}") from err
                # Keep the previous token while a rotation is in flight.
            self._read_at = now
        return self._value


def _tls_context(
    ca_file: str | None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as err:
        raise AccessError(f"cannot load TLS files (ca={ca_file}, cert={cert_file}): {err}") from err
    if not verify:
        # Only when a kubeconfig explicitly says insecure-skip-tls-verify.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def in_cluster(sa_dir: Path = SA_DIR) -> ClusterAccess:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise AccessError(
            "not running in a cluster (KUBERNETES_SERVICE_HOST unset): "
            "pass --kubeconfig, --apiserver or --manifests"
        )
    if ":" in host:  # bare IPv6
        host = f"[{host}]"
    return ClusterAccess(
        server=f"https://{host}:{port}",
        ssl_context=_tls_context(str(sa_dir / "ca.crt")),
        token=FileToken(sa_dir / "token"),
        description="in-cluster",
    )


def explicit(server: str, token_file: str | None, ca_file: str | None) -> ClusterAccess:
    token: TokenSource = FileToken(Path(token_file)) if token_file else (lambda: None)
    ctx = _tls_context(ca_file) if server.startswith("https://") else None
    return ClusterAccess(server.rstrip("/"), ctx, token, f"apiserver {server}")


def from_kubeconfig(path: str, context: str | None = None) -> ClusterAccess:
    # Imported here: it pulls in the whole generated client, which in-cluster mode never needs.
    from kubernetes.client import Configuration
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.kube_config import load_kube_config

    cfg = Configuration()
    try:
        load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=cfg, persist_config=False
        )
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as err:
        raise AccessError(f"kubeconfig {path} (context {context or 'current'}): {err}") from err
    ctx = None
    if cfg.host.startswith("https://"):
        ctx = _tls_context(cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file, bool(cfg.verify_ssl))
    return ClusterAccess(
        server=cfg.host.rstrip("/"),
        ssl_context=ctx,
        token=_kubeconfig_token(cfg),
        description=f"kubeconfig {path} context {context or 'current'}",
    )


def _kubeconfig_token(cfg: Any) -> TokenSource:
    """Token from the loaded config, refreshed by its hook (exec plugins, OIDC) when due."""

    def token() -> str | None:
        if cfg.refresh_api_key_hook is not None:
            cfg.refresh_api_key_hook(cfg)
        value = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if not value:
            return None
        value = str(value)
        return value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value

    return token
