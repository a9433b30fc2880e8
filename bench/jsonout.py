"""Benchmark results as JSON files (`--json PATH` of bench.dns, bench.proxy and bench.sync), read
back by bench/report_render.py. NaN and infinities become null: strict JSON, readable anywhere."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any


def clean(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, recursively (tuples become lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when the file is missing, unreadable or not an object."""
    with contextlib.suppress(OSError, ValueError):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict):
            return doc
    return {}
