"""Transparent mode's socket options and the start-up check that decides the mode.

`--source-address-mode`:
- `node`: backends see the node's address (nftables `redirect`, plain sockets);
- `transparent`: backends see the client's address where kube-proxy would keep it
  (kpx/source.py); kpx exits at start when this node cannot do it;
- `auto` (default): transparent when the kernel and kpx's privileges allow it, else node, said
  in one log line (`transparent_mode_unavailable`) and in `kpx_source_address_mode`.

Needs: `IP_TRANSPARENT` on kpx's own sockets (CAP_NET_ADMIN or CAP_NET_RAW in the kpx process),
nftables' `tproxy` and `socket` expressions (nft_tproxy, nft_socket), and policy routing
(kpx/policyroute.py).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
from collections.abc import Sequence

IP_TRANSPARENT = 19  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: the port is chosen at connect (4-tuple reuse)

# Checked with `nft -c` (the kernel validates, nothing is committed): both expressions kpx's
# transparent table uses, in the hook they need.
_PROBE_TABLE = """table inet kpx-probe {
	chain probe {
		type filter hook prerouting priority -150; policy accept;
		meta l4proto tcp socket transparent 1 accept
		meta nfproto ipv4 tcp dport 9 tproxy ip to :9
		meta nfproto ipv6 tcp dport 9 tproxy ip6 to :9
	}
}
"""


def make_transparent(sock: _socket.socket) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT): accept tproxied connections, bind to any address.
    Raises PermissionError without CAP_NET_ADMIN/CAP_NET_RAW."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def bind_transparent(sock: _socket.socket, ip: str) -> None:
    """Make `sock` connect from `ip` (not an address of this host). Raises OSError."""
    make_transparent(sock)
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((ip, 0))


def capability_problem() -> str | None:
    """None when this process may set IP_TRANSPARENT, else why not."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            make_transparent(probe)
    except OSError as err:
        if err.errno in (errno.EPERM, errno.EACCES):
            return "no CAP_NET_ADMIN or CAP_NET_RAW for IP_TRANSPARENT"
        return f"IP_TRANSPARENT: {err.strerror}"
    return None


_PROBE_TIMEOUT = 10.0


async def kernel_problem(command: Sequence[str] = ("nft",)) -> str | None:
    """None when nftables accepts `tproxy` and `socket transparent` here, else nft's error."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            "-c",
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        return f"nft: {err.strerror}"
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(_PROBE_TABLE.encode()), _PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return f"nft -c did not finish within {_PROBE_TIMEOUT}s"
    if proc.returncode != 0:
        problem = " ".join(stderr.decode(errors="replace").split())[:300]
        return f"nftables tproxy/socket unsupported (nft_tproxy, nft_socket): {problem}"
    return None


async def transparent_problem(command: Sequence[str] = ("nft",)) -> str | None:
    """None when transparent mode can work on this node, else the first reason it cannot."""
    return capability_problem() or await kernel_problem(command)
