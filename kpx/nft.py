"""nftables steering: render the ruleset as text (pure) and apply it with `nft -f -`.

One table, `inet kpx`, owned by kpx. The rules never change while kpx runs; only set
membership does:
- `svc4` / `svc6` (ip . port): ClusterIPs, externalIPs and LB IPs with usable endpoints;
  matching TCP from pods (prerouting) and host processes (output) is REDIRECTed to the proxy
  port, where the proxy reads SO_ORIGINAL_DST;
- `np4` / `np6` (port): NodePorts with usable endpoints, matched on `fib daddr type local`
  (and on `--nodeport-addresses` CIDRs when given), redirected the same way;
- `svc4-reject`, `np4-reject`, ...: frontends of Services without a usable endpoint anywhere,
  answered with a TCP reset in the filter hooks (input, forward, output) so the client's
  connect fails at once (kube-proxy's nftables mode: `no-endpoint-services` -> reject);
- `svc4-drop`, `np4-drop`, ...: frontends whose Local traffic policy finds no endpoint on this
  node while the Service has some elsewhere (internalTrafficPolicy Local ClusterIPs,
  externalTrafficPolicy Local external frontends without the short-circuit): dropped in the
  same filter hooks, as kube-proxy's `no-endpoint-services` -> drop, so the client's connect
  times out instead of failing (another node may serve it);
- `svc4-local`, `np4-local`, ...: external frontends of externalTrafficPolicy: Local Services
  without an endpoint on this node: redirected for host processes (output hook) and for
  sources in the cluster CIDRs (kube-proxy's short-circuit to the cluster-wide endpoints),
  dropped for everyone else.

Transparent mode (`transparent=True`, kpx/steering.py decides it): traffic from pods and from
outside the node is handed to the proxy's IP_TRANSPARENT listener by `tproxy` in a prerouting
chain at mangle priority instead of `redirect`, so the accepted socket's local address is the
frontend and the client's address is untouched; the packet gets the fwmark `TPROXY_MARK`, which
the policy routing kpx installs (kpx/policyroute.py: `fwmark lookup` a table whose only route
is `local default dev lo`) turns into local delivery. The same chain marks every TCP packet of
a connection that belongs to a transparent socket (`socket transparent 1`): the client's later
packets and, above all, the backends' replies to the client's address, which the node would
otherwise forward to the client pod. Except a connection's first SYN: the socket it finds may
be a TIME_WAIT one (kpx closed first towards that client port, and the client reuses the port
within the minute), which would answer it with a bare ACK: the client resets it and connects
only with a retransmitted SYN (bench/proxy.py's transparent connection rate was half of node
mode's). `tproxy` hands such a SYN to the listener, which takes the tuple over. Host processes
(output hook) are still `redirect`ed, and the refusing chains skip marked packets (a tproxied
packet keeps its frontend destination).
Clients behind a bridge (the ingress device is a bridge, as with bridge CNIs) are `redirect`ed
too: tproxy does not work for them (see `_BRIDGE`); the proxy still connects from their
address where their backend is not on the same bridge (kpx/links.py).

`loadBalancerSourceRanges` (kube-proxy's `firewall-ips`): `lbfw4` holds the LB IP . port
frontends with ranges, `lbfw-allow4` (interval) the LB IP . port . allowed range triples; a
new or established packet to a firewalled frontend from any other source is dropped in
prerouting and output before it is steered (priority -110, ahead of the nat and tproxy hooks'
verdicts taking effect). Changed only when a Service's ranges or LB IPs change.

So an endpoint change costs nothing in the kernel, a new frontend costs one set element, and a
frontend losing its last endpoint moves between two sets. Every change is one `nft -f`
transaction (atomic); startup rewrites the table from scratch (`add table; delete table;
table {...}` in one transaction), idempotent across restarts, and a crash leaves the last
complete ruleset in place.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import Counter

from kpx.rules import Steer, SteerKey

# LB frontend -> the source ranges allowed to reach it (ServiceTable.firewall).
Firewall = Mapping[SteerKey, tuple[str, ...]]

log = structlog.get_logger("kpx.nft")

TABLE = "inet kpx"
# The fwmark bit of tproxied packets and of packets for transparent sockets (the policy routing
# matches it). Free in kube-proxy (0x4000, 0x8000), Calico (0xffff0000) and Cilium (0x0f00).
TPROXY_MARK = 0x2000
ELEMENTS_PER_LINE = 1000  # keeps single statements (and nft's parser) reasonable at 10k+

SYNC_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    "nft transactions that failed (the next sync rewrites the table)",
)
CLEANUP_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
    "Failures to remove kpx's nftables table",
)


class NftError(Exception):
    """`nft -f` rejected a transaction; the message is nft's stderr."""


