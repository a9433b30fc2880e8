"""The daemons' small HTTP server: /healthz (alive), /readyz (initial sync done), /metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.registry import Collector

ReadyCheck = Callable[[], tuple[bool, str]]


def parse_listen(address: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` -> (host, port); raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


class HealthServer:
    """Serves health and metrics; `ready` says whether the daemon may take traffic."""

    def __init__(
        self,
        address: str,
        ready: ReadyCheck,
        alive: ReadyCheck | None = None,
        extra_routes: list[web.RouteDef] | None = None,
        reuse_port: bool = False,
        registry: Collector = REGISTRY,
    ) -> None:
        self.host, self.port = parse_listen(address)
        # SO_REUSEPORT: a successor process binds the same port while this one still serves
        # (kpx's handover, kpx/handover.py).
        self.reuse_port = reuse_port
        self._ready = ready
        self._registry = registry  # what /metrics serves (dnsd adds its child's, see there)
        self._alive = alive or (lambda: (True, "ok"))
        self._app = web.Application()
        self._app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics),
                *(extra_routes or []),
            ]
        )
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, reuse_port=self.reuse_port
        )
        await site.start()
        if self.port == 0:  # ephemeral port chosen by the kernel (tests)
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok, text = self._alive()
        return web.Response(status=200 if ok else 503, text=text + "\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok, text = self._ready()
        return web.Response(status=200 if ok else 503, text=text + "\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
