"""Forwarding of names outside the cluster zones, as CoreDNS's `forward` + `cache` plugins do it.

- Routing: the stub domain with the longest matching suffix (kube-dns `stubDomains`, a CoreDNS
  server block per zone), else the default upstreams (`/etc/resolv.conf` by default).
- Upstream choice (CoreDNS `policy`): `random` (default), `round_robin` or `sequential`; upstreams
  marked unhealthy go last, so when every one is down a query still tries them all.
- Each attempt: UDP from a fresh socket (a kernel-chosen random source port) with a random query
  ID; a reply is accepted only with that ID, QR set and our question (case-insensitive), anything
  else is ignored (RFC 5452 section 9.1). A truncated reply is asked again over TCP.
- Timeout, network error, REFUSED or SERVFAIL from one upstream -> the next upstream; the client
  gets SERVFAIL only when every upstream failed (cached for `servfail_ttl`). Attempts stop after
  `FORWARD_DEADLINE` seconds in total (CoreDNS's 5 s), leaving at least one attempt.
- Health (CoreDNS `max_fails 2`, health check every 0.5 s): two transport failures in a row mark
  an upstream unhealthy and start a probe (`. IN NS`) until it answers. One log line per
  transition, never one per query.
- Cache (dnsd/cache.py): hits answered at once; a popular entry close to expiring is
  refreshed in the background (`prefetch`); when every upstream failed, an expired entry is
  served instead of SERVFAIL (serve-stale, RFC 8767).
- At most `max_inflight` client queries wait for upstreams; above that REFUSED (CoreDNS
  `max_concurrent`). Identical concurrent questions share one upstream exchange.
- EDNS: the client's OPT record is forwarded upstream as is. The answer carries an OPT exactly
  when the query did, and it is ours, never the upstream's (dnsd/forward_wire.py says why).
- Answer size: `forward()` returns the whole answer, whatever its size. Fitting it into the
  client's UDP payload size (TC=1 and a trimmed answer) is the server's job, which also owns
  the transport the query came on.

The bytes-in, bytes-out parts (splitting the client's query, checking an upstream's reply,
re-addressing the answer to the client) are pure functions in dnsd/forward_wire.py; this module
is the I/O around them: routing, upstream choice and health, coalescing, the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dnslib
import structlog
from prometheus_client import Counter, Gauge, Histogram

from dnsd.cache import CACHE_PREFETCHES, RCODE_NOERROR, RCODE_SERVFAIL, CacheKey, DnsCache
from dnsd.forward_loop import FORWARD_LOOPS, probe_labels, probe_question
from dnsd.forward_udp import Deadlines, UpstreamFailed, ask_udp
from dnsd.forward_wire import (
    ParsedQuery,
    build_answer,
    check_response,
    error_answer,
    parse_query,
)
from kwatch import metrics as kwatch_metrics

log = structlog.get_logger("dnsd.forward")

RCODE_FORMERR = 1
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
# Failures from one upstream that make the next upstream worth asking.
RETRY_RCODES = frozenset({RCODE_SERVFAIL, RCODE_REFUSED})
# CoreDNS forward: whole-query deadline, failures before "unhealthy", health-check interval.
FORWARD_DEADLINE = 5.0
MAX_FAILS = 2
HEALTH_CHECK_INTERVAL = 0.5
# Root NS query used as the health probe (ID patched per probe), RD=1.
HEALTH_PROBE = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + b"\x00" + struct.pack("!HH", 2, 1)

# Every upstream failed: one message for every question (a cache entry then holds no bytes of
# its own; the client's question replaces this one's, as for every upstream answer).
SERVFAIL = struct.pack("!HHHHHH", 0, 0x8180 | RCODE_SERVFAIL, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01"

Policy = Literal["random", "round_robin", "sequential"]

FORWARD_REQUESTS = Counter(
    "dnsd_forward_requests_total", "Queries sent to an upstream (UDP and TCP retries)", ["to"]
)
FORWARD_RESPONSES = Counter(
    "dnsd_forward_responses_total", "Accepted upstream responses by rcode", ["to", "rcode"]
)
FORWARD_ERRORS = Counter(
    "dnsd_forward_errors_total",
    "Failed upstream attempts by reason (timeout, refused, network, tcp)",
    ["to", "reason"],
)
FORWARD_DURATION = Histogram(
    "dnsd_forward_request_duration_seconds",
    "Time from sending a query to an upstream to its accepted response",
    ["to", "rcode"],
    buckets=tuple(0.00025 * 2**i for i in range(16)),  # 0.25 ms .. 8.192 s, as CoreDNS
)
FORWARD_TRUNCATED = Counter(
    "dnsd_forward_tcp_retries_total", "Truncated UDP answers asked again over TCP", ["to"]
)
FORWARD_MISMATCHED = Counter(
    "dnsd_forward_mismatched_responses_total",
    "Datagrams ignored because ID or question did not match (spoofing or stale)",
    ["to"],
)
FORWARD_SERVFAILS = Counter(
    "dnsd_forward_servfail_total", "Questions answered SERVFAIL because every upstream failed"
)
FORWARD_REJECTS = Counter(
    "dnsd_forward_max_concurrent_rejects_total", "Queries refused above max_inflight"
)
FORWARD_COALESCED = Counter(
    "dnsd_forward_coalesced_total", "Queries that joined an identical question already upstream"
)
FORWARD_INFLIGHT = Gauge("dnsd_forward_inflight", "Client queries waiting for an upstream")
HEALTHCHECK_FAILURES = Counter(
    "dnsd_forward_healthcheck_failures_total", "Failed health probes of unhealthy upstreams", ["to"]
)
HEALTHCHECK_BROKEN = Counter(
    "dnsd_forward_healthcheck_broken_total", "Queries sent while every upstream was unhealthy"
)
UPSTREAM_HEALTHY = Gauge("dnsd_forward_upstream_healthy", "1 if the upstream is healthy", ["to"])


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The `nameserver` addresses of a resolv.conf (IPv4/IPv6, port 53), in order; [] if none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.readlines()
    except OSError:
        return []
    servers: list[tuple[str, int]] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        if (fields[1], 53) not in servers:
            servers.append((fields[1], 53))
    return servers


@dataclass(eq=False)
class Upstream:
    """One upstream server and what we know of its health."""

    host: str
    port: int
    label: str = ""  # "host:port", the `to` label of the metrics
    fails: int = 0  # consecutive transport failures
    healthy: bool = True
    looping: bool = False  # sends our queries back to us (dnsd/forward_loop.py): never used
    probe: asyncio.Task[None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.label = (
            f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        )
        self.family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.mismatched = FORWARD_MISMATCHED.labels(self.label)
        UPSTREAM_HEALTHY.labels(self.label).set(1)


class Forwarder:
    """Answers client queries from the cache or the upstreams; see the module docstring."""

    def __init__(
        self,
        upstreams: Sequence[tuple[str, int]],
        *,
        stub_domains: dict[str, list[tuple[str, int]]] | None = None,
        cache: DnsCache | None = None,
        timeout: float = 2.0,
        max_inflight: int = 1000,
        policy: Policy = "random",
        loop_seed: int | None = None,
        on_loop: Callable[[str], None] | None = None,
    ) -> None:
        self.cache = cache
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.policy = policy
        self._by_address: dict[tuple[str, int], Upstream] = {}
        self.upstreams = self._upstreams(upstreams)
        # Longest suffix first, so the first match is the most specific stub domain.
        self.stub_domains = sorted(
            (
                (_domain_labels(domain), self._upstreams(servers))
                for domain, servers in (stub_domains or {}).items()
            ),
            key=lambda item: -len(item[0]),
        )
        self._pending: dict[CacheKey, asyncio.Task[bytes]] = {}
        self._prefetching: dict[CacheKey, asyncio.Task[bytes]] = {}
        self._inflight = 0
        # round_robin: queries so far per route, keyed by the id of the route's upstream list
        # (self.upstreams or a stub domain's, alive as long as the forwarder): each route counts
        # on its own, as each CoreDNS forward block has its own policy.
        self._robin: dict[int, int] = {}
        self._closed = False
        self._deadlines: Deadlines | None = None  # of the UDP questions, made on first use
        # Loop probes (dnsd/forward_loop.py): probe labels -> the upstream probed with them.
        self.loop_probes: dict[tuple[bytes, ...], Upstream] = (
            {}
            if loop_seed is None
            else {probe_labels(loop_seed, i): up for i, up in enumerate(self._by_address.values())}
        )
        self.on_loop = on_loop  # told the label of an upstream found looping here
        self._looping = False  # any upstream looping: _order filters them out
        if not self.upstreams:
            log.warning("no_upstreams", hint="every forwarded query will be SERVFAIL")

    async def forward(self, query: bytes) -> bytes | None:
        """The whole answer to a client's raw query; None = drop it (unparseable).

        Echoes the client's ID, RD and question bytes; SERVFAIL only when every upstream
        failed; REFUSED above `max_inflight`. Never truncated to the client's UDP size: the
        server sets TC when the answer does not fit.
        """
        parsed = parse_query(query)
        if parsed is None:
            return None
        at_once = self._at_once(parsed)
        if at_once is not None:
            return at_once
        return await self._ask(parsed)

    def answer_at_once(self, query: bytes) -> bytes | None:
        """`forward`'s answer when it needs no upstream: from the cache, NOTIMP, or REFUSED
        while `max_inflight` queries wait upstream (shed, counted in
        dnsd_forward_max_concurrent_rejects_total). None: `ask` must ask upstream (or drop).

        Synchronous, so a flood of queries the forwarder refuses or answers from the cache
        costs no task, no coroutine and no extra turn of the event loop per query."""
        parsed = parse_query(query)
        return None if parsed is None else self._at_once(parsed)

    async def ask(self, query: bytes) -> bytes | None:
        """`forward`'s answer for a query `answer_at_once` just left (None): asked upstream
        without looking at the cache a second time (a miss is counted once)."""
        answer = self.ask_later(query)
        return None if answer is None else await answer

    def ask_later(
        self, query: bytes, then: Callable[[bytes], bytes] | None = None
    ) -> asyncio.Future[bytes] | None:
        """`ask` as a future of the answer (passed through `then` when given); None = drop
        (unparseable). No task and no coroutine per client query: a flood of forwarded names
        keeps one exchange (a task) per distinct question in flight, and each client waiting
        for it costs a future and a callback."""
        parsed = parse_query(query)
        return None if parsed is None else self._ask(parsed, then)

    def _ask(
        self, parsed: ParsedQuery, then: Callable[[bytes], bytes] | None = None
    ) -> asyncio.Future[bytes]:
        exchange = self._pending.get(parsed.key)
        if exchange is None:
            # It leaves _pending itself when it ends (_exchange), before its waiters run.
            exchange = asyncio.ensure_future(self._exchange(parsed, shared=True))
            self._pending[parsed.key] = exchange
        else:
            FORWARD_COALESCED.inc()
        self._inflight += 1
        FORWARD_INFLIGHT.inc()
        answer: asyncio.Future[bytes] = exchange.get_loop().create_future()
        exchange.add_done_callback(_Waiter(self, parsed, then, answer))
        return answer

    def _answer(
        self,
        parsed: ParsedQuery,
        then: Callable[[bytes], bytes] | None,
        answer: asyncio.Future[bytes],
        exchange: asyncio.Future[bytes],
    ) -> None:
        """The exchange a client waited for ended: its answer, re-addressed to that client.
        A client that went away (its future cancelled) never cancels the exchange others
        share."""
        self._inflight -= 1
        FORWARD_INFLIGHT.dec()
        if answer.done():
            return
        if exchange.cancelled():
            answer.cancel()
            return
        error = exchange.exception()
        if error is not None:
            answer.set_exception(error)
            return
        try:
            response = build_answer(parsed, exchange.result())
            answer.set_result(response if then is None else then(response))
        except Exception as err:  # a bug for one client must not hide it from the others
            answer.set_exception(err)

    def _at_once(self, parsed: ParsedQuery) -> bytes | None:
        if self.loop_probes:
            probed = self.loop_probes.get(parsed.labels)
            if probed is not None:  # our probe came back: that upstream loops to us
                self._loop_found(probed)
                return error_answer(parsed, RCODE_SERVFAIL)  # and is not sent round again
        if parsed.opcode != 0:
            return error_answer(parsed, RCODE_NOTIMP)
        cache = self.cache
        if cache is not None:
            cached = cache.get(parsed.key)
            if cached is not None:
                if cache.prefetch and cache.prefetch_due(parsed.key):
                    self._prefetch(parsed)
                return build_answer(parsed, cached)
            if cache.stale_for:
                stale = cache.stale(parsed.key)  # a refresh failed moments ago: no retry yet
                if stale is not None:
                    return build_answer(parsed, stale)
        if self._inflight >= self.max_inflight:
            FORWARD_REJECTS.inc()
            return error_answer(parsed, RCODE_REFUSED)
        return None

    async def resolve(self, qname: str, qtype: int) -> list[dnslib.RR]:
        """Answer records for `qname`/`qtype` (chasing an ExternalName target); [] on failure.

        Goes through the cache, coalescing and `max_inflight` like a client query.
        """
        try:
            question = dnslib.DNSQuestion(qname, qtype)
        except Exception:  # dnslib raises its own error types for bad labels
            return []
        query = dnslib.DNSRecord(dnslib.DNSHeader(id=secrets.randbits(16), rd=1), q=question)
        answer = await self.forward(query.pack())
        if answer is None:
            return []
        try:
            record = dnslib.DNSRecord.parse(answer)
        except Exception:  # dnslib.DNSError and struct errors on a mangled answer
            return []
        if record.header.rcode != RCODE_NOERROR:
            return []
        return list(record.rr)

    async def probe_loops(self, budget: float = 2.0) -> None:
        """Ask every upstream its own probe name once (HINFO, straight to it): one that
        arrives back at dnsd marks that upstream (`_at_once`). The answers do not matter."""
        exchanges = []
        for labels, upstream in self.loop_probes.items():
            template = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0) + probe_question(labels)
            with contextlib.suppress(UpstreamFailed, OSError):  # (an address it cannot reach)
                exchanges.append(self._udp_question(upstream, template, template[12:], budget))
        for exchange in exchanges:
            with contextlib.suppress(UpstreamFailed, asyncio.TimeoutError, OSError):
                await exchange

    def mark_looping(self, label: str) -> None:
        """What another process of this dnsd found (its --forward-process child): `label`'s
        upstream loops. Counted and logged where it was found, not again here."""
        for upstream in self._by_address.values():
            if upstream.label == label and not upstream.looping:
                upstream.looping = self._looping = True

    def _loop_found(self, upstream: Upstream) -> None:
        if upstream.looping:
            return
        upstream.looping = self._looping = True
        FORWARD_LOOPS.labels(upstream.label).inc()
        log.error(
            "forwarding_loop_detected",
            to=upstream.label,
            hint="this upstream sends dnsd's forwarded queries back to dnsd (a resolv.conf or "
            "--upstream naming dnsd's own address?): dnsd no longer forwards to it",
        )
        if self.on_loop is not None:
            self.on_loop(upstream.label)

    async def close(self) -> None:
        """Stop health probes and abandon exchanges still waiting for upstreams."""
        self._closed = True
        tasks: list[asyncio.Task[Any]] = list(self._pending.values())
        tasks += self._prefetching.values()
        tasks += [up.probe for up in self._by_address.values() if up.probe is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pending.clear()

    def route(self, labels: Sequence[bytes]) -> list[Upstream]:
        """The upstreams for a qname (lower-case labels): longest stub domain, else default."""
        for domain, servers in self.stub_domains:
            if len(domain) <= len(labels) and tuple(labels[len(labels) - len(domain) :]) == domain:
                return servers
        return self.upstreams

    def _upstreams(self, addresses: Sequence[tuple[str, int]]) -> list[Upstream]:
        # One Upstream per address, shared between routes, so health is tracked once.
        servers: list[Upstream] = []
        for host, port in addresses:
            upstream = self._by_address.get((host, port))
            if upstream is None:
                upstream = self._by_address[(host, port)] = Upstream(host, port)
            if upstream not in servers:
                servers.append(upstream)
        return servers

    def _prefetch(self, query: ParsedQuery) -> None:
        """Refresh a popular entry in the background (CoreDNS cache `prefetch`)."""
        key = query.key
        if key in self._pending or key in self._prefetching or self._closed:
            return  # already being asked
        # Kept apart from _pending: a client must not wait on it (a failed prefetch answers
        # nothing, the client then asks the upstreams itself).
        CACHE_PREFETCHES.inc()
        task = asyncio.ensure_future(self._exchange(query, prefetch=True))
        self._prefetching[key] = task
        task.add_done_callback(lambda _: self._prefetching.pop(key, None))

    async def _exchange(
        self, query: ParsedQuery, prefetch: bool = False, shared: bool = False
    ) -> bytes:
        """Ask the upstreams in turn; the response to cache and answer with, SERVFAIL if none
        (or, with serve-stale, the expired answer). A failed prefetch changes nothing: the
        entry it meant to refresh is still good. `shared`: the task is `_pending[query.key]`,
        which it leaves when it ends."""
        try:
            response = await self._ask_upstreams(query)
        except Exception:
            log.exception("forward_failed")
            response = None
        finally:
            if shared and self._pending.get(query.key) is asyncio.current_task():
                del self._pending[query.key]
        if response is None and prefetch:
            return b""
        if response is None and self.cache is not None and self.cache.stale_for:
            # RFC 8767: every upstream failed, an expired answer is better than none.
            stale = self.cache.stale(query.key, failed=True)
            if stale is not None:
                return stale
        if response is None:
            FORWARD_SERVFAILS.inc()
            response = SERVFAIL
        if self.cache is not None and not self._closed:
            self.cache.put(query.key, response)
        return response

    async def _ask_upstreams(self, query: ParsedQuery) -> bytes | None:
        # RD=1 (we are a stub asking a recursor), CD as the client asked: both fixed per key.
        flags = 0x0100 | (0x0010 if query.key.cd else 0)
        additional = 1 if query.opt is not None else 0
        template = struct.pack("!HHHHHH", 0, flags, 1, 0, 0, additional)
        template += query.question + (query.opt or b"")
        deadline = time.monotonic() + max(FORWARD_DEADLINE, self.timeout)
        for attempt, upstream in enumerate(self._order(self.route(query.labels))):
            remaining = deadline - time.monotonic()
            if attempt > 0 and remaining <= 0:
                break
            budget = min(self.timeout, max(remaining, 0.001))
            started = time.monotonic()
            try:
                # UDP, then TCP if truncated; the UDP wait is a future (no coroutine frame).
                response = await self._udp_question(upstream, template, query.question, budget)
                if response[2] & 0x02:
                    FORWARD_TRUNCATED.labels(upstream.label).inc()
                    response = await self._tcp_exchange(upstream, template, query.question, budget)
            except UpstreamFailed as failure:
                FORWARD_ERRORS.labels(upstream.label, failure.reason).inc()
                self._failed(upstream, failure.reason)
                continue
            rcode = RCODE_NAMES.get(response[3] & 0x0F, str(response[3] & 0x0F))
            FORWARD_RESPONSES.labels(upstream.label, rcode).inc()
            FORWARD_DURATION.labels(upstream.label, rcode).observe(time.monotonic() - started)
            self._succeeded(upstream)
            if response[3] & 0x0F not in RETRY_RCODES:
                return response
        return None

    def _order(self, servers: list[Upstream]) -> list[Upstream]:
        # CoreDNS forward policy.go: random is a uniform shuffle; for the k-th query of a route
        # (k from 1) round_robin puts upstream k mod n first and keeps the others in their
        # order; sequential keeps the configured order.
        if self._looping:  # never to an upstream that sends it back (none left: SERVFAIL)
            servers = [up for up in servers if not up.looping]
        if len(servers) == 1 and servers[0].healthy:
            return servers  # the common route: nothing to order (and no list per query)
        if self.policy == "random":
            servers = random.sample(servers, len(servers))
        elif self.policy == "round_robin" and servers:
            turn = self._robin[id(servers)] = self._robin.get(id(servers), 0) + 1
            first = turn % len(servers)
            servers = [servers[first], *servers[:first], *servers[first + 1 :]]
        healthy = [up for up in servers if up.healthy]
        if servers and not healthy:
            HEALTHCHECK_BROKEN.inc()
        return healthy + [up for up in servers if not up.healthy]

    def _udp_question(
        self, upstream: Upstream, template: bytes, question: bytes, budget: float
    ) -> asyncio.Future[bytes]:
        """Our query (a random ID on `template`) to `upstream` over UDP: the reply as a future
        (dnsd/forward_udp.py); raises or fails with UpstreamFailed."""
        FORWARD_REQUESTS.labels(upstream.label).inc()
        message = struct.pack("!H", secrets.randbits(16)) + template[2:]
        loop = asyncio.get_running_loop()
        if self._deadlines is None or self._deadlines.loop is not loop:
            self._deadlines = Deadlines(loop)
        return ask_udp(
            self._deadlines,
            upstream.family,
            (upstream.host, upstream.port),
            message,
            question,
            budget,
            upstream.mismatched,
        )

    async def _tcp_exchange(
        self, upstream: Upstream, template: bytes, question: bytes, budget: float
    ) -> bytes:
        qid = secrets.randbits(16)
        message = struct.pack("!H", qid) + template[2:]
        FORWARD_REQUESTS.labels(upstream.label).inc()
        writer = None
        try:
            async with asyncio.timeout(budget):
                reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
                writer.write(struct.pack("!H", len(message)) + message)
                await writer.drain()
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                response = await reader.readexactly(length)
        except TimeoutError:
            raise UpstreamFailed("timeout") from None
        except (OSError, asyncio.IncompleteReadError):
            raise UpstreamFailed("tcp") from None
        finally:
            if writer is not None:
                writer.close()
        if not check_response(response, qid, question):
            FORWARD_MISMATCHED.labels(upstream.label).inc()
            raise UpstreamFailed("tcp")
        return response

    def _failed(self, upstream: Upstream, reason: str) -> None:
        upstream.fails += 1
        if upstream.healthy and upstream.fails >= MAX_FAILS:
            upstream.healthy = False
            UPSTREAM_HEALTHY.labels(upstream.label).set(0)
            log.warning("upstream_unhealthy", upstream=upstream.label, reason=reason)
            if not self._closed and (upstream.probe is None or upstream.probe.done()):
                upstream.probe = asyncio.ensure_future(self._probe(upstream))

    def _succeeded(self, upstream: Upstream) -> None:
        upstream.fails = 0
        if not upstream.healthy:
            upstream.healthy = True
            UPSTREAM_HEALTHY.labels(upstream.label).set(1)
            log.info("upstream_healthy", upstream=upstream.label)
            probe = upstream.probe
            if probe is not None and probe is not asyncio.current_task():
                probe.cancel()

    async def _probe(self, upstream: Upstream) -> None:
        """Ask an unhealthy upstream `. IN NS` every HEALTH_CHECK_INTERVAL until it answers."""
        question = HEALTH_PROBE[12:]
        crashed = False
        while not upstream.healthy:
            await asyncio.sleep(HEALTH_CHECK_INTERVAL)
            try:
                await self._udp_question(upstream, HEALTH_PROBE, question, self.timeout)
            except UpstreamFailed:
                HEALTHCHECK_FAILURES.labels(upstream.label).inc()
                continue
            except Exception as err:
                # Not an upstream failure: a bug. The probe is the only way back to healthy
                # besides a lucky client query, so it goes on at the next interval (it is not
                # supervised on its own); counted as a restart, its traceback logged once.
                HEALTHCHECK_FAILURES.labels(upstream.label).inc()
                kwatch_metrics.TASK_RESTARTS.labels("forward-probe").inc()
                if crashed:
                    log.error(
                        "forward_probe_failed_again", upstream=upstream.label, problem=repr(err)
                    )
                else:
                    log.exception("forward_probe_failed", upstream=upstream.label)
                crashed = True
                continue
            self._succeeded(upstream)


class _Waiter:
    """One client query waiting for an exchange: settles its answer when the exchange ends
    (the exchange's done callback; about 70 bytes where a functools.partial takes 216)."""

    __slots__ = ("answer", "forwarder", "parsed", "then")

    def __init__(
        self,
        forwarder: Forwarder,
        parsed: ParsedQuery,
        then: Callable[[bytes], bytes] | None,
        answer: asyncio.Future[bytes],
    ) -> None:
        self.forwarder = forwarder
        self.parsed = parsed
        self.then = then
        self.answer = answer

    def __call__(self, exchange: asyncio.Future[bytes]) -> None:
        self.forwarder._answer(self.parsed, self.then, self.answer, exchange)


def _domain_labels(domain: str) -> tuple[bytes, ...]:
    return tuple(label.lower().encode() for label in domain.strip(".").split(".") if label)
