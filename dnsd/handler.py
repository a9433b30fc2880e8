"""The entry point for one query: bytes in, bytes out (or a coroutine when upstream is needed).

Cluster names are answered from the zone index without dnslib; everything else goes to the
forwarder. The order of decisions mirrors CoreDNS's server + plugin/kubernetes handler.go.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from dnslib import RR

from dnsd import answers as enc
from dnsd import wire
from dnsd.metrics import DnsStats
from dnsd.names import ip_from_dashed
from dnsd.wire import Answer, Query, Reject, parse_query, respond
from dnsd.zone import Alias, ZoneIndex

if TYPE_CHECKING:  # (not imported at run time: the --forward-process child stays small)
    from dnsd.autopath import AutoPath
    from dnsd.clients import PodClients
    from dnsd.isolation import NamespaceIsolation

# An answer now, none (drop), or later: a future (a forwarded name) or a coroutine (the rarer
# cases that ask the forwarder and then think: ExternalName chases, search-path completion).
Result = bytes | None | asyncio.Future[bytes] | Coroutine[Any, Any, bytes | None]


class PodMode(StrEnum):
    """CoreDNS `pods` option (dns-features 2.1)."""

    DISABLED = "disabled"
    INSECURE = "insecure"
    VERIFIED = "verified"


class Upstream(Protocol):
    """The part of dnsd.forward.Forwarder the handler calls."""

    async def forward(self, query: bytes) -> bytes | None: ...

    def answer_at_once(self, query: bytes) -> bytes | None: ...

    def ask_later(
        self, query: bytes, then: Callable[[bytes], bytes] | None = None
    ) -> asyncio.Future[bytes] | None: ...

    async def resolve(self, qname: str, qtype: int) -> list[RR]: ...


class PodLookup(Protocol):
    def __call__(self, ip: str, namespace: str) -> bool: ...


class LazyNames(Protocol):
    """Names answered on the control path, looked up when asked instead of encoded ahead
    (dnsd.endpoint_names). A name one of them claims never takes the fast negative answer."""

    def claims(self, name_key: bytes, offsets: list[int], zone_offset: int) -> bool: ...

    def answer(
        self, name_key: bytes, offsets: list[int], zone_offset: int, qtype: int, nodata: Answer
    ) -> Answer | None: ...


_POD_LABEL = b"\x03pod"
_A = struct.pack("!H", wire.TYPE_A)
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # QD, AN, NS, AR counts
_ONE_QUESTION_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"
_AAAA = struct.pack("!H", wire.TYPE_AAAA)


class Handler:
    def __init__(
        self,
        index: ZoneIndex,
        *,
        upstream: Upstream | None = None,
        pod_mode: PodMode = PodMode.DISABLED,
        pod_exists: PodLookup | None = None,
        max_udp_size: int = 1232,
        stats: DnsStats | None = None,
        clients: PodClients | None = None,
        autopath: AutoPath | None = None,
        isolation: NamespaceIsolation | None = None,
        lazy: tuple[LazyNames, ...] = (),
        loadbalance: bool = False,
    ) -> None:
        self.index = index
        # CoreDNS `loadbalance` (kubeadm's Corefile has it): A and AAAA answers of two or more
        # records come in an order that changes per query (wire.turned).
        self.loadbalance = loadbalance
        self.lazy = lazy  # empty unless an option that needs it is on
        self.upstream = upstream
        self.pod_mode = pod_mode
        self.pod_exists = pod_exists
        # Per-client answers (--autopath, --namespace-isolation): who is a pod of which
        # namespace. All None when both are off, and then no query pays for them.
        self.clients = clients if autopath is not None or isolation is not None else None
        self.autopath = autopath if clients is not None else None
        self.isolation = isolation if clients is not None else None
        # Largest UDP answer we send and the size we advertise in our OPT; the client's own
        # size is honoured below it (RFC 6891 §6.2.5; DNS Flag Day 2020 suggests 1232).
        self.max_udp_size = max(max_udp_size, wire.UDP_PLAIN_LIMIT)
        # Our OPT record without and with the DO bit (RFC 3225 §3: DO copied from the query).
        self._opts = (
            wire.opt_record(self.max_udp_size, False),
            wire.opt_record(self.max_udp_size, True),
        )
        self.stats = stats or DnsStats()
        self._answers = index.answers  # the zone updates this dict in place, never replaces it
        self._counts = (self.stats.fast_counts(False), self.stats.fast_counts(True))

    def handle(self, data: bytes, tcp: bool = False, client: str | None = None) -> Result:
        """Answer one DNS message from `client` (its IP); None means drop it."""
        if self.isolation is None or self.fast_allows(data, client):
            fast = self.fast(data, tcp)
            if fast is not None:
                return fast
        return self.full(data, tcp, client)

    def fast_allows_packed(self, data: bytes, packed: bytes) -> bool:
        """`fast_allows` for the UDP thread, which has the client's IP as packed bytes."""
        assert self.isolation is not None and self.clients is not None
        namespace = self.clients.namespace_of_packed(packed)
        if namespace is None:
            return True
        return self.isolation.fast_allows(data, self.isolation.client_label(namespace))

    def fast_allows(self, data: bytes, client: str | None) -> bool:
        """--namespace-isolation: may the fast path answer this client (no pod, or a name its
        namespace may see)? False leaves the decision to `full`."""
        if self.isolation is None or self.clients is None or client is None:
            return True
        namespace = self.clients.namespace_of(client)
        if namespace is None:
            return True
        return self.isolation.fast_allows(data, self.isolation.client_label(namespace))

    def fast(
        self, data: bytes, tcp: bool = False, counts: dict[int, int] | None = None
    ) -> bytes | None:
        """The common case, inlined: a QUERY (QR=0, opcode 0) with one IN question, no other
        records but an option-less OPT at the end, for a precomputed (name, type) whose answer
        fits. Reads the zone and counts into `counts` (DnsStats.fast_counts; the handler's
        own by default), nothing else: the UDP threads call it directly.

        Returns None to hand anything else to `full`, which decides every case properly
        (this path never answers something `full` would answer differently).
        """
        n = len(data)
        if n < 17 or data[2] & 0xF8 or not self.index.ready:
            # Too short, a response or another opcode; a zone still being built serves
            # nothing (SERVFAIL, CoreDNS 3.6): the full path decides.
            return None
        sections = data[4:12]
        if sections == _ONE_QUESTION:
            # The question runs to the end of the message. Stored keys are valid wire names
            # (no zero or pointer bytes inside labels) followed by the QTYPE, so a key that
            # matches everything before QCLASS proves the message is exactly that question:
            # no label walk needed. Keys lower-case the QTYPE bytes too; answer_key() never
            # stores a type whose bytes fall in A-Z, so that cannot alias.
            if data[n - 1] != 1 or data[n - 2]:
                return None
            key = data[12 : n - 2].lower()
            answer = self._answers.get(key)
            if answer is None:
                answer = self._fast_negative(key)
                if answer is None:
                    return None
            if answer.turn and self.loadbalance:
                answer = wire.turned(answer, data)
            variant = (data[2] & 1) | ((data[3] >> 3) & 2)
            out = data[:2] + answer.heads[variant] + data[12:] + answer.tail
            if len(out) > wire.UDP_PLAIN_LIMIT and not tcp:
                out = wire.truncate_raw(data, n, variant, b"", answer, wire.UDP_PLAIN_LIMIT)
            elif len(out) > wire.TCP_LIMIT:
                return None
            qtype = (data[n - 4] << 8) | data[n - 3]
        elif sections == _ONE_QUESTION_OPT:
            # The question, then an OPT (11 bytes): root owner, TYPE 41, EDNS version 0,
            # no options (RDLENGTH 0). Other forms take the full path.
            if (
                n < 28
                or data[n - 11 : n - 8] != b"\x00\x00\x29"
                or data[n - 5]
                or data[n - 2]
                or data[n - 1]
                or data[n - 12] != 1
                or data[n - 13]
            ):
                return None
            key = data[12 : n - 13].lower()
            answer = self._answers.get(key)
            if answer is None:
                answer = self._fast_negative(key)
                if answer is None:
                    return None
            if answer.turn and self.loadbalance:
                answer = wire.turned(answer, data)
            size = (data[n - 8] << 8) | data[n - 7]
            variant = 4 | (data[2] & 1) | ((data[3] >> 3) & 2)
            opt = self._opts[data[n - 4] >> 7]
            out = data[:2] + answer.heads[variant] + data[12 : n - 11] + answer.tail + opt
            if tcp:
                limit = wire.TCP_LIMIT
            elif size > self.max_udp_size:
                limit = self.max_udp_size
            else:
                limit = size if size > wire.UDP_PLAIN_LIMIT else wire.UDP_PLAIN_LIMIT
            if len(out) > limit:
                if tcp:
                    return None
                out = wire.truncate_raw(data, n - 11, variant, opt, answer, limit)
            qtype = (data[n - 15] << 8) | data[n - 14]
        else:
            return None
        # Counted by (QTYPE, rcode byte) in one int: no tuple to build per query.
        counted = (qtype << 8) | answer.heads[0][1]
        if counts is None:
            counts = self._counts[tcp]
        counts[counted] = counts.get(counted, 0) + 1
        return out

    def _fast_negative(self, key: bytes) -> Answer | None:
        """NXDOMAIN / NODATA for a well-formed name, when that is all `_miss` would decide.

        Anything needing more (ExternalName aliases, pod names, zone transfers, names outside
        the zones) returns None and takes the full path; a property test checks both paths
        answer alike.
        """
        index = self.index
        name_key = key[:-2]
        if name_key in index.aliases:
            return None
        qtype = (key[-2] << 8) | key[-1]
        if qtype == wire.TYPE_AXFR or qtype == wire.TYPE_IXFR:
            return None
        zid = index.existing.get(name_key)
        if zid is not None:
            return index.nodata[zid]
        if not name_key.endswith(index.zone_suffixes):
            return None  # in no zone (zone_of would find none): spare the walk
        # Walk the labels: the key is everything before QCLASS, which need not be a name.
        offsets = []
        i = 0
        last = len(name_key) - 1
        while i < last:
            length = name_key[i]
            if not 0 < length < 64:
                return None
            offsets.append(i)
            i += length + 1
        if i != last or last > 254:
            return None
        found = index.zone_of(name_key, offsets)
        if found is None or self.autopath is not None:
            return None  # (autopath: a pod's NXDOMAIN may become an answer)
        zid, zone_offset = found
        if (
            self.pod_mode is not PodMode.DISABLED
            and len(offsets) > 3
            and offsets[3] == zone_offset
            and name_key[offsets[2] : offsets[3]] == _POD_LABEL
        ):
            return None
        for names in self.lazy:  # none unless an option needs them
            if names.claims(name_key, offsets, zone_offset):
                return None
        return index.nxdomain[zid]

    def forwards(self, data: bytes) -> bool:
        """Would `full` answer this message with `_forward` alone, for any client? True only
        for a well-formed query (EDNS version 0, class IN) of a name outside every zone that
        the zone does not own either (a reverse name of a ClusterIP), once the zone is built:
        then any process holding the same forwarder settings answers it alike, without the
        zone (--forward-process). Everything else, and anything in doubt, is False. Reads the
        zone like `fast`, so the UDP threads may call it.

        The common shapes (one question, then nothing or one OPT at the end, options such as
        a cookie included) are read here with a label walk and no objects; the zones are
        matched with bytes.endswith on the lower-cased wire name (label-aligned only when it
        hits). Any other shape takes `parse_query`, as `full` does. The UDP thread runs this
        for every query of a flood of forwarded names: 4.5 us per query with the parser."""
        index = self.index
        if self.upstream is None or not index.ready:
            return False
        n = len(data)
        if n < 17 or data[2] & 0xF8:
            return self._forwards_parsed(data)
        sections = data[4:12]
        if sections != _ONE_QUESTION and sections != _ONE_QUESTION_OPT:
            return self._forwards_parsed(data)
        i = 12
        while i < n:
            length = data[i]
            if not length:
                break
            if length > 63:
                return self._forwards_parsed(data)
            i += length + 1
        end = i + 1  # past the root label; QTYPE and QCLASS follow
        if i >= n or end - 12 > 255 or data[end + 2 : end + 4] != b"\x00\x01":
            return self._forwards_parsed(data)  # (a slice past the end is short: no match)
        if sections == _ONE_QUESTION:
            if end + 4 != n:
                return self._forwards_parsed(data)
        else:
            # The OPT: root owner, TYPE 41, class = UDP size, TTL = extended rcode, version,
            # flags; RDLENGTH bytes of options, then the end of the message.
            opt = end + 4
            if (
                opt + 11 > n
                or data[opt : opt + 3] != b"\x00\x00\x29"
                or opt + 11 + ((data[opt + 9] << 8) | data[opt + 10]) != n
            ):
                return self._forwards_parsed(data)
            if data[opt + 6]:
                return False  # EDNS version other than 0: BADVERS from `full`
        key = data[12:end].lower()
        if key.endswith(index.zone_suffixes) and _in_zone(key, index.zone_suffixes):
            return False
        return key not in index.existing and key + data[end : end + 2] not in index.answers

    def _forwards_parsed(self, data: bytes) -> bool:
        """`forwards` with the full parser: any shape `full` reads."""
        index = self.index
        try:
            query = parse_query(data)
        except Reject:
            return False
        if (query.edns and query.edns_version != 0) or query.qclass != wire.CLASS_IN:
            return False
        key = query.name_key
        # As `_answer` and `_miss` decide (isolation hides names inside the zones only).
        end = query.question_end
        return (
            key + data[end - 4 : end - 2] not in index.answers
            and index.zone_of(key, query.label_offsets) is None
            and key not in index.existing
        )

    def full(self, data: bytes, tcp: bool = False, client: str | None = None) -> Result:
        """Every case, decided by parsing the message; `fast` is a shortcut through it."""
        started = time.perf_counter()
        try:
            query = parse_query(data)
        except Reject as reject:
            self.stats.rejected(tcp, reject.rcode)
            if reject.rcode is None:
                return None
            return wire.rcode_without_question(data, reject.rcode)
        if query.edns:
            if query.edns_version != 0:
                return self._done(query, tcp, started, self._rcode(query, wire.BADVERS))
            limit = wire.TCP_LIMIT if tcp else min(query.udp_size, self.max_udp_size)
        else:
            limit = wire.TCP_LIMIT if tcp else wire.UDP_PLAIN_LIMIT
        if query.qclass != wire.CLASS_IN:
            # CoreDNS without the chaos plugin refuses other classes (dns-features 3.10).
            return self._done(query, tcp, started, self._rcode(query, wire.REFUSED))
        namespace = None
        if self.clients is not None and client is not None:
            namespace = self.clients.namespace_of(client)
        result = self._answer(query, limit, tcp, namespace, True)
        if result is None or isinstance(result, bytes):
            return self._done(query, tcp, started, result)
        if isinstance(result, asyncio.Future):
            result.add_done_callback(_CountWhenDone(self, query, tcp, started))
            return result
        return self._count_later(query, tcp, started, result)

    def _answer(
        self, query: Query, limit: int, tcp: bool, namespace: str | None, complete: bool
    ) -> Result:
        """The answer to a parsed query from a pod of `namespace` (None: not a pod client);
        `complete`: search-path completion may apply (not for its own candidates)."""
        if namespace is not None and self.isolation is not None:
            hidden = self.isolation.hidden(query, self.isolation.client_label(namespace))
            if hidden is not None and self.index.ready:
                return respond(query, hidden, limit, self.max_udp_size)
        data = query.data
        answer = self.index.answers.get(
            query.name_key + data[query.question_end - 4 : query.question_end - 2]
        )
        if answer is not None and self.index.ready:
            if answer.turn and self.loadbalance:
                answer = wire.turned(answer, data)
            return respond(query, answer, limit, self.max_udp_size)
        return self._miss(query, limit, tcp, namespace if complete else None)

    # --- not a precomputed (name, type) ---------------------------------------------------

    def _miss(self, query: Query, limit: int, tcp: bool, namespace: str | None = None) -> Result:
        index = self.index
        found = index.zone_of(query.name_key, query.label_offsets)
        if found is None:
            zid = index.existing.get(query.name_key)
            if zid is not None and index.ready:
                # A reverse name we own (PTR) asked for another type: NODATA, reverse-zone SOA.
                return respond(query, index.nodata[zid], limit, self.max_udp_size)
            return self._forward(query, limit, tcp)
        zid, zone_offset = found
        if not index.ready:
            # CoreDNS answers SERVFAIL for its zones until the API caches synced (3.6).
            return self._rcode(query, wire.SERVFAIL)
        if query.qtype in (wire.TYPE_AXFR, wire.TYPE_IXFR):
            return self._rcode(query, wire.REFUSED)  # no transfer plugin (dns-features 3.11)
        alias = index.aliases.get(query.name_key)
        if alias is not None:
            if query.qtype in (wire.TYPE_A, wire.TYPE_AAAA) and not alias.internal:
                return self._chase(query, alias, limit)
            # RFC 1034 §3.6.2: a CNAME owner has no other data; the client follows it.
            return respond(query, alias.cname_only, limit, self.max_udp_size)
        existing = index.existing.get(query.name_key)
        if existing is not None:
            return respond(query, index.nodata[existing], limit, self.max_udp_size)
        if zid >= index.service_zones:
            # A --multicluster or --external-zone: no pod or endpoint names in there.
            return respond(query, index.nxdomain[zid], limit, self.max_udp_size)
        offsets = query.label_offsets
        for names in self.lazy:
            if names.claims(query.name_key, offsets, zone_offset):
                lazy = names.answer(
                    query.name_key, offsets, zone_offset, query.qtype, index.nodata[zid]
                )
                if lazy is not None:
                    return respond(query, lazy, limit, self.max_udp_size)
        if (
            len(offsets) > 3
            and offsets[3] == zone_offset
            and query.name_key[offsets[2] : offsets[3]] == _POD_LABEL
        ):
            pod = self._pod(query, offsets)
            if pod is not None:
                return respond(query, pod, limit, self.max_udp_size)
        nxdomain = respond(query, index.nxdomain[zid], limit, self.max_udp_size)
        if (
            namespace is not None
            and self.autopath is not None
            and self.autopath.applies(query, namespace, zid)
        ):
            return self._complete(query, limit, tcp, namespace, zid, nxdomain)
        return nxdomain

    async def _complete(
        self, query: Query, limit: int, tcp: bool, namespace: str, zid: int, nxdomain: bytes
    ) -> bytes | None:
        """--autopath: the first search-list candidate that exists (dnsd/autopath.py)."""
        assert self.autopath is not None

        async def lookup(candidate: bytes) -> bytes | None:
            try:
                parsed = parse_query(candidate)
            except Reject:
                return None
            result = self._answer(parsed, wire.TCP_LIMIT, True, namespace, False)
            if result is None or isinstance(result, bytes):
                return result
            return await result

        response = await self.autopath.complete(query, namespace, zid, nxdomain, lookup)
        if response is not None and not tcp:
            response = wire.truncate_foreign(query, response, limit, self.max_udp_size)
        return response

    def _pod(self, query: Query, offsets: list[int]) -> Answer | None:
        """`<dashed-ip>.<ns>.pod.<zone>` (dns-features 2.1/2.2); None -> NXDOMAIN."""
        if self.pod_mode is PodMode.DISABLED:
            return None
        key = query.name_key
        # `<ns>.pod.<zone>` exists only for a namespace that exists (and is exposed).
        ns_zid = self.index.existing.get(key[offsets[1] :])
        if ns_zid is None:
            return None
        label = key[1 : offsets[1]].decode("latin-1")
        namespace = key[offsets[1] + 1 : offsets[2]].decode("latin-1")
        ip = ip_from_dashed(label)
        if ip is None:
            return None
        if self.pod_mode is PodMode.VERIFIED and not (
            self.pod_exists is not None and self.pod_exists(ip, namespace)
        ):
            return None
        v6 = ":" in ip
        if query.qtype != (wire.TYPE_AAAA if v6 else wire.TYPE_A):
            return self.index.nodata[ns_zid]
        family = socket.AF_INET6 if v6 else socket.AF_INET
        rdata = socket.inet_pton(family, ip)
        # Owner = pointer to the question (offset 12), so it echoes the query's case.
        tail = b"\xc0\x0c" + struct.pack("!HHIH", query.qtype, 1, self.index.ttl, len(rdata))
        tail += rdata
        return wire.make_answer(wire.NOERROR, 1, 0, 0, tail, (len(tail),))

    async def _chase(self, query: Query, alias: Alias, limit: int) -> bytes | None:
        """ExternalName to an outside name: CNAME first, then the target's records from the
        forwarder; the encoded answer is reused until its shortest TTL expires."""
        now = time.monotonic()
        cached = alias.cache.get(query.qtype)
        if cached is not None and cached[0] > now:
            return respond(query, cached[1], limit, self.max_udp_size)
        records: list[RR] = []
        if self.upstream is not None:
            records = await self.upstream.resolve(alias.target, query.qtype)
        answer = enc.encode(alias.owner, query.qtype, [alias.cname, *records])
        ttl = min([alias.cname.ttl, *(rr.ttl for rr in records)])
        alias.cache[query.qtype] = (now + ttl, answer)
        return respond(query, answer, limit, self.max_udp_size)

    def _forward(self, query: Query, limit: int, tcp: bool) -> Result:
        if self.upstream is None:
            return self._rcode(query, wire.SERVFAIL)
        # Cache hits and REFUSED above max-concurrent at once: a flood costs no task; the
        # rest waits for upstream as a future (no task or coroutine per query either).
        at_once = self.upstream.answer_at_once(query.data)
        if at_once is not None:
            return self._fit_foreign(query, limit, tcp, at_once)
        return self.upstream.ask_later(query.data, _FitForeign(self, query, limit, tcp))

    def _fit_foreign(self, query: Query, limit: int, tcp: bool, response: bytes) -> bytes:
        response = bytes(response)  # the server tells answers from coroutines by type
        if not tcp:
            response = wire.truncate_foreign(query, response, limit, self.max_udp_size)
        return response

    def _rcode(self, query: Query, rcode: int) -> bytes:
        return wire.rcode_with_question(query, rcode, self.max_udp_size)

    # --- accounting -----------------------------------------------------------------------

    def _done(
        self, query: Query, tcp: bool, started: float, response: bytes | None
    ) -> bytes | None:
        self.stats.answered(tcp, query.qtype, response, time.perf_counter() - started)
        return response

    async def _count_later(
        self, query: Query, tcp: bool, started: float, pending: Coroutine[Any, Any, bytes | None]
    ) -> bytes | None:
        response = await pending
        return self._done(query, tcp, started, response)


