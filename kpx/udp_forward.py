"""Sending received datagrams on without copying them: the send half of kpx's UDP hot path.

A run is some datagrams of one RecvBatch (kwatch/mmsg.py) bound for one destination: a
session's socket, connected to its endpoint, or one client's address through the socket that
client sent to. The datagrams still sit in the batch's pinned buffers; the iovecs point there.

- UDP GSO (UDP_SEGMENT, Linux 4.18) when every datagram of the run but the last has the same
  length and the last is no longer: one sendmsg, and the stack routes, filters (nftables) and
  checksums the run once; the device, or the receiving stack, cuts it back into the same
  datagrams (the segment size is the datagram size, so boundaries are kept).
- Otherwise sendmmsg, one entry per datagram, pointing at the same buffers.
GSO refused falls back to sendmmsg: EIO (the device has no checksum offload) turns GSO off for
this sender; EINVAL or EMSGSIZE (a segment over the route's MTU, a run over 64 KiB) for that
run, and the socket gets no GSO run with segments that large again.
"""

from __future__ import annotations

import array
import ctypes
import errno
from collections.abc import Sequence
from typing import Any

from kwatch.mmsg import (
    CALLS,
    LEN_I,
    MMSG_SIZE,
    MSG_DONTWAIT,
    NAME_SIZE,
    NAMELEN_I,
    Pinned,
    RecvBatch,
)

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h
MAX_GSO_BYTES = 65000  # a GSO run is one UDP datagram to the stack: under 64 KiB in all
MAX_GSO_SEGMENTS = 64  # UDP_MAX_SEGMENTS (64 before Linux 5.6, 128 since)
MSGHDR_SIZE = 56  # struct msghdr on LP64: name, namelen, iov, iovlen, control, controllen, flags
CMSG_SPACE_U16 = 24  # CMSG_SPACE(sizeof(uint16_t)): a 16-byte cmsghdr and the size, aligned
_REFUSED_SOCKETS = 4096  # sockets remembered with their refused segment size


def _libc_sendmsg() -> Any:
    try:
        sendmsg = ctypes.CDLL(None, use_errno=True).sendmsg
    except (OSError, AttributeError):
        return None
    sendmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    sendmsg.restype = ctypes.c_ssize_t
    return sendmsg


