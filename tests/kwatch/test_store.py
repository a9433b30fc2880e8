from hypothesis import given
from hypothesis import strategies as st

from kwatch.resources import ENDPOINTSLICES, SERVICES
from kwatch.store import EventType, Store, slice_service_key


def service(name, rv, ip="10.0.0.1"):
    return SERVICES.parse(
        {
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv)},
            "spec": {"clusterIP": ip},
        }
    )


def eps(name, svc_name):
    return ENDPOINTSLICES.parse(
        {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "labels": {"kubernetes.io/service-name": svc_name},
            },
            "addressType": "IPv4",
            "endpoints": [],
        }
    )


def test_events_are_delivered_in_order_with_old_objects():
    store = Store("services")
    seen = []
    store.subscribe(lambda e: seen.append((e.type, e.key, e.old is not None)))
    store.upsert("ns/a", service("a", 1))
    store.upsert("ns/a", service("a", 2))
    store.delete("ns/a")
    store.delete("ns/a")  # already gone: no event
    assert seen == [
        (EventType.ADDED, "ns/a", False),
        (EventType.MODIFIED, "ns/a", True),
        (EventType.DELETED, "ns/a", True),
    ]


def test_replace_emits_deletes_for_vanished_objects_and_skips_unchanged():
    store = Store("services")
    store.upsert("ns/a", service("a", 1))
    store.upsert("ns/b", service("b", 1))
    seen = []
    store.subscribe(lambda e: seen.append((e.type, e.key)))
    changed = store.replace({"ns/a": service("a", 1), "ns/c": service("c", 5)}, "9")
    assert sorted(seen) == [(EventType.ADDED, "ns/c"), (EventType.DELETED, "ns/b")]
    assert changed == 2 and store.resource_version == "9"


def test_replace_without_resource_versions_compares_values():
    store = Store("services")
    store.upsert("ns/a", service("a", "", "10.0.0.1"))
    seen = []
    store.subscribe(lambda e: seen.append(e.type))
    store.replace({"ns/a": service("a", "", "10.0.0.1")})
    assert seen == []
    store.replace({"ns/a": service("a", "", "10.0.0.2")})
    assert seen == [EventType.MODIFIED]


def test_secondary_index_follows_updates_and_deletes():
    store = Store("endpointslices", {"service": slice_service_key})
    store.upsert("ns/a-1", eps("a-1", "a"))
    store.upsert("ns/a-2", eps("a-2", "a"))
    assert [s.metadata.name for s in store.by_index("service", "ns/a")] == ["a-1", "a-2"]
    store.upsert("ns/a-2", eps("a-2", "b"))
    assert [s.metadata.name for s in store.by_index("service", "ns/a")] == ["a-1"]
    store.delete("ns/a-1")
    assert store.by_index("service", "ns/a") == []
    assert [s.metadata.name for s in store.by_index("service", "ns/b")] == ["a-2"]


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["x", "y", None])), max_size=40))
def test_secondary_index_matches_a_plain_recount_after_any_changes(ops):
    """The index keeps a lone key as a string and several as a set (memory): whatever the
    order of upserts and deletes, it answers as a recount of the objects would."""
    store = Store("endpointslices", {"service": slice_service_key})
    slices = {name: {svc: eps(name, svc) for svc in "xy"} for name in "abcd"}
    owner: dict[str, str] = {}
    for name, svc in ops:
        if svc is None:
            store.delete(f"ns/{name}")
            owner.pop(name, None)
        else:
            store.upsert(f"ns/{name}", slices[name][svc])
            owner[name] = svc
    for svc in "xy":
        expected = sorted(n for n, s in owner.items() if s == svc)
        assert [o.metadata.name for o in store.by_index("service", f"ns/{svc}")] == expected


def test_failing_subscriber_does_not_stop_others():
    store = Store("services")
    seen = []

    def broken(_event):
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(lambda e: seen.append(e.key))
    store.upsert("ns/a", service("a", 1))
    assert seen == ["ns/a"]


def test_on_synced_fires_once():
    store = Store("services")
    calls = []
    store.on_synced(lambda: calls.append(1))
    store.mark_synced()
    store.mark_synced()
    store.on_synced(lambda: calls.append(2))
    assert calls == [1, 2]
