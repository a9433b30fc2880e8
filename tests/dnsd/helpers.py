"""Builders for API objects and DNS clients shared by the dnsd tests."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype
import dnslib
import yaml

ZONE = "cluster.local"

# --- API objects -------------------------------------------------------------------------------


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def service(
    name: str,
    ns: str = "default",
    *,
    ips: list[str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    headless: bool = False,
    external_name: str | None = None,
    publish_not_ready: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": ports if ports is not None else []}
    if external_name is not None:
        spec.update(type="ExternalName", externalName=external_name)
    elif headless:
        spec.update(clusterIP="None", clusterIPs=["None"])
    else:
        ips = ips or ["10.96.0.1"]
        spec.update(clusterIP=ips[0], clusterIPs=ips)
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def endpoint(
    ip: str | list[str],
    *,
    hostname: str | None = None,
    ready: bool | None = None,
    pod: str | None = None,
) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip] if isinstance(ip, str) else ip}
    if hostname:
        ep["hostname"] = hostname
    if ready is not None:
        ep["conditions"] = {"ready": ready}
    if pod:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "default"}
    return ep


def endpoint_slice(
    name: str,
    svc: str,
    endpoints: list[dict[str, Any]],
    *,
    ns: str = "default",
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [],
    }


def pod(name: str, ip: str, ns: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    }


def write_manifest(path: Path, objects: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(objects))
    return path


# --- DNS clients -------------------------------------------------------------------------------


async def ask(
    port: int,
    name: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    edns: int | None = None,
    payload: int = 1232,
    host: str = "127.0.0.1",
    within: float = 2.0,
) -> dns.message.Message:
    if edns is None:
        query = dns.message.make_query(name, rdtype, use_edns=False)
    else:
        query = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    if tcp:
        return await dns.asyncquery.tcp(query, host, port=port, timeout=within)
    return await dns.asyncquery.udp(query, host, port=port, timeout=within, ignore_trailing=False)


def records(msg: dns.message.Message, section: str = "answer") -> list[tuple[str, str, str]]:
    """(owner, type, rdata) of every record of a section, owners without the trailing dot."""
    out = []
    for rrset in getattr(msg, section):
        for rdata in rrset:
            out.append(
                (
                    rrset.name.to_text().rstrip("."),
                    dns.rdatatype.to_text(rrset.rdtype),
                    rdata.to_text(),
                )
            )
    return out


def rdatas(msg: dns.message.Message, rdtype: str | None = None) -> list[str]:
    return sorted(r for _, t, r in records(msg) if rdtype is None or t == rdtype)


def raw_udp(
    port: int, packet: bytes, timeout: float = 1.0, host: str = "127.0.0.1"
) -> bytes | None:
    """Send one datagram and wait for one answer (None on timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (host, port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def free_udp_tcp_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (for daemons started as subprocesses)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


# --- a fake upstream resolver ------------------------------------------------------------------


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers A/AAAA for names in `zone_data`, NXDOMAIN otherwise (UDP only)."""

    def __init__(self, zone_data: dict[tuple[str, str], list[str]]) -> None:
        self.zone_data = {(n.lower().rstrip("."), t): v for (n, t), v in zone_data.items()}
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[tuple[str, str]] = []
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        request = dnslib.DNSRecord.parse(data)
        name = str(request.q.qname).rstrip(".").lower()
        qtype = dnslib.QTYPE[request.q.qtype]
        self.queries.append((name, qtype))
        reply = request.reply()
        values = self.zone_data.get((name, qtype))
        if values is None and not any(n == name for n, _ in self.zone_data):
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
        for value in values or []:
            rdata = dnslib.A(value) if qtype == "A" else dnslib.AAAA(value)
            reply.add_answer(dnslib.RR(request.q.qname, request.q.qtype, ttl=60, rdata=rdata))
        assert self.transport is not None
        self.transport.sendto(reply.pack(), addr)

    @classmethod
    async def start(cls, zone_data: dict[tuple[str, str], list[str]]) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: cls(zone_data), local_addr=("127.0.0.1", 0)
        )
        assert protocol.transport is not None
        protocol.port = protocol.transport.get_extra_info("sockname")[1]
        return protocol

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def headless_pool(name: str, addresses: list[str]) -> list[dict[str, Any]]:
    """A headless Service `name` with one port (http 80) and one EndpointSlice of `addresses`,
    all ready."""
    ports = [{"name": "http", "port": 80}]
    return [
        service(name, headless=True, ports=ports),
        endpoint_slice(f"{name}-1", name, [endpoint(a) for a in addresses], ports=ports),
    ]
