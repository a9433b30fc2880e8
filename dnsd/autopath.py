"""Server-side search-path completion for pods (CoreDNS `autopath @kubernetes`).

A pod's resolv.conf has `search <ns>.svc.<zone> svc.<zone> <zone> <host's search...>` and
`ndots:5`, so a lookup of `example.com` is first asked as `example.com.<ns>.svc.<zone>`, then
down the list, up to six queries. When a pod (its address is a known pod IP, in namespace ns)
asks a name below `<ns>.svc.<zone>` that does not exist, dnsd walks that list itself
(plugin/autopath/autopath.go):
- base = the name without `<ns>.svc.<zone>`; candidates `base.svc.<zone>`, `base.<zone>`,
  `base.<each search domain of --resolv-conf>` and finally `base.` itself, which is forwarded;
- the first candidate whose answer is not NXDOMAIN (an answer, NODATA, even SERVFAIL) is the
  answer: its question replaced by the client's, and when it has answer records, a CNAME from
  the asked name to the owner of the first one put first, with that record's TTL (cname.go);
- when every candidate is NXDOMAIN, the original NXDOMAIN, and the client walks its list.

The answer is assembled with dnslib: this runs on the control path, per NXDOMAIN of a pod.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from dnslib import CNAME, QTYPE, RR, DNSLabel, DNSRecord
from prometheus_client import Counter

from dnsd import wire
from dnsd.names import to_wire
from dnsd.wire import Query

log = structlog.get_logger("dnsd.autopath")

AUTOPATH_SUCCESS = Counter(
    "dnsd_autopath_success_total", "Pod queries answered by a later search-list candidate"
)

# Answers a candidate query (its raw bytes) as the handler would, whole (no truncation).
Lookup = Callable[[bytes], Awaitable[bytes | None]]


def read_resolv_search(path: str) -> list[str]:
    """The domains of the last `search` (or `domain`) line of a resolv.conf; [] if none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.readlines()
    except OSError:
        return []
    search: list[str] = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] in ("search", "domain"):
            search = [f.lower().strip(".") for f in fields[1:] if f.strip(".")]
    return search


class AutoPath:
    def __init__(self, zones: list[str], search: list[str]) -> None:
        self.zones = zones
        self.search: list[bytes] = []  # the host's search domains, wire form
        for domain in search:
            try:
                self.search.append(to_wire(domain))
            except (ValueError, UnicodeEncodeError):
                log.warning("autopath_search_domain_skipped", domain=domain)
        self._first: dict[tuple[str, int], bytes] = {}  # (ns, zone id) -> `<ns>.svc.<zone>`

    def first(self, namespace: str, zid: int) -> bytes:
        """`<ns>.svc.<zone>` in wire form: the first element of the pod's search list."""
        key = (namespace, zid)
        found = self._first.get(key)
        if found is None:
            try:
                found = to_wire(f"{namespace}.svc.{self.zones[zid]}")
            except (ValueError, UnicodeEncodeError):
                found = b""
            if len(self._first) < 100_000:
                self._first[key] = found
        return found

    def applies(self, query: Query, namespace: str, zid: int) -> bool:
        """The name lies strictly below the client's `<ns>.svc.<zone>` (firstInSearchPath)."""
        if zid >= len(self.zones):
            return False  # a --multicluster or --external-zone: no pod search list there
        first = self.first(namespace, zid)
        key = query.name_key
        return bool(first) and len(key) > len(first) and key.endswith(first)

    def candidates(self, query: Query, namespace: str, zid: int) -> list[bytes]:
        """The names to try after the asked one, in search-list order, in wire form."""
        base = query.name_key[: len(query.name_key) - len(self.first(namespace, zid))]
        zone = to_wire(self.zones[zid])
        suffixes = [b"\x03svc" + zone, zone, *self.search, b"\x00"]
        return [base + s for s in suffixes if len(base) + len(s) <= 255]

    async def complete(
        self,
        query: Query,
        namespace: str,
        zid: int,
        nxdomain: bytes,
        lookup: Lookup,
    ) -> bytes | None:
        """The answer of the first candidate that is not NXDOMAIN, CNAMEd; else `nxdomain`."""
        data = query.data
        name_end = 12 + len(query.name_key)
        for name in self.candidates(query, namespace, zid):
            candidate = data[:12] + name + data[name_end:]
            response = await lookup(candidate)
            if response is None or len(response) < 12 or response[3] & 0x0F == wire.NXDOMAIN:
                continue
            try:
                answer = _cnamed(response, data[12:name_end])
            except Exception:  # dnslib's errors on an upstream answer it cannot read
                log.warning("autopath_answer_unreadable")
                continue
            AUTOPATH_SUCCESS.inc()
            return answer
        return nxdomain


def _cnamed(response: bytes, asked: bytes) -> bytes:
    """`response` as an answer to `asked` (wire name, the client's case): the question
    replaced, a CNAME to the first answer's owner first (CoreDNS autopath cname.go)."""
    message = DNSRecord.parse(response)
    owner = DNSLabel(_labels(asked))
    message.questions[0].qname = owner
    for rr in message.rr:
        if rr.rname == owner:  # DNSLabel compares case-insensitively
            continue
        message.rr.insert(0, RR(owner, QTYPE.CNAME, ttl=rr.ttl, rdata=CNAME(rr.rname)))
        break
    return bytes(message.pack())


def _labels(name: bytes) -> list[bytes]:
    labels = []
    i = 0
    while name[i]:
        labels.append(name[i + 1 : i + 1 + name[i]])
        i += 1 + name[i]
    return labels
