"""One `--workers N` data-plane process: accepts the redirected TCP connections on the proxy
port (a SO_REUSEPORT group shared with the other workers) and relays them.

It watches nothing: the control process (kpx/main.py) owns the watches, the service table and
the nftables table, and sends each worker the rules of the Services whose rules changed
(kpx/worker_feed.py, over kpx/worker_channel.py). The worker applies them to its own
`Frontends` (kpx/frontends.py, the same code the single-process kpx reads), so its pickers,
masquerade classes and drains behave as the single process's. Per worker, not per node: the
balancer's cooldowns and ClientIP affinity (a client whose connections land on two workers may
be pinned to two endpoints; kube-proxy's affinity is per node).

It listens only once the first rules are applied, so it never accepts for a table it does not
have. It exits when the control process goes: PR_SET_PDEATHSIG sends it SIGTERM, and the
channel's end of file stops it too (whichever comes first); on SIGTERM it stops accepting and
drains, as kpx does.

Kept small on purpose (each worker's resident set is paid N times): no pydantic, no aiohttp,
no API client.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from kpx.balancer import AFFINITY_EVICTIONS, COOLDOWNS, Balancer
from kpx.frontends import Frontends
from kpx.local import LocalClients, local_addresses
from kpx.proxy_setup import build_proxy
from kpx.rules import ServiceRules
from kpx.transparent import make_transparent
from kpx.worker_channel import Channel, WorkerConfig
from kwatch.logs import configure_logging
from kwatch.runtime import die_with_parent, release_free_memory, run

log = structlog.get_logger("kpx.worker")

# Seconds between two stats messages to the control process (its /metrics sums them).
STATS_PERIOD = 1.0
# Seconds open connections may finish on SIGTERM without --drain-timeout (kpx/main.py's).
DEFAULT_STOP_DRAIN = 30.0


def reuse_port_listener(host: str, port: int, transparent: bool) -> socket.socket:
    """A redirect listener socket bound to host:port in the workers' SO_REUSEPORT group, with
    the single-process listener's options (kpx/proxy.py `Proxy._bind`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            make_transparent(sock)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def stats_snapshot(stats: object) -> dict[str, int]:
    """Every counter of a `ProxyStats` (its slots and its base classes'), and the balancer's
    (kpx/metrics.py `BalancerEventsCollector` names)."""
    names = {name for cls in type(stats).__mro__ for name in getattr(cls, "__slots__", ())}
    found = {name: int(getattr(stats, name)) for name in names if hasattr(stats, name)}
    found["backend_cooldowns"] = COOLDOWNS.value
    found["affinity_evictions"] = AFFINITY_EVICTIONS.value
    return found


class Worker:
    """The worker's parts: its frontend map, its proxy, and the channel that feeds them."""

    def __init__(self, config: WorkerConfig, channel: Channel) -> None:
        self.config = config
        self.channel = channel
        balancer = Balancer(
            max_candidates=len(config.connect_timeouts),
            cooldown_base=config.cooldown_base,
            cooldown_cap=config.cooldown_max,
            affinity_max_entries=config.affinity_max_entries,
        )
        self.balancer = balancer
        local_clients = self.local_clients = LocalClients(config.cluster_cidrs, local_addresses())
        self.frontends = Frontends(balancer, local_clients)
        self.proxy, self.shared_links = build_proxy(
            self.frontends, local_clients, config, config.transparent
        )
        self.listening = False
        self.stop_drain = (
            DEFAULT_STOP_DRAIN if config.drain_timeout is None else config.drain_timeout
        )

    def apply(self, changes: Mapping[str, ServiceRules | None], full: bool) -> None:
        """Make `changes` the applied rules of their Services (`full`: and forget every
        Service not named); drain the backends no frontend offers any more."""
        frontends = self.frontends
        frontends.begin()
        try:
            if full:
                for key in frontends.service_keys():
                    if key not in changes:
                        frontends.set_service(key, None)
            for key, rules in changes.items():
                frontends.set_service(key, rules)
        finally:
            removed, added = frontends.end({})
        for backend in removed:
            self.proxy.close_backend(backend)
        for backend in added:
            self.proxy.restore_backend(backend)

    async def listen(self) -> None:
        """Join the SO_REUSEPORT group on every redirect host (once the first rules are in)."""
        config = self.config
        for host in config.listen_hosts:
            sock = reuse_port_listener(host, config.proxy_port, config.transparent)
            await self.proxy.accept_on(self.proxy.adopt_listener(sock))
        self.listening = True
        # What is alive now lives as long as the process (kpx/main.py's `_settle_memory`).
        gc.collect()
        gc.freeze()
        release_free_memory()

    async def follow(self, stop: asyncio.Event) -> None:
        """Apply what the control process sends until it says stop or goes away."""
        while True:
            message = await self.channel.receive()
            if message is None:
                log.info("worker_control_gone", worker=self.config.index)
                break
            if message[0] == "stop":
                self.stop_drain = float(message[1])
                break
            _kind, seq, changes, full = message
            self.apply(changes, full)
            if not self.listening:
                await self.listen()
            self.channel.send(("ack", seq))
        stop.set()

    async def report(self) -> None:
        while True:
            snapshot = stats_snapshot(self.proxy.stats)
            snapshot["affinity_entries"] = self.balancer.affinity_entries()
            self.channel.send(("stats", snapshot))
            await asyncio.sleep(STATS_PERIOD)

    async def housekeeping(self) -> None:
        """kpx/main.py's housekeeping for what a worker holds: affinity and cooldown sweeps,
        this host's addresses (local clients), the connected routes (transparent mode)."""
        while True:
            await asyncio.sleep(self.config.housekeeping_period)
            self.balancer.sweep()
            await self.local_clients.refresh_off_loop()
            if self.config.transparent:
                await self.shared_links.refresh_off_loop()

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        tasks = [
            asyncio.create_task(self.follow(stop)),
            asyncio.create_task(self.report()),
            asyncio.create_task(self.housekeeping()),
        ]
        status = 0
        try:
            done = asyncio.create_task(stop.wait())
            await asyncio.wait([done, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and task.exception() is not None:
                    log.error("worker_failed", problem=repr(task.exception()))
                    status = 1
        finally:
            for task in tasks:
                task.cancel()
            await self.proxy.stop(self.stop_drain if status == 0 else 0.0)
            self.channel.close()
        return status


async def serve(sock: socket.socket) -> int:
    channel = await Channel.open(sock)
    config: Any = await channel.receive()
    if not isinstance(config, WorkerConfig):
        return 1
    configure_logging(config.log_format, config.log_level, daemon="kpx-worker")  # type: ignore[arg-type]
    structlog.contextvars.bind_contextvars(worker=config.index)
    return await Worker(config, channel).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kpx.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    return run(serve(socket.socket(fileno=args.channel_fd)))


if __name__ == "__main__":
    sys.exit(main())
