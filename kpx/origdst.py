"""The destination a client dialled before nftables redirected it to kpx (SO_ORIGINAL_DST).

`redirect` rewrites the destination to kpx's listener; conntrack still remembers the original
tuple and hands it out through getsockopt: SOL_IP/SO_ORIGINAL_DST (80) for IPv4 and
SOL_IPV6 (= IPPROTO_IPV6)/IP6T_SO_ORIGINAL_DST (80) for IPv6 (linux/netfilter_ipv4.h,
linux/netfilter_ipv6/ip6_tables.h).
"""

from __future__ import annotations

import _socket
import socket
import struct

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28
_V4_MAPPED_PREFIX = "::ffff:"


def unmap_ipv4(ip: str) -> str:
    """`::ffff:10.0.0.1` (an IPv4 peer seen by a dual-stack socket) -> `10.0.0.1`."""
    if ip.startswith(_V4_MAPPED_PREFIX) and "." in ip:
        return ip[len(_V4_MAPPED_PREFIX) :]
    return ip


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """struct sockaddr_in (family, port in network order, 4-byte address) -> (ip, port)."""
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def parse_sockaddr_in6(raw: bytes) -> tuple[str, int]:
    """struct sockaddr_in6 (family, port, flowinfo, 16-byte address, scope id) -> (ip, port)."""
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def original_dst(sock: _socket.socket, peer_ip: str | None = None) -> tuple[str, int]:
    """The pre-redirect (ip, port) of an accepted connection.

    `peer_ip` is the client address as accept() returned it; an IPv4-mapped peer on an AF_INET6
    listener was tracked by IPv4 conntrack, so it is asked through SOL_IP. Raises OSError
    (ENOENT) when conntrack has no entry, e.g. a client that dialled the listener directly.
    """
    if sock.family == socket.AF_INET or (
        peer_ip is not None and peer_ip.startswith(_V4_MAPPED_PREFIX) and "." in peer_ip
    ):
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
        return parse_sockaddr_in(raw)
    raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
    return parse_sockaddr_in6(raw)
