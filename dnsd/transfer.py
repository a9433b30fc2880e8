"""Zone transfer (AXFR, RFC 5936) of the cluster zones to allowed clients, over TCP only.

As CoreDNS's `transfer` plugin with the kubernetes plugin's Transferer (plugin/transfer,
plugin/kubernetes/transfer.go):
- only a question for a cluster zone's apex is transferred; only over TCP (UDP: REFUSED, the
  handler's answer), only to clients inside `--transfer-to` (anyone else: REFUSED);
- the SOA first and last, the apex NS and its glue next, then every record of the zone;
- IXFR (RFC 1995) with a serial at or above ours: the SOA alone (the zone is up to date);
  any other IXFR is answered with the full transfer (RFC 1995 section 4 allows it);
- records are sent in messages of at most 500 records (CoreDNS flushes above 500), and
  never over the 64 KiB a TCP message can carry.

The records are every precomputed answer under the zone (A, AAAA, SRV, TXT, CNAME of
ExternalName Services, the answers of in-cluster CNAME chases), each record once; names built
only when asked (dnsd.endpoint_names, dnsd.zonal) are not in it, as CoreDNS's transfer leaves
out the endpoints of ClusterIP Services. The zone is snapshot when the transfer starts; the
messages are built a chunk at a time between yields to the event loop, so a large zone does not
stall queries.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from dnslib import QTYPE, RR, SOA, DNSBuffer, DNSHeader, DNSQuestion, DNSRecord
from prometheus_client import Counter

from dnsd import answers as enc
from dnsd import wire
from dnsd.names import from_wire, to_wire
from dnsd.records import Soa
from dnsd.zone import ZoneIndex

log = structlog.get_logger("dnsd.transfer")

MAX_RECORDS = 500  # records per message (CoreDNS transfer: a message is sent above 500)
MAX_MESSAGE = 60000  # bytes per message, below the 65535 a TCP length prefix allows
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TRANSFERS = Counter(
    "dnsd_zone_transfers_total",
    "AXFR/IXFR requests over TCP by outcome (sent, up_to_date, refused)",
    ["result"],
)


def parse_networks(values: Sequence[str]) -> list[Network]:
    """`--transfer-to` values: CIDRs or single addresses; `*` is everyone (CoreDNS `to *`)."""
    networks: list[Network] = []
    for value in values:
        if value.strip() == "*":
            networks += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            continue
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"expected a CIDR, an IP address or *, got {value!r}") from None
    return networks


@dataclass(frozen=True, slots=True)
class XfrRequest:
    """What a transfer question asks for."""

    zone: str  # the cluster zone, lower case
    qtype: int  # AXFR or IXFR
    serial: int | None  # the client's serial (IXFR), None for AXFR


class ZoneTransfer:
    """Decides and streams transfers; the TCP connection writes what `messages` yields."""

    def __init__(self, index: ZoneIndex, allowed: Sequence[Network]) -> None:
        self.index = index
        self.allowed = list(allowed)

    def permits(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed)

    def refused(self, client: str, request: XfrRequest) -> None:
        """A client outside `--transfer-to` asked: the handler answers REFUSED."""
        TRANSFERS.labels("refused").inc()
        log.info("zone_transfer_refused", client=client, zone=request.zone)

    def request(self, query: wire.Query) -> XfrRequest | None:
        """The transfer `query` asks for, or None when it is no transfer of a cluster zone
        (another name: the handler answers it as any other query)."""
        if query.qtype not in (wire.TYPE_AXFR, wire.TYPE_IXFR):
            return None
        zid = self.index.zone_ids.get(query.name_key)
        if zid is None or zid >= len(self.index.zones):
            return None  # a reverse zone or an --external-zone: not transferred
        serial = None
        if query.qtype == wire.TYPE_IXFR:
            serial = _ixfr_serial(query.data)
        return XfrRequest(self.index.zones[zid], query.qtype, serial)

    async def messages(self, query: wire.Query, request: XfrRequest) -> AsyncIterator[bytes]:
        """The response messages of one allowed transfer, in order."""
        index = self.index
        if not index.ready:
            yield wire.rcode_with_question(query, wire.SERVFAIL, wire.TCP_LIMIT)
            return
        serial = index.serial
        soa = enc.soa_rr(request.zone, index.primary, index.ttl, serial)
        assert isinstance(soa.rdata, Soa)
        soa_rr = RR(
            request.zone,
            QTYPE.SOA,
            ttl=soa.ttl,
            rdata=SOA(soa.rdata.mname, soa.rdata.rname, soa.rdata.times),
        )
        if request.serial is not None and request.serial >= serial:
            # RFC 1995 section 2: the client is up to date, our SOA alone says so.
            TRANSFERS.labels("up_to_date").inc()
            yield self._message(query, [soa_rr])
            return
        TRANSFERS.labels("sent").inc()
        # Snapshot now: the zone may change between the chunks below.
        zone_wire = to_wire(request.zone)
        answers = sorted(
            (key, answer) for key, answer in index.answers.items() if key[:-2].endswith(zone_wire)
        )
        aliases = sorted(
            (key, alias.cname_only)
            for key, alias in index.aliases.items()
            if key.endswith(zone_wire)
        )
        # Apex NS and its glue first, after the SOA (CoreDNS Transfer()).
        ns_name = f"ns.dns.{request.zone}"
        first = [enc.answer_key(request.zone, wire.TYPE_NS)]
        first += [enc.answer_key(ns_name, t) for t in (wire.TYPE_A, wire.TYPE_AAAA)]
        ordered = [(k, a) for k in first if (a := index.answers.get(k)) is not None]
        ordered += [(k, a) for k, a in answers if k not in first]
        ordered += [(key + enc.qtype_key(wire.TYPE_CNAME), a) for key, a in aliases]
        log.info("zone_transfer_started", zone=request.zone, serial=serial, answers=len(ordered))
        seen: set[tuple[str, int, str]] = set()
        pending: list[RR] = [soa_rr]
        size = 0
        for key, answer in ordered:
            qtype = (key[-2] << 8) | key[-1]
            if qtype == wire.TYPE_SOA:
                continue
            for rr in enc.decode_answer_records(from_wire(key[:-2]), qtype, answer):
                ident = (str(rr.rname).lower(), rr.rtype, str(rr.rdata).lower())
                if ident in seen:
                    continue
                seen.add(ident)
                record_size = _packed_size(rr)
                if pending and (len(pending) >= MAX_RECORDS or size + record_size > MAX_MESSAGE):
                    yield self._message(query, pending)
                    pending, size = [], 0
                pending.append(rr)
                size += record_size
        if len(pending) >= MAX_RECORDS:
            yield self._message(query, pending)
            pending = []
        pending.append(soa_rr)
        yield self._message(query, pending)
        log.info("zone_transfer_done", zone=request.zone, serial=serial, records=len(seen) + 2)

    @staticmethod
    def _message(query: wire.Query, records: list[RR]) -> bytes:
        """One response message: the question echoed, `records` in the answer section."""
        header = DNSHeader(
            id=struct.unpack_from("!H", query.data)[0], qr=1, aa=1, rd=query.data[2] & 1
        )
        message = DNSRecord(header, q=DNSQuestion(from_wire(query.name_key), query.qtype))
        for rr in records:
            message.add_answer(rr)
        return bytes(message.pack())


def _packed_size(rr: RR) -> int:
    """Bytes of `rr` written without compression (an upper bound of its size in a message)."""
    buffer = DNSBuffer()
    rr.pack(buffer)
    return len(buffer.data)


def _ixfr_serial(data: bytes) -> int | None:
    """The serial of the SOA in an IXFR query's authority section (RFC 1995 section 3)."""
    try:
        nscount = struct.unpack_from("!H", data, 8)[0]
        if struct.unpack_from("!H", data, 6)[0] or nscount != 1:
            return None
        record = DNSRecord.parse(data)
    except Exception:  # dnslib's own errors on a malformed record
        return None
    for rr in record.auth:
        if rr.rtype == QTYPE.SOA:
            return int(rr.rdata.times[0])
    return None
