"""Forwarding-loop detection: CoreDNS's `loop` plugin, without the crash.

A loop is an upstream that sends dnsd's forwarded queries back to dnsd: a node whose
resolv.conf names the node's own address while dnsd listens on it with hostNetwork, or the
cluster DNS Service's ClusterIP. Every forwarded name then circles until the timeouts, each
turn a new query, and clients see timeouts instead of answers.

CoreDNS sends `<random>.<random>.` HINFO through itself at start-up and halts (exits) when it
sees that name arrive more than twice, so a loop ends in a crash loop of the whole DNS server.
dnsd sends each upstream a probe name of its own, straight to that upstream: `<seed>.<index>.`,
the seed random per dnsd start and shared with its --forward-process child (which answers most
forwarded names over UDP). A probe name arriving at dnsd can only have come back through that
upstream. The process that receives it marks the upstream as looping for good (one log line,
`dnsd_forward_loops_detected_total{to}`), answers the probe SERVFAIL instead of forwarding it
again (which ends the circle), and from then on forwards to the other upstreams only; a route
with none left answers SERVFAIL at once. Cluster names are never affected. A restart probes
again (the configuration may have been fixed).
"""

from __future__ import annotations

import struct

from prometheus_client import Counter

from dnsd.names import to_wire

QTYPE_HINFO = 13

FORWARD_LOOPS = Counter(
    "dnsd_forward_loops_detected_total",
    "Upstreams found sending dnsd's forwarded queries back to dnsd (they are no longer used)",
    ["to"],
)


def probe_labels(seed: int, index: int) -> tuple[bytes, ...]:
    """The lower-case labels of the probe name of the `index`-th upstream."""
    return (str(seed).encode(), str(index).encode())


def probe_question(labels: tuple[bytes, ...]) -> bytes:
    """The probe's question section: the name, HINFO, IN."""
    return to_wire(".".join(label.decode() for label in labels)) + struct.pack(
        "!HH", QTYPE_HINFO, 1
    )
