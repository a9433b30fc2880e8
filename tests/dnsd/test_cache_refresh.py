"""Prefetch and serve-stale (CoreDNS cache `prefetch`, RFC 8767) against real upstream servers
on 127.0.0.x that the tests start and stop; the cache's clock is the only thing faked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import dns.rcode
import pytest

from dnsd.cache import STALE_TTL, DnsCache
from dnsd.forward import Forwarder
from dnsd.main import Daemon
from tests.dnsd.conftest import make_settings
from tests.dnsd.test_forward import (
    Clock,
    FakeUpstream,
    Handler,
    addresses,
    answering,
    metric,
    parse,
    query,
)


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    """Real DNS servers on 127.0.0.x (UDP and TCP), closed at the end (or by the test)."""
    started: list[FakeUpstream] = []

    async def start(handler: Handler, host: str = "127.0.0.2") -> FakeUpstream:
        fake = await FakeUpstream(host, handler).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.close()


@pytest.fixture
async def forwarder() -> AsyncIterator[Callable[..., Forwarder]]:
    made: list[Forwarder] = []

    def make(*upstreams: FakeUpstream, **kwargs: Any) -> Forwarder:
        kwargs.setdefault("timeout", 0.25)
        fwd = Forwarder([u.address for u in upstreams], policy="sequential", **kwargs)
        made.append(fwd)
        return fwd

    yield make
    for fwd in made:
        await fwd.close()


async def wait_for(condition, within: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- prefetch ----------------------------------------------------------------------------------


async def test_a_popular_entry_is_refreshed_before_it_expires(upstream, forwarder):
    clock = Clock()
    good = await upstream(answering("192.0.2.70", ttl=10))
    fwd = forwarder(good, cache=DnsCache(clock=clock, prefetch=2))
    before = metric("dnsd_cache_prefetch_total")
    await fwd.forward(query())  # miss: asked upstream
    clock.now += 1
    await fwd.forward(query())  # hit 1
    clock.now += 8.5  # 0.5 s left: within 10 % of 10 s (ceil: the last second)
    answer = await fwd.forward(query())  # hit 2: popular and about to expire
    assert parse(answer).answer[0].ttl == 1  # the client still gets the cached answer
    await fwd.forward(query())  # asked again while the refresh is under way: no second one
    await wait_for(lambda: len(good.seen) == 2)
    assert metric("dnsd_cache_prefetch_total") == before + 1
    clock.now += 3  # past the old entry's expiry: the refreshed one answers
    answer = await fwd.forward(query())
    assert addresses(answer) == ["192.0.2.70"]
    assert parse(answer).answer[0].ttl == 7
    assert len(good.seen) == 2


async def test_an_entry_asked_less_than_amount_times_is_not_prefetched(upstream, forwarder):
    clock = Clock()
    good = await upstream(answering(ttl=10))
    fwd = forwarder(good, cache=DnsCache(clock=clock, prefetch=3))
    await fwd.forward(query())
    clock.now += 1
    await fwd.forward(query())
    clock.now += 8.5
    await fwd.forward(query())  # only the second hit
    await asyncio.sleep(0.1)
    assert len(good.seen) == 1


async def test_hits_with_a_gap_of_duration_do_not_make_an_entry_popular(upstream, forwarder):
    clock = Clock()
    good = await upstream(answering(ttl=300))
    fwd = forwarder(good, cache=DnsCache(clock=clock, prefetch=2, prefetch_duration=60))
    await fwd.forward(query())
    clock.now += 100
    await fwd.forward(query())  # hit 1
    clock.now += 175  # 25 s left, within 10 % of 300 s, but 175 s since the last hit
    await fwd.forward(query())  # the count starts again: 1
    await asyncio.sleep(0.1)
    assert len(good.seen) == 1


async def test_a_failed_prefetch_keeps_the_entry(upstream, forwarder):
    clock = Clock()
    good = await upstream(answering("192.0.2.71", ttl=10))
    fwd = forwarder(good, cache=DnsCache(clock=clock, prefetch=1))
    await fwd.forward(query())
    good.silent = True  # from now on the upstream never answers
    clock.now += 9.5
    await fwd.forward(query())  # triggers a prefetch that times out
    await wait_for(lambda: not fwd._prefetching, within=3)
    answer = await fwd.forward(query())
    assert addresses(answer) == ["192.0.2.71"]  # still the cached answer, not SERVFAIL


# --- serve stale -------------------------------------------------------------------------------


async def test_expired_answer_is_served_stale_when_every_upstream_fails(upstream, forwarder):
    clock = Clock()
    first = await upstream(answering("192.0.2.80", ttl=10), "127.0.0.3")
    fwd = forwarder(first, cache=DnsCache(clock=clock, stale_for=3600), timeout=0.2)
    assert addresses(await fwd.forward(query())) == ["192.0.2.80"]
    await first.close()  # the only upstream goes away
    before = metric("dnsd_cache_served_stale_total")
    clock.now += 100
    answer = parse(await fwd.forward(query(qid=7)))
    assert answer.rcode() == dns.rcode.NOERROR and answer.id == 7
    assert [rd.address for rd in answer.answer[0]] == ["192.0.2.80"]
    assert answer.answer[0].ttl == STALE_TTL  # RFC 8767 section 4
    assert metric("dnsd_cache_served_stale_total") == before + 1


async def test_after_a_failed_refresh_stale_answers_come_at_once(upstream, forwarder):
    clock = Clock()
    flaky = await upstream(answering("192.0.2.81", ttl=10))
    fwd = forwarder(flaky, cache=DnsCache(clock=clock, stale_for=3600), timeout=0.2)
    await fwd.forward(query())
    flaky.silent = True
    clock.now += 20
    assert addresses(await fwd.forward(query())) == ["192.0.2.81"]  # after the timeout
    asked = len(flaky.seen)
    clock.now += STALE_TTL - 1  # RFC 8767 section 5: no new attempt for a while
    assert addresses(await fwd.forward(query())) == ["192.0.2.81"]
    assert len(flaky.seen) == asked
    clock.now += 2  # the recheck timer ran out: the upstream is asked again
    flaky.silent = False
    answer = await fwd.forward(query())
    assert len(flaky.seen) == asked + 1
    assert parse(answer).answer[0].ttl == 10  # fresh again


async def test_stale_answers_end_after_the_serve_stale_duration(upstream, forwarder):
    clock = Clock()
    gone = await upstream(answering(ttl=10), "127.0.0.4")
    fwd = forwarder(gone, cache=DnsCache(clock=clock, stale_for=60), timeout=0.2)
    await fwd.forward(query())
    await gone.close()
    clock.now += 10 + 61
    assert parse(await fwd.forward(query())).rcode() == dns.rcode.SERVFAIL


async def test_without_serve_stale_an_expired_answer_is_servfail(upstream, forwarder):
    clock = Clock()
    gone = await upstream(answering(ttl=10), "127.0.0.5")
    fwd = forwarder(gone, cache=DnsCache(clock=clock), timeout=0.2)
    await fwd.forward(query())
    await gone.close()
    clock.now += 11
    assert parse(await fwd.forward(query())).rcode() == dns.rcode.SERVFAIL


async def test_a_working_upstream_is_preferred_to_a_stale_answer(upstream, forwarder):
    clock = Clock()
    good = await upstream(answering("192.0.2.82", ttl=10))
    fwd = forwarder(good, cache=DnsCache(clock=clock, stale_for=3600))
    await fwd.forward(query())
    clock.now += 20
    answer = parse(await fwd.forward(query()))
    assert answer.answer[0].ttl == 10
    assert len(good.seen) == 2


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (0, 60.0, 10, 0.0)),
        (
            [
                *("--prefetch", "10", "--prefetch-duration", "30"),
                *("--prefetch-percentage", "20", "--serve-stale", "3600"),
            ],
            (10, 30.0, 20, 3600.0),
        ),
    ],
)
def test_the_options_reach_the_cache(tmp_path, flags, expected):
    daemon = Daemon(make_settings(tmp_path / "none.yaml", 53, *flags))
    cache = daemon.forwarder.cache
    assert cache is not None
    got = (cache.prefetch, cache.prefetch_duration, cache.prefetch_percentage, cache.stale_for)
    assert got == expected
