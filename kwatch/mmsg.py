"""recvmmsg(2) / sendmmsg(2) through ctypes, shared by dnsd's UDP server and kpx's UDP relay.

Python's socket module moves one datagram per system call and builds an address tuple for each;
these helpers move up to a batch per call into buffers pinned once (their addresses never
change), and hand out each datagram's data as a memoryview and its sender as the raw sockaddr
bytes (hashable, so a caller can key sessions on them without ever building a tuple).

Layout (LP64 Linux: x86_64, aarch64): struct mmsghdr = msghdr (56 bytes: name 0, namelen 8,
iov 16, iovlen 24, control 32, controllen 40, flags 48) + msg_len (56) + padding = 64 bytes;
struct iovec = 16 bytes.
"""

from __future__ import annotations

import array
import ctypes
import errno
import socket
import struct
import sys
from typing import Any

NAME_SIZE = 128  # sizeof(struct sockaddr_storage)
MMSG_SIZE = 64  # sizeof(struct mmsghdr)
MSG_WAITFORONE = 0x10000
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
MSG_CTRUNC = 0x8
# In 4-byte units within one mmsghdr: msg_namelen, msg_controllen, msg_flags, msg_len.
NAMELEN_I, CONTROLLEN_I, FLAGS_I, LEN_I = 2, 10, 12, 14
# In 8-byte units within one mmsghdr: msg_name, msg_iov, msg_iovlen, msg_control.
NAME_Q, IOV_Q, IOVLEN_Q, CONTROL_Q = 0, 2, 3, 4
# ICMP errors a UDP socket reports for an earlier send (the peer went away).
PEER_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)


def _libc_calls() -> tuple[Any, Any] | None:
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


CALLS = _libc_calls()


def available() -> bool:
    return CALLS is not None


def last_errno() -> int:
    return ctypes.get_errno()


