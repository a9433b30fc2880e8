"""Policy routing for transparent mode: packets carrying kpx's fwmark are delivered locally.

`tproxy` and the `socket transparent` match (kpx/nft.py) only mark packets; what makes the node
deliver a packet addressed to a ClusterIP, or a backend's reply addressed to a client pod, to
kpx's socket instead of forwarding it is one rule and one route per family:

    ip rule add fwmark 0x2000/0x2000 lookup 10262 pref 10262
    ip route replace local 0.0.0.0/0 dev lo table 10262        (and ::/0 for IPv6)

Installed idempotently at start (a rule already there is kept, a different one at kpx's
preference replaced), left in place when kpx is killed (a restarted kpx takes over without a
gap), removed by the clean exit. Endpoint changes never come here. The commands are `ip`'s,
run as subprocesses like `nft`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import structlog

from kpx.nft import TPROXY_MARK

log = structlog.get_logger("kpx.policyroute")

ROUTE_TABLE = 10262
RULE_PREF = 10262
_MAX_RULE_DELETES = 16  # bounded: stray rules at our preference are removed one per command
_DEFAULT = {4: "0.0.0.0/0", 6: "::/0"}


class PolicyRouteError(Exception):
    """`ip` refused a command; the message is its stderr."""


def rule_args(family: int) -> list[str]:
    return [
        f"-{family}",
        "rule",
        "add",
        "fwmark",
        f"{TPROXY_MARK:#x}/{TPROXY_MARK:#x}",
        "lookup",
        str(ROUTE_TABLE),
        "pref",
        str(RULE_PREF),
    ]


def route_args(family: int, verb: str = "replace") -> list[str]:
    return [
        f"-{family}",
        "route",
        verb,
        "local",
        _DEFAULT[family],
        "dev",
        "lo",
        "table",
        str(ROUTE_TABLE),
    ]


def rule_present(listing: str) -> bool:
    """Whether `ip rule show pref P` output is exactly kpx's rule (one line, mark and table)."""
    lines = [line for line in listing.splitlines() if line.strip()]
    if len(lines) != 1:
        return False
    words = lines[0].split()
    mark = f"{TPROXY_MARK:#x}/{TPROXY_MARK:#x}"
    return "fwmark" in words and mark in words and str(ROUTE_TABLE) in words


class PolicyRouting:
    """Installs and removes kpx's fwmark rule and local route for the given families."""

    def __init__(
        self, families: Iterable[int], command: Sequence[str] = ("ip",), timeout: float = 10.0
    ) -> None:
        self.families = sorted(set(families))
        self.command = list(command)
        self.timeout = timeout

    async def install(self) -> None:
        """Make the rule and route exist (idempotent). Raises PolicyRouteError."""
        for family in self.families:
            listing = await self._ip(f"-{family}", "rule", "show", "pref", str(RULE_PREF))
            if not rule_present(listing):
                await self._delete_rules(family)
                await self._ip(*rule_args(family))
            await self._ip(*route_args(family))
        log.info(
            "policy_routing_installed",
            mark=f"{TPROXY_MARK:#x}",
            table=ROUTE_TABLE,
            families=self.families,
        )

    async def remove(self) -> None:
        """Delete the rule and route (clean exit); a missing one is not an error."""
        for family in self.families:
            try:
                await self._delete_rules(family)
                await self._ip(*route_args(family, "del"), check=False)
            except PolicyRouteError as err:
                log.error("policy_routing_cleanup_failed", family=family, problem=str(err))
        log.info("policy_routing_removed", table=ROUTE_TABLE)

    async def _delete_rules(self, family: int) -> None:
        for _ in range(_MAX_RULE_DELETES):
            listing = await self._ip(f"-{family}", "rule", "show", "pref", str(RULE_PREF))
            if not listing.strip():
                return
            await self._ip(f"-{family}", "rule", "del", "pref", str(RULE_PREF))

    async def _ip(self, *args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PolicyRouteError(
                f"ip {' '.join(args)}: no answer within {self.timeout}s"
            ) from None
        if check and proc.returncode != 0:
            problem = " ".join(err.decode(errors="replace").split())[:500]
            raise PolicyRouteError(f"ip {' '.join(args)}: {problem}")
        return out.decode(errors="replace")
