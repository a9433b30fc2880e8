"""The contract between kpx's control path (service table, balancer) and its data path (proxy).

The control path turns Services + EndpointSlices into a `FrontendMap`; the proxy asks it, once
per accepted connection, for the `Picker` of the frontend the client dialled, then walks
`candidates()` in order until a connect succeeds, reporting each outcome back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Backend:
    """One endpoint address and port a connection can go to."""

    ip: str
    port: int
    node_name: str | None = None
    zone: str | None = None


class Picker(Protocol):
    """Backend choice for one Service port frontend (round robin, affinity, failure skipping)."""

    def candidates(self, client_ip: str) -> list[Backend]:
        """Backends to try, in order: the pick first, then fallbacks for retries.

        Empty means the frontend has no usable endpoint: the proxy refuses the connection.
        """
        ...

    def report_success(self, backend: Backend, client_ip: str) -> None:
        """A connect to `backend` succeeded (records affinity, clears failure state)."""
        ...

    def report_failure(self, backend: Backend) -> None:
        """A connect to `backend` was refused or timed out (starts/extends its cool-down)."""
        ...


class FrontendMap(Protocol):
    def lookup(self, ip: str, port: int) -> Picker | None:
        """The picker for TCP frontend ip:port (ClusterIP, NodePort on a node IP, externalIP,
        LoadBalancer IP), or None when kpx does not serve that address."""
        ...
