"""`--mode ports` for UDP: every UDP frontend gets its own local port (no root, no nftables).

As for TCP (kpx/ports.py) each frontend is bound on `bind_address` at a kernel-chosen port and
keeps that port whatever its state. The states map onto what a client sees from nftables mode:
- "serve": datagrams are relayed;
- "reject" (no endpoint anywhere): the socket is closed, so the kernel answers each datagram
  with ICMP port unreachable (a connected client gets ECONNREFUSED), as kube-proxy's reject;
  the port is re-bound when endpoints come back (if another program took it meanwhile, a new
  port is chosen and logged);
- "drop" and "local": the socket stays; the relay drops what the picker has no endpoint for
  (a Local policy without endpoints here; outsiders of an externalTrafficPolicy Local frontend).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from kpx.ports import frontend_text
from kpx.rules import Steer, SteerKey
from kpx.udp_relay import UdpListener, UdpRelay

log = structlog.get_logger("kpx.udp_ports")


class UdpPortsWriter:
    """A SteeringWriter for the UDP table in `--mode ports`."""

    def __init__(self, relay: UdpRelay, bind_address: str = "127.0.0.1") -> None:
        self.relay = relay
        self.bind_address = bind_address
        self._listeners: dict[SteerKey, UdpListener] = {}
        self._ports: dict[SteerKey, int] = {}  # kept while a frontend is in "reject"
        self._state: dict[SteerKey, Steer] = {}
        self.needs_full = True

    def assignments(self) -> list[dict[str, Any]]:
        return [
            {
                "frontend": frontend_text(key),
                "protocol": "UDP",
                "address": self.bind_address,
                "port": port,
                "endpoints": self._state.get(key) == "serve",
                "state": self._state.get(key),
            }
            for key, port in sorted(self._ports.items())
        ]

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool:
        keys = set(steering) | set(self._ports) if self.needs_full else set(changed)
        self.needs_full = False
        touched = False
        for key in sorted(keys):
            state = steering.get(key)
            if state is None:
                self._state.pop(key, None)
                self._ports.pop(key, None)
                touched |= self._unbind(key)
                continue
            self._state[key] = state
            if key not in self._ports:
                touched |= self._bind(key)  # a new frontend gets its port even in "reject"
            if state == "reject":
                touched |= self._unbind(key)
            elif key not in self._listeners:
                touched |= self._bind(key)
        # Endpoints may have changed without any steering change: re-check sessions.
        self.relay.invalidate()
        if any(steering.get(key) is None for key in keys):
            self.relay.prune_frontends()
        return touched

    def _unbind(self, key: SteerKey) -> bool:
        listener = self._listeners.pop(key, None)
        if listener is None:
            return False
        listener.close()
        log.info("frontend_unbound", frontend=frontend_text(key), protocol="UDP")
        return True

    def _bind(self, key: SteerKey) -> bool:
        family, ip, port = key
        frontend_ip = ip or ("::" if family == 6 else "0.0.0.0")
        wanted = self._ports.get(key, 0)
        for attempt in (wanted, 0) if wanted else (0,):
            try:
                listener = self.relay.serve_port(self.bind_address, attempt, frontend_ip, port)
            except OSError as err:
                log.error(
                    "frontend_bind_failed",
                    frontend=frontend_text(key),
                    protocol="UDP",
                    port=attempt,
                    problem=str(err),
                )
                continue
            self._listeners[key] = listener
            self._ports[key] = listener.port
            log.info(
                "frontend_bound",
                frontend=frontend_text(key),
                protocol="UDP",
                address=self.bind_address,
                port=listener.port,
            )
            return True
        return False

    async def remove(self) -> None:
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self._ports.clear()
        self._state.clear()
        self.needs_full = True
