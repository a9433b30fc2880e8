"""Shared fixtures for kpx tests.

- `netns_topology`: a fresh network-namespace topology (tests/kpx/netns.py), deleted after the
  test whatever its outcome; skips where namespaces cannot be created.
- `run` / `run_uvloop`: run a coroutine to completion on a fresh event loop (`run` is
  parametrized over uvloop, which kpx uses in production, and the stdlib loop; the data path
  relies on add_reader/add_writer semantics that both must honour).
- `StaticPicker` / `StaticFrontends`: stand-ins for the control path's balancer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from kpx.backends import Backend
from tests.kpx.netns import Topology, netns_available

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
# A scenario that has not finished by then failed (a hang must not eat the whole suite).
SCENARIO_TIMEOUT = 60.0


def run_on(loop_name: str, coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop_name]) as runner:
        return runner.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT))


@pytest.fixture(params=sorted(LOOP_FACTORIES))
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    loop_name: str = request.param
    return lambda coro: run_on(loop_name, coro)


@pytest.fixture
def run_uvloop() -> Runner[Any]:
    return lambda coro: run_on("uvloop", coro)


@pytest.fixture
def netns_topology() -> Iterator[Topology]:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    with Topology() as topology:
        yield topology


class StaticPicker:
    """A Picker over a fixed list: round robin over `backends` (each call starts one further
    and lists the rest as fallbacks), or exactly `order` when given. Records every report."""

    def __init__(self, backends: list[Backend], *, rotate: bool = True) -> None:
        self.backends = list(backends)
        self.rotate = rotate
        self._next = 0
        self.successes: list[tuple[Backend, str]] = []
        self.failures: list[Backend] = []

    def candidates(self, client_ip: str) -> list[Backend]:
        backends = self.backends
        if not backends:
            return []
        if not self.rotate:
            return list(backends)
        start = self._next % len(backends)
        self._next += 1
        return backends[start:] + backends[:start]

    def report_success(self, backend: Backend, client_ip: str) -> None:
        self.successes.append((backend, client_ip))

    def report_failure(self, backend: Backend) -> None:
        self.failures.append(backend)


class StaticFrontends:
    """A FrontendMap from a dict (ip, port) -> picker."""

    def __init__(self, pickers: dict[tuple[str, int], StaticPicker] | None = None) -> None:
        self.pickers = dict(pickers or {})
        self.lookups: list[tuple[str, int]] = []

    def lookup(self, ip: str, port: int) -> StaticPicker | None:
        self.lookups.append((ip, port))
        return self.pickers.get((ip, port))
