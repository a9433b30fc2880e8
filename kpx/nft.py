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

So an endpoint change costs nothing in the kernel, a new frontend costs one set element, and a
frontend losing its last endpoint moves between two sets. Every change is one `nft -f`
transaction (atomic); startup rewrites the table from scratch (`add table; delete table;
table {...}` in one transaction), idempotent across restarts, and a crash leaves the last
complete ruleset in place.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterable, Mapping, Sequence

import structlog
from prometheus_client import Counter

from kpx.table import Steer, SteerKey

log = structlog.get_logger("kpx.nft")

TABLE = "inet kpx"
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


def set_name(key: SteerKey, state: Steer) -> str:
    family, ip, _port = key
    base = f"svc{family}" if ip else f"np{family}"
    return base + SET_SUFFIX[state]


def element(key: SteerKey) -> str:
    _family, ip, port = key
    return f"{ip} . {port}" if ip else str(port)


def _split_cidrs(cidrs: Iterable[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {4: [], 6: []}
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        out[net.version].append(str(net))
    return out


def _interval_set(name: str, addr_type: str, cidrs: list[str]) -> str:
    return (
        f"\tset {name} {{ type {addr_type}; flags interval; auto-merge; "
        f"elements = {{ {', '.join(cidrs)} }}; }}"
    )


def _family_chains(
    family: int, proxy_port: int, nodeport_cidrs: list[str] | None, cluster_cidrs: list[str]
) -> list[str]:
    """The sets and the steering/refusing chains of one address family.

    `nodeport_cidrs` None means NodePorts on every local address; an empty list means no
    NodePorts in this family (kube-proxy: nodePortAddresses without a CIDR of that family).
    """
    f = family
    ip = "ip" if f == 4 else "ip6"
    addr_type = "ipv4_addr" if f == 4 else "ipv6_addr"
    lines = [
        f"\tset svc{f}{sfx} {{ type {addr_type} . inet_service; }}" for sfx in SET_SUFFIX.values()
    ]
    lines += [f"\tset np{f}{sfx} {{ type inet_service; }}" for sfx in SET_SUFFIX.values()]
    np_match: str | None = "fib daddr type local"
    if nodeport_cidrs is not None:
        if nodeport_cidrs:
            lines.append(_interval_set(f"np-addresses{f}", addr_type, nodeport_cidrs))
            np_match = f"fib daddr type local {ip} daddr @np-addresses{f}"
        else:
            np_match = None
    redirect = f"redirect to :{proxy_port}"
    reset = "reject with tcp reset"
    svc, np = f"{ip} daddr . tcp dport @svc{f}", f"{np_match} tcp dport @np{f}"
    steer = [f"{svc} {redirect}"]
    host = [f"{svc}-local {redirect}"]  # host processes are local clients
    # What reaches the filter hooks still addressed to a `-local` frontend was not redirected
    # (not a local client): dropped, like the `-drop` ones.
    refuse = [f"{svc}-reject {reset}", f"{svc}-local drop", f"{svc}-drop drop"]
    if cluster_cidrs:  # pods are local clients too (kube-proxy's detect-local by clusterCIDR)
        lines.append(_interval_set(f"cluster{f}", addr_type, cluster_cidrs))
        steer.append(f"{ip} saddr @cluster{f} {svc}-local {redirect}")
    if np_match is not None:
        steer.append(f"{np} {redirect}")
        host.append(f"{np}-local {redirect}")
        refuse += [f"{np}-reject {reset}", f"{np}-local drop", f"{np}-drop drop"]
        if cluster_cidrs:
            steer.append(f"{ip} saddr @cluster{f} {np}-local {redirect}")
    for name, rules in ((f"steer{f}", steer), (f"steer-host{f}", host), (f"refuse{f}", refuse)):
        lines += [f"\tchain {name} {{", *(f"\t\t{rule}" for rule in rules), "\t}"]
    return lines


def _base_chain(name: str, kind: str, hook: str, priority: int, body: str) -> list[str]:
    return [
        f"\tchain {name} {{",
        f"\t\ttype {kind} hook {hook} priority {priority}; policy accept;",
        *(f"\t\t{rule}" for rule in body.split("\n")),
        "\t}",
    ]


def render_table(
    proxy_port: int, nodeport_cidrs: Sequence[str] = (), cluster_cidrs: Sequence[str] = ()
) -> str:
    """The table definition (sets empty), the same every time for the same settings."""
    split = _split_cidrs(nodeport_cidrs) if nodeport_cidrs else None
    cluster = _split_cidrs(cluster_cidrs)
    lines = [f"table {TABLE} {{"]
    for f in (4, 6):
        lines += _family_chains(f, proxy_port, None if split is None else split[f], cluster[f])
    steer = "meta nfproto ipv4 jump steer4\nmeta nfproto ipv6 jump steer6"
    host = "meta nfproto ipv4 jump steer-host4\nmeta nfproto ipv6 jump steer-host6"
    # Only a connection's first packet is checked: established flows (already redirected, or
    # draining after their frontend lost its endpoints) are never reset. The filter hooks
    # run after the nat ones, so a redirected connection no longer matches a reject set.
    refuse = (
        "ct state new meta nfproto ipv4 jump refuse4\nct state new meta nfproto ipv6 jump refuse6"
    )
    # dstnat (-100) for the redirects; filter - 10 so the reset comes before other firewalls.
    lines += _base_chain("nat-prerouting", "nat", "prerouting", -100, steer)
    lines += _base_chain("nat-output", "nat", "output", -100, steer + "\n" + host)
    for hook in ("input", "forward", "output"):
        lines += _base_chain(f"filter-{hook}", "filter", hook, -10, refuse)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _element_lines(verb: str, groups: Mapping[str, list[str]]) -> list[str]:
    lines = []
    for name in sorted(groups):
        items = groups[name]
        for start in range(0, len(items), ELEMENTS_PER_LINE):
            chunk = ", ".join(items[start : start + ELEMENTS_PER_LINE])
            lines.append(f"{verb} element {TABLE} {name} {{ {chunk} }}")
    return lines


def render_full(
    steering: Mapping[SteerKey, Steer],
    proxy_port: int,
    nodeport_cidrs: Sequence[str] = (),
    cluster_cidrs: Sequence[str] = (),
) -> str:
    """One transaction that replaces whatever kpx table exists with the desired one."""
    groups: dict[str, list[str]] = {}
    for key in sorted(steering):
        groups.setdefault(set_name(key, steering[key]), []).append(element(key))
    # `add table` first so that `delete table` cannot fail on a fresh node.
    head = f"add table {TABLE}\ndelete table {TABLE}\n"
    body = render_table(proxy_port, nodeport_cidrs, cluster_cidrs)
    return head + body + "".join(line + "\n" for line in _element_lines("add", groups))


def render_delta(
    applied: Mapping[SteerKey, Steer], desired: Mapping[SteerKey, Steer | None]
) -> str:
    """Element deletes and adds turning `applied` into `desired` for the keys in `desired`.

    `desired[key]` None removes the frontend. Returns "" when nothing changes.
    """
    removals: dict[str, list[str]] = {}
    additions: dict[str, list[str]] = {}
    for key in sorted(desired):
        old, new = applied.get(key), desired[key]
        if old == new:
            continue
        if old is not None:
            removals.setdefault(set_name(key, old), []).append(element(key))
        if new is not None:
            additions.setdefault(set_name(key, new), []).append(element(key))
    lines = _element_lines("delete", removals) + _element_lines("add", additions)
    return "".join(line + "\n" for line in lines)


def render_cleanup() -> str:
    return f"add table {TABLE}\ndelete table {TABLE}\n"


class NftWriter:
    """Keeps the kernel's kpx table equal to the table's steering state."""

    def __init__(
        self,
        proxy_port: int,
        nodeport_cidrs: Sequence[str] = (),
        command: Sequence[str] = ("nft",),
        timeout: float = 30.0,
        cluster_cidrs: Sequence[str] = (),
    ) -> None:
        self.proxy_port = proxy_port
        self.nodeport_cidrs = list(nodeport_cidrs)
        self.cluster_cidrs = list(cluster_cidrs)
        self.command = list(command)
        self.timeout = timeout
        self.applied: dict[SteerKey, Steer] = {}
        self.needs_full = True
        self.last_duration = 0.0

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool:
        """Apply the changes for `changed` keys (everything on the first call or after a
        failure). Returns whether the kernel was touched; raises NftError on failure."""
        if self.needs_full:
            script = render_full(steering, self.proxy_port, self.nodeport_cidrs, self.cluster_cidrs)
            await self._run_or_flag(script)
            self.applied = dict(steering)
            self.needs_full = False
            return True
        desired = {key: steering.get(key) for key in changed}
        script = render_delta(self.applied, desired)
        if not script:
            return False
        await self._run_or_flag(script)
        for key, state in desired.items():
            if state is None:
                self.applied.pop(key, None)
            else:
                self.applied[key] = state
        return True

    async def remove(self) -> None:
        """Delete the kpx table (clean exit)."""
        try:
            await self.run(render_cleanup())
        except NftError as err:
            CLEANUP_FAILURES.inc()
            log.error("nft_cleanup_failed", problem=str(err))
        self.applied = {}
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
        started = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                "-f",
                "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as err:  # no nft binary, no permission, out of processes
            raise NftError(f"cannot start {self.command[0]}: {err}") from None
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(script.encode()), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise NftError(f"nft did not finish within {self.timeout}s") from None
        self.last_duration = time.monotonic() - started
        if proc.returncode != 0:
            raise NftError(" ".join(stderr.decode(errors="replace").split())[:2000])