def _in_zone(key: bytes, suffixes: tuple[bytes, ...]) -> bool:
    """Does the wire name `key` (labels already checked) end in one of `suffixes` at a label
    boundary, as ZoneIndex.zone_of would find? `x\\007cluster.local` ends in the bytes of
    `cluster.local` but is not in it."""
    for suffix in suffixes:
        if key.endswith(suffix):
            start = len(key) - len(suffix)
            i = 0
            while i < start:
                i += key[i] + 1
            if i == start:
                return True
    return False


# Held per forwarded query while it waits for upstream: small objects with slots (about 70
# bytes) where a functools.partial takes 216.
class _FitForeign:
    """`Handler._fit_foreign` of one query, for the forwarder to call with its answer."""

    __slots__ = ("handler", "limit", "query", "tcp")

    def __init__(self, handler: Handler, query: Query, limit: int, tcp: bool) -> None:
        self.handler, self.query, self.limit, self.tcp = handler, query, limit, tcp

    def __call__(self, response: bytes) -> bytes:
        return self.handler._fit_foreign(self.query, self.limit, self.tcp, response)


class _CountWhenDone:
    """Counts a forwarded query's answer once its future is done."""

    __slots__ = ("handler", "query", "started", "tcp")

    def __init__(self, handler: Handler, query: Query, tcp: bool, started: float) -> None:
        self.handler, self.query, self.tcp, self.started = handler, query, tcp, started

    def __call__(self, answer: asyncio.Future[bytes]) -> None:
        if not answer.cancelled() and answer.exception() is None:
            self.handler._done(self.query, self.tcp, self.started, answer.result())
