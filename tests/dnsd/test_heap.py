"""dnsd freezes its heap once the first zone is built (dnsd.main Daemon.settle_heap): that is
safe only while rebuilding the zone makes no cyclic garbage, which frozen objects would keep."""

from __future__ import annotations

import asyncio
import gc

from tests.dnsd.conftest import StartDnsd
from tests.dnsd.test_chaos import cluster as chaos_cluster
from tests.dnsd.test_handler import BASIC, Cluster, service


def test_rebuilding_the_zone_makes_no_cyclic_garbage() -> None:
    cluster = Cluster(BASIC)
    gc.collect()
    for i in range(30):
        extra = service(f"s{i}", ips=[f"10.96.1.{i + 1}"], ports=[{"name": "http", "port": 80}])
        cluster.apply([*BASIC, extra])
        assert cluster.ask(f"s{i}.default.svc.cluster.local").answer
    assert gc.collect() == 0


async def test_settle_heap_freezes_what_lives_once_the_zone_is_built(start_dnsd: StartDnsd) -> None:
    run = await start_dnsd(chaos_cluster())
    before = gc.get_freeze_count()
    try:
        await asyncio.wait_for(run.daemon.settle_heap(), 10)
        assert run.daemon.index.ready
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
