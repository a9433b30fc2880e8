"""--forward-process: forwarding in a child process with its own GIL, at a lower priority.

dnsd's UDP threads answer cluster names themselves and hand every other query to the event
loop, all under one GIL: under a flood of forwarded names the loop holds it (and a core)
while cluster names wait. With this option the threads hand the names outside every zone
(Handler.forwards: well-formed, class IN, EDNS version 0, not a name the zone owns) to a
child (dnsd.forward_child) over a SOCK_SEQPACKET socket pair instead, without blocking: a
full socket sheds the query (dnsd_dns_dropped_total{reason="forward_queue_full"}). The child
answers from the very listener socket the query came on (inherited at start), so the client
sees dnsd's address and port, through the same Handler and UdpListener code the parent's
loop uses: the same answer, truncation and EDNS as without the option. It runs under
SCHED_IDLE (--forward-idle, the default) at --forward-nice: on a busy core a waking UDP
thread of the parent preempts it at once. A nice value alone is not enough: the kernel
(EEVDF) lets the running child finish its time slice before the woken thread runs. Measured
with bench.dns_overload, dnsd and a control knotd pinned to one core, the loads on another:
probe p99 4.3 and 3.9 ms without the option; 2.6, 3.4 and 2.4 ms with the child at nice 10
(2.8 ms adding --udp-thread-slice 0.0001); 0.80, 0.69, 2.30 and 1.05 ms under SCHED_IDLE
(knotd 0.10-0.45 ms in the same runs). The UDP thread still reads and classifies the whole
flood (Handler.forwards): since forwards reads the common shapes with a label walk instead of
the parser (4.5 -> 1.9 us per flood packet, micro-benchmark), 0.36-0.70 ms over five runs
against 0.68-0.72 ms over three runs of the old code on the same quiet machine (knotd
0.05-0.15 ms), the flood answered at 14.3-15.8k/s instead of 13.6-14.0k/s.

Everything else stays in the parent: cluster, reverse and ExternalName names, autopath,
isolation, malformed messages (they need the zone or are answered at once), TCP, and the
forwarding the parent does for itself (ExternalName chases, autopath's last candidate).

`ForwardProcess.run` is a supervised task: it starts the child once the listeners are bound,
passes it the listener sockets, waits for its `ready`, points the UDP threads at it, and when
the child ends (crash, kill -9) points them back at the parent's loop at once (forwarding goes
on there, never lost), logs one line, counts the restart and starts a new child after a
backoff. /healthz fails while the child has been gone for longer than a restart takes
(`liveness`). The child's metrics come every second and are added to the parent's /metrics
(dnsd.forward_channel.merge). A child dies with its parent (PR_SET_PDEATHSIG); SIGTERM of the
parent stops it first. With --workers N every worker has a child of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from dnsd import forward_channel as channel
from dnsd.build import ForwardOptions
from dnsd.server import DnsServer
from dnsd.settings import DnsdSettings
from kwatch.backoff import Backoff

log = structlog.get_logger("dnsd.forward_process")

PROCESS_UP = Gauge(
    "dnsd_forward_process_up", "1 while the --forward-process child answers forwarded names"
)
PROCESS_RESTARTS = Counter(
    "dnsd_forward_process_restarts_total",
    "Times the --forward-process child ended and was restarted",
)

START_TIMEOUT = 15.0  # seconds a new child may take to say it is ready
STOP_TIMEOUT = 3.0  # seconds a child may take to stop on SIGTERM before SIGKILL
HEALTHY_RUN = 30.0  # a child that ran this long starts the backoff over
# Bytes of queries waiting for the child, per query of --slow-queue (at least 32 KiB): the
# kernel counts about 64 bytes more per query in full batches (it doubles SO_SNDBUF, and a
# message costs some 700 bytes of its own), so about --slow-queue queries wait under a flood.
CHANNEL_BYTES_PER_QUERY = 64
CHANNEL_MIN_BUFFER = 32 * 1024
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the child imports dnsd from


class ChildChannel:
    """The parent's end of one child's socket pair, as the UDP threads see it (ForwardSink)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.gone = False

    def offer(self, listener: int, queries: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
        if self.gone:
            return 0, True
        lost = 0
        sent_any = False
        for message, count in channel.query_messages(listener, queries):
            if lost:  # the socket was full a moment ago: the rest is shed too
                lost += count
                continue
            try:
                self.sock.send(message, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                lost += count
                continue
            except OSError as err:
                if err.errno == errno.EMSGSIZE:  # one query larger than the buffer
                    lost += count
                    continue
                self.gone = True  # the child is gone (EPIPE, ECONNRESET), the socket closed
                if not sent_any:
                    return 0, True
                lost += count  # (the child died between two messages of one batch)
                continue
            sent_any = True
        return lost, False


def child_options(settings: DnsdSettings) -> dict[str, Any]:
    """The child's own settings beside its forwarder's (dnsd.build.forward_options)."""
    return {
        "max_udp_size": settings.max_udp_size,
        "query_log_sample": settings.query_log_sample,
        "log_format": settings.log_format,
        "log_level": settings.log_level,
        "nice": settings.forward_nice,
        "idle": settings.forward_idle,
    }


class ForwardProcess:
    """Starts, watches and restarts the child; see the module docstring."""

    def __init__(
        self,
        settings: DnsdSettings,
        forward_options: ForwardOptions,
        server: DnsServer,
        on_loop: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.forward_options = forward_options
        self.on_loop = on_loop  # told the upstreams the child finds looping
        self._up = asyncio.Event()  # set while a child answers forwarded names
        self._link: ChildChannel | None = None  # the running child's channel
        self.server = server
        self.backoff = Backoff(initial=0.5, maximum=30.0)
        self.pid: int | None = None
        self.restarts = 0
        self._families: list[channel.Family] = []  # the running child's last snapshot
        self._retired: list[channel.Family] = []  # what ended children counted
        # When /healthz starts failing if no child is up by then; None: one is up, or none
        # is due yet (a worker waiting for its zone before it listens).
        self._failing_after: float | None = None
        self._stopping = False
        self._proc: subprocess.Popen[bytes] | None = None
        PROCESS_UP.set(0)

    # --- what the parent's /metrics and /healthz read ------------------------------------

    def metric_families(self) -> list[list[channel.Family]]:
        return [self._retired, self._families]

    async def up(self, within: float) -> bool:
        """Whether a child answers forwarded names, waiting up to `within` seconds for one."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), within)
        return self._up.is_set()

    def tell_loop(self, label: str) -> None:
        """Tell the running child that `label`'s upstream loops (a child started later
        reads it from the forward options)."""
        link = self._link
        if link is not None and not link.gone:
            with contextlib.suppress(OSError):
                link.sock.send(channel.LOOP + label.encode(), socket.MSG_DONTWAIT)

    def liveness(self) -> tuple[bool, str]:
        """Alive unless the child has been gone for longer than a restart takes."""
        deadline = self._failing_after
        if deadline is not None and time.monotonic() > deadline:
            return False, "forward process is not running"
        return True, "ok"

    # --- the supervised task ----------------------------------------------------------------

    async def run(self) -> None:
        """Keep a child answering: start it, wait for its end, restart it after a backoff.
        Started once the listeners are bound (workers > 0 bind when their zone is built)."""
        self._failing_after = time.monotonic() + START_TIMEOUT
        while not self._stopping:
            started = time.monotonic()
            status = await self._one_child()
            if self._stopping:
                break
            if time.monotonic() - started >= HEALTHY_RUN:
                self.backoff.reset()
            delay = self.backoff.next()
            if self._failing_after is None:  # the first end since a child was up
                self._failing_after = time.monotonic() + delay + START_TIMEOUT
            self.restarts += 1
            PROCESS_RESTARTS.inc()
            log.warning(
                "forward_process_ended", pid=self.pid, status=status, restart_in=round(delay, 2)
            )
            await asyncio.sleep(delay)
        await asyncio.Event().wait()  # stopped: a forever task waits to be cancelled

    async def stop(self) -> None:
        """Stop the child and start no other (the parent is stopping): before the listeners
        close, so their sockets are really closed when the parent's are."""
        self._stopping = True
        self.server.forward_through(None)
        if self._proc is not None and self._proc.poll() is None:
            await self._stop(self._proc)

    async def _one_child(self) -> int | None:
        """Run one child until it ends; its exit status (None: it never started)."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        size = max(CHANNEL_MIN_BUFFER, self.settings.slow_queue * CHANNEL_BYTES_PER_QUERY)
        for sock, option in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, size)
        ours.setblocking(False)
        link = self._link = ChildChannel(ours)
        ready = loop.create_future()
        ended = asyncio.Event()
        proc: subprocess.Popen[bytes] | None = None
        try:
            proc = self._spawn(theirs)
            theirs.close()
            self.pid, self._proc = proc.pid, proc
            loop.add_reader(ours.fileno(), self._readable, ours, ready, ended)
            gone = loop.create_task(ended.wait())
            try:
                await asyncio.wait(
                    [ready, gone], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                gone.cancel()
            if not ready.done():
                log.error("forward_process_not_ready", pid=proc.pid, within=START_TIMEOUT)
            elif not ended.is_set() and not self._stopping:
                self.server.forward_through(link)
                self._failing_after = None
                PROCESS_UP.set(1)
                self._up.set()
                while not ended.is_set() and proc.poll() is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ended.wait(), 0.5)
            return await self._reap(proc)
        finally:
            self.server.forward_through(None)
            link.gone = True
            self._link = None
            PROCESS_UP.set(0)
            self._up.clear()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(ours.fileno())
            ours.close()
            theirs.close()
            if proc is not None and proc.poll() is None:
                await self._stop(proc)
            self._retired = channel.retire(self._retired, self._families)
            self._families = []

    def _spawn(self, theirs: socket.socket) -> subprocess.Popen[bytes]:
        sockets = [sock.fileno() for sock in self.server.udp_sockets()]
        args = {
            "parent": os.getpid(),
            "link": theirs.fileno(),
            "sockets": sockets,
            "forward": self.forward_options,
            "child": child_options(self.settings),
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(
            [sys.executable, "-m", "dnsd.forward_child", json.dumps(args)],
            pass_fds=[theirs.fileno(), *sockets],
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def _readable(
        self, ours: socket.socket, ready: asyncio.Future[None], ended: asyncio.Event
    ) -> None:
        """The child's messages: ready, metric snapshots; an empty read is its end."""
        if not channel.read_packets(ours, partial(self._message, ready), size=1 << 20, burst=64):
            ended.set()
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(ours.fileno())

    def _message(self, ready: asyncio.Future[None], message: bytes) -> None:
        kind = message[:1]
        if kind == channel.READY and not ready.done():
            ready.set_result(None)
        elif kind == channel.LOOP and self.on_loop is not None:
            self.on_loop(message[1:].decode("ascii", "replace"))
        elif kind == channel.METRICS:
            try:
                self._families = channel.read_metrics(message)
            except (ValueError, TypeError):
                log.warning("forward_process_bad_metrics", size=len(message))

    async def _reap(self, proc: subprocess.Popen[bytes]) -> int | None:
        for _ in range(100):  # the socket closes a moment before the process is reapable
            status = proc.poll()
            if status is not None:
                return status
            await asyncio.sleep(0.01)
        return None

    async def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)
