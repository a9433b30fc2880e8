"""`--mode ports`: no root, no nftables; every frontend gets its own local listening port.

For development and the demo: each frontend (ClusterIP:port, NodePort, externalIP:port, LB
IP:port) is bound on `bind_address` at a kernel-chosen port, and the assignments are logged and
served on `/debug/services`. A frontend without endpoints keeps its port: the proxy resets the
client at once (there is no kernel reject rule in this mode).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import structlog

from kpx.table import Steer, SteerKey

log = structlog.get_logger("kpx.ports")


class _Listener(Protocol):
    @property
    def port(self) -> int: ...

    def close(self) -> None: ...


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
            if key in self._listeners:
                continue
            family, ip, port = key
            # A NodePort has no single address; the table finds it by family and port.
            frontend_ip = ip or ("::" if family == 6 else "0.0.0.0")
            try:
                listener = await self.proxy.serve_port(self.bind_address, 0, frontend_ip, port)
            except OSError as err:
                log.error("frontend_bind_failed", frontend=frontend_text(key), problem=str(err))
                continue
            self._listeners[key] = listener
            touched = True
            log.info(
                "frontend_bound",
                frontend=frontend_text(key),
                address=self.bind_address,
                port=listener.port,
            )
        return touched

    async def remove(self) -> None:
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self._state.clear()
        self.needs_full = True