class RunSender:
    """Sends runs of `rx`'s current datagrams. One per RecvBatch; the event loop's thread only.

    `send` returns how many datagrams left, in order; `error` is the errno that stopped the
    rest (0: none did) and `sent_bytes` their payload."""

    def __init__(self, rx: RecvBatch, gso: bool = True) -> None:
        sendmsg = _libc_sendmsg()
        if CALLS is None or sendmsg is None:
            raise OSError("sendmsg/sendmmsg are not available here")
        self._sendmsg = sendmsg
        self._sendmmsg = CALLS[1]
        self.gso = gso
        self.error = 0
        self.sent_bytes = 0
        self.gso_runs = 0  # runs sent as one GSO datagram
        batch = rx.batch
        self._rx_ints = rx.ints
        self._base, self._size = rx.buffer_address, rx.size
        self._iov = Pinned(batch * 16)
        self._iovq = memoryview(self._iov.data).cast("Q")
        self._name = Pinned(NAME_SIZE)
        self._name_view = memoryview(self._name.data)
        # sendmmsg: entry k sends iovec k, to the name buffer (namelen 0: the connected peer).
        self._msgs = Pinned(batch * MMSG_SIZE)
        self._msg_ints = memoryview(self._msgs.data).cast("I")
        msgs = memoryview(self._msgs.data).cast("Q")
        for k in range(batch):
            msgs[8 * k] = self._name.address
            msgs[8 * k + 2] = self._iov.address + 16 * k
            msgs[8 * k + 3] = 1
        self._namelens = {
            n: memoryview(array.array("I", [n] * batch)) for n in (0, 16, 28, NAME_SIZE)
        }
        # sendmsg with UDP_SEGMENT: one msghdr over all the iovecs.
        self._control = Pinned(CMSG_SPACE_U16)
        control = memoryview(self._control.data)
        control.cast("Q")[0] = 16 + 2  # cmsg_len = CMSG_LEN(2)
        control.cast("I")[2:4] = array.array("I", [SOL_UDP, UDP_SEGMENT])
        self._segment = control.cast("H")  # index 8: the segment size
        self._msghdr = Pinned(MSGHDR_SIZE)
        header = memoryview(self._msghdr.data).cast("Q")
        header[0] = self._name.address
        header[2] = self._iov.address
        header[4] = self._control.address
        header[5] = CMSG_SPACE_U16
        self._header = header
        self._header_ints = memoryview(self._msghdr.data).cast("I")
        # fd -> the smallest segment size its route refused (EINVAL / EMSGSIZE).
        self._refused: dict[int, int] = {}

    def send(self, fd: int, indices: Sequence[int], name: bytes = b"") -> int:
        """Send datagrams `indices` of the batch on `fd`, to `name` (a raw sockaddr) or, when
        empty, to the socket's connected peer. Never blocks."""
        ints, iovq = self._rx_ints, self._iovq
        base, size = self._base, self._size
        count = k = 0
        for i in indices:
            iovq[k] = base + i * size
            iovq[k + 1] = ints[16 * i + LEN_I]
            k += 2
        count = k // 2
        self.error = self.sent_bytes = 0
        if count == 0:
            return 0
        lengths = iovq[1:k:2].tolist()
        namelen = len(name)
        if namelen:
            self._name_view[:namelen] = name
        segment = lengths[0]
        if (
            count > 1
            and self.gso
            and 0 < segment < self._refused.get(fd, 65536)
            and count <= MAX_GSO_SEGMENTS
            and (same := lengths.count(segment)) >= count - 1
            and (same == count or lengths[-1] < segment)
        ):
            total = sum(lengths)
            if total <= MAX_GSO_BYTES:
                sent = self._send_gso(fd, count, namelen, segment, total)
                if sent >= 0:
                    return sent
        return self._send_each(fd, count, namelen, lengths)

    def _send_gso(self, fd: int, count: int, namelen: int, segment: int, total: int) -> int:
        """The run in one sendmsg; -1: refused as GSO, send it datagram by datagram."""
        self._header_ints[2] = namelen
        self._header[3] = count
        self._segment[8] = segment
        result: int = self._sendmsg(fd, self._msghdr.address, MSG_DONTWAIT)
        if result >= 0:
            self.sent_bytes = total
            self.gso_runs += 1
            return count
        code = ctypes.get_errno()
        if code == errno.EIO:  # no checksum offload on the way: never again
            self.gso = False
        elif code in (errno.EINVAL, errno.EMSGSIZE):
            if len(self._refused) >= _REFUSED_SOCKETS:
                self._refused.clear()
            self._refused[fd] = min(segment, self._refused.get(fd, 65536))
        else:
            self.error = code
            return 0
        return -1

    def _send_each(self, fd: int, count: int, namelen: int, lengths: list[int]) -> int:
        namelens = self._namelens.get(namelen)
        if namelens is None:
            namelens = self._namelens[namelen] = memoryview(
                array.array("I", [namelen] * len(self._namelens[0]))
            )
        self._msg_ints[NAMELEN_I : 16 * count : 16] = namelens[:count]
        sent = 0
        for _ in range(count + 2):  # bounded: EINTR retries, else a send or a stop
            result: int = self._sendmmsg(
                fd, self._msgs.address + sent * MMSG_SIZE, count - sent, MSG_DONTWAIT
            )
            if result > 0:
                sent += result
                if sent >= count:
                    break
                continue
            code = ctypes.get_errno()
            if code != errno.EINTR:
                self.error = code
                break
        self.sent_bytes = sum(lengths[:sent])
        return sent
