"""--multicluster over real UDP/TCP (dnspython as the client): ServiceImports answered in
clusterset.local per the MCS DNS specification (KEP-1645) as CoreDNS's `multicluster` option,
fed from a manifest and from the fake API server (which serves multicluster.x-k8s.io)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import dns.flags
import dns.rcode
import pytest

from dnsd.main import Daemon
from dnsd.settings import DnsdSettings
from kwatch.settings import load_settings
from tests.apiserver import FakeApiServer
from tests.dnsd.helpers import ask, endpoint, namespace, rdatas, records, service

MC = "clusterset.local"
Z = "cluster.local"


def service_import(
    name: str,
    ns: str = "default",
    *,
    ips: list[str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    headless: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "Headless" if headless else "ClusterSetIP"}
    if ips is not None:
        spec["ips"] = ips
    if ports is not None:
        spec["ports"] = ports
    return {
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceImport",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def mc_slice(
    name: str,
    svc: str,
    cluster: str | None,
    endpoints: list[dict[str, Any]],
    *,
    ns: str = "default",
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    labels = {"multicluster.kubernetes.io/service-name": svc}
    if cluster is not None:
        labels["multicluster.kubernetes.io/source-cluster"] = cluster
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [],
    }


HTTPS = [{"name": "https", "protocol": "TCP", "port": 443}]
CLUSTER = [
    namespace("default"),
    service("web", ips=["10.96.0.5"], ports=[{"name": "http", "port": 80}]),
    service_import("web", ips=["10.42.42.42", "fd00:42::42"], ports=[*HTTPS, {"port": 8443}]),
    service_import("pending"),  # no clusterset IP yet
    service_import("hdls", headless=True, ports=HTTPS),
    mc_slice(
        "hdls-a",
        "hdls",
        "clusterA",
        [
            endpoint("10.3.0.100", hostname="my-pet-1"),
            endpoint("10.3.0.101", hostname="my-pet-2"),
            endpoint("10.3.0.102", ready=False),
        ],
        ports=HTTPS,
    ),
    mc_slice(
        "hdls-b", "hdls", "clusterB", [endpoint("10.4.0.100", hostname="my-pet-1")], ports=HTTPS
    ),
    mc_slice("hdls-b6", "hdls", "clusterB", [endpoint("fd00:4::1")], address_type="IPv6"),
    service_import("empty", headless=True),
]


async def test_clusterset_ip_service(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--multicluster", MC)
    msg = await ask(dnsd.port, f"web.default.svc.{MC}")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert rdatas(msg) == ["10.42.42.42"]
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{MC}", "AAAA", tcp=True)) == [
        "fd00:42::42"
    ]
    srv = await ask(dnsd.port, f"_https._tcp.web.default.svc.{MC}", "SRV", edns=0)
    # Two clusterset IPs are two records of CoreDNS's SRV() count: 100 / 2.
    assert rdatas(srv) == [f"0 50 443 web.default.svc.{MC}."]
    assert sorted(r for _, t, r in records(srv, "additional") if t in ("A", "AAAA")) == [
        "10.42.42.42",
        "fd00:42::42",
    ]
    # The cluster's own Service is untouched; no per-cluster name for a ClusterSetIP import.
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{Z}")) == ["10.96.0.5"]
    no_cluster = await ask(dnsd.port, f"clustera.web.default.svc.{MC}")
    assert no_cluster.rcode() == dns.rcode.NXDOMAIN


async def test_headless_service_across_clusters(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--multicluster", MC)
    base = f"hdls.default.svc.{MC}"
    assert rdatas(await ask(dnsd.port, base)) == ["10.3.0.100", "10.3.0.101", "10.4.0.100"]
    assert rdatas(await ask(dnsd.port, base, "AAAA")) == ["fd00:4::1"]
    assert rdatas(await ask(dnsd.port, f"my-pet-1.clusterA.{base}")) == ["10.3.0.100"]
    assert rdatas(await ask(dnsd.port, f"my-pet-1.clusterb.{base}", tcp=True)) == ["10.4.0.100"]
    assert rdatas(await ask(dnsd.port, f"fd00-4--1.clusterb.{base}", "AAAA")) == ["fd00:4::1"]
    srv = await ask(dnsd.port, f"_https._tcp.{base}", "SRV", edns=0)
    assert rdatas(srv) == [
        f"0 33 443 my-pet-1.clustera.{base}.",
        f"0 33 443 my-pet-1.clusterb.{base}.",
        f"0 33 443 my-pet-2.clustera.{base}.",
    ]
    assert sorted(r for _, t, r in records(srv, "additional") if t == "A") == [
        "10.3.0.100",
        "10.3.0.101",
        "10.4.0.100",
    ]


async def test_negative_answers_in_the_clusterset_zone(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--multicluster", MC, "--pods", "insecure", "--zonal")
    for name in (
        f"empty.default.svc.{MC}",  # headless without ready endpoints
        f"pending.default.svc.{MC}",  # no clusterset IP
        f"10-3-0-102.clustera.hdls.default.svc.{MC}",  # not ready
        f"my-pet-1.hdls.default.svc.{MC}",  # no cluster ID
        f"10-42-42-42.web.default.svc.{MC}",  # no endpoint names of the local cluster
        f"a.pin._zone.hdls.default.svc.{MC}",  # nor zonal names
        f"1-2-3-4.default.pod.{MC}",  # nor pod names
        f"ghost.default.svc.{MC}",
        f"web.nons.svc.{MC}",
    ):
        for edns in (None, 0):
            msg = await ask(dnsd.port, name, edns=edns)
            assert msg.rcode() == dns.rcode.NXDOMAIN, name
            assert msg.authority[0].name.to_text() == f"{MC}.", name
    for name, rdtype in ((f"default.svc.{MC}", "A"), (f"web.default.svc.{MC}", "TXT")):
        msg = await ask(dnsd.port, name, rdtype)
        assert msg.rcode() == dns.rcode.NOERROR and not msg.answer, name
    soa = await ask(dnsd.port, MC, "SOA")
    assert rdatas(soa)[0].startswith(f"ns.dns.{Z}. hostmaster.{Z}. ")
    assert rdatas(await ask(dnsd.port, f"dns-version.{MC}", "TXT")) == ['"1.1.0"']


async def test_changes_to_imports_and_their_slices(start_dnsd):
    dnsd = await start_dnsd(CLUSTER, "--multicluster", MC)
    base = f"hdls.default.svc.{MC}"
    changed = [o for o in CLUSTER if o["metadata"]["name"] not in ("hdls-b", "web")] + [
        service("web", ips=["10.96.0.5"]),
        service_import("web", ips=["10.42.0.9"]),
        mc_slice("hdls-c", "hdls", "clusterC", [endpoint("10.5.0.1", hostname="my-pet-9")]),
    ]
    await dnsd.replace(changed)
    assert rdatas(await ask(dnsd.port, f"web.default.svc.{MC}")) == ["10.42.0.9"]
    assert rdatas(await ask(dnsd.port, base)) == ["10.3.0.100", "10.3.0.101", "10.5.0.1"]
    gone = await ask(dnsd.port, f"my-pet-1.clusterb.{base}")
    assert gone.rcode() == dns.rcode.NXDOMAIN
    assert rdatas(await ask(dnsd.port, f"my-pet-9.clusterc.{base}")) == ["10.5.0.1"]


async def test_without_the_option_clusterset_names_are_forwarded(start_dnsd):
    dnsd = await start_dnsd(CLUSTER)
    msg = await ask(dnsd.port, f"web.default.svc.{MC}")
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert (f"web.default.svc.{MC}", "A") in dnsd.upstream.queries


@pytest.mark.parametrize("zone", [Z, f"sub.{Z}"])
def test_a_multicluster_zone_inside_a_cluster_zone_is_refused(zone, capsys):
    from dnsd.settings import load

    with pytest.raises(SystemExit):
        load(["--multicluster", zone], environ={})
    assert "overlaps" in capsys.readouterr().err


async def test_from_the_api_server(tmp_path: Path):
    with FakeApiServer() as api:
        api.start()
        for obj in CLUSTER:
            api.create(obj)
        argv = [
            "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")),
            "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
            "--upstream", "127.0.0.1:9", "--multicluster", MC,
        ]  # fmt: skip
        settings = load_settings(DnsdSettings, argv, env_prefix="DNSD", prog="dnsd", environ={})
        daemon = Daemon(settings)
        await daemon.start()
        try:
            for _ in range(500):
                if daemon.readiness()[0]:
                    break
                await asyncio.sleep(0.02)
            assert daemon.readiness()[0], daemon.readiness()
            port = daemon.dns_port
            base = f"hdls.default.svc.{MC}"
            assert rdatas(await ask(port, f"my-pet-2.clustera.{base}")) == ["10.3.0.101"]
            assert rdatas(await ask(port, f"web.default.svc.{MC}")) == ["10.42.42.42"]
            # A watch event: the import gets a new clusterset IP.
            api.update(service_import("web", ips=["10.42.0.1"]))
            for _ in range(250):
                if rdatas(await ask(port, f"web.default.svc.{MC}")) == ["10.42.0.1"]:
                    break
                await asyncio.sleep(0.02)
            assert rdatas(await ask(port, f"web.default.svc.{MC}")) == ["10.42.0.1"]
            assert any(r.resource == "serviceimports" and r.verb == "watch" for r in api.requests)
        finally:
            await daemon.stop()
