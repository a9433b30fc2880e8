"""A blackholed API connection (packets dropped, no reset) is noticed by TCP keepalive.

The fake API server and a reflector run in a private network namespace (`unshare --net`, its
own loopback); an nftables rule then drops every packet of the API port, as a dead NAT entry
or a cut link would. Keepalive is shortened here (2 s idle, 2 probes 1 s apart) to keep the
test short; with the defaults (15 s + 3 x 5 s) the same mechanism takes 30 s, against 45 s
for client-go's HTTP/2 health check. The watch's own read-idle deadline is set long (60 s), so
only keepalive can be what notices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
import kwatch.client as client
client.KEEPALIVE_IDLE, client.KEEPALIVE_INTERVAL, client.KEEPALIVE_COUNT = 2, 1, 2
client.USER_TIMEOUT_MS = 4000
from prometheus_client import REGISTRY
from kwatch.backoff import Backoff
from kwatch.cluster import ClusterState
from kwatch.resources import SERVICES
from kwatch.settings import AccessSettings
from tests.apiserver import FakeApiServer

def svc(name, ip):
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}

def errors():
    return REGISTRY.get_sample_value(
        "kwatch_api_errors_total", {"resource": "services", "code": "0"}) or 0.0

def nft(script):
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)

async def main():
    with FakeApiServer(bookmark_interval=0.5) as api:
        api.start()
        api.load([svc("a", "10.96.0.1")])
        kubeconfig = api.write_kubeconfig(sys.argv[2])
        state = ClusterState([SERVICES], backoff=lambda: Backoff(0.2, 1.0, jitter=0.1))
        await state.start(AccessSettings(kubeconfig=str(kubeconfig), watch_idle_timeout=60),
                          "blackhole-test")
        await asyncio.wait_for(state.wait_synced(), 10)
        while api.watch_count() < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        before = errors()
        nft("table inet blackhole {\n chain in {\n type filter hook input priority -300;\n"
            " tcp dport %d drop\n tcp sport %d drop\n }\n}\n" % (api.port, api.port))
        cut = time.monotonic()
        api.create(svc("b", "10.96.0.2"))  # sent into the blackhole
        detected = None
        while time.monotonic() - cut < 20:
            if errors() > before:
                detected = time.monotonic() - cut
                break
            await asyncio.sleep(0.05)
        nft("delete table inet blackhole")
        healed = time.monotonic()
        converged = None
        while time.monotonic() - healed < 15:
            if "default/b" in state.store(SERVICES):
                converged = time.monotonic() - healed
                break
            await asyncio.sleep(0.05)
        await state.stop()
        print(json.dumps({"detected": detected, "converged": converged}))

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("nft") is None,
                    reason="needs unshare and nft")  # fmt: skip
def test_a_blackholed_watch_is_noticed_by_keepalive(tmp_path: Path) -> None:
    out = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", CHILD, str(ROOT),
         str(tmp_path / "kubeconfig.yaml")],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # 2 s idle + 2 probes 1 s apart = 4 s; never the 60 s read-idle deadline.
    assert result["detected"] is not None and 3.0 <= result["detected"] <= 10.0, result
    assert result["converged"] is not None and result["converged"] <= 10.0, result
