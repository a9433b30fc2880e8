"""What a full garbage collection walks in kpx at N Services, with and without `gc.freeze`.

    .venv/bin/python -m bench.gc_heap [--services 10000]

Runs kpx's own `serve` (nftables mode, `--manifests`, N Services with one endpoint each, as
bench/proxy.py's programming runs) in this process inside a node namespace of a fresh
bench/netns_topology.py chain. Once kpx froze its start-up heap (after the first sync), it
prints the objects a full collection walks and how long it took, then unfreezes and collects
again: the same full collection as before kpx froze its heap. The object counts are exact;
the milliseconds are this machine's, at this moment (a full collection holds the event loop,
so every proxied byte waits that long).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path

import uvloop

from bench.netns_topology import Chain, netns_unavailable
from bench.proxy import programming_objects
from kpx import settings as kpx_settings
from kpx.main import serve


async def measure(settings: kpx_settings.KpxSettings, services: int) -> dict[str, float]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        async with asyncio.timeout(600):
            while not gc.get_freeze_count():  # noqa: ASYNC110  (nothing to wait on but this)
                await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        frozen = gc.get_freeze_count()
        walked_frozen = len(gc.get_objects())  # the frozen generation is not listed
        t0 = time.perf_counter()
        gc.collect()
        frozen_ms = (time.perf_counter() - t0) * 1000
        gc.unfreeze()
        walked_all = len(gc.get_objects())
        t0 = time.perf_counter()
        gc.collect()
        all_ms = (time.perf_counter() - t0) * 1000
        gc.freeze()
    finally:
        stop.set()
        await task
    return {
        "services": services,
        "frozen_objects": frozen,
        "full_gc_objects_frozen": walked_frozen,
        "full_gc_ms_frozen": round(frozen_ms, 2),
        "full_gc_objects_unfrozen": walked_all,
        "full_gc_ms_unfrozen": round(all_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as tmp, Chain() as chain:
        manifests = Path(tmp) / "manifests"
        manifests.mkdir()
        # Written and dropped: this process's own copy must not count as kpx's heap.
        (manifests / "all.json").write_text(
            json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": programming_objects(args.services)}
            )
        )
        settings = kpx_settings.load(
            [
                *("--mode", "nftables", "--manifests", str(manifests), "--node-name", "node"),
                *("--metrics-bind-address", "127.0.0.1:10249", "--log-level", "warning"),
                *("--healthz-bind-address", "127.0.0.1:10256"),
            ]
        )
        with chain.node.entered():  # kpx's sockets and its nft subprocesses live there
            result = uvloop.run(measure(settings, args.services))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
