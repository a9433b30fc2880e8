"""Feed the stores from a YAML/JSON manifest file or folder instead of an API server.

Accepts what `kubectl apply -f` accepts for the kinds we watch: multi-document YAML, JSON, and
`List` objects. The path is polled for changes (mtime/size of every file); a file that fails to
read or parse keeps the whole last good state, because applying the other files alone would
silently delete the broken file's objects. An individual invalid object is skipped as the
reflector skips one (its last good version kept).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import structlog
import yaml
from prometheus_client import Counter
from pydantic import ValidationError

from kwatch import metrics
from kwatch.models import describe_error, object_key
from kwatch.resources import Resource
from kwatch.store import Store

log = structlog.get_logger("kwatch.manifest")

# libyaml's C loader when PyYAML was built with it (the PyPI wheels are), about 7x faster.
SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

RELOADS = Counter(
    "kwatch_manifest_reloads_total", "Manifest (re)loads by result (ok / error)", ["result"]
)

SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(Exception):
    """The manifest path could not be read or parsed as a whole."""


class ManifestSource:
    def __init__(
        self, path: Path, stores: dict[Resource, Store[Any]], poll_interval: float = 1.0
    ) -> None:
        self.path = path
        self.stores = stores
        # By kind among the stores given: a daemon may watch a kind through its own Resource
        # (a slimmer model of the same API objects, as dnsd's pod addresses).
        self._by_kind = {r.kind: r for r in stores}
        self.poll_interval = poll_interval
        self.settle_seconds = min(0.2, poll_interval / 2)
        self._signature: tuple[tuple[str, int, int], ...] | None = None

    async def run(self) -> None:
        """Load now, then reload whenever a file changes; never raises on bad input."""
        while True:
            # A folder walk and a stat per file: in a thread too, as the parse below.
            signature = await asyncio.to_thread(self._current_signature)
            if signature != self._signature:
                signature = await self._settled(signature)
                self._signature = signature
                # Reading and parsing (YAML, models) runs in a thread: a big manifest takes
                # seconds, and the event loop serves DNS and proxied connections meanwhile.
                # Only the store update, which calls the subscribers, runs on the loop.
                parsed = await asyncio.to_thread(self._read)
                if parsed is not None:
                    self._apply(parsed)
            await asyncio.sleep(self.poll_interval)

    async def _settled(self, signature: tuple[tuple[str, int, int], ...]) -> Any:
        """Wait until the files stop changing: an editor or `cp` writing in place leaves a
        truncated file for a moment, and a truncated manifest is often still valid YAML with
        fewer objects, which would briefly delete Services."""
        for _ in range(20):  # bounded: a file rewritten forever is loaded as it stands
            await asyncio.sleep(self.settle_seconds)
            again = await asyncio.to_thread(self._current_signature)
            if again == signature:
                break
            signature = again
        return signature

    def load(self) -> bool:
        """Read every file and replace the stores' contents; False if the manifest was rejected."""
        parsed = self._read()
        if parsed is None:
            return False
        self._apply(parsed)
        return True

    def _read(self) -> dict[Resource, dict[str, Any]] | None:
        """Every object of the manifest, parsed; None (logged) if the manifest is rejected."""
        try:
            documents = list(self._documents())
        except ManifestError as err:
            RELOADS.labels("error").inc()
            log.error("manifest_invalid", path=str(self.path), problem=str(err))
            return None
        per_resource: dict[Resource, dict[str, Any]] = {r: {} for r in self.stores}
        for doc in _flatten(documents):
            self._parse_into(doc, per_resource)
        return per_resource

    def _apply(self, per_resource: dict[Resource, dict[str, Any]]) -> None:
        for resource, objects in per_resource.items():
            store = self.stores[resource]
            store.replace(objects)
            metrics.OBJECTS.labels(resource.name).set(len(store))
            if not store.synced:
                store.mark_synced()
                metrics.SYNCED.labels(resource.name).set(1)
        RELOADS.labels("ok").inc()
        log.info(
            "manifest_loaded",
            path=str(self.path),
            **{r.name: len(objs) for r, objs in per_resource.items()},
        )

    def _parse_into(self, doc: dict[str, Any], out: dict[Resource, dict[str, Any]]) -> None:
        resource = self._by_kind.get(str(doc.get("kind", "")))
        if resource is None or resource not in out:
            return  # Deployments, ConfigMaps, ...: not ours to read
        if resource.namespaced:
            meta = doc.get("metadata")
            if isinstance(meta, dict) and not meta.get("namespace"):
                # kubectl apply puts namespace-less objects in "default"; so do we.
                doc = {**doc, "metadata": {**meta, "namespace": "default"}}
        key = object_key(doc)
        try:
            if key is None:
                raise ValueError("metadata.name missing")
            out[resource][key] = resource.parse(_detached(doc))
        except (ValidationError, ValueError) as err:
            problem = describe_error(err) if isinstance(err, ValidationError) else str(err)
            metrics.SKIPPED.labels(resource.name, "invalid").inc()
            log.warning("object_skipped", resource=resource.name, key=key or "?", problem=problem)
            previous = self.stores[resource].get(key) if key else None
            if previous is not None:
                out[resource][key] = previous  # type: ignore[index]

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(p for p in self.path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        return [self.path]

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        entries = []
        try:
            for file in self._files():
                st = file.stat()
                entries.append((str(file), st.st_mtime_ns, st.st_size))
        except OSError:
            return ()  # missing path: load() reports it
        return tuple(entries)

    def _documents(self) -> Iterator[Any]:
        if not self.path.exists():
            raise ManifestError(f"{self.path} does not exist")
        for file in self._files():
            try:
                if file.suffix == ".json":
                    # orjson: a 10,000-Service JSON manifest in well under a second, where
                    # PyYAML's pure-Python loader took about 50 s.
                    yield orjson.loads(file.read_bytes())
                    continue
                text = file.read_text()
                yield from (d for d in yaml.load_all(text, Loader=SafeLoader) if d is not None)
            except (OSError, UnicodeDecodeError, yaml.YAMLError, orjson.JSONDecodeError) as err:
                raise ManifestError(f"{file}: {_first_line(err)}") from err


def _flatten(documents: list[Any]) -> Iterator[dict[str, Any]]:
    """Yield objects, expanding `kind: List` (and `...List`) documents into their items."""
    for doc in documents:
        if not isinstance(doc, dict):
            log.warning("manifest_document_skipped", problem="document is not a mapping")
            continue
        if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            yield from _flatten(doc["items"])
        else:
            yield doc


def _detached(doc: dict[str, Any]) -> Any:
    """`doc` rebuilt from its JSON, sharing no object with the parsed file.

    The models keep strings of the objects they are parsed from. Parsed straight from a
    file's document tree, those strings pin the tree's memory arenas once it is freed (about
    40 MB more RSS at 10,000 Services / 100,000 endpoints); parsed from a fresh copy, they sit
    in new arenas and the whole tree goes back to the system, as the API path's pages do.
    A document JSON cannot hold (a YAML mapping with integer keys) is parsed as it is, for
    validation to report."""
    try:
        return orjson.loads(orjson.dumps(doc))
    except orjson.JSONEncodeError:
        return doc


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())
