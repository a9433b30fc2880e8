"""How to reach the API server: URL, TLS context and a source of bearer tokens.

Three ways, as kube-proxy and CoreDNS offer them:
- in-cluster: KUBERNETES_SERVICE_HOST/PORT, the service-account CA, and the projected token,
  re-read as the kubelet rotates it;
- a kubeconfig (path + context). Static credentials (a token or token file, client
  certificate and key, CA, as files or inline data) are read here; anything else (exec
  plugins, auth providers, basic auth, impersonation) goes through the official `kubernetes`
  package's loader, so they all work. That package (about 10 MB of RSS, issue 15) is imported
  only then;
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
    static = static_kubeconfig(path, context)
    if static is not None:
        return static
    # Imported here: it pulls in the whole generated client, which static credentials and
    # in-cluster mode never need.
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


# --- kubeconfig with static credentials, without the official client -------------------------

# User entries read here; any other key (exec, auth-provider, username/password, as, ...) means
# the official loader. Cluster keys other than these are ignored, as that loader ignores them.
_STATIC_USER_KEYS = frozenset(
    {
        "token",
        "tokenFile",
        "client-certificate",
        "client-certificate-data",
        "client-key",
        "client-key-data",
    }
)


def static_kubeconfig(path: str, context: str | None = None) -> ClusterAccess | None:
    """Access from a kubeconfig whose user has only static credentials; None when the user
    needs the official loader (exec plugins, auth providers, ...). AccessError when the file
    or the entries it names are missing or malformed."""
    import yaml  # the daemons import it anyway (manifests); here only for kubeconfigs

    where = f"kubeconfig {path} (context {context or 'current'})"
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise AccessError(f"{where}: {err}") from err
    if not isinstance(doc, dict):
        raise AccessError(f"{where}: not a kubeconfig")
    name = context or doc.get("current-context")
    ctx = _named(doc, "contexts", "context", name, where)
    cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), where)
    user = _named(doc, "users", "user", ctx.get("user"), where) if ctx.get("user") else {}
    if set(user) - _STATIC_USER_KEYS:
        return None
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise AccessError(f"{where}: cluster {ctx.get('cluster')!r} has no server")
    base = Path(path).resolve().parent
    ssl_context = None
    if server.startswith("https://"):
        ssl_context = _static_tls(cluster, user, base, where)
    token: TokenSource = lambda: None  # noqa: E731
    if isinstance(user.get("token"), str) and user["token"]:
        value = user["token"]
        token = lambda: value  # noqa: E731
    elif isinstance(user.get("tokenFile"), str) and user["tokenFile"]:
        token = FileToken(_resolve(base, user["tokenFile"]))
    return ClusterAccess(
        server=server.rstrip("/"),
        ssl_context=ssl_context,
        token=token,
        description=f"kubeconfig {path} context {name}",
    )


def _named(doc: dict[str, Any], section: str, key: str, name: Any, where: str) -> dict[str, Any]:
    """The `key` mapping of the entry called `name` in doc[section]."""
    for entry in doc.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                raise AccessError(f"{where}: {section} entry {name!r} is not a mapping")
            return value
    raise AccessError(f"{where}: no {section} entry named {name!r}")


def _resolve(base: Path, value: str) -> Path:
    """kubeconfig paths are relative to the kubeconfig's own directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _static_tls(
    cluster: dict[str, Any], user: dict[str, Any], base: Path, where: str
) -> ssl.SSLContext:
    import binascii
    import tempfile

    verify = not cluster.get("insecure-skip-tls-verify", False)
    try:
        ca_data = cluster.get("certificate-authority-data")
        ca_file = cluster.get("certificate-authority")
        ctx = ssl.create_default_context(
            cafile=str(_resolve(base, ca_file)) if ca_file and not ca_data else None,
            cadata=_b64(ca_data).decode() if ca_data else None,
        )
        cert, key = user.get("client-certificate-data"), user.get("client-key-data")
        if cert or user.get("client-certificate"):
            with tempfile.TemporaryDirectory(prefix="kwatch-") as tmp:
                # ssl reads a client certificate only from files: written to a private
                # directory for the call, removed right after.
                cert_file = (
                    _private_file(Path(tmp) / "cert.pem", _b64(cert))
                    if cert
                    else str(_resolve(base, user["client-certificate"]))
                )
                key_file = (
                    _private_file(Path(tmp) / "key.pem", _b64(key))
                    if key
                    else str(_resolve(base, user["client-key"]))
                    if user.get("client-key")
                    else None
                )
                ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError, ValueError, binascii.Error, TypeError) as err:
        raise AccessError(f"{where}: cannot load TLS material: {err}") from err
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _b64(data: str) -> bytes:
    """Inline kubeconfig data: base64, line breaks ignored as Go's decoder does."""
    import base64

    return base64.b64decode("".join(str(data).split()), validate=True)


def _private_file(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return str(path)
