"""One supervisor for every long-running task of a daemon (watches, zone controller, sync loop).

A task is a coroutine *factory*: the supervisor awaits it, and when it raises an exception
nobody expected, logs it (with its traceback the first time that problem is seen, one short
line after), counts it in `kwatch_task_restarts_total{task}` and starts it again after an
exponential backoff with jitter. The task's state lives outside the coroutine (a Store, a
dirty set), so a restarted task resumes from what it had instead of starting over.

Liveness (`liveness()`, served as `/healthz` and `/livez`) fails when a task is
- dead: it returned although it should run forever, or it failed `crash_loop_failures` times in
  a row without a healthy run in between and waits for its next restart (restarting the process
  is the next remedy), or
- wedged: it said it had work (`Progress.pending()`) and did not finish it
  (`Progress.done()`) within `wedge_deadline` seconds.
An unreachable API server makes neither: reflectors keep retrying inside their task, and the
daemons keep serving the last good state.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from kwatch import metrics
from kwatch.backoff import Backoff

log = structlog.get_logger("kwatch.supervisor")

TaskFactory = Callable[[], Coroutine[Any, Any, None]]

# A run this long counts as healthy: the next failure starts the backoff from the beginning.
HEALTHY_RUN_SECONDS = 30.0
DEFAULT_WEDGE_DEADLINE = 60.0
DEFAULT_CRASH_LOOP_FAILURES = 5


class Progress:
    """A task's work marker: `pending()` when work arrives, `done()` once it is applied.

    Cheap enough for store callbacks: it only keeps the time of the oldest unapplied work.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.pending_since: float | None = None

    def pending(self) -> None:
        if self.pending_since is None:
            self.pending_since = self._clock()

    def done(self) -> None:
        self.pending_since = None

    def waiting(self) -> float:
        """Seconds the oldest unapplied work has waited (0 when there is none)."""
        since = self.pending_since
        return 0.0 if since is None else self._clock() - since


@dataclass(slots=True)
class _Supervised:
    name: str
    factory: TaskFactory
    forever: bool
    backoff: Backoff
    task: asyncio.Task[None] | None = None
    failures: int = 0  # consecutive failures without a healthy run in between
    finished: bool = False  # returned; dead when `forever`
    running: bool = False  # inside the factory now (not waiting out a backoff)
    last_problem: str = ""
    seen_problems: set[str] = field(default_factory=set)


class Supervisor:
    """Starts, restarts and reports on a daemon's background tasks."""

    def __init__(
        self,
        *,
        wedge_deadline: float = DEFAULT_WEDGE_DEADLINE,
        crash_loop_failures: int = DEFAULT_CRASH_LOOP_FAILURES,
        backoff: Callable[[], Backoff] = lambda: Backoff(initial=0.5, maximum=30.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wedge_deadline = wedge_deadline
        self.crash_loop_failures = crash_loop_failures
        self._backoff = backoff
        self._clock = clock
        self._tasks: dict[str, _Supervised] = {}
        self._progress: dict[str, Progress] = {}
        self._stopping = False

    # --- starting ----------------------------------------------------------------------------

    def progress(self, name: str) -> Progress:
        """The work marker of task `name` (created before the task, for store callbacks)."""
        progress = self._progress.get(name)
        if progress is None:
            progress = self._progress[name] = Progress(self._clock)
            metrics.TASK_WAITING.labels(name).set_function(progress.waiting)
        return progress

    def spawn(self, name: str, factory: TaskFactory, *, forever: bool = True) -> None:
        """Run `factory()` under supervision. `forever`: returning is a failure (dead)."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already supervised")
        entry = _Supervised(name, factory, forever, self._backoff())
        self._tasks[name] = entry
        metrics.TASK_RESTARTS.labels(name)  # the series exists (0) from the start
        entry.task = asyncio.get_running_loop().create_task(self._run(entry), name=name)

    async def _run(self, entry: _Supervised) -> None:
        while True:
            started = self._clock()
            entry.running = True
            try:
                await entry.factory()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the point of a supervisor
                entry.running = False
                if self._clock() - started >= HEALTHY_RUN_SECONDS:
                    entry.failures = 0
                    entry.backoff.reset()
                entry.failures += 1
                delay = entry.backoff.next()
                self._report(entry, err, delay)
                metrics.TASK_RESTARTS.labels(entry.name).inc()
                await asyncio.sleep(delay)
                continue
            entry.running = False
            entry.finished = True
            if entry.forever and not self._stopping:
                log.error("task_ended", task=entry.name)
            return

    def _report(self, entry: _Supervised, err: Exception, delay: float) -> None:
        problem = f"{type(err).__name__}: {err}"
        entry.last_problem = problem
        if problem in entry.seen_problems:
            # The traceback was logged already: one short line per repeat.
            log.error(
                "task_failed_again",
                task=entry.name,
                problem=problem,
                failures=entry.failures,
                restart_in=round(delay, 2),
            )
            return
        if len(entry.seen_problems) < 100:  # bounded: messages may embed changing values
            entry.seen_problems.add(problem)
        log.error(
            "task_failed",
            task=entry.name,
            problem=problem,
            failures=entry.failures,
            restart_in=round(delay, 2),
            traceback="".join(traceback.format_exception(err)),
        )

    # --- reporting ---------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        """(alive, why not): every `forever` task running and none wedged past the deadline."""
        problems = []
        for entry in self._tasks.values():
            ended = entry.finished or (entry.task is not None and entry.task.done())
            if entry.forever and ended and not self._stopping:
                problems.append(f"task {entry.name} is dead")
            elif entry.failures >= self.crash_loop_failures and not entry.running:
                # Crash-looping: waiting out a backoff after the last of many failures. Once
                # restarted it counts as alive again (kubelet must not kill a recovered task).
                problems.append(
                    f"task {entry.name} failed {entry.failures} times in a row: "
                    f"{entry.last_problem}"
                )
        for name, progress in self._progress.items():
            waited = progress.waiting()
            if waited > self.wedge_deadline:
                problems.append(
                    f"task {name} has work waiting for {waited:.0f}s "
                    f"(deadline {self.wedge_deadline:g}s)"
                )
        if problems:
            return False, "; ".join(problems)
        return True, "ok"

    def failures(self, name: str) -> int:
        entry = self._tasks.get(name)
        return 0 if entry is None else entry.failures

    def mark_healthy(self, name: str) -> None:
        """A task reports a healthy step (e.g. a successful sync): its crash count restarts."""
        entry = self._tasks.get(name)
        if entry is not None and entry.failures:
            entry.failures = 0
            entry.backoff.reset()

    # --- stopping ----------------------------------------------------------------------------

    async def stop(self) -> None:
        self._stopping = True
        tasks = [e.task for e in self._tasks.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._stopping = False
        for progress in self._progress.values():
            progress.done()
