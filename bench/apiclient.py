"""The fake API server in its own process, and writes to it with the kubeconfig's token and CA
(shared by bench/dns.py and bench/proxy.py)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def start_fake_apiserver(
    objects: list[dict[str, Any]],
    folder: Path,
    spawn: Callable[..., subprocess.Popen[Any]],
    extra_history: int = 1000,
) -> tuple[subprocess.Popen[Any], Path]:
    """`python -m tests.apiserver` loaded with `objects`, started through `spawn(*argv,
    **popen_kwargs)` (e.g. inside a namespace); returns the process and its kubeconfig."""
    folder.mkdir(parents=True, exist_ok=True)
    objects_file = folder / "objects.json"
    objects_file.write_text(json.dumps(objects))
    kubeconfig = folder / "kubeconfig.yaml"
    proc = spawn(
        sys.executable,
        "-m",
        "tests.apiserver",
        "--port",
        "0",
        "--kubeconfig",
        str(kubeconfig),
        "--load",
        str(objects_file),
        "--history-limit",
        str(len(objects) + extra_history),
        "--bookmark-interval",
        "5",
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if not proc.stdout.readline():
        proc.kill()
        raise SystemExit("fake API server did not start")
    return proc, kubeconfig


class Api:
    """Requests over one keep-alive HTTPS connection, authenticated as the kubeconfig says
    (bearer token, CA from `certificate-authority` or `-data`)."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        ctx = ssl.create_default_context()
        if "certificate-authority-data" in cluster:
            ctx.load_verify_locations(
                cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
            )
        else:
            ctx.load_verify_locations(cafile=cluster["certificate-authority"])
        url = urllib.parse.urlparse(cluster["server"])
        self.conn = http.client.HTTPSConnection(
            url.hostname or "127.0.0.1", url.port, context=ctx, timeout=10
        )
        self.headers = {
            "Authorization": f"Bearer {user['token']}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers=self.headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {payload[:300]!r}")
        result: dict[str, Any] = json.loads(payload)
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
