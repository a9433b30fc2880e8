"""nftables steering for UDP frontends: `tproxy` to kpx's transparent UDP sockets.

A table of its own, `inet kpx-udp`, next to the TCP one (kpx/nft.py), with the same four
states per frontend and the same "only set membership changes" property:
- `usvc4` / `unp4` (and `6`): frontends with endpoints. Datagrams from pods and from outside
  (prerouting) are `tproxy`ed to the proxy port, unchanged: the relay's IP_TRANSPARENT socket
  reads their original destination with IP_RECVORIGDSTADDR. REDIRECT would lose it (for UDP
  there is no SO_ORIGINAL_DST), and it would leave a NAT binding in conntrack, the very thing
  that makes kube-proxy's UDP sessions stale;
- host processes' datagrams (output) get a mark in a `route` chain; a policy route
  (`ip rule fwmark MARK lookup TABLE`, `local default dev lo` in TABLE: kpx/policyroute.py)
  loops them through `lo` into prerouting, where the tproxy rule takes them (`iif lo`);
- `-local`: externalTrafficPolicy Local without endpoints here: tproxied for host processes and
  the cluster CIDRs, dropped for everyone else;
- answers to sessions that send from the client's address (transparent mode) are marked by
  the TCP table's `socket transparent` rules (kpx/nft.py), one of them for UDP: a second
  such rule for IPv6 in this table was seen to stop IPv6 TCP replies from being taken back;
- `-drop`: dropped; `-reject`: ICMP port unreachable (kube-proxy's reject), in prerouting
  (after the steering rules) and, for host processes, in the output hook. Datagrams carrying
  the mark were steered to kpx and pass.

`loadBalancerSourceRanges`: the same `lbfw4` / `lbfw-allow4` sets and drop rule as the TCP
table's (kpx/nft.py), for UDP ports, fed by the UDP table's firewall.

kpx never writes an SCTP match, so no rule makes the kernel load the sctp module.

Bridged pods and br_netfilter: with `net.bridge.bridge-nf-call-iptables=1` (kube-proxy's own
requirement for bridge CNIs) the prerouting hook runs for a pod's frame inside the bridge, and
the socket tproxy assigns there is dropped when the bridge hands the packet to IP (ip_rcv
orphans it, and the second prerouting pass is skipped). So datagrams that come in through a
bridge (`meta iifkind "bridge"`) to a ClusterIP, externalIP or LB IP are only marked: the policy
route delivers them locally and the socket lookup finds the relay's transparent socket bound to
exactly that frontend address (kpx/udp_relay.py `frontend_socket`, opened by this writer). A
bridged pod calling a NodePort still needs the sysctl off: kpx logs `tproxy_bridge_netfilter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import structlog

from kpx.nft import SET_SUFFIX, TPROXY_MARK, Firewall, NftWriter, TableSets, interval_set
from kpx.rules import Steer, SteerKey
from kpx.udp_relay import UdpRelay

log = structlog.get_logger("kpx.udp_nft")

BRIDGE_NF_SYSCTLS = (
    Path("/proc/sys/net/bridge/bridge-nf-call-iptables"),
    Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables"),
)


def bridge_netfilter_on() -> bool:
    """Whether br_netfilter runs the IP hooks for bridged frames in this namespace."""
    for path in BRIDGE_NF_SYSCTLS:
        try:
            if path.read_text().strip() == "1":
                return True
        except OSError:
            continue  # br_netfilter not loaded
    return False


TABLE = "inet kpx-udp"
MARK = TPROXY_MARK  # kpx/policyroute.py delivers it locally
SETS = TableSets(TABLE, "usvc", "unp")


def _chain(name: str, rules: list[str], base: str = "") -> list[str]:
    head = [f"\t\t{base}"] if base else []
    return [f"\tchain {name} {{", *head, *(f"\t\t{r}" for r in rules), "\t}"]


def _family(
    f: int, proxy_port: int, nodeport_cidrs: list[str] | None, cluster_cidrs: list[str]
) -> list[str]:
    ip = "ip" if f == 4 else "ip6"
    addr_type = "ipv4_addr" if f == 4 else "ipv6_addr"
    lines = [
        f"\tset usvc{f}{s} {{ type {addr_type} . inet_service; }}" for s in SET_SUFFIX.values()
    ]
    lines += [f"\tset unp{f}{s} {{ type inet_service; }}" for s in SET_SUFFIX.values()]
    np_match: str | None = "fib daddr type local"
    if nodeport_cidrs is not None:
        np_match = None
        if nodeport_cidrs:
            lines.append(interval_set(f"np-addresses{f}", addr_type, nodeport_cidrs))
            np_match = f"fib daddr type local {ip} daddr @np-addresses{f}"
    to_kpx = f"tproxy {ip} to :{proxy_port} meta mark set {MARK:#x} accept"
    frontends = [f"{ip} daddr . udp dport @usvc{f}"]
    if np_match is not None:
        frontends.append(f"{np_match} udp dport @unp{f}")
    # A datagram that came in through a bridge (a bridge CNI's pods) is not delivered to the
    # socket tproxy assigns when br_netfilter runs prerouting inside the bridge: it is only
    # marked, routed locally, and reaches the relay's socket bound to its frontend address.
    bridged = f'meta iifkind "bridge" {ip} daddr . udp dport @usvc{f}'
    steer = [f"{bridged} meta mark set {MARK:#x} accept"]
    if cluster_cidrs:
        steer.append(f"{bridged}-local {ip} saddr @cluster{f} meta mark set {MARK:#x} accept")
    mark, refuse = [], [f"meta mark {MARK:#x} return"]
    for match in frontends:
        steer += [f"{match} {to_kpx}", f'iif "lo" {match}-local {to_kpx}']
        if cluster_cidrs:
            steer.append(f"{ip} saddr @cluster{f} {match}-local {to_kpx}")
        mark += [f"{match} meta mark set {MARK:#x}", f"{match}-local meta mark set {MARK:#x}"]
        refuse += [
            f"{match}-reject reject with icmpx port-unreachable",
            f"{match}-local drop",
            f"{match}-drop drop",
        ]
    if cluster_cidrs:
        lines.append(interval_set(f"cluster{f}", addr_type, cluster_cidrs))
    lines.append(f"\tset lbfw{f} {{ type {addr_type} . inet_service; }}")
    lines.append(
        f"\tset lbfw-allow{f} {{ type {addr_type} . inet_service . {addr_type}; flags interval; }}"
    )
    lines += _chain(f"steer{f}", steer) + _chain(f"mark{f}", mark) + _chain(f"refuse{f}", refuse)
    return lines


def render_table(
    proxy_port: int, nodeport_cidrs: Sequence[str] = (), cluster_cidrs: Sequence[str] = ()
) -> str:
    split: dict[int, list[str]] | None = None
    if nodeport_cidrs:
        split = {4: [], 6: []}
        for cidr in nodeport_cidrs:
            split[6 if ":" in cidr else 4].append(cidr)
    cluster: dict[int, list[str]] = {4: [], 6: []}
    for cidr in cluster_cidrs:
        cluster[6 if ":" in cidr else 4].append(cidr)
    lines = [f"table {TABLE} {{"]
    for f in (4, 6):
        lines += _family(f, proxy_port, None if split is None else split[f], cluster[f])

    def jump(prefix: str) -> list[str]:
        return [
            f"meta l4proto udp meta nfproto ipv4 jump {prefix}4",
            f"meta l4proto udp meta nfproto ipv6 jump {prefix}6",
        ]

    # Refused in prerouting (what steer did not accept): a reject in the forward hook sends
    # no ICMP error for a packet routed back out the interface it came in on.
    lines += _chain(
        "prerouting",
        jump("steer") + jump("refuse"),
        "type filter hook prerouting priority mangle; policy accept;",
    )
    lines += _chain(
        "output", jump("mark"), "type route hook output priority mangle; policy accept;"
    )
    lines += _chain(
        "filter-output", jump("refuse"), "type filter hook output priority -10; policy accept;"
    )
    # Sources outside a LoadBalancer's ranges: dropped before anything steers them.
    firewall = [
        f"meta nfproto ipv{f} {ip} daddr . udp dport @lbfw{f} "
        f"{ip} daddr . udp dport . {ip} saddr != @lbfw-allow{f} drop"
        for f, ip in ((4, "ip"), (6, "ip6"))
    ]
    for hook in ("prerouting", "output"):
        lines += _chain(
            f"firewall-{hook}", firewall, f"type filter hook {hook} priority -110; policy accept;"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_firewall_delta(applied: Firewall, desired: Firewall) -> list[str]:
    """Element deletes and adds turning the applied UDP firewall into the desired one."""
    return SETS.firewall_delta(applied, desired)


def render_full(
    steering: Mapping[SteerKey, Steer],
    proxy_port: int,
    nodeport_cidrs: Sequence[str] = (),
    cluster_cidrs: Sequence[str] = (),
    firewall: Firewall | None = None,
) -> str:
    body = render_table(proxy_port, nodeport_cidrs, cluster_cidrs)
    return SETS.full(body, steering, firewall or {})


def render_delta(
    applied: Mapping[SteerKey, Steer], desired: Mapping[SteerKey, Steer | None]
) -> str:
    return SETS.delta(applied, desired)


class UdpNftWriter(NftWriter):
    """Keeps `inet kpx-udp` equal to the UDP table's steering, and tells the relay after each
    sync (its sessions are re-checked). The policy routes are kpx/policyroute.py's."""

    sets = SETS

    def __init__(
        self,
        relay: UdpRelay,
        proxy_port: int,
        nodeport_cidrs: Sequence[str] = (),
        command: Sequence[str] = ("nft",),
        timeout: float = 30.0,
        cluster_cidrs: Sequence[str] = (),
        firewall: Callable[[], Firewall] | None = None,
    ) -> None:
        super().__init__(
            proxy_port, nodeport_cidrs, command, timeout, cluster_cidrs, firewall=firewall
        )
        self.relay = relay

    def render_table(self) -> str:
        return render_table(self.proxy_port, self.nodeport_cidrs, self.cluster_cidrs)

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool:
        if self.needs_full and not self.applied and bridge_netfilter_on():
            log.warning(
                "tproxy_bridge_netfilter",
                problem="bridge-nf-call-iptables is 1: UDP from pods behind a bridge "
                "to a NodePort is not delivered to kpx",
            )
        try:
            return await super().sync(steering, changed)
        finally:
            self.relay.invalidate()

    def _applied(
        self, steering: Mapping[SteerKey, Steer], keys: Iterable[SteerKey], removed: bool
    ) -> None:
        if removed:
            self.relay.prune_frontends()
        # A socket on each served frontend address, for what comes in without tproxy.
        for key in keys:
            _family, ip, port = key
            if ip and steering.get(key) in ("serve", "local"):
                self.relay.frontend_socket((ip, port))
