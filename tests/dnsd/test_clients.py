"""Per-client answers over real sockets: --autopath and --namespace-isolation.

Pods get addresses in 127.0.0.0/8, so a test client bound to a pod's IP is that pod to dnsd.
"""

from __future__ import annotations

import asyncio
import shutil
import socket

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsd.clients import POD_ADDRESSES, PodAddress, PodClients, pack_ip
from dnsd.handler import Handler
from dnsd.isolation import NamespaceIsolation
from dnsd.server import UdpListener
from kwatch.models import Pod
from kwatch.resources import PODS
from kwatch.store import EventType, StoreEvent
from tests.dnsd import test_fuzz as fuzz
from tests.dnsd.helpers import (
    endpoint,
    endpoint_slice,
    namespace,
    pod,
    records,
    service,
    write_manifest,
)

Z = "cluster.local"
SHOP_POD = "127.0.0.10"  # a pod in namespace shop
DATA_POD = "127.0.0.11"  # a pod in namespace data
HOST_POD = "127.0.0.12"  # a host-network pod in shop: its IP is a node's
NODE = "127.0.0.1"  # no pod has it

CLUSTER = [
    namespace("shop"),
    namespace("data"),
    namespace("kube-system"),
    service("kube-dns", "kube-system", ips=["10.96.0.10"]),
    service("web", "shop", ips=["10.96.1.1"], ports=[{"name": "http", "port": 80}]),
    service("db", "data", ips=["10.96.2.1"], ports=[{"name": "pg", "port": 5432}]),
    service("both", "data", headless=True),
    endpoint_slice("both-1", "both", [endpoint("10.1.0.9")], ns="data"),
    service("ext", "shop", external_name="www.example.org"),
    pod("shop-1", SHOP_POD, "shop"),
    pod("data-1", DATA_POD, "data"),
    {**pod("agent", HOST_POD, "shop"), "spec": {"hostNetwork": True}},
]


async def ask_from(
    port: int,
    source: str,
    name: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=port, source=source, timeout=3)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, source=source, timeout=3)


# --- the pod index -----------------------------------------------------------------------------


def _pod(name: str, ns: str, ip: str, phase: str = "Running", host: bool = False) -> Pod:
    return PODS.parse(  # type: ignore[no-any-return]
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {"hostNetwork": host},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
        }
    )


def _event(kind: EventType, obj: Pod, old: Pod | None = None) -> StoreEvent[Pod]:
    return StoreEvent(kind, obj.metadata.key, obj, old)


def test_pod_index_maps_ips_to_namespaces_and_forgets_what_goes():
    clients = PodClients()
    a = _pod("a", "shop", "10.0.0.1")
    clients.on_pod(_event(EventType.ADDED, a))
    clients.on_pod(_event(EventType.ADDED, _pod("b", "data", "fd00::1")))
    clients.on_pod(_event(EventType.ADDED, _pod("h", "shop", "10.9.9.9", host=True)))
    assert clients.namespace_of("10.0.0.1") == "shop"
    assert clients.namespace_of_packed(pack_ip("fd00::1") or b"") == "data"
    assert clients.namespace_of("10.9.9.9") is None  # host network: a node's address
    assert clients.namespace_of("not an ip") is None
    done = _pod("a", "shop", "10.0.0.1", phase="Succeeded")
    clients.on_pod(_event(EventType.MODIFIED, done, a))
    assert clients.namespace_of("10.0.0.1") is None
    # An IP taken over by a new pod stays with it when the old one is deleted.
    old = _pod("old", "shop", "10.0.0.2")
    new = _pod("new", "data", "10.0.0.2")
    clients.on_pod(_event(EventType.ADDED, old))
    clients.on_pod(_event(EventType.ADDED, new))
    clients.on_pod(_event(EventType.DELETED, old, old))
    assert clients.namespace_of("10.0.0.2") == "data"
    clients.on_pod(_event(EventType.DELETED, new, new))
    assert clients.namespace_of("10.0.0.2") is None
    assert len(clients) == 1


