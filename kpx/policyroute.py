"""Policy routing for transparent mode: packets carrying kpx's fwmark are delivered locally.

`tproxy` and the `socket transparent` match (kpx/nft.py) only mark packets; what makes the node
deliver a packet addressed to a ClusterIP, or a backend's reply addressed to a client pod, to
kpx's socket instead of forwarding it is one rule and one route per family, as `ip` would say:

    ip rule add fwmark 0x2000/0x2000 lookup 10262 pref 10262
    ip route replace local 0.0.0.0/0 dev lo table 10262        (and ::/0 for IPv6)

kpx sends them itself over rtnetlink, with the CAP_NET_ADMIN its own process holds (the
`python-kpx` file capability): iproute2's `ip` drops file capabilities when run by a non-root
user, so it could not do this in the image. Installed idempotently at start (an identical rule
is left as it is, the route replaced), left in place when kpx is killed (a restarted kpx takes
over without a gap), removed by the clean exit. Endpoint changes never come here.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterable
from functools import partial

import structlog

from kpx.nft import TPROXY_MARK

log = structlog.get_logger("kpx.policyroute")

ROUTE_TABLE = 10262
RULE_PREF = 10262

# linux/netlink.h, linux/rtnetlink.h, linux/fib_rules.h
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLM_F_REPLACE, _NLM_F_EXCL, _NLM_F_CREATE = 0x100, 0x200, 0x400
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_NEWRULE, _RTM_DELRULE = 24, 25, 32, 33
_RTA_OIF, _RTA_TABLE = 4, 15
_FRA_PRIORITY, _FRA_FWMARK, _FRA_TABLE, _FRA_FWMASK = 6, 10, 15, 16
_FR_ACT_TO_TBL = 1
_RTN_LOCAL, _RT_SCOPE_HOST, _RTPROT_BOOT = 2, 254, 3
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
# Answers that mean "already as wanted": the rule exists / the rule or route is gone.
_ADD_OK = {errno.EEXIST}
_DEL_OK = {errno.ENOENT, errno.ESRCH}


class PolicyRouteError(Exception):
    """The kernel refused a change; the message says which and why."""


def _attr(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)


def rule_message(family: int, delete: bool = False, seq: int = 1) -> bytes:
    """RTM_NEWRULE (RTM_DELRULE): fwmark TPROXY_MARK/TPROXY_MARK lookup ROUTE_TABLE."""
    body = struct.pack("=BBBBBBBBI", _FAMILY[family], 0, 0, 0, 0, 0, 0, _FR_ACT_TO_TBL, 0)
    body += _attr(_FRA_PRIORITY, RULE_PREF) + _attr(_FRA_FWMARK, TPROXY_MARK)
    body += _attr(_FRA_FWMASK, TPROXY_MARK) + _attr(_FRA_TABLE, ROUTE_TABLE)
    kind = _RTM_DELRULE if delete else _RTM_NEWRULE
    flags = _NLM_F_REQUEST | _NLM_F_ACK | (0 if delete else _NLM_F_CREATE | _NLM_F_EXCL)
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def route_message(family: int, lo_index: int, delete: bool = False, seq: int = 1) -> bytes:
    """RTM_NEWROUTE (replace) / RTM_DELROUTE: local default dev lo table ROUTE_TABLE."""
    body = struct.pack(
        "=BBBBBBBBI", _FAMILY[family], 0, 0, 0, 0, _RTPROT_BOOT, _RT_SCOPE_HOST, _RTN_LOCAL, 0
    )
    body += _attr(_RTA_TABLE, ROUTE_TABLE) + _attr(_RTA_OIF, lo_index)
    kind = _RTM_DELROUTE if delete else _RTM_NEWROUTE
    flags = _NLM_F_REQUEST | _NLM_F_ACK | (0 if delete else _NLM_F_CREATE | _NLM_F_REPLACE)
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def ack_error(reply: bytes, seq: int) -> int | None:
    """The errno in the NLMSG_ERROR answering `seq` (0: success); None if not in `reply`."""
    offset = 0
    while offset + 20 <= len(reply):
        length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", reply, offset)
        if kind == _NLMSG_ERROR and got_seq == seq:
            code: int = struct.unpack_from("=i", reply, offset + 16)[0]
            return -code
        if length < 16:
            break
        offset += (length + 3) & ~3
    return None


def _talk(message: bytes, seq: int) -> int:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        sock.send(message)
        for _ in range(16):  # bounded: the ack comes first on a fresh socket
            code = ack_error(sock.recv(65536), seq)
            if code is not None:
                return code
    return errno.EPROTO


class PolicyRouting:
    """Installs and removes kpx's fwmark rule and local route for the given families."""

    def __init__(self, families: Iterable[int]) -> None:
        self.families = sorted(set(families))
        self._seq = 0

    def _send(self, what: str, message_for: Callable[..., bytes], ok: set[int]) -> None:
        self._seq += 1
        try:
            code = _talk(message_for(seq=self._seq), self._seq)
        except OSError as err:
            raise PolicyRouteError(f"{what}: {err.strerror or err}") from None
        if code and code not in ok:
            raise PolicyRouteError(f"{what}: {os.strerror(code)}")

    async def install(self) -> None:
        """Make the rule and route exist (idempotent). Raises PolicyRouteError."""
        try:
            lo = socket.if_nametoindex("lo")
        except OSError as err:
            raise PolicyRouteError(f"no loopback interface: {err.strerror or err}") from None
        for f in self.families:
            self._send(f"ip -{f} rule add", partial(rule_message, f), _ADD_OK)
            self._send(f"ip -{f} route replace", partial(route_message, f, lo), set())
        log.info(
            "policy_routing_installed",
            mark=f"{TPROXY_MARK:#x}",
            table=ROUTE_TABLE,
            families=self.families,
        )

    async def remove(self) -> None:
        """Delete the rule and route (clean exit); a missing one is not an error."""
        try:
            lo = socket.if_nametoindex("lo")
        except OSError:
            lo = 1
        for f in self.families:
            try:
                self._send(f"ip -{f} rule del", partial(rule_message, f, True), _DEL_OK)
                self._send(f"ip -{f} route del", partial(route_message, f, lo, True), _DEL_OK)
            except PolicyRouteError as err:
                log.error("policy_routing_cleanup_failed", family=f, problem=str(err))
        log.info("policy_routing_removed", table=ROUTE_TABLE)
