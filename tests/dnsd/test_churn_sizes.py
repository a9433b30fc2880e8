"""Churn leaves nothing behind: once Services, EndpointSlices, Pods and Namespaces with names
never seen before have come and gone, every map the zone, its controller and the stores keep
is back to the size it had before (the convergence soak, bench/soak.py, churns like this for
20 minutes and measures dnsd's RSS)."""

from __future__ import annotations

from typing import Any

from dnsd.handler import PodMode
from tests.dnsd.helpers import endpoint, endpoint_slice, namespace, pod, service
from tests.dnsd.test_handler import BASIC, Cluster

TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"


def sizes(cluster: Cluster) -> dict[str, int]:
    index, controller = cluster.index, cluster.controller
    out = {
        "answers": len(index.answers),
        "existing": len(index.existing),
        "aliases": len(index.aliases),
        "sources": len(index.sources()),
        "shared": len(index._shared),
        "ptr_owners": len(index._ptr_owners),
        "touched": len(index._touched),
        "dirty": len(controller.changes._dirty),
        "triggers": len(controller.changes._triggers),
        "dirty_namespaces": len(controller._dirty_namespaces),
    }
    for resource, store in cluster.stores.items():
        out[resource.name] = len(store)
        for name, values in store._indexes.items():
            out[f"{resource.name}:{name}"] = len(values)
    return out


def with_trigger(eps: dict[str, Any], second: int) -> dict[str, Any]:
    eps["metadata"]["annotations"] = {TRIGGER: f"2026-12-04T18:00:{second % 60:02d}Z"}
    return eps


def round_objects(i: int, step: int) -> list[dict[str, Any]]:
    """Round `i` of the churn, `step` 0 or 1 (the second moves endpoints and addresses): every
    kind of Service in a namespace of its own, with new names and addresses each round."""
    ns = f"churn{i}"
    a, b = i % 250 + 1, (i + step) % 250 + 1
    ip4, ip6 = f"10.100.{a}.{b}", f"fd00:100::{i:x}:{step + 1}"
    shared = f"10.101.{a}.1"  # an endpoint of two headless Services: a shared reverse name
    port = [{"name": "http", "port": 80 + step}]
    return [
        namespace(ns),
        service(f"web{i}", ns, ips=[f"10.96.{a}.{b}", f"fd00:96::{i:x}"], ports=port),
        with_trigger(
            endpoint_slice(f"web{i}-v4", f"web{i}", [endpoint(ip4)], ns=ns, ports=port), step
        ),
        with_trigger(
            endpoint_slice(
                f"web{i}-v6",
                f"web{i}",
                [endpoint(ip6, ready=step == 0)],
                ns=ns,
                ports=port,
                address_type="IPv6",
            ),
            step + 1,
        ),
        service(f"db{i}", ns, headless=True, ports=port),
        endpoint_slice(
            f"db{i}-v4",
            # The second step relabels the slice to the other headless Service.
            f"db{i}" if step == 0 else f"cache{i}",
            [endpoint(f"10.102.{a}.{b}", hostname=f"db-{step}"), endpoint(shared)],
            ns=ns,
            ports=port,
        ),
        service(f"cache{i}", ns, headless=True, ports=port),
        endpoint_slice(f"cache{i}-v4", f"cache{i}", [endpoint(shared)], ns=ns, ports=port),
        service(f"out{i}", ns, external_name=f"x{step}.example.com"),
        service(f"in{i}", ns, external_name=f"web{i}.{ns}.svc.cluster.local"),
        pod(f"pod{i}-{step}", ip4, ns),
    ]


def test_churn_with_new_names_returns_every_map_to_its_size() -> None:
    cluster = Cluster(BASIC, pods=PodMode.VERIFIED, endpoint_ptrs=True)
    baseline = sizes(cluster)
    for i in range(30):
        cluster.apply([*BASIC, *round_objects(i, 0)])
        during = sizes(cluster)
        assert cluster.ask(f"in{i}.churn{i}.svc.cluster.local").answer
        cluster.apply([*BASIC, *round_objects(i, 1)])
        cluster.apply(BASIC)
        assert sizes(cluster) == baseline, f"round {i}"
    assert during["answers"] > baseline["answers"]
    assert during["ptr_owners"] > baseline["ptr_owners"]
    assert during["shared"] > baseline["shared"]
    assert during["aliases"] > baseline["aliases"]
    assert not cluster.ask("web29.churn29.svc.cluster.local").answer
