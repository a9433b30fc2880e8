"""Parsing list pages keeps no strings of the objects alive once they are gone: pydantic's
process-wide string cache (16,384 strings) takes keys only, not the resourceVersions and
addresses that change with every relist (bench/soak.py counted them as RSS growth)."""

from __future__ import annotations

from tests.kwatch.fresh import fresh_python

# A fresh process: the cache is the process's, and earlier tests may have filled it.
SCRIPT = """
import gc, json, tracemalloc
from kwatch.resources import SERVICES

def page(round):
    items = [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": f"svc{i}", "namespace": "default",
                      "resourceVersion": str(round * 10_000 + i)},
         "spec": {"clusterIP": f"10.{round}.{i // 250}.{i % 250 + 1}",
                  "ports": [{"name": "http", "port": 80}]}}
        for i in range(1000)
    ]
    return json.dumps({"metadata": {"resourceVersion": str(round)}, "items": items}).encode()

pages = [page(r) for r in range(1, 21)]  # 40,000 values never seen again
# Kept: the names (interned) stay the same objects; the keys are cached once.
kept = SERVICES.parse_list(pages[0])
gc.collect()
tracemalloc.start()
for body in pages[1:]:
    objects, _, _ = SERVICES.parse_list(body)
    assert len(objects) == 1000
    del objects
gc.collect()
print(tracemalloc.get_traced_memory()[0])
"""


def test_relisting_new_values_keeps_none_of_them() -> None:
    out = fresh_python(SCRIPT, timeout=120)
    # With values cached: about 16,000 strings, 0.9 MB.
    assert int(out) < 100_000
