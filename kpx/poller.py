"""The data path's own epoll set, watched by the event loop as one fd.

Relays and connects watch their sockets here rather than with the loop's `add_reader` /
`add_writer`: uvloop makes a libuv poll handle per fd (an epoll_ctl ADD and DEL to check the
fd, an ioctl, then the real ADD) and drops it when the fd has no reader or writer left (three
more epoll_ctl), and re-arms it with a DEL and an ADD on every change of interest. For one
proxied request that was 16 of kpx's 40 syscalls (bench/conncost.py); here every change of
interest is one epoll_ctl. The loop watches the set's fd for readability and `_dispatch` runs
the callbacks of the sockets that are ready, with the loop's semantics: level-triggered, and
an error or hang-up wakes both the reader and the writer.

The interface is the loop's (`add_reader`, `remove_reader`, `add_writer`, `remove_writer`), so
kpx/splice.py and kpx/dial.py are unaware of it. Every fd must be removed before it is closed.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_TROUBLE = select.EPOLLERR | select.EPOLLHUP
# Events taken per dispatch; more stay ready and wake the loop again at once.
_MAX_EVENTS = 256


class Poller:
    """Readiness callbacks for many fds through one epoll set registered with `loop`."""

    __slots__ = ("_epoll", "_loop", "_masks", "_readers", "_writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        # The event mask each fd is registered with (absent: not in the set).
        self._masks: dict[int, int] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    # The four calls below are the data path's hottest: each is one dict change and at most one
    # epoll_ctl, written out rather than shared through a helper call.

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._readers[fd] = callback
        old = self._masks.get(fd, 0)
        if not old & _IN:
            self._set_mask(fd, old, old | _IN)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        old = self._masks[fd]
        self._set_mask(fd, old, old & ~_IN)
        return True

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        self._writers[fd] = callback
        old = self._masks.get(fd, 0)
        if not old & _OUT:
            self._set_mask(fd, old, old | _OUT)

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        old = self._masks[fd]
        self._set_mask(fd, old, old & ~_OUT)
        return True

    def _set_mask(self, fd: int, old: int, mask: int) -> None:
        # The kernel drops a closed fd from the set by itself: should an fd ever be closed
        # before its removal here and its number be reused, the set and `_masks` disagree, and
        # the call that fails is replaced by the one that fits instead of breaking a connection.
        epoll = self._epoll
        if not mask:
            del self._masks[fd]
            try:
                epoll.unregister(fd)
            except FileNotFoundError:
                pass
            return
        try:
            if old:
                epoll.modify(fd, mask)
            else:
                epoll.register(fd, mask)
        except FileNotFoundError:
            epoll.register(fd, mask)
        except FileExistsError:
            epoll.modify(fd, mask)
        self._masks[fd] = mask

    def _dispatch(self) -> None:
        readers, writers = self._readers, self._writers
        for fd, events in self._epoll.poll(0, _MAX_EVENTS):
            # A callback earlier in this batch may have removed (and closed) this fd, or a new
            # socket may hold its number now: look the callbacks up when they are due. Both
            # callbacks tolerate a spurious wake-up (splice says EAGAIN; a connect check sees
            # no error and no peer yet).
            if events & (_IN | _TROUBLE):
                reader = readers.get(fd)
                if reader is not None:
                    reader()
            if events & (_OUT | _TROUBLE):
                writer = writers.get(fd)
                if writer is not None:
                    writer()

    def close(self) -> None:
        """Stop watching everything (the fds themselves are their owners' to close)."""
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._readers.clear()
        self._writers.clear()
        self._masks.clear()
