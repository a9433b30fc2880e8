"""kpx's settings: flags, `KPX_*` environment and `--config` YAML, defaults as kube-proxy's.

`--config` takes either kpx's own keys (`proxy_port: 10262` or `proxy-port: 10262`) or a
KubeProxyConfiguration (`kubeproxy.config.k8s.io/v1alpha1`): its camelCase fields that mean
the same thing here (mode, healthzBindAddress, metricsBindAddress, nodePortAddresses,
minSyncPeriod, syncPeriod, hostnameOverride, clusterCIDR, masqueradeAll) are mapped, Go
durations ("1s", "250ms") parsed, and every other field ignored with the file still accepted.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kwatch.settings import AccessSettings, ListenAddress, settings_or_exit

DESCRIPTION = "kpx: userspace kube-proxy for TCP and UDP Services, steered by nftables"

# KubeProxyConfiguration field -> kpx field.
KUBE_PROXY_FIELDS = {
    "mode": "mode",
    "healthzBindAddress": "healthz_bind_address",
    "metricsBindAddress": "metrics_bind_address",
    "nodePortAddresses": "nodeport_addresses",
    "minSyncPeriod": "min_sync_period",
    "syncPeriod": "sync_period",
    "hostnameOverride": "node_name",
    "clusterCIDR": "cluster_cidrs",
    "udpIdleTimeout": "udp_timeout",  # the userspace mode's field (removed in 1.26)
    "masqueradeAll": "masquerade_all",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: Any) -> Any:
    """Go duration text ("1m30s", "250ms") -> seconds; numbers and other values unchanged."""
    if not isinstance(value, str) or not value or not value[0].isdigit():
        return value
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return value  # let validation report it
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def _number(value: int | float | str) -> float | None:
    """Seconds from a number, a signed decimal text or a Go duration; None if none of them."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            value = parse_duration(value)
            return None if isinstance(value, str) else float(value)
    return float(value)


def parse_durations(value: Any) -> list[float]:
    """`--connect-timeouts` in any of its forms -> seconds: a number, a duration text, a
    comma-separated text, or a list of those (flags repeat, the environment and YAML may list
    or comma-separate); blanks around entries and empty entries are ignored. Raises
    ValueError naming the entry that is not a positive duration."""
    items = value if isinstance(value, list | tuple) else [value]
    out: list[float] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise ValueError(f"{item!r} is not a duration")
        pieces = [p.strip() for p in item.split(",")] if isinstance(item, str) else [item]
        for piece in pieces:
            if piece == "":
                continue
            seconds = _number(piece)
            if seconds is None:
                raise ValueError(
                    f"{piece!r} is not a duration (seconds, or Go units such as 250ms, 1s)"
                )
            if not 0 < seconds < math.inf:  # also rejects NaN
                raise ValueError(f"{piece!r}: every connect timeout must be > 0 and finite")
            out.append(seconds)
    if not out:
        raise ValueError("needs at least one timeout")
    return out


def _parse_cidrs(value: list[str]) -> list[str]:
    out = []
    for item in value:
        for cidr in (c.strip() for c in item.split(",") if c.strip()):
            try:
                out.append(str(ipaddress.ip_network(cidr, strict=False)))
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR") from None
    return out


