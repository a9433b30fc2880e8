"""kwatch.runtime.steady_heap pins glibc's mmap threshold (the daemons' heap under churn)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from tests.kwatch.fresh import fresh_python

# In a child process: mallopt changes the allocator of the whole process it runs in.
SCRIPT = """
import ctypes
from kwatch.runtime import steady_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_by_block(size):
    libc.malloc_trim(0)  # no free room at the heap's top: a big block needs new memory
    before = libc.mallinfo2().hblkhd
    block = bytearray(size)
    return libc.mallinfo2().hblkhd - before

big = bytearray(4 << 20)  # mmapped, then freed: glibc raises its threshold to 4 MiB
del big
print(mapped_by_block(1 << 20), steady_heap(), mapped_by_block(1 << 20), mapped_by_block(64 << 10))
"""


def has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not has_mallinfo2(), reason="glibc >= 2.33 only"
)
def test_a_freed_big_block_no_longer_moves_big_blocks_into_the_heap() -> None:
    out = fresh_python(SCRIPT, timeout=60).split()
    default_mib, taken, steady_mib, steady_64k = out
    # glibc's own behaviour: after the 4 MiB block, a 1 MiB one comes from the heap.
    assert int(default_mib) == 0
    assert taken == "True"
    # Pinned at 128 KiB: a 1 MiB block gets its own mapping again (returned when freed)
    # instead of growing the heap; 64 KiB ones (a forwarded query's 65535-byte receive
    # buffer) stay in the heap.
    assert int(steady_mib) >= 1 << 20
    assert int(steady_64k) == 0
