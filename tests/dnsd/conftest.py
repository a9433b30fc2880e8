"""Fixtures: dnsd running in-process on 127.0.0.1 (ephemeral ports), fed from a manifest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dnsd.main import Daemon
from dnsd.settings import DnsdSettings
from kwatch.settings import load_settings
from tests.dnsd.helpers import FakeUpstream, write_manifest


@dataclass
class Running:
    daemon: Daemon
    manifest: Path
    upstream: FakeUpstream

    @property
    def port(self) -> int:
        return self.daemon.dns_port

    @property
    def http_port(self) -> int:
        assert self.daemon.health is not None
        return self.daemon.health.port

    async def replace(self, objects: list[dict[str, Any]], within: float = 5.0) -> None:
        """Rewrite the manifest and wait until the zone applied it."""
        batches = self.daemon.controller.batches
        write_manifest(self.manifest, objects)
        # The manifest source polls mtimes every second; reload now instead of waiting.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.daemon.controller.batches == batches:
            assert loop.time() < deadline, "manifest change was not applied"
            await asyncio.sleep(0.02)


StartDnsd = Callable[..., Awaitable[Running]]

UPSTREAM_DATA = {
    ("www.example.org", "A"): ["192.0.2.80"],
    ("www.example.org", "AAAA"): ["2001:db8::80"],
    ("db.example.org", "A"): ["192.0.2.5"],
    # More than 512 bytes of answer: truncated for a client without EDNS.
    ("many.example.org", "A"): [f"192.0.2.{i}" for i in range(1, 61)],
}


def make_settings(manifest: Path, upstream_port: int, *extra: str) -> DnsdSettings:
    argv = [
        "--manifests",
        str(manifest),
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--forward-timeout",
        "0.5",
        *extra,
    ]
    return load_settings(DnsdSettings, argv, env_prefix="DNSD", prog="dnsd", environ={})


@pytest.fixture
async def start_dnsd(tmp_path: Path) -> AsyncIterator[StartDnsd]:
    running: list[Running] = []

    async def start(
        objects: list[dict[str, Any]] | None, *extra: str, wait: bool = True
    ) -> Running:
        """Start dnsd on `objects`; None = the manifest does not exist yet (never synced)."""
        manifest = tmp_path / f"cluster{len(running)}.yaml"
        if objects is not None:
            write_manifest(manifest, objects)
        upstream = await FakeUpstream.start(UPSTREAM_DATA)
        daemon = Daemon(make_settings(manifest, upstream.port, *extra))
        await daemon.start()
        run = Running(daemon, manifest, upstream)
        running.append(run)
        if wait:
            for _ in range(250):
                if daemon.readiness()[0]:
                    break
                await asyncio.sleep(0.02)
            assert daemon.readiness()[0], daemon.readiness()
        return run

    yield start
    for run in running:
        await run.daemon.stop()
        run.upstream.close()