SET_SUFFIX: dict[Steer, str] = {
    "serve": "",
    "local": "-local",
    "drop": "-drop",
    "reject": "-reject",
}


def element(key: SteerKey) -> str:
    _family, ip, port = key
    return f"{ip} . {port}" if ip else str(port)


def _split_cidrs(cidrs: Iterable[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {4: [], 6: []}
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        out[net.version].append(str(net))
    return out


def interval_set(name: str, addr_type: str, cidrs: list[str]) -> str:
    return (
        f"\tset {name} {{ type {addr_type}; flags interval; auto-merge; "
        f"elements = {{ {', '.join(cidrs)} }}; }}"
    )


def _family_chains(
    family: int,
    proxy_port: int,
    nodeport_cidrs: list[str] | None,
    cluster_cidrs: list[str],
    transparent: bool = False,
) -> list[str]:
    """The sets and the steering/refusing chains of one address family.

    `nodeport_cidrs` None means NodePorts on every local address; an empty list means no
    NodePorts in this family (kube-proxy: nodePortAddresses without a CIDR of that family).
    `transparent` adds the `tproxy{f}` chain (prerouting's `steer{f}` with tproxy).
    """
    f = family
    ip = "ip" if f == 4 else "ip6"
    addr_type = "ipv4_addr" if f == 4 else "ipv6_addr"
    lines = [
        f"\tset svc{f}{sfx} {{ type {addr_type} . inet_service; }}" for sfx in SET_SUFFIX.values()
    ]
    lines += [f"\tset np{f}{sfx} {{ type inet_service; }}" for sfx in SET_SUFFIX.values()]
    lines.append(f"\tset lbfw{f} {{ type {addr_type} . inet_service; }}")
    lines.append(
        f"\tset lbfw-allow{f} {{ type {addr_type} . inet_service . {addr_type}; flags interval; }}"
    )
    np_match: str | None = "fib daddr type local"
    if nodeport_cidrs is not None:
        if nodeport_cidrs:
            lines.append(interval_set(f"np-addresses{f}", addr_type, nodeport_cidrs))
            np_match = f"fib daddr type local {ip} daddr @np-addresses{f}"
        else:
            np_match = None
    reset = "reject with tcp reset"
    svc, np = f"{ip} daddr . tcp dport @svc{f}", f"{np_match} tcp dport @np{f}"
    # Client matches, steered to the proxy (`{v}` becomes the verdict).
    steer = [f"{svc} {{v}}"]
    host = [f"{svc}-local {{v}}"]  # host processes are local clients
    # What reaches the filter hooks still addressed to a `-local` frontend was not redirected
    # (not a local client): dropped, like the `-drop` ones.
    refuse = [f"{svc}-reject {reset}", f"{svc}-local drop", f"{svc}-drop drop"]
    if cluster_cidrs:  # pods are local clients too (kube-proxy's detect-local by clusterCIDR)
        lines.append(interval_set(f"cluster{f}", addr_type, cluster_cidrs))
        steer.append(f"{ip} saddr @cluster{f} {svc}-local {{v}}")
    if np_match is not None:
        steer.append(f"{np} {{v}}")
        host.append(f"{np}-local {{v}}")
        refuse += [f"{np}-reject {reset}", f"{np}-local drop", f"{np}-drop drop"]
        if cluster_cidrs:
            steer.append(f"{ip} saddr @cluster{f} {np}-local {{v}}")
    redirect = f"redirect to :{proxy_port}"
    tproxy = f"tproxy {ip} to :{proxy_port} meta mark set meta mark | {TPROXY_MARK:#x} accept"
    chains = [
        (f"steer{f}", [r.format(v=redirect) for r in steer]),
        (f"steer-host{f}", [r.format(v=redirect) for r in host]),
        (f"refuse{f}", refuse),
    ]
    if transparent:
        # tproxy finds no socket while no kpx listens (killed, restarting): reset the client
        # then, as `redirect` to a closed port does, instead of forwarding its packet on.
        tproxied = [rule for r in steer for rule in (r.format(v=tproxy), r.format(v=reset))]
        chains.append((f"tproxy{f}", tproxied))
    for name, rules in chains:
        lines += [f"\tchain {name} {{", *(f"\t\t{rule}" for rule in rules), "\t}"]
    return lines


# Packets that came in through a bridge (a bridge CNI's cni0) are `redirect`ed even in
# transparent mode: the kernel does not deliver them to the socket `tproxy` assigns (seen on
# 6.x without br_netfilter: the SYN is answered with a reset). Their clients' addresses are
# still kept towards backends elsewhere; the replies come back routed.
_BRIDGE = 'meta iifkind "bridge"'


def _base_chain(name: str, kind: str, hook: str, priority: int, body: str) -> list[str]:
    return [
        f"\tchain {name} {{",
        f"\t\ttype {kind} hook {hook} priority {priority}; policy accept;",
        *(f"\t\t{rule}" for rule in body.split("\n")),
        "\t}",
    ]


def render_table(
    proxy_port: int,
    nodeport_cidrs: Sequence[str] = (),
    cluster_cidrs: Sequence[str] = (),
    transparent: bool = False,
) -> str:
    """The table definition (sets empty), the same every time for the same settings."""
    split = _split_cidrs(nodeport_cidrs) if nodeport_cidrs else None
    cluster = _split_cidrs(cluster_cidrs)
    lines = [f"table {TABLE} {{"]
    for f in (4, 6):
        lines += _family_chains(
            f, proxy_port, None if split is None else split[f], cluster[f], transparent
        )
    steer = "meta nfproto ipv4 jump steer4\nmeta nfproto ipv6 jump steer6"
    host = "meta nfproto ipv4 jump steer-host4\nmeta nfproto ipv6 jump steer-host6"
    # Only a connection's first packet is checked: established flows (already redirected, or
    # draining after their frontend lost its endpoints) are never reset. The filter hooks
    # run after the nat ones, so a redirected connection no longer matches a reject set; a
    # tproxied one still does (its destination is unchanged), so marked packets skip them.
    new = "ct state new"
    if transparent:
        new += f" meta mark & {TPROXY_MARK:#x} == 0"
    refuse = f"{new} meta nfproto ipv4 jump refuse4\n{new} meta nfproto ipv6 jump refuse6"
    if transparent:
        mark = f"meta mark set meta mark | {TPROXY_MARK:#x}"
        tproxy = (
            # Packets of connections kpx holds transparently (clients' later packets, the
            # backends' replies to a client's address): delivered to kpx, not forwarded. UDP
            # too: the answers to UDP sessions sent from a client's address (kpx/udp_nft.py).
            # Not a TCP SYN (the module's doc: a TIME_WAIT socket's tuple reused).
            f"meta l4proto udp socket transparent 1 {mark} accept\n"
            f"tcp flags & (syn | ack) != syn socket transparent 1 {mark} accept\n"
            f"{_BRIDGE} return\n"
            "meta nfproto ipv4 jump tproxy4\nmeta nfproto ipv6 jump tproxy6"
        )
        # mangle (-150): before conntrack's nat and the filter hooks.
        lines += _base_chain("tproxy-prerouting", "filter", "prerouting", -150, tproxy)
        bridged = "\n".join(f"{_BRIDGE} {rule}" for rule in steer.split("\n"))
        lines += _base_chain("nat-prerouting", "nat", "prerouting", -100, bridged)
    else:
        # dstnat (-100) for the redirects; filter - 10 so the reset comes before other firewalls.
        lines += _base_chain("nat-prerouting", "nat", "prerouting", -100, steer)
    lines += _base_chain("nat-output", "nat", "output", -100, steer + "\n" + host)
    firewall = "\n".join(
        f"meta nfproto ipv{f} {ip} daddr . tcp dport @lbfw{f} "
        f"{ip} daddr . tcp dport . {ip} saddr != @lbfw-allow{f} drop"
        for f, ip in ((4, "ip"), (6, "ip6"))
    )
    for hook in ("prerouting", "output"):
        lines += _base_chain(f"firewall-{hook}", "filter", hook, -110, firewall)
    for hook in ("input", "forward", "output"):
        lines += _base_chain(f"filter-{hook}", "filter", hook, -10, refuse)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _firewall_elements(key: SteerKey, ranges: tuple[str, ...]) -> dict[str, list[str]]:
    family, ip, port = key
    return {
        f"lbfw{family}": [f"{ip} . {port}"],
        f"lbfw-allow{family}": [f"{ip} . {port} . {cidr}" for cidr in ranges],
    }


@dataclass(frozen=True, slots=True)
class TableSets:
    """One kpx nftables table and the names of its steering sets: what the TCP table and the
    UDP one (kpx/udp_nft.py) render alike. Each frontend is one element of one set, named
    for its kind and steering (`svc4`, `svc4-reject`, `np6-local`, ...)."""

    table: str  # "inet kpx"
    address: str  # prefix of the (ip . port) sets: "svc" -> svc4, svc4-reject, ...
    node_port: str  # prefix of the (port) sets of NodePorts

    def set_name(self, key: SteerKey, state: Steer) -> str:
        family, ip, _port = key
        return f"{self.address if ip else self.node_port}{family}{SET_SUFFIX[state]}"

    def element_lines(self, verb: str, groups: Mapping[str, list[str]]) -> list[str]:
        lines = []
        for name in sorted(groups):
            items = groups[name]
            for start in range(0, len(items), ELEMENTS_PER_LINE):
                chunk = ", ".join(items[start : start + ELEMENTS_PER_LINE])
                lines.append(f"{verb} element {self.table} {name} {{ {chunk} }}")
        return lines

    def full(self, body: str, steering: Mapping[SteerKey, Steer], firewall: Firewall) -> str:
        """One transaction replacing whatever table exists with `body` (the definition, sets
        empty) filled with `steering` and `firewall`."""
        groups: dict[str, list[str]] = {}
        for key in sorted(steering):
            groups.setdefault(self.set_name(key, steering[key]), []).append(element(key))
        for key in sorted(firewall):
            for name, items in _firewall_elements(key, firewall[key]).items():
                groups.setdefault(name, []).extend(items)
        # `add table` first so that `delete table` cannot fail on a fresh node.
        lines = self.element_lines("add", groups)
        return self.cleanup() + body + "".join(line + "\n" for line in lines)

    def delta(
        self, applied: Mapping[SteerKey, Steer], desired: Mapping[SteerKey, Steer | None]
    ) -> str:
        """Element deletes and adds turning `applied` into `desired` for the keys in
        `desired`; `desired[key]` None removes the frontend. "" when nothing changes."""
        removals: dict[str, list[str]] = {}
        additions: dict[str, list[str]] = {}
        for key in sorted(desired):
            old, new = applied.get(key), desired[key]
            if old == new:
                continue
            if old is not None:
                removals.setdefault(self.set_name(key, old), []).append(element(key))
            if new is not None:
                additions.setdefault(self.set_name(key, new), []).append(element(key))
        lines = self.element_lines("delete", removals) + self.element_lines("add", additions)
        return "".join(line + "\n" for line in lines)

    def firewall_delta(self, applied: Firewall, desired: Firewall) -> list[str]:
        """Element deletes and adds (lines) turning the applied firewall into the desired one."""
        removals: dict[str, list[str]] = {}
        additions: dict[str, list[str]] = {}
        for key in sorted(set(applied) | set(desired)):
            old, new = applied.get(key), desired.get(key)
            if old == new:
                continue
            for ranges, groups in ((old, removals), (new, additions)):
                if ranges is not None:
                    for name, items in _firewall_elements(key, ranges).items():
                        groups.setdefault(name, []).extend(items)
        return self.element_lines("delete", removals) + self.element_lines("add", additions)

    def cleanup(self) -> str:
        """Removes the table; never fails on a node without it."""
        return f"add table {self.table}\ndelete table {self.table}\n"


SETS = TableSets(TABLE, "svc", "np")


def render_full(
    steering: Mapping[SteerKey, Steer],
    proxy_port: int,
    nodeport_cidrs: Sequence[str] = (),
    cluster_cidrs: Sequence[str] = (),
    transparent: bool = False,
    firewall: Firewall | None = None,
) -> str:
    """One transaction that replaces whatever kpx table exists with the desired one."""
    body = render_table(proxy_port, nodeport_cidrs, cluster_cidrs, transparent)
    return SETS.full(body, steering, firewall or {})


def render_delta(
    applied: Mapping[SteerKey, Steer], desired: Mapping[SteerKey, Steer | None]
) -> str:
    """Element deletes and adds turning `applied` into `desired` (kpx/nft's sets)."""
    return SETS.delta(applied, desired)


def render_firewall_delta(applied: Firewall, desired: Firewall) -> list[str]:
    return SETS.firewall_delta(applied, desired)


def render_cleanup() -> str:
    return SETS.cleanup()


class NftWriter:
    """Keeps the kernel's kpx table equal to the table's steering state. Subclassed for the
    UDP table (kpx/udp_nft.py): `sets`, `render_table` and the `_applied` hook."""

    sets = SETS

    def __init__(
        self,
        proxy_port: int,
        nodeport_cidrs: Sequence[str] = (),
        command: Sequence[str] = ("nft",),
        timeout: float = 30.0,
        cluster_cidrs: Sequence[str] = (),
        transparent: bool = False,
        firewall: Callable[[], Firewall] | None = None,
    ) -> None:
        self.proxy_port = proxy_port
        # The table's current loadBalancerSourceRanges (read whole each sync: it is small and
        # changes only with Services, so comparing it costs little).
        self.firewall = firewall
        self.applied_firewall: dict[SteerKey, tuple[str, ...]] = {}
        # tproxy from prerouting (kpx keeps clients' addresses) instead of redirect.
        self.transparent = transparent
        self.nodeport_cidrs = list(nodeport_cidrs)
        self.cluster_cidrs = list(cluster_cidrs)
        self.command = list(command)
        self.timeout = timeout
        self.applied: dict[SteerKey, Steer] = {}
        self.needs_full = True
        self._lock = threading.Lock()  # one `nft` of this writer at a time

    def render_table(self) -> str:
        """The table definition (sets empty) for these settings."""
        return render_table(
            self.proxy_port, self.nodeport_cidrs, self.cluster_cidrs, self.transparent
        )

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool:
        """Apply the changes for `changed` keys (everything on the first call or after a
        failure). Returns whether the kernel was touched; raises NftError on failure."""
        firewall = dict(self.firewall()) if self.firewall is not None else {}
        if self.needs_full:
            await self._run_or_flag(self.sets.full(self.render_table(), steering, firewall))
            removed = any(key not in steering for key in self.applied)
            self.applied = dict(steering)
            self.applied_firewall = firewall
            self.needs_full = False
            self._applied(steering, steering, removed)
            return True
        desired = {key: steering.get(key) for key in changed}
        script = self.sets.delta(self.applied, desired)
        if firewall != self.applied_firewall:
            lines = self.sets.firewall_delta(self.applied_firewall, firewall)
            script += "".join(line + "\n" for line in lines)
        if not script:
            return False
        await self._run_or_flag(script)
        self.applied_firewall = firewall
        for key, state in desired.items():
            if state is None:
                self.applied.pop(key, None)
            else:
                self.applied[key] = state
        self._applied(steering, desired, any(state is None for state in desired.values()))
        return True

    def _applied(
        self, steering: Mapping[SteerKey, Steer], keys: Iterable[SteerKey], removed: bool
    ) -> None:
        """`keys` are in the kernel as `steering` says; `removed`: some frontend left."""

    async def remove(self) -> None:
        """Delete the table (clean exit)."""
        try:
            await self.run(self.sets.cleanup())
        except NftError as err:
            CLEANUP_FAILURES.inc()
            log.error("nft_cleanup_failed", table=self.sets.table, problem=str(err))
        self.applied = {}
        self.applied_firewall = {}
        self.needs_full = True

    async def _run_or_flag(self, script: str) -> None:
        try:
            await self.run(script)
        except BaseException:  # NftError, or cancelled half-way: the kernel state is unknown
            # Our idea of the kernel's state may be wrong now: rewrite everything next time.
            SYNC_FAILURES.inc()
            self.needs_full = True
            raise

    async def run(self, script: str) -> None:
        """`nft -f -` with `script`, in a worker thread. Raises NftError.

        Not `asyncio.create_subprocess_exec`: uvloop forks the whole process from the event
        loop's thread, which held the loop ~12 ms per spawn at 10,000 Services (every
        proxied connection waited that long). A cancelled caller does not stop the thread:
        the lock makes the next transaction wait until that one is over."""
        await asyncio.to_thread(self._run_locked, script)

    def _run_locked(self, script: str) -> None:
        with self._lock:
            run_nft(self.command, script, self.timeout)


def run_nft(command: Sequence[str], script: str, timeout: float) -> None:
    """Apply `script` with `command -f -` (blocking; call it from a thread). Raises NftError."""
    try:
        proc = subprocess.run(
            [*command, "-f", "-"],
            input=script.encode(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except OSError as err:  # no nft binary, no permission, out of processes
        raise NftError(f"cannot start {command[0]}: {err}") from None
    except subprocess.TimeoutExpired:  # killed and reaped by subprocess.run
        raise NftError(f"nft did not finish within {timeout}s") from None
    if proc.returncode != 0:
        raise NftError(" ".join(proc.stderr.decode(errors="replace").split())[:2000])
