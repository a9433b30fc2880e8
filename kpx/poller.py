"""The data path's own epoll set, watched by the event loop as one fd.

Relays and connects watch their sockets here rather than with the loop's `add_reader` /
`add_writer`: uvloop makes a libuv poll handle per fd (an epoll_ctl ADD and DEL to check the
fd, an ioctl, then the real ADD) and drops it when the fd has no reader or writer left (three
more epoll_ctl), and re-arms it with a DEL and an ADD on every change of interest. For one
proxied request that was 16 of kpx's 40 syscalls (bench/conncost.py); here every change of
interest is one epoll_ctl. The loop watches the set's fd for readability and `_dispatch` runs
the callbacks of the sockets that are ready, with the loop's semantics: level-triggered, and
an error or hang-up wakes both the reader and the writer.

The interface is the loop's (`add_reader`, `remove_reader`, `add_writer`, `remove_writer`),
plus two calls that save an epoll_ctl each per proxied connection:
- `writer_to_reader`: a connected backend socket goes from "connect done?" to "data?" in one
  change of interest instead of two;
- `forget`: the owner is about to close the fd, and closing takes it out of the epoll set by
  itself, so the set is not told (a DEL per socket). Only once the last reference to the
  socket's file is gone, though: a child forked at that moment holds one until it execs
  (CLOEXEC), and meanwhile the closed socket's events still arrive under its fd number, which
  a new socket may hold. Every callback therefore checks what it is told (splice says EAGAIN,
  a connect asks the socket for its peer).
Every fd must be removed or forgotten before it is closed.

A callback may close an fd and make a new one with the same number while events of the same
batch are still to be dispatched: the events of an fd removed or forgotten during the batch
are dropped (they were the old socket's), and the new socket's arrive at the next wake-up.
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

    __slots__ = ("_epoll", "_gone", "_loop", "_masks", "_readers", "_writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], object]] = {}
        self._writers: dict[int, Callable[[], object]] = {}
        # The event mask each fd is registered with (absent: not in the set).
        self._masks: dict[int, int] = {}
        # Fds removed or forgotten since the current (or last) batch was polled.
        self._gone: set[int] = set()
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    # The four calls below are the data path's hottest: each is one dict change and at most one
    # epoll_ctl, written out rather than shared through a helper call.

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self._readers[fd] = callback
        masks = self._masks
        old = masks.get(fd, 0)
        if not old:  # a new socket's registration, the common case: without `_set_mask`
            try:
                self._epoll.register(fd, _IN)
            except FileExistsError:
                self._epoll.modify(fd, _IN)
            masks[fd] = _IN
        elif not old & _IN:
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

    def writer_to_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Stop watching `fd` for writing and watch it for reading, in one epoll_ctl."""
        self._writers.pop(fd, None)
        self._readers[fd] = callback
        old = self._masks.get(fd, 0)
        if old != _IN:
            self._set_mask(fd, old, _IN)

    def forget(self, fd: int) -> None:
        """Drop `fd`'s callbacks without telling the epoll set: the caller closes it next."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        if self._masks.pop(fd, 0):
            self._gone.add(fd)

    def _set_mask(self, fd: int, old: int, mask: int) -> None:
        # The kernel drops a closed fd from the set by itself: should an fd ever be closed
        # before its removal here and its number be reused, the set and `_masks` disagree, and
        # the call that fails is replaced by the one that fits instead of breaking a connection.
        epoll = self._epoll
        if not mask:
            del self._masks[fd]
            self._gone.add(fd)
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
        readers, writers, gone = self._readers, self._writers, self._gone
        gone.clear()
        for fd, events in self._epoll.poll(0, _MAX_EVENTS):
            # A callback earlier in this batch may have removed (and closed) this fd, and a new
            # socket may hold its number now: these events were the old one's.
            if fd in gone:
                continue
            if events & (_IN | _TROUBLE):
                reader = readers.get(fd)
                if reader is not None:
                    reader()
            if events & (_OUT | _TROUBLE):
                writer = writers.get(fd)
                if writer is not None and fd not in gone:
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
