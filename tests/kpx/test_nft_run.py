"""The nft writer's process handling: errors, timeouts, one transaction at a time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kpx.nft import NftError, NftWriter


def writer_running(shell: str, timeout: float = 5.0) -> NftWriter:
    """A writer whose `nft` is `sh -c shell` (the `-f -` arguments land in $0 and $1)."""
    return NftWriter(10262, command=["sh", "-c", shell], timeout=timeout)


async def test_a_rejected_transaction_raises_with_nfts_stderr():
    writer = writer_running("cat >/dev/null; echo 'Error:  no such   set' >&2; exit 1")
    with pytest.raises(NftError, match=r"^Error: no such set$"):
        await writer.run("add element inet kpx svc4 { 10.0.0.1 . 80 }\n")


async def test_the_script_reaches_nft_on_its_stdin(tmp_path: Path):
    out = tmp_path / "script"
    await writer_running(f"cat > {out}").run("add table inet kpx\n")
    assert out.read_text() == "add table inet kpx\n"


async def test_an_nft_that_hangs_is_killed_after_the_timeout():
    writer = writer_running("sleep 30", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(NftError, match=r"did not finish within 0\.3s"):
        await writer.run("")
    assert time.monotonic() - started < 5


async def test_a_cancelled_transaction_ends_before_the_next_one_starts(tmp_path: Path):
    log = tmp_path / "log"
    writer = writer_running(f"echo start >> {log}; sleep 0.4; echo end >> {log}")
    first = asyncio.create_task(writer.run(""))
    await asyncio.sleep(0.1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await writer.run("")  # waits for the abandoned one: two nft never interleave
    assert log.read_text().split() == ["start", "end", "start", "end"]


async def test_the_event_loop_runs_while_nft_does():
    writer = writer_running("sleep 0.3")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await writer.run("")
    ticker.cancel()
    assert ticks >= 10
