"""Read objects for FakeApiServer.load from YAML (multi-document) or JSON files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml

# The libyaml loader is ~10x faster on big manifests; PyYAML may be built without it.
_YamlLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _flatten(doc: Any) -> Iterator[dict[str, Any]]:
    """Objects from a document: a list, a `kind: List` / `*List`, or a single object."""
    if doc is None:
        return
    if isinstance(doc, list):
        for item in doc:
            yield from _flatten(item)
    elif isinstance(doc, dict) and isinstance(doc.get("items"), list):
        yield from _flatten(doc["items"])
    elif isinstance(doc, dict):
        yield doc
    else:
        raise ValueError(f"not a Kubernetes object: {doc!r:.80}")


def read_objects(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    if path.suffix == ".json":
        return list(_flatten(orjson.loads(data)))
    return [obj for doc in yaml.load_all(data, Loader=_YamlLoader) for obj in _flatten(doc)]
