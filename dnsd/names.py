"""Domain names as the index holds them, and the IP <-> name mappings of the cluster zone.

Names are kept in two forms: dotted text without the trailing dot, lower case (`svc.ns.svc.zone`),
while records are built, and DNS wire form lower case (`\\x03svc\\x02ns...\\x00`) as the keys the
hot path looks up. Lower-casing wire bytes with `bytes.lower()` is exactly DNS's case folding:
it only touches ASCII A-Z (RFC 4343 §3).
"""

from __future__ import annotations

import functools
import ipaddress
import socket

_LENGTH_BYTES = [bytes((n,)) for n in range(64)]


@functools.lru_cache(maxsize=4096)
def to_wire(name: str) -> bytes:
    """`a.b.c` (no trailing dot, "" for the root) -> wire form; raises ValueError if invalid.

    Cached: building a Service's records asks for the same few names many times (its name is
    an owner, an SRV target and a key).
    """
    if not name:
        return b"\x00"
    labels = name.encode("ascii").split(b".")
    if b"" in labels:
        raise ValueError(f"empty label in {name!r}")
    try:
        out = b"".join([_LENGTH_BYTES[len(label)] + label for label in labels]) + b"\x00"
    except IndexError:
        raise ValueError(f"label over 63 bytes in {name!r}") from None
    if len(out) > 255:
        raise ValueError(f"name too long: {name!r}")
    return out


def from_wire(wire: bytes) -> str:
    """Uncompressed wire name -> dotted text (no trailing dot); labels decoded as latin-1."""
    labels = []
    i = 0
    while wire[i]:
        length = wire[i]
        labels.append(wire[i + 1 : i + 1 + length].decode("latin-1"))
        i += 1 + length
    return ".".join(labels)


def label_offsets(wire: bytes) -> list[int]:
    """Offsets of every label in an uncompressed wire name, longest suffix first."""
    offsets = []
    i = 0
    while wire[i]:
        offsets.append(i)
        i += 1 + wire[i]
    return offsets


def dashed_ip(ip: str) -> str:
    """The generated endpoint hostname CoreDNS uses (k8s/kubernetes.go endpointHostname).

    IPv4 dots become dashes; IPv6 colons become dashes and a trailing dash gets a "0" so the
    label does not end in "-" (`fd00::` -> `fd00--0`).
    """
    if "." in ip:
        return ip.replace(".", "-")
    dashed = ip.replace(":", "-")
    return dashed + "0" if dashed.endswith("-") else dashed


def ip_from_dashed(label: str) -> str | None:
    """Pod-name label -> canonical IP, or None (CoreDNS findPods' parsing).

    Exactly three dashes and no `--` means IPv4 (`10-0-0-1`); anything else is read as IPv6 with
    dashes for colons (`fd00-10--1`).
    """
    if label.count("-") == 3 and "--" not in label:
        candidate = label.replace("-", ".")
        try:
            socket.inet_pton(socket.AF_INET, candidate)
        except OSError:
            return None
        return candidate
    try:
        return ipaddress.IPv6Address(label.replace("-", ":")).compressed
    except ValueError:
        return None


def reverse_name(ip: str) -> str:
    """`10.0.0.1` -> `1.0.0.10.in-addr.arpa`; IPv6 -> 32 nibbles under ip6.arpa (SPEC §2.3.3)."""
    return ipaddress.ip_address(ip).reverse_pointer


def reverse_of_packed(packed: bytes) -> str:
    """`reverse_name` from the 4 or 16 address bytes (always the canonical form)."""
    if len(packed) == 4:
        return f"{packed[3]}.{packed[2]}.{packed[1]}.{packed[0]}.in-addr.arpa"
    return ".".join(packed.hex()[::-1]) + ".ip6.arpa"
