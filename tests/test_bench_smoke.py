"""The benchmark harnesses run end to end in `--quick` mode (seconds each).

Only that they work: the figures of a quick run on a shared machine mean nothing, so none is
checked. They skip when the peer tools are not installed (knot, dnsperf, haproxy, iperf3 and
wrk are not in scripts/bootstrap.sh) or network namespaces are not available.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.netns_topology import netns_unavailable

ROOT = Path(__file__).resolve().parent.parent


def _needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install it to run the benchmarks)")


def _run(module: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}\n{out.stdout[-3000:]}"
    return out.stdout


@pytest.mark.timeout(120)
def test_bench_dns_quick() -> None:
    _needs("knotd", "dnsperf")
    text = _run("bench.dns")
    assert "medians of 1 runs" in text
    assert "propagation" in text
    # The knot zone mirrors dnsd's records: every sampled question gets the same answer.
    assert "differs:" not in text, "knot and dnsd answer differently:\n" + text


@pytest.mark.timeout(120)
def test_bench_proxy_quick() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    _needs("iperf3", "wrk", "haproxy")
    text = _run("bench.proxy")
    assert "medians of 1 runs" in text
    assert "network programming latency" in text
    prefix = text.split("netns chain ", 1)[1].split("-*", 1)[0]
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in leftovers  # every namespace it created is gone
