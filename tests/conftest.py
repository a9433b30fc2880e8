"""Fixtures shared by every test package: the fake API server and a kubeconfig for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apiserver import FakeApiServer


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    """A running HTTPS fake kube-apiserver on 127.0.0.1 (fresh per test)."""
    with FakeApiServer(bookmark_interval=0.5) as server:
        server.start()
        yield server


@pytest.fixture
def kubeconfig(api_server: FakeApiServer, tmp_path: Path) -> Path:
    return api_server.write_kubeconfig(tmp_path / "kubeconfig.yaml")