def test_the_slim_pod_model_keeps_only_name_namespace_version_and_counted_ips():
    raw = {
        "metadata": {
            "name": "a",
            "namespace": "shop",
            "resourceVersion": "7",
            "labels": {"app": "web", "pod-template-hash": "abc"},
            "uid": "u",
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
        },
    }
    address = POD_ADDRESSES.parse(raw)
    assert isinstance(address, PodAddress)
    assert address.metadata.resource_version == "7"
    assert address.ips == (pack_ip("10.0.0.1"), pack_ip("fd00::1"))
    assert not hasattr(address.metadata, "labels")
    host = POD_ADDRESSES.parse({**raw, "spec": {"hostNetwork": True}})
    pending_without_ip = POD_ADDRESSES.parse({**raw, "status": {"phase": "Pending"}})
    failed = POD_ADDRESSES.parse({**raw, "status": {**raw["status"], "phase": "Failed"}})
    assert host.ips == pending_without_ip.ips == failed.ips == ()
    clients = PodClients()
    clients.on_pod(StoreEvent(EventType.ADDED, "shop/a", address, None))
    assert clients.namespace_of("fd00::1") == "shop"


@pytest.mark.parametrize(
    ("flags", "model"),
    [(["--autopath"], PodAddress), (["--autopath", "--pods", "verified"], Pod)],
    ids=["slim-watch", "shared-with-pods-verified"],
)
async def test_one_pod_watch_feeds_the_index(start_dnsd, flags, model):
    run = await start_dnsd(CLUSTER, *flags)
    pod_stores = [s for r, s in run.daemon.state.stores.items() if r.name == "pods"]
    assert len(pod_stores) == 1
    assert all(isinstance(obj, model) for obj in pod_stores[0])
    assert run.daemon.clients is not None
    assert run.daemon.clients.namespace_of(SHOP_POD) == "shop"
    assert run.daemon.clients.namespace_of(HOST_POD) is None


# --- autopath ----------------------------------------------------------------------------------


