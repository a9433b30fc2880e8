"""`--mode ports`: no root, no nftables; every frontend gets its own local listening port.

For development and the demo: each frontend (ClusterIP:port, NodePort, externalIP:port, LB
IP:port) is bound on `bind_address` at a kernel-chosen port, and the assignments are logged and
served on `/debug/services`. A frontend keeps its port whatever its state; without kernel rules
the states are approximated:
- "reject" (no endpoint anywhere): the proxy accepts and resets the client at once;
- "drop" (a Local policy, no endpoint on this node): the listener is held, so the client's
  connect completes in the kernel but nothing answers until endpoints come back (a dropped
  SYN in nftables mode: the client times out, or is served if they return in time);
- "local" (externalTrafficPolicy Local, no endpoint here): node and pod clients are served,
  others reset. Only the kernel can drop one client's SYN and accept another's on the same
  port, so outsiders see a reset instead of nftables mode's drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import structlog

from kpx.rules import Steer, SteerKey

log = structlog.get_logger("kpx.ports")


class _Listener(Protocol):
    @property
    def port(self) -> int: ...

    def close(self) -> None: ...

    def hold(self) -> None: ...

    def resume(self) -> None: ...


class PortListeners(Protocol):
    async def serve_port(
        self, listen_host: str, listen_port: int, frontend_ip: str, frontend_port: int
    ) -> Any: ...


def frontend_text(key: SteerKey) -> str:
    family, ip, port = key
    if not ip:
        return f"nodeport/{family}:{port}"
    return f"[{ip}]:{port}" if family == 6 else f"{ip}:{port}"


class PortsWriter:
    """A SteeringWriter that opens and closes one proxy listener per frontend."""

    def __init__(self, proxy: PortListeners, bind_address: str = "127.0.0.1") -> None:
        self.proxy = proxy
        self.bind_address = bind_address
        self._listeners: dict[SteerKey, _Listener] = {}
        self._state: dict[SteerKey, Steer] = {}
        self.needs_full = True

    def assignments(self) -> list[dict[str, Any]]:
        """One row per frontend: what the client would dial, where to dial instead."""
        return [
            {
                "frontend": frontend_text(key),
                "address": self.bind_address,
                "port": listener.port,
                "endpoints": self._state.get(key) == "serve",
                "state": self._state.get(key),
            }
            for key, listener in sorted(self._listeners.items())
        ]

    async def sync(
        self, steering: Mapping[SteerKey, Steer], changed: Iterable[SteerKey] = ()
    ) -> bool:
        keys = set(steering) | set(self._listeners) if self.needs_full else set(changed)
        self.needs_full = False
        touched = False
        for key in sorted(keys):
            state = steering.get(key)
            if state is None:
                self._state.pop(key, None)
                listener = self._listeners.pop(key, None)
                if listener is not None:
                    listener.close()
                    log.info("frontend_unbound", frontend=frontend_text(key))
                    touched = True
                continue
            self._state[key] = state
            listener = self._listeners.get(key)
            if listener is None:
                listener = await self._bind(key)
                if listener is None:
                    continue
                touched = True
            if state == "drop":
                listener.hold()
            else:
                listener.resume()
        return touched

    async def _bind(self, key: SteerKey) -> _Listener | None:
        family, ip, port = key
        # A NodePort has no single address; the table finds it by family and port.
        frontend_ip = ip or ("::" if family == 6 else "0.0.0.0")
        try:
            listener: _Listener = await self.proxy.serve_port(
                self.bind_address, 0, frontend_ip, port
            )
        except OSError as err:
            log.error("frontend_bind_failed", frontend=frontend_text(key), problem=str(err))
            return None
        self._listeners[key] = listener
        log.info(
            "frontend_bound",
            frontend=frontend_text(key),
            address=self.bind_address,
            port=listener.port,
        )
        return listener

    async def remove(self) -> None:
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self._state.clear()
        self.needs_full = True
