"""The policy routes `tproxy` needs: marked packets are delivered locally, whatever their
destination (`ip rule add fwmark MARK lookup TABLE`, `ip route add local default dev lo table
TABLE`, for IPv4 and IPv6).

The mark, table and preference are the ones the TCP transparent mode (issue 10) uses, so both
share one rule and one route.

Installed idempotently at start (a rule already there is kept, so a kpx restarted after SIGKILL
takes over without a gap), left in place by a crash, removed by the clean exit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

log = structlog.get_logger("kpx.tproxy_routes")

MARK = 0x2000  # one bit, clear of kube-proxy's 0x4000 (masquerade) and 0x8000 (drop)
ROUTE_TABLE = 10262
RULE_PRIORITY = 10262
_FAMILIES = (("-4", "0.0.0.0/0"), ("-6", "::/0"))


async def _ip(command: Sequence[str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 1, "timed out"
    return proc.returncode or 0, out.decode(errors="replace").strip()


def _rule(family: str) -> list[str]:
    return [family, "rule", "{}", "fwmark", f"{MARK:#x}/{MARK:#x}", "lookup", str(ROUTE_TABLE)]


async def install(command: Sequence[str] = ("ip",)) -> bool:
    """Add the rule and route of each family where missing. Returns whether IPv4's are in
    place; an IPv6 failure (no IPv6 here) is logged, not fatal."""
    ok = True
    for family, default in _FAMILIES:
        show = [a if a != "{}" else "show" for a in _rule(family)]
        code, out = await _ip(command, *show)
        if code != 0 or not out:
            add = [a if a != "{}" else "add" for a in _rule(family)]
            code, out = await _ip(command, *add, "priority", str(RULE_PRIORITY))
            if code != 0:
                log.warning("tproxy_rule_failed", family=family, problem=out)
                ok = ok and family != "-4"
                continue
        route = [family, "route", "replace", "local", default, "dev", "lo"]
        code, out = await _ip(command, *route, "table", str(ROUTE_TABLE))
        if code != 0:
            log.warning("tproxy_route_failed", family=family, problem=out)
            ok = ok and family != "-4"
    return ok


async def remove(command: Sequence[str] = ("ip",)) -> None:
    for family, _default in _FAMILIES:
        delete = [a if a != "{}" else "del" for a in _rule(family)]
        for _ in range(8):  # bounded: one rule normally, duplicates from older versions too
            code, _out = await _ip(command, *delete)
            if code != 0:
                break
        await _ip(command, family, "route", "flush", "table", str(ROUTE_TABLE))
