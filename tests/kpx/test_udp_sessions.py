"""The UDP session table: pure bookkeeping (expiry, the bound, eviction of the oldest idle)."""

from __future__ import annotations

import sys

import pytest

from kpx.backends import Backend
from kpx.udp_sessions import DEFAULT_IDLE_TIMEOUT, Session, SessionTable

B = Backend("10.1.0.1", 53)


def session(n: int, now: float, frontend: tuple[str, int] = ("10.96.0.10", 53)) -> Session:
    name = n.to_bytes(4, "big")
    return Session(name, name, f"10.0.0.{n}", frontend, B, None, 0, now)


def test_default_idle_timeout_is_the_kernels_udp_conntrack_timeout():
    assert DEFAULT_IDLE_TIMEOUT == 30.0


def test_sessions_idle_for_the_timeout_expire_and_active_ones_stay():
    table = SessionTable(idle_timeout=30, max_sessions=10)
    old, fresh = session(1, now=0.0), session(2, now=0.0)
    table.add(old)
    table.add(fresh)
    fresh.last = 20.0  # a datagram either way refreshes it
    assert table.expire(29.9) == []
    assert table.expire(30.0) == [old]
    assert table.get(old.key) is None and table.get(fresh.key) is fresh
    assert table.expire(50.0) == [fresh] and len(table) == 0


def test_a_full_table_evicts_its_oldest_idle_sessions_first():
    table = SessionTable(idle_timeout=30, max_sessions=32)
    for n in range(32):
        table.add(session(n, now=float(100 - n)))  # higher n: idle for longer
    evicted = table.make_room()
    assert [s.client_ip for s in evicted] == ["10.0.0.31", "10.0.0.30"]  # 32 // 16
    assert len(table) == 30
    assert table.make_room() == []  # room now


def test_remove_only_forgets_the_session_it_was_given():
    table = SessionTable()
    first = session(1, 0.0)
    table.add(first)
    again = session(1, 1.0)  # same key, a newer session
    table.add(again)
    assert not table.remove(first)
    assert table.get(again.key) is again
    assert table.remove(again) and not table.remove(again)


def test_sessions_of_one_frontend():
    table = SessionTable()
    a, b = session(1, 0.0), session(2, 0.0, ("10.96.0.11", 53))
    table.add(a)
    table.add(b)
    assert table.of_frontend(("10.96.0.11", 53)) == [b]


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        SessionTable(idle_timeout=0)
    with pytest.raises(ValueError):
        SessionTable(max_sessions=0)


def test_per_session_state_is_compact():
    s = session(1, 0.0)
    assert not hasattr(s, "__dict__")
    # The Python object alone (its socket and the kernel's are measured by bench/udp.py).
    assert sys.getsizeof(s) <= 140