def _from_kube_proxy_configuration(data: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    if str(data.get("kind", "")) != "KubeProxyConfiguration":
        return data
    # kpx's own names (flags, environment) win over the mapped ones; the rest is ignored.
    out = {k: v for k, v in data.items() if k in fields and k not in KUBE_PROXY_FIELDS}
    for key, value in data.items():
        name = KUBE_PROXY_FIELDS.get(key)
        if name is None or name in out:
            continue
        if name == "mode" and value in ("", "iptables", "nftables", "ipvs"):
            value = "nftables"  # every kernel mode means "kpx with nftables steering"
        if value in ("", None):
            continue
        if name == "cluster_cidrs" and isinstance(value, str):
            value = [value]  # clusterCIDR is one comma-separated string
        out[name] = value
    return out


class KpxSettings(AccessSettings):
    """Every kpx option; the field description is the flag's help text."""

    mode: Literal["nftables", "ports"] = Field(
        "nftables",
        description="nftables: steer Service traffic to the proxy with nftables (root); "
        "ports: bind every frontend on a local port instead (no root, development)",
    )
    source_address_mode: Literal["auto", "transparent", "node"] = Field(
        "auto",
        description="whose address backends see: transparent keeps the client's where "
        "kube-proxy would (nftables tproxy, IP_TRANSPARENT; exits if unavailable), node "
        "connects from the node's, auto is transparent where possible, else node",
    )
    masquerade_all: bool = Field(
        False,
        description="backends always see the node's address, never the client's "
        "(kube-proxy's --masquerade-all)",
    )
    node_name: str = Field(
        default_factory=socket.gethostname,
        description="this node's name as in EndpointSlice nodeName (the hostname if unset)",
    )
    nodeport_addresses: list[str] = Field(
        default_factory=list,
        description="CIDRs of the local addresses that accept NodePorts; none means all; "
        "primary: only this Node's InternalIPs (kube-proxy's nftables default)",
    )
    cluster_cidrs: list[str] = Field(
        default_factory=list,
        description="pod CIDRs (kube-proxy's clusterCIDR): pods there reaching an "
        "externalTrafficPolicy: Local frontend get the Service's cluster-wide endpoints",
    )
    healthz_bind_address: ListenAddress = Field(
        "0.0.0.0:10256", description="HOST:PORT of /healthz and /livez (kube-proxy's)"
    )
    metrics_bind_address: ListenAddress = Field(
        "127.0.0.1:10249", description="HOST:PORT of /metrics, /readyz and /proxyMode"
    )
    proxy_port: int = Field(
        10262, ge=1, le=65535, description="port the nftables rules redirect Service traffic to"
    )
    ports_bind_address: str = Field(
        "127.0.0.1", description="address the frontends are bound on in --mode ports"
    )
    min_sync_period: float = Field(
        0.05, ge=0, description="seconds between two rule updates (bursts are coalesced)"
    )
    sync_period: float = Field(
        30.0,
        gt=0,
        description="seconds between housekeeping passes; /healthz fails after 2x this "
        "without applying a queued change (kube-proxy's healthTimeout)",
    )
    connect_timeouts: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0],
        min_length=1,
        description="connect timeout per attempt; one attempt per entry, each to the next "
        "backend (kube-proxy userspace's ladder); comma separated and/or repeated",
    )
    drain_timeout: float | None = Field(
        None,
        ge=0,
        description="seconds a removed endpoint's open connections may continue, and the "
        "drain allowed on SIGTERM; unset: until they end (30 s on SIGTERM)",
    )
    idle_timeout: float | None = Field(
        None,
        gt=0,
        description="seconds without a byte either way after which kpx closes a proxied "
        "connection; unset: never (kube-proxy's behaviour for TCP)",
    )
    max_connections: int | None = Field(
        None, ge=1, description="open proxied connections at most; unset: from RLIMIT_NOFILE"
    )
    udp_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds without a datagram either way after which a UDP session "
        "(client, frontend -> endpoint) ends; the kernel's nf_conntrack_udp_timeout",
    )
    udp_max_sessions: int = Field(
        65536, ge=1, description="UDP sessions at most; the oldest idle ones make room"
    )
    cooldown_base: float = Field(
        1.0, gt=0, description="seconds a backend is skipped after a failed connect"
    )
    cooldown_max: float = Field(
        30.0, gt=0, description="longest skip of a backend that keeps failing (doubling)"
    )
    affinity_max_entries: int = Field(
        65535,
        ge=1,
        description="ClientIP affinity pins per Service port at most (kube-proxy's nftables"
        " affinity set size); the least recently used goes first",
    )

    handover_socket: str = Field(
        "@kpx/handover",
        description="unix socket (a leading @: abstract, in the network namespace) where a "
        "starting kpx takes the listening and established sockets over from the running one, "
        "which then serves it; empty: no handover (nftables mode only)",
    )
    handover_timeout: float = Field(
        5.0,
        gt=0,
        description="seconds each handover step may take (the listeners, connects under way "
        "to finish, the connections) before the handover is given up",
    )

    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="TCP data-plane processes accepting on the proxy port (SO_REUSEPORT), fed "
        "by this process, which alone watches the API and programs nftables (nftables mode; "
        "no handover)",
    )

    @model_validator(mode="after")
    def _workers_without_handover(self) -> KpxSettings:
        if self.workers > 1:
            if self.mode != "nftables":
                raise ValueError("--workers above 1 needs --mode nftables")
            if "handover_socket" in self.model_fields_set and self.handover_socket:
                raise ValueError(
                    "--workers above 1 cannot hand over (kpx/handover.py): "
                    "set --handover-socket '' or --workers 1"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _kube_proxy_config(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return _from_kube_proxy_configuration(data, set(cls.model_fields))

    @field_validator(
        "min_sync_period",
        "sync_period",
        "drain_timeout",
        "idle_timeout",
        "udp_timeout",
        "handover_timeout",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("connect_timeouts", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> list[float]:
        return parse_durations(value)

    @field_validator("nodeport_addresses")
    @classmethod
    def _nodeport_addresses(cls, value: list[str]) -> list[str]:
        items = [c.strip() for item in value for c in item.split(",") if c.strip()]
        if "primary" in items:
            if items != ["primary"]:
                raise ValueError("primary stands alone (not with CIDRs)")
            return items
        return _parse_cidrs(items)

    @field_validator("cluster_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        return _parse_cidrs(value)

    @field_validator("node_name")
    @classmethod
    def _node_name(cls, value: str) -> str:
        # kube-proxy lowercases and trims the hostname it uses as node name.
        value = value.strip().lower()
        if not value:
            raise ValueError("must not be empty")
        return value

    @property
    def nodeport_primary(self) -> bool:
        """`--nodeport-addresses primary`: NodePorts on this Node's InternalIPs only."""
        return self.nodeport_addresses == ["primary"]

    @property
    def health_timeout(self) -> float:
        return 2 * self.sync_period


def load(argv: Sequence[str] | None = None) -> KpxSettings:
    """Settings from argv/environment/--config, or exit 2 with the problem on stderr."""
    return settings_or_exit(
        KpxSettings, argv, env_prefix="KPX", prog="kpx", description=DESCRIPTION
    )