class Pinned:
    """A zeroed bytearray whose address C code may keep (the ctypes view pins it)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self._view = (ctypes.c_char * size).from_buffer(self.data)
        self.address = ctypes.addressof(self._view)


def sockaddr_to_python(raw: bytes) -> Any:
    """A sockaddr_in / sockaddr_in6 as the address tuple socket.sendto takes."""
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6:
        flowinfo = struct.unpack_from("!I", raw, 4)[0]
        scope = int.from_bytes(raw[24:28], sys.byteorder)
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope)
    return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)


def python_to_sockaddr(address: tuple[Any, ...]) -> bytes:
    """The inverse of `sockaddr_to_python` for (host, port[, flowinfo, scope]) tuples."""
    host, port = str(address[0]), int(address[1])
    if ":" in host:
        flowinfo = int(address[2]) if len(address) > 2 else 0
        scope = int(address[3]) if len(address) > 3 else 0
        return (
            socket.AF_INET6.to_bytes(2, sys.byteorder)
            + struct.pack("!HI", port, flowinfo)
            + socket.inet_pton(socket.AF_INET6, host)
            + scope.to_bytes(4, sys.byteorder)
        )
    return (
        socket.AF_INET.to_bytes(2, sys.byteorder)
        + struct.pack("!H", port)
        + socket.inet_pton(socket.AF_INET, host)
        + bytes(8)
    )


class RecvBatch:
    """Receive up to `batch` datagrams of up to `size` bytes per call on any socket.

    One instance can serve every socket of a single-threaded event loop: each call overwrites
    the previous batch, so callers consume `data(i)` / `name(i)` before the next `recv`.
    `control` bytes per datagram receive ancillary data (IP_RECVORIGDSTADDR).
    """

    def __init__(self, batch: int, size: int, control: int = 0) -> None:
        if CALLS is None:
            raise OSError("recvmmsg/sendmmsg are not available here")
        self._recvmmsg = CALLS[0]
        self.batch = batch
        self.size = size
        self.control = control
        self._buf = Pinned(batch * size)
        self._names = Pinned(batch * NAME_SIZE)
        self._iov = Pinned(batch * 16)
        self._msgs = Pinned(batch * MMSG_SIZE)
        self._ctl = Pinned(max(1, batch * control))
        self.view = memoryview(self._buf.data)
        self.names = self._names.data
        self.controls = self._ctl.data
        self.names_view = memoryview(self.names)
        self.controls_view = memoryview(self.controls)
        self.ints = memoryview(self._msgs.data).cast("I")
        # Datagram i's bytes start at buffer_address + i * size (for senders that point at
        # them instead of copying: kpx/udp_forward.py).
        self.buffer_address = self._buf.address
        iov = memoryview(self._iov.data).cast("Q")
        msgs = memoryview(self._msgs.data).cast("Q")
        for i in range(batch):
            iov[2 * i] = self._buf.address + i * size
            iov[2 * i + 1] = size
            msgs[8 * i + NAME_Q] = self._names.address + i * NAME_SIZE
            msgs[8 * i + IOV_Q] = self._iov.address + 16 * i
            msgs[8 * i + IOVLEN_Q] = 1
        # The kernel overwrites msg_namelen and msg_controllen of each entry it fills: those
        # are reset before the next call, and only those (one strided copy, no Python loop).
        self._name_sizes = memoryview(array.array("I", [NAME_SIZE] * batch))
        self._control_sizes = memoryview(array.array("I", [control] * batch))
        self.ints[NAMELEN_I::16] = self._name_sizes
        if control:
            for i in range(batch):
                msgs[8 * i + CONTROL_Q] = self._ctl.address + i * control
            self.ints[CONTROLLEN_I::16] = self._control_sizes  # low half of a size_t (LE)
        self._filled = 0

    def recv(self, fd: int) -> int:
        """Datagrams received (0: none waiting); -errno on failure. Never blocks."""
        # The entries the last call filled, and the next one (a failure part-way may have
        # touched it).
        used = min(self._filled + 1, self.batch)
        ints = self.ints
        ints[NAMELEN_I : 16 * used : 16] = self._name_sizes[:used]
        if self.control:
            ints[CONTROLLEN_I : 16 * used : 16] = self._control_sizes[:used]
        n: int = self._recvmmsg(fd, self._msgs.address, self.batch, MSG_DONTWAIT, None)
        if n < 0:
            self._filled = 0
            code = ctypes.get_errno()
            return 0 if code in (errno.EAGAIN, errno.EINTR) else -code
        self._filled = n
        return n

    def length(self, i: int) -> int:
        return int(self.ints[16 * i + LEN_I])

    def truncated(self, i: int) -> bool:
        return bool(self.ints[16 * i + FLAGS_I] & MSG_TRUNC)

    def data(self, i: int) -> memoryview:
        start = i * self.size
        return self.view[start : start + self.ints[16 * i + LEN_I]]

    def name(self, i: int) -> bytes:
        length = self.ints[16 * i + NAMELEN_I]
        start = i * NAME_SIZE
        return bytes(self.names[start : start + length])

    def control_data(self, i: int) -> bytes:
        length = self.ints[16 * i + CONTROLLEN_I]
        start = i * self.control
        return bytes(self.controls[start : start + length])


class SendBatch:
    """Queue up to `batch` datagrams (pointing at caller-owned pinned memory or copied into own
    buffers) and send them in one sendmmsg per socket."""

    def __init__(self, batch: int, size: int) -> None:
        if CALLS is None:
            raise OSError("recvmmsg/sendmmsg are not available here")
        self._sendmmsg = CALLS[1]
        self.batch = batch
        self.size = size
        self._buf = Pinned(batch * size)
        self._names = Pinned(batch * NAME_SIZE)
        self._iov = Pinned(batch * 16)
        self._msgs = Pinned(batch * MMSG_SIZE)
        self._view = memoryview(self._buf.data)
        self._iovq = memoryview(self._iov.data).cast("Q")
        self._ints = memoryview(self._msgs.data).cast("I")
        msgs = memoryview(self._msgs.data).cast("Q")
        for i in range(batch):
            msgs[8 * i + NAME_Q] = self._names.address + i * NAME_SIZE
            msgs[8 * i + IOV_Q] = self._iov.address + 16 * i
            msgs[8 * i + IOVLEN_Q] = 1
            self._iovq[2 * i] = self._buf.address + i * size
        self.count = 0

    def add(self, data: memoryview | bytes, name: bytes) -> bool:
        """Queue one datagram for `name` (raw sockaddr); False when the batch is full."""
        i = self.count
        if i >= self.batch:
            return False
        size = len(data)
        start = i * self.size
        self._view[start : start + size] = data
        self._iovq[2 * i + 1] = size
        nstart = i * NAME_SIZE
        self._names.data[nstart : nstart + len(name)] = name
        self._ints[16 * i + NAMELEN_I] = len(name)
        self.count = i + 1
        return True

    def flush(self, fd: int) -> tuple[int, int]:
        """Send what is queued; returns (sent, failed). Datagrams the socket cannot take now
        (EAGAIN) are dropped, as a full kernel queue would drop them."""
        count, sent, failed = self.count, 0, 0
        self.count = 0
        for _ in range(2 * count + 2):  # bounded: each round sends or skips one at least
            if sent + failed >= count:
                break
            address = self._msgs.address + (sent + failed) * MMSG_SIZE
            k = self._sendmmsg(fd, address, count - sent - failed, MSG_DONTWAIT)
            if k > 0:
                sent += k
            elif ctypes.get_errno() != errno.EINTR:
                failed += 1
        return sent, failed
