"""Initial sync of a big cluster through kwatch, against the fake API server in its own process.

    .venv/bin/python -m bench.sync [--services 10000] [--endpoints-per-slice 10] [--runs 3]
        [--objects realistic|minimal] [--quick] [--json PATH]

Loads 10,000 Services and 10,000 EndpointSlices (100,000 endpoints) into the fake API server
(a separate process, so its memory is not counted), then, in a fresh process per run, measures:
- seconds from start to `synced` (paginated lists over HTTPS, parse, store);
- RSS growth of the process caused by the stores (baseline taken after every import);
- events/s applied afterwards: a watch replaying the whole history (one ADDED per object)
  through the reflector's live-event path into fresh stores.
`--objects realistic` (the default) dresses the objects as a real cluster's look
(bench/realistic.py: managedFields, last-applied annotations, Helm labels, ownerReferences);
`--objects minimal` sends only the fields the daemons read. Prints each run and the medians.
Figures, not assertions: this machine is shared and noisy.
`--quick`: 500 Services, 1 run, a smoke test of the harness. `--json PATH` also writes the runs
and the medians to PATH, for bench/report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.apiclient import start_fake_apiserver
from bench.jsonout import write_json
from bench.realistic import dress

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def endpoint_ip(n: int) -> str:
    return f"10.{64 + n // 65536}.{n // 256 % 256}.{n % 256}"


def generate(services: int, per_slice: int) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i in range(services):
        ns = f"ns{i % 100}"
        name = f"svc{i}"
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": ip,
                    "clusterIPs": [ip],
                    "selector": {"app": name},
                    "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                },
            }
        )
        objs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-abcde",
                    "namespace": ns,
                    "labels": {
                        "kubernetes.io/service-name": name,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    },
                    "annotations": {
                        "endpoints.kubernetes.io/last-change-trigger-time": "2026-11-22T00:00:00Z"
                    },
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
                "endpoints": [
                    {
                        "addresses": [endpoint_ip(i * per_slice + j)],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "nodeName": f"node-{j % 50}",
                        "zone": f"zone-{j % 3}",
                        "targetRef": {"kind": "Pod", "name": f"{name}-{j}", "namespace": ns},
                    }
                    for j in range(per_slice)
                ],
            }
        )
    return objs


def _set_when_full(store: Any, target: int, done: asyncio.Event) -> Any:
    def on_event(_event: object) -> None:
        if len(store) >= target:
            done.set()

    return on_event


async def measure(kubeconfig: str) -> dict[str, float]:
    """One run, in a fresh process: sync time, RSS growth, replayed events/s."""
    from kubernetes.config import kube_config  # noqa: F401  (imported before the baseline)

    from kwatch.client import ApiClient
    from kwatch.cluster import ClusterState, access_from_settings
    from kwatch.reflector import Reflector
    from kwatch.resources import ENDPOINTSLICES, SERVICES
    from kwatch.settings import AccessSettings
    from kwatch.store import Store

    gc.collect()
    base = rss_mb()
    settings = AccessSettings(kubeconfig=kubeconfig)
    state = ClusterState([SERVICES, ENDPOINTSLICES])
    started = time.perf_counter()
    await state.start(settings, "bench-sync")
    await state.wait_synced()
    synced = time.perf_counter() - started
    gc.collect()
    grown = rss_mb() - base
    objects = len(state.store(SERVICES)) + len(state.store(ENDPOINTSLICES))
    endpoints = sum(len(s.endpoints) for s in state.store(ENDPOINTSLICES))
    await state.stop()

    # Replay: watch from the oldest retained version; every object arrives as one ADDED.
    client = ApiClient(access_from_settings(settings))
    rates = {}
    for resource in (SERVICES, ENDPOINTSLICES):
        store: Store[Any] = Store(resource.name)
        reflector = Reflector(client, resource, store, watch_timeout=(60, 60))
        target = objects // 2
        done = asyncio.Event()
        store.subscribe(_set_when_full(store, target, done))
        t0 = time.perf_counter()
        task = asyncio.create_task(reflector._watch("0"))  # rv 0: every object as ADDED
        finished, _ = await asyncio.wait(
            {task, asyncio.ensure_future(done.wait())},
            timeout=120,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in finished:
            raise RuntimeError(f"replay watch ended early: {task.exception()!r}, got {len(store)}")
        rates[resource.name] = target / (time.perf_counter() - t0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await client.close()
    return {
        "synced_s": synced,
        "rss_growth_mb": grown,
        "rss_total_mb": rss_mb(),
        "objects": objects,
        "endpoints": endpoints,
        "services_events_per_s": rates["services"],
        "endpointslices_events_per_s": rates["endpointslices"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints-per-slice", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="500 Services, 1 run")
    parser.add_argument(
        "--objects",
        choices=["realistic", "minimal"],
        default="realistic",
        help="objects shaped as a real cluster's (managedFields, labels, ...) or minimal ones",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: kubeconfig path
    args = parser.parse_args()
    if args.quick:
        args.services, args.runs = 500, 1
    return args


def measure_in_child(kubeconfig: Path) -> dict[str, float]:
    """One run in a fresh process (`--measure`), so every run starts from an empty heap."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.sync", "--measure", str(kubeconfig)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_all(args: argparse.Namespace) -> list[dict[str, float]]:
    """The fake API server loaded with the objects, then `--runs` child runs against it."""
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        objects = generate(args.services, args.endpoints_per_slice)
        if args.objects == "realistic":
            dress(objects)
        # History holds every object, so the replay watch from rv 0 sees them all.
        server, kubeconfig = start_fake_apiserver(
            objects,
            Path(tmp),
            lambda *argv, **kw: subprocess.Popen(list(argv), **kw),
            extra_history=10,
        )
        runs = []
        try:
            for i in range(args.runs):
                result = measure_in_child(kubeconfig)
                runs.append(result)
                print(f"run {i + 1}: " + ", ".join(f"{k}={v:,.2f}" for k, v in result.items()))
        finally:
            server.terminate()
            server.wait(10)
    return runs


def report(args: argparse.Namespace, runs: list[dict[str, float]]) -> None:
    """The medians, printed and written to `--json`."""
    print(
        f"\nmedians of {len(runs)} runs ({args.services:,} Services, "
        f"{args.services * args.endpoints_per_slice:,} endpoints, {args.objects} objects):"
    )
    medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    for key, value in medians.items():
        print(f"  {key:28} {value:>12,.2f}")
    print("  targets: synced_s <= 3, rss_growth_mb <= 120")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "sync",
                "quick": args.quick,
                "args": vars(args),
                "services": args.services,
                "endpoints": args.services * args.endpoints_per_slice,
                "objects": args.objects,
                "runs": runs,
                "medians": medians,
                "complete": True,
            },
        )


def main() -> None:
    args = parse_args()
    if args.measure:
        import uvloop

        print(json.dumps(uvloop.run(measure(args.measure))))
        return
    report(args, run_all(args))


if __name__ == "__main__":
    main()
