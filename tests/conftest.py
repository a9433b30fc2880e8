"""Fixtures shared by every test package: the fake API server and a kubeconfig for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kwatch.models import keep_reference_names
from tests.apiserver import FakeApiServer


@pytest.fixture(autouse=True)
def _reference_names_kept() -> Iterator[None]:
    """Every test starts with kwatch's default (endpoint targetRef names kept): a daemon
    started in-process sets it for the whole process (kwatch.models.keep_reference_names)."""
    keep_reference_names(True)
    yield
    keep_reference_names(True)


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    """A running HTTPS fake kube-apiserver on 127.0.0.1 (fresh per test)."""
    with FakeApiServer(bookmark_interval=0.5) as server:
        server.start()
        yield server


@pytest.fixture
def kubeconfig(api_server: FakeApiServer, tmp_path: Path) -> Path:
    return api_server.write_kubeconfig(tmp_path / "kubeconfig.yaml")
