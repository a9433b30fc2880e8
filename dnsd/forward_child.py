"""The --forward-process child: answers the forwarded names dnsd's UDP threads hand it.

Started by dnsd.forward_process as `python -m dnsd.forward_child ARGS-JSON` with two kinds of
inherited descriptors: its end of the channel (dnsd.forward_channel) and dnsd's bound UDP
listener sockets, from which it sends its answers (never reading them: the parent's threads
do). It runs on uvloop like dnsd, at the niceness --forward-nice, with its own GIL, its own
forwarder and cache built from the same settings as the parent's (dnsd.build), and answers
through the same Handler and UdpListener code as the parent's event loop does, with a zone
index that is never filled: the parent sends only names outside every zone
(Handler.forwards). It exits when the parent closes the channel, on SIGTERM, and (through
PR_SET_PDEATHSIG) when the parent dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from prometheus_client import REGISTRY

from dnsd import forward_channel as channel
from dnsd.build import ForwardOptions, build_forwarder, build_index
from dnsd.handler import Handler
from dnsd.metrics import DnsCollector, DnsStats
from dnsd.server import UdpListener
from kwatch.logs import configure_logging
from kwatch.mmsg import sockaddr_to_python
from kwatch.runtime import die_with_parent, release_free_memory, run, steady_heap, stop_event

log = structlog.get_logger("dnsd.forward_child")

METRICS_INTERVAL = 1.0  # seconds between two snapshots sent to the parent
DRAIN_BATCH = 16  # messages (of up to 64 queries) read per wake-up, so timers get a turn
CHANNEL_MAX = 1 << 17  # a query message: MESSAGE_LIMIT, or one query of up to 64 KiB


def lower_priority(nice: int, idle: bool) -> None:
    """Run at niceness `nice` (only ever raised: lowering needs a privilege) and, with
    `idle`, under SCHED_IDLE (no privilege needed either): a core then runs this process
    only while nothing else wants it, and a waking thread of dnsd preempts it at once
    instead of waiting for the end of its time slice (which a nice value alone does not
    bring: measured in dnsd/forward_process.py)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    if idle:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as err:  # a seccomp profile may forbid it: the nice value stays
            log.warning("forward_process_not_idle", problem=str(err))


class ForwardChild:
    """The child's parts: one Handler with its forwarder, one UdpListener per passed socket."""

    def __init__(
        self,
        forward: ForwardOptions,
        options: dict[str, Any],
        link: socket.socket,
        sockets: list[int],
    ) -> None:
        self.link = link
        self.forwarder = build_forwarder(
            forward, on_loop=lambda label: self._send(channel.LOOP + label.encode())
        )
        self.stats = DnsStats()
        self.handler = Handler(
            build_index(forward),  # never ready: the parent sends no name of a zone
            upstream=self.forwarder,
            max_udp_size=options["max_udp_size"],
            stats=self.stats,
        )
        self.listeners = [
            UdpListener(socket.socket(fileno=fd), self.handler, options["query_log_sample"])
            for fd in sockets
        ]
        self.collector = DnsCollector(self.stats)
        self.closed = asyncio.Event()

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            listener.attach(loop)
        REGISTRY.register(self.collector)
        self.link.setblocking(False)
        loop.add_reader(self.link.fileno(), self._readable)
        # Its whole heap is start-up (imports, the forwarder): collect the garbage, freeze the
        # rest out of later collections, give the C heap's free pages back (1.3 MB of 20).
        gc.collect()
        gc.freeze()
        release_free_memory()
        self._send(channel.READY)
        reporter = loop.create_task(self._report())
        stopped = loop.create_task(stop.wait())
        closed = loop.create_task(self.closed.wait())
        try:
            await asyncio.wait([stopped, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reporter, stopped, closed):
                task.cancel()
            loop.remove_reader(self.link.fileno())
            self._send(channel.metrics_message(channel.snapshot(REGISTRY)))
            await self.forwarder.close()
            for listener in self.listeners:
                listener.close()  # our descriptor only: the parent's socket stays open
            self.link.close()

    def _readable(self) -> None:
        """Answer the queries of up to DRAIN_BATCH messages waiting on the channel."""
        recv = self.link.recv
        listeners = self.listeners
        for _ in range(DRAIN_BATCH):
            try:
                message = recv(CHANNEL_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:  # the parent closed its end: it is stopping or gone
                self.closed.set()
                asyncio.get_running_loop().remove_reader(self.link.fileno())
                return
            if message[:1] == channel.LOOP:  # the parent found an upstream looping
                self.forwarder.mark_looping(message[1:].decode("ascii", "replace"))
                continue
            try:
                number, queries = channel.read_queries(message)
                answer = listeners[number].answer_slow
            except (ValueError, IndexError):
                self.stats.drop("internal_error")
                continue
            for sockaddr, data in queries:
                try:
                    addr = sockaddr_to_python(sockaddr)
                except (ValueError, OSError, struct.error):
                    self.stats.drop("internal_error")
                    continue
                answer(data, addr)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            self._send(channel.metrics_message(channel.snapshot(REGISTRY)))

    def _send(self, message: bytes) -> None:
        # A parent that does not read gets the next snapshot instead of this one.
        with contextlib.suppress(OSError):
            self.link.send(message, socket.MSG_DONTWAIT)


async def serve(
    forward: ForwardOptions, options: dict[str, Any], link: int, sockets: list[int]
) -> int:
    stop = stop_event()
    child = ForwardChild(forward, options, socket.socket(fileno=link), sockets)
    log.info(
        "forward_process_started",
        pid=os.getpid(),
        nice=os.getpriority(os.PRIO_PROCESS, 0),
        idle=os.sched_getscheduler(0) == os.SCHED_IDLE,
    )
    await child.serve(stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args: dict[str, Any] = json.loads((argv if argv is not None else sys.argv[1:])[0])
    die_with_parent(int(args["parent"]))
    steady_heap()  # as dnsd's: the cache's churn would otherwise fragment the heap
    options = args["child"]
    configure_logging(options["log_format"], options["log_level"], "dnsd")
    lower_priority(int(options["nice"]), bool(options["idle"]))
    sockets = [int(fd) for fd in args["sockets"]]
    return run(serve(args["forward"], options, int(args["link"]), sockets))


if __name__ == "__main__":
    sys.exit(main())