@pytest.fixture
async def autopath(start_dnsd, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nsearch corp.example\n")
    return await start_dnsd(CLUSTER, "--autopath", "--resolv-conf", str(resolv))


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_autopath_answers_a_service_of_another_namespace_with_a_cname(autopath, tcp):
    asked = f"db.data.shop.svc.{Z}"
    reply = await ask_from(autopath.port, SHOP_POD, asked, tcp=tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question[0].name.to_text() == asked + "."
    assert records(reply) == [
        (asked, "CNAME", f"db.data.svc.{Z}."),
        (f"db.data.svc.{Z}", "A", "10.96.2.1"),
    ]
    assert reply.answer[0].ttl == 5  # the TTL of the record it points at


async def test_autopath_ends_with_the_bare_name_from_upstream(autopath):
    asked = f"www.example.org.shop.svc.{Z}"
    reply = await ask_from(autopath.port, SHOP_POD, asked)
    assert records(reply) == [
        (asked, "CNAME", "www.example.org."),
        ("www.example.org", "A", "192.0.2.80"),
    ]
    # The search list was walked in the pod's order, the host's search domain included.
    # (HINFO: dnsd's loop probe, dnsd/forward_loop.py)
    forwarded = [name for name, qtype in autopath.upstream.queries if qtype != "HINFO"]
    assert forwarded == ["www.example.org.corp.example", "www.example.org"]


async def test_autopath_keeps_the_nxdomain_when_no_candidate_exists(autopath):
    reply = await ask_from(autopath.port, SHOP_POD, f"nothing.shop.svc.{Z}")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert records(reply, "authority")[0][:2] == (Z, "SOA")


async def test_autopath_stops_at_nodata(autopath):
    """A candidate that exists without the type (NODATA) ends the walk, as in CoreDNS."""
    asked = f"web.shop.data.svc.{Z}"
    reply = await ask_from(autopath.port, DATA_POD, asked, "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []
    assert reply.question[0].name.to_text() == asked + "."


async def test_autopath_leaves_existing_names_alone(autopath):
    reply = await ask_from(autopath.port, SHOP_POD, f"web.shop.svc.{Z}")
    assert records(reply) == [(f"web.shop.svc.{Z}", "A", "10.96.1.1")]


@pytest.mark.parametrize(
    ("source", "name"),
    [
        (NODE, f"db.data.shop.svc.{Z}"),  # no pod: normal answers
        (HOST_POD, f"db.data.shop.svc.{Z}"),  # host network: a node
        (DATA_POD, f"db.data.shop.svc.{Z}"),  # not below its own <ns>.svc.<zone>
    ],
)
async def test_autopath_is_only_for_pods_below_their_own_namespace(autopath, source, name):
    reply = await ask_from(autopath.port, source, name)
    assert reply.rcode() == dns.rcode.NXDOMAIN


async def test_autopath_follows_pod_changes(autopath):
    write_manifest(autopath.manifest, [o for o in CLUSTER if o["metadata"]["name"] != "shop-1"])
    clients = autopath.daemon.clients
    for _ in range(300):  # the manifest source polls every second
        if clients.namespace_of(SHOP_POD) is None:
            break
        await asyncio.sleep(0.02)
    assert clients.namespace_of(SHOP_POD) is None
    reply = await ask_from(autopath.port, SHOP_POD, f"db.data.shop.svc.{Z}")
    assert reply.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
async def test_dig_from_a_pod_gets_the_completed_answer(autopath):
    proc = await asyncio.create_subprocess_exec(
        *("dig", "+tries=1", "+time=3", "+noall", "+answer", "-b", SHOP_POD),
        *("-p", str(autopath.port), "@127.0.0.1", f"db.data.shop.svc.{Z}", "A"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    lines = [line.split() for line in out.decode().splitlines() if line.strip()]
    assert [(line[0], line[3], line[4]) for line in lines] == [
        (f"db.data.shop.svc.{Z}.", "CNAME", f"db.data.svc.{Z}."),
        (f"db.data.svc.{Z}.", "A", "10.96.2.1"),
    ]


# --- namespace isolation -----------------------------------------------------------------------


@pytest.fixture
async def isolated(start_dnsd):
    return await start_dnsd(CLUSTER, "--namespace-isolation", "--shared-namespaces", "kube-system")


HIDDEN_FROM_SHOP = [
    (f"db.data.svc.{Z}", "A"),
    (f"_pg._tcp.db.data.svc.{Z}", "SRV"),
    (f"db.data.svc.{Z}", "SRV"),
    (f"data.svc.{Z}", "A"),
    (f"both.data.svc.{Z}", "A"),
    (f"10-1-0-9.both.data.svc.{Z}", "A"),
    ("1.2.96.10.in-addr.arpa", "PTR"),
    ("9.0.1.10.in-addr.arpa", "PTR"),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize(("name", "rdtype"), HIDDEN_FROM_SHOP)
async def test_a_pod_does_not_see_names_of_other_namespaces(isolated, name, rdtype, tcp):
    reply = await ask_from(isolated.port, SHOP_POD, name, rdtype, tcp=tcp)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.answer == []
    zone = "in-addr.arpa" if name.endswith("in-addr.arpa") else Z
    assert records(reply, "authority")[0][:2] == (zone, "SOA")
    # A node (and a host-network pod) still sees everything (`data.svc.<zone>`: NODATA).
    for source in (NODE, HOST_POD):
        seen = await ask_from(isolated.port, source, name, rdtype, tcp=tcp)
        assert seen.rcode() == dns.rcode.NOERROR
        assert seen.answer or name == f"data.svc.{Z}"


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        (f"web.shop.svc.{Z}", "A", "10.96.1.1"),  # its own namespace
        (f"_http._tcp.web.shop.svc.{Z}", "SRV", f"0 100 80 web.shop.svc.{Z}."),
        (f"kube-dns.kube-system.svc.{Z}", "A", "10.96.0.10"),  # shared
        ("1.1.96.10.in-addr.arpa", "PTR", f"web.shop.svc.{Z}."),
        (Z, "SOA", None),  # the apex is nobody's
        ("www.example.org", "A", "192.0.2.80"),  # forwarded names
    ],
)
async def test_a_pod_sees_its_own_and_the_shared_namespaces(isolated, name, rdtype, expected):
    reply = await ask_from(isolated.port, SHOP_POD, name, rdtype)
    assert reply.rcode() == dns.rcode.NOERROR
    if expected is not None:
        assert expected in [r for _, _, r in records(reply)]


async def test_isolation_applies_on_both_udp_paths(isolated):
    """The recvmmsg thread and the one-datagram path decide alike (the fast path included)."""
    for batch in (0, 64):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        listener = UdpListener(sock, isolated.daemon.handler, 0.0, batch=batch)
        listener.start(asyncio.get_running_loop())
        try:
            port = sock.getsockname()[1]
            for _ in range(3):  # again: nothing cached on the way may leak
                hidden = await ask_from(port, SHOP_POD, f"db.data.svc.{Z}")
                assert hidden.rcode() == dns.rcode.NXDOMAIN, batch
                seen = await ask_from(port, DATA_POD, f"db.data.svc.{Z}")
                assert records(seen) == [(f"db.data.svc.{Z}", "A", "10.96.2.1")]
                node = await ask_from(port, NODE, f"db.data.svc.{Z}")
                assert node.answer
        finally:
            listener.close()


async def test_isolation_and_autopath_together_never_complete_into_a_hidden_name(start_dnsd):
    run = await start_dnsd(CLUSTER, "--namespace-isolation", "--autopath")
    reply = await ask_from(run.port, SHOP_POD, f"db.data.shop.svc.{Z}")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    reply = await ask_from(run.port, DATA_POD, f"db.data.data.svc.{Z}")
    assert records(reply)[0] == (f"db.data.data.svc.{Z}", "CNAME", f"db.data.svc.{Z}.")


async def test_without_the_options_no_pod_is_watched(start_dnsd):
    run = await start_dnsd(CLUSTER)
    assert run.daemon.handler.clients is None
    assert run.daemon.handler.isolation is None and run.daemon.handler.autopath is None
    reply = await ask_from(run.port, SHOP_POD, f"db.data.svc.{Z}")
    assert reply.answer


@pytest.mark.parametrize("name", [f"db.data.shop.svc.{Z}", f"www.example.org.shop.svc.{Z}"])
async def test_autopath_answers_carry_opt_when_the_query_did(autopath, name):
    query = dns.message.make_query(name, "A", use_edns=0, payload=1232)
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=autopath.port, source=SHOP_POD)
    assert reply.edns == 0
    assert records(reply)[0][:2] == (name, "CNAME")
    assert reply.question[0].name.to_text() == name + "."


# --- with the other zones of issue 15 ----------------------------------------------------------

EXTERNAL = "example.net"


def _with_external_ip(obj: dict, ip: str) -> dict:  # type: ignore[type-arg]
    obj["spec"]["externalIPs"] = [ip]
    return obj


async def test_isolation_covers_external_zone_names_and_autopath_ignores_them(start_dnsd):
    cluster = [
        *[o for o in CLUSTER if o["metadata"]["name"] not in ("web", "db")],
        _with_external_ip(service("web", "shop", ips=["10.96.1.1"]), "192.0.2.1"),
        _with_external_ip(service("db", "data", ips=["10.96.2.1"]), "192.0.2.2"),
    ]
    run = await start_dnsd(
        cluster, "--external-zone", EXTERNAL, "--namespace-isolation", "--autopath"
    )
    own = await ask_from(run.port, SHOP_POD, f"web.shop.{EXTERNAL}")
    assert records(own) == [(f"web.shop.{EXTERNAL}", "A", "192.0.2.1")]
    other = await ask_from(run.port, SHOP_POD, f"db.data.{EXTERNAL}")
    assert other.rcode() == dns.rcode.NXDOMAIN
    assert records(other, "authority")[0][:2] == (EXTERNAL, "SOA")
    node = await ask_from(run.port, NODE, f"db.data.{EXTERNAL}")
    assert records(node) == [(f"db.data.{EXTERNAL}", "A", "192.0.2.2")]
    # No search list in an external zone: a missing name there stays NXDOMAIN.
    missing = await ask_from(run.port, SHOP_POD, f"nothing.shop.{EXTERNAL}")
    assert missing.rcode() == dns.rcode.NXDOMAIN


# --- the fast path decides as the full path does, per client -------------------------------------

_ISOLATED: Handler | None = None
POD_OF_EMPTY, POD_OF_DEFAULT = "10.9.0.1", "10.9.0.2"
CLUSTER_REVERSE = ("5.0.96.10.in-addr.arpa", "1.0.1.10.in-addr.arpa")  # web, db-0


def isolated_handler() -> Handler:
    """The fuzz tests' cluster (namespaces default and empty), answered per client."""
    global _ISOLATED
    if _ISOLATED is None:
        base = fuzz.cluster()
        clients = PodClients()
        for name, ns, ip in (("a", "empty", POD_OF_EMPTY), ("b", "default", POD_OF_DEFAULT)):
            clients.on_pod(StoreEvent(EventType.ADDED, f"{ns}/{name}", _pod(name, ns, ip), None))
        _ISOLATED = Handler(
            base.index,
            upstream=base.upstream,
            clients=clients,
            isolation=NamespaceIsolation(base.index),
        )
    return _ISOLATED


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(
        # Names of the cluster's shape, most of them real: <prefix>.<svc>.<ns>.<svc|pod>.<zone>
        st.tuples(
            st.lists(
                st.sampled_from(["db-0", "10-1-0-2", "_http._tcp", "_pg._tcp", "x"]), max_size=1
            ),
            st.lists(st.sampled_from(["web", "db", "ext", "alias", "nosuch", "WEB"]), max_size=1),
            st.sampled_from(["default", "empty", "nosuch", "Default"]),
            st.sampled_from(["svc", "pod"]),
            st.sampled_from(["cluster.local", "CLUSTER.local"]),
        ).map(lambda p: ".".join([*p[0], *p[1], p[2], p[3], p[4]])),
        # Reverse names of ClusterIPs and endpoints, and names of any shape.
        st.sampled_from(
            ["5.0.96.10.in-addr.arpa", "1.0.1.10.in-addr.arpa", "9.9.9.10.in-addr.arpa"]
        ),
        st.lists(st.sampled_from(fuzz.LABELS), max_size=5).map(
            lambda labels: ".".join([*labels, "cluster.local"])
        ),
    ),
    st.sampled_from(fuzz.QTYPES),
    st.sampled_from([None, 0]),
    st.booleans(),
    st.sampled_from([POD_OF_EMPTY, POD_OF_DEFAULT, "10.9.0.3"]),
)
def test_with_isolation_fast_and_full_path_give_the_same_answer(name, qtype, edns, tcp, client):
    query = dns.message.make_query(name, qtype, use_edns=False if edns is None else edns)
    data = query.to_wire()
    handler = isolated_handler()
    fast = fuzz.finish(lambda: handler.handle(data, tcp, client))
    full = fuzz.finish(lambda: handler.full(data, tcp, client))
    assert fast == full, name
    if client == POD_OF_EMPTY and fast is not None:
        lowered = name.lower()
        if ".default.svc.cluster.local" in lowered or lowered in CLUSTER_REVERSE:
            # Never another namespace's data (the cluster's PTRs all point into default).
            assert dns.message.from_wire(fast).answer == [], name
