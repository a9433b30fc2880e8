"""The soak's checker: what dnsd and kpx should serve, derived from the API's objects on its
own (no dnsd or kpx code), and the comparison with what they do serve.

DNS (zone cluster.local, `--pods verified`, no endpoint PTRs), per the Kubernetes DNS spec
1.1.0 and CoreDNS where the spec is silent:
- a ClusterIP Service: A / AAAA of its ClusterIPs at `<svc>.<ns>.svc`; per named port an SRV
  `_<port>._<proto>.<svc>.<ns>.svc` -> the Service name, and every port, named or not, at the
  Service name; PTR from each ClusterIP (§2.3);
- a headless Service with ready endpoints: A / AAAA of the ready addresses at the Service
  name and at `<hostname or dashed IP>.<svc>.<ns>.svc`, SRV per named EndpointSlice port to
  those names and every slice port at the Service name, PTR from each ready address to its
  name; without any: NXDOMAIN (§2.4);
- SRV weights as CoreDNS's (plugin/backend_lookup.go SRV() over kubernetes.go findServices):
  floor(100 / N), at least 1, N = the records the question matched before duplicate
  (target, port) pairs are dropped: ClusterIPs x matching ports, or ready endpoint addresses
  (per EndpointSlice) x matching slice ports, a slice without ports counting one (port -1);
- an ExternalName Service: CNAME to its target (§2.5);
- `<dashed-ip>.<ns>.pod`: A when a pod with that IP exists in that existing namespace;
  `<ns>.svc` and `<ns>.pod` exist (NODATA) for an existing namespace;
- everything that existed once and no longer does: NXDOMAIN, and a reverse name nobody owns
  goes to the upstream (the soak's upstream answers NXDOMAIN to everything).
kpx (`--mode ports`): one frontend per ClusterIP x TCP port, `serve` when an EndpointSlice of
that family has a ready endpoint for the port's name, else `reject`; no other frontend.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename

ZONE = "cluster.local"
Answer = tuple[str, ...] | str  # sorted rdata texts (empty: NODATA), or an rcode's name
Question = tuple[str, str]  # (name, type)


@dataclass
class Seen:
    """Everything the churn ever wrote, so that what is gone is checked to be gone."""

    services: set[str] = field(default_factory=set)  # ns/name
    ips: set[str] = field(default_factory=set)  # ClusterIPs and endpoint addresses
    pods: set[tuple[str, str]] = field(default_factory=set)  # (namespace, IP)
    namespaces: set[str] = field(default_factory=set)


@dataclass
class Snapshot:
    """The API's objects once the writes stopped."""

    services: list[dict[str, Any]]
    slices: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    namespaces: list[dict[str, Any]]


# --- what should be served -------------------------------------------------------------------


def dashed(ip: str) -> str:
    """CoreDNS endpointHostname for an endpoint without a hostname."""
    if "." in ip:
        return ip.replace(".", "-")
    text = ip.replace(":", "-")
    return text + "0" if text.endswith("-") else text


def canonical(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def family(ip: str) -> int:
    return 6 if ":" in ip else 4


def reverse_name(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text(omit_final_dot=True).lower()


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


def _is_ready(endpoint: dict[str, Any]) -> bool:
    return (endpoint.get("conditions") or {}).get("ready") is not False


class Expected:
    """Answers (name, type) -> records and the names that exist, built from a Snapshot."""

    def __init__(self, snap: Snapshot) -> None:
        self.records: dict[Question, set[str]] = {}
        self.names: set[str] = set()  # every name that exists, ancestors below the zone too
        self.ptrs: dict[str, dict[int, set[str]]] = {}  # reverse name -> rank -> targets
        self.namespaces = {ns["metadata"]["name"] for ns in snap.namespaces}
        self.slices: dict[str, list[dict[str, Any]]] = {}
        for sl in snap.slices:
            owner = (sl["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if owner:
                self.slices.setdefault(f"{sl['metadata']['namespace']}/{owner}", []).append(sl)
        self.services = {_key(svc): svc for svc in snap.services}
        self.pods = {
            (pod["metadata"]["namespace"], canonical(ip["ip"]))
            for pod in snap.pods
            for ip in (pod.get("status") or {}).get("podIPs") or []
        }
        for key, svc in self.services.items():
            self._service(key, svc)
        for ns in self.namespaces:
            self._exists(f"{ns}.svc.{ZONE}")
            self._exists(f"{ns}.pod.{ZONE}")
        for rev, ranks in self.ptrs.items():
            self._add(rev, "PTR", *(f"{t}." for t in ranks[min(ranks)]))

    def _exists(self, name: str) -> None:
        while name.endswith("." + ZONE) and name not in self.names:
            self.names.add(name)
            name = name.split(".", 1)[1]

    def _add(self, name: str, rtype: str, *rdatas: str) -> None:
        self.records.setdefault((name, rtype), set()).update(rdatas)
        if not name.endswith(".arpa"):
            self._exists(name)

    def _ptr(self, ip: str, rank: int, target: str) -> None:
        self.ptrs.setdefault(reverse_name(ip), {}).setdefault(rank, set()).add(target)

    def _srvs(self, owner: str, targets: Iterable[tuple[int, str]], count: int) -> None:
        """SRV records at `owner`, weight 100 / `count` (at least 1): `count` is every record
        CoreDNS's lookup matched, duplicates and port-less ones included."""
        weight = max(1, 100 // count)
        answered = {f"0 {weight} {port} {target}." for port, target in targets}
        if answered:
            self._add(owner, "SRV", *answered)

    def _service(self, key: str, svc: dict[str, Any]) -> None:
        ns, name = key.split("/")
        base = f"{name}.{ns}.svc.{ZONE}"
        spec = svc["spec"]
        if spec.get("type") == "ExternalName":
            self._add(base, "CNAME", spec["externalName"].rstrip(".") + ".")
        elif spec.get("clusterIP") == "None":
            self._headless(key, base)
        else:
            ips = [canonical(ip) for ip in spec.get("clusterIPs") or [spec["clusterIP"]]]
            for ip in ips:
                self._add(base, "AAAA" if family(ip) == 6 else "A", ip)
                self._ptr(ip, 0, base)
            ports = spec.get("ports") or []
            by_owner: dict[str, list[int]] = {}
            for port in ports:
                if port.get("name"):
                    owner = f"_{port['name']}._{port.get('protocol', 'TCP')}.{base}".lower()
                    by_owner.setdefault(owner, []).append(port["port"])
            by_owner[base] = [p["port"] for p in ports]  # the bare name: every port
            for owner, numbers in by_owner.items():
                if numbers:  # a record per matching port and ClusterIP
                    self._srvs(owner, [(n, base) for n in numbers], len(numbers) * len(ips))

    def _headless(self, key: str, base: str) -> None:
        srv: dict[str, set[tuple[int, str]]] = {}
        count: dict[str, int] = {}
        for sl in self.slices.get(key, []):
            ports = sl.get("ports") or [{}]  # no ports: one without a number (CoreDNS's -1)
            for ep in sl.get("endpoints") or []:
                if not _is_ready(ep):
                    continue
                for ip in ep.get("addresses") or []:
                    ip = canonical(ip)
                    target = f"{(ep.get('hostname') or dashed(ip)).lower()}.{base}"
                    rtype = "AAAA" if family(ip) == 6 else "A"
                    self._add(base, rtype, ip)
                    self._add(target, rtype, ip)
                    self._ptr(ip, 1, target)
                    for p in ports:
                        owners = [base]
                        if p.get("name"):
                            owners.append(
                                f"_{p['name']}._{p.get('protocol', 'TCP')}.{base}".lower()
                            )
                        for owner in owners:
                            count[owner] = count.get(owner, 0) + 1
                            targets = srv.setdefault(owner, set())
                            if p.get("port") is not None:
                                targets.add((p["port"], target))
        for owner, targets in srv.items():
            self._srvs(owner, targets, count[owner])

    def answer(self, name: str, rtype: str) -> Answer:
        if (name, rtype) in self.records:
            return tuple(sorted(self.records[name, rtype]))
        if name.endswith(".arpa"):
            return "NXDOMAIN"  # forwarded: the soak's upstream answers NXDOMAIN
        pod = name.split(".")
        if len(pod) == 5 and pod[2] == "pod" and pod[1] in self.namespaces:
            ip = _undashed(pod[0])
            if ip is not None and (pod[1], ip) in self.pods:
                return (ip,) if rtype == ("AAAA" if family(ip) == 6 else "A") else ()
        return () if name in self.names else "NXDOMAIN"

    def questions(self, seen: Seen) -> list[Question]:
        """Every question worth asking: each name of what exists and of what existed."""
        out: set[Question] = set()
        for key in seen.services | set(self.services):
            ns, name = key.split("/")
            base = f"{name}.{ns}.svc.{ZONE}"
            external = self.services.get(key, {}).get("spec", {}).get("type") == "ExternalName"
            # An ExternalName's A would be chased upstream: its CNAME is the record.
            out |= {(base, t) for t in (("CNAME",) if external else ("A", "AAAA", "SRV"))}
        for name, rtype in self.records:
            if not name.endswith(".arpa"):
                out.add((name, rtype))
                if rtype in ("A", "AAAA"):  # the other family: NODATA
                    out.add((name, "AAAA" if rtype == "A" else "A"))
        out |= {(reverse_name(ip), "PTR") for ip in seen.ips}
        for ns, ip in seen.pods | self.pods:
            out.add((f"{dashed(ip)}.{ns}.pod.{ZONE}", "A"))
        for ns in seen.namespaces | self.namespaces:
            out |= {(f"{ns}.svc.{ZONE}", "A"), (f"{ns}.pod.{ZONE}", "A")}
        return sorted(out)

    def frontends(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, svc in self.services.items():
            spec = svc["spec"]
            if spec.get("type") == "ExternalName" or spec.get("clusterIP") in (None, "None"):
                continue
            for ip in spec.get("clusterIPs") or [spec["clusterIP"]]:
                ip = canonical(ip)
                for port in spec.get("ports") or []:
                    if port.get("protocol", "TCP") != "TCP":
                        continue
                    text = f"[{ip}]:{port['port']}" if family(ip) == 6 else f"{ip}:{port['port']}"
                    ready = self._ready_for(key, port.get("name") or "", family(ip))
                    out[text] = "serve" if ready else "reject"
        return out

    def _ready_for(self, key: str, port_name: str, fam: int) -> bool:
        for sl in self.slices.get(key, []):
            if sl.get("addressType") != f"IPv{fam}":
                continue
            if not any((p.get("name") or "") == port_name for p in sl.get("ports") or []):
                continue
            if any(_is_ready(ep) for ep in sl.get("endpoints") or []):
                return True
        return False


def _undashed(label: str) -> str | None:
    """A pod label back to its IP (IPv4 only: the soak's pods have IPv4 addresses)."""
    try:
        return canonical(label.replace("-", "."))
    except ValueError:
        return None


# --- what is served ------------------------------------------------------------------------------


def ask_all(port: int, questions: list[Question], timeout: float = 2.0) -> dict[Question, Answer]:
    """Ask dnsd every question over UDP, 200 in flight at a time; "TIMEOUT" for no answer
    after three tries."""
    answers: dict[Question, Answer] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        for start in range(0, len(questions), 200):
            batch = questions[start : start + 200]
            for _ in range(3):
                pending = {i: q for i, q in enumerate(batch) if q not in answers}
                if not pending:
                    break
                _ask_batch(sock, pending, answers, timeout)
            for q in batch:
                answers.setdefault(q, "TIMEOUT")
    return answers


def _ask_batch(
    sock: socket.socket,
    pending: dict[int, Question],
    answers: dict[Question, Answer],
    timeout: float,
) -> None:
    for qid, (name, rtype) in pending.items():
        query = dns.message.make_query(name, rtype)
        query.id = qid
        sock.send(query.to_wire())
    deadline = time.monotonic() + timeout
    while pending and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            reply = dns.message.from_wire(sock.recv(65535))
        except (TimeoutError, ConnectionRefusedError):
            return
        except dns.exception.DNSException:
            continue
        question = pending.get(reply.id)
        if question is None or not reply.question:
            continue
        if reply.question[0].name.to_text(omit_final_dot=True).lower() != question[0]:
            continue
        del pending[reply.id]
        answers[question] = _read(reply, question[1])


def _read(reply: dns.message.Message, rtype: str) -> Answer:
    if reply.rcode() != dns.rcode.NOERROR:
        return dns.rcode.to_text(reply.rcode())
    wanted = dns.rdatatype.from_text(rtype)
    return tuple(
        sorted(
            rr.to_text().lower() for rrset in reply.answer if rrset.rdtype == wanted for rr in rrset
        )
    )


def served_frontends(url: str) -> dict[str, str] | None:
    """kpx's /debug/services as frontend -> state; None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            rows = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return {row["frontend"]: row["state"] for row in rows}


# --- the comparison ------------------------------------------------------------------------------


@dataclass
class CheckResult:
    questions: int
    frontends: int
    differences: list[str]
    passes: int  # comparisons made until zero differences or the deadline
    # Questions per "<kind of name> <type> answer|NODATA|NXDOMAIN", and frontends per state.
    coverage: dict[str, int]
    settle_s: float  # from the first comparison to the last


def compare(
    expected: Expected, questions: list[Question], dns_port: int, kpx_url: str
) -> list[str]:
    diffs = []
    got = ask_all(dns_port, questions)
    for q in questions:
        want = expected.answer(*q)
        if got[q] != want:
            diffs.append(f"dns {q[0]} {q[1]}: want {_show(want)} got {_show(got[q])}")
    frontends = expected.frontends()
    served = served_frontends(kpx_url)
    if served is None:
        return [*diffs, "kpx /debug/services did not answer"]
    for fe in sorted(set(served) | set(frontends)):
        if served.get(fe) != frontends.get(fe):
            diffs.append(f"kpx {fe}: want {frontends.get(fe)} got {served.get(fe)}")
    return diffs


def _show(answer: Answer) -> str:
    if isinstance(answer, str):
        return answer
    return "[" + ", ".join(answer) + "]" if answer else "NODATA"


def check(
    snap: Snapshot, seen: Seen, dns_port: int, kpx_url: str, deadline_s: float
) -> CheckResult:
    """Compare until zero differences or `deadline_s` (the daemons may still be catching up
    with the last writes); the API does not change meanwhile."""
    expected = Expected(snap)
    questions = expected.questions(seen)
    started = time.monotonic()
    passes = 1
    diffs = compare(expected, questions, dns_port, kpx_url)
    while diffs and time.monotonic() - started < deadline_s:
        time.sleep(1)
        diffs = compare(expected, questions, dns_port, kpx_url)
        passes += 1
    return CheckResult(
        len(questions),
        len(expected.frontends()),
        diffs,
        passes,
        coverage(expected, questions),
        time.monotonic() - started,
    )


def coverage(expected: Expected, questions: list[Question]) -> dict[str, int]:
    """What the questions expect, counted: that the check covered every kind of answer."""
    out: dict[str, int] = {}
    for name, rtype in questions:
        want = expected.answer(name, rtype)
        kind = want if isinstance(want, str) else ("answer" if want else "NODATA")
        labels = name.split(".")
        where = (
            "reverse" if name.endswith(".arpa")
            else "namespace" if len(labels) == 4
            else "pod" if labels[2] == "pod"
            else "service" if len(labels) == 5
            else "endpoint" if len(labels) == 6 and not labels[0].startswith("_")
            else "port"
        )  # fmt: skip
        out[f"{where} {rtype} {kind}"] = out.get(f"{where} {rtype} {kind}", 0) + 1
    for state in expected.frontends().values():
        out[f"frontend {state}"] = out.get(f"frontend {state}", 0) + 1
    return dict(sorted(out.items()))
