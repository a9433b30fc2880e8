"""Round robin, ClientIP affinity and failure cool-down, driven by an injected clock."""

from __future__ import annotations

import random
from collections import Counter

from kpx.backends import Backend
from kpx.balancer import COOLDOWNS, Balancer, LocalTrafficPicker

A, B, C = Backend("10.1.0.1", 80), Backend("10.1.0.2", 80), Backend("10.1.0.3", 80)
KEY = ("internal", 4)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(backends=(A, B, C), affinity=None, clock=None, seed=1, **kw):
    clock = clock or Clock()
    balancer = Balancer(clock=clock, rng=random.Random(seed), **kw)
    picker = balancer.update("ns/web:http", {KEY: backends}, affinity)[KEY]
    return balancer, picker, clock


def test_round_robin_visits_every_backend_in_turn():
    _, picker, _ = make()
    firsts = [picker.candidates("c")[0] for _ in range(9)]
    assert Counter(firsts) == {A: 3, B: 3, C: 3}
    assert firsts[:3] == firsts[3:6] == firsts[6:]


def test_candidates_are_the_pick_then_the_rotation_capped():
    _, picker, _ = make(backends=[Backend(f"10.1.0.{i}", 80) for i in range(10)])
    got = picker.candidates("c")
    assert len(got) == 4 and len(set(got)) == 4
    assert picker.candidates("c")[0] == got[1]


def test_no_backends_means_no_candidates():
    _, picker, _ = make(backends=[])
    assert picker.candidates("c") == []


def test_list_is_shuffled_on_change_and_kept_on_a_no_op_update():
    orders = set()
    for seed in range(20):
        _, picker, _ = make(seed=seed)
        orders.add(tuple(picker.candidates("c")[:3]))
    assert len(orders) > 1  # shuffled, like kube-proxy's userspace round robin
    balancer, picker, _ = make()
    picker.candidates("c")
    before = picker.candidates("c")[0]
    same = balancer.update("ns/web:http", {KEY: [C, B, A]}, None)[KEY]
    assert same is picker
    assert picker.candidates("c")[0] != before  # rotation continued, not reset


def test_affinity_pins_a_client_per_service_port():
    _, picker, clock = make(affinity=60)
    first = picker.candidates("192.0.2.1")[0]
    picker.report_success(first, "192.0.2.1")
    for _ in range(10):
        clock.now += 30
        got = picker.candidates("192.0.2.1")[0]
        assert got == first
        picker.report_success(got, "192.0.2.1")  # every new connection restarts the timer
    others = [picker.candidates(f"192.0.2.{i}")[0] for i in range(2, 5)]
    assert set(others) == {A, B, C}  # other clients still rotate


def test_a_burst_of_connections_from_one_client_shares_one_endpoint():
    # The pin is taken when the endpoint is picked (userspace NextEndpoint; the nftables mode's
    # `update @affinity-*` on the first packet), not when the connect completes: parallel
    # connections a client opens before its first connect lands must not be spread.
    _, picker, _ = make(affinity=60)
    picks = [picker.candidates("192.0.2.1")[0] for _ in range(6)]
    assert len(set(picks)) == 1


def test_every_new_connection_restarts_the_affinity_timer_even_before_it_connects():
    _, picker, clock = make(affinity=60)
    first = picker.candidates("c")[0]
    for _ in range(5):
        clock.now += 50  # within the timeout of the previous connection, not of the first
        assert picker.candidates("c")[0] == first
    clock.now += 61
    assert picker.candidates("c")[0] != first  # expired: the next in the rotation


def test_affinity_expires_after_timeout_from_last_connection():
    _, picker, clock = make(affinity=60)
    first = picker.candidates("c")[0]
    picker.report_success(first, "c")
    clock.now += 60
    assert picker.candidates("c")[0] == first
    clock.now += 61
    assert picker.candidates("c")[0] != first  # a fresh pick: the next in the rotation


def test_affinity_is_shared_by_the_frontends_of_a_service_port():
    clock = Clock()
    balancer = Balancer(clock=clock, rng=random.Random(3))
    pickers = balancer.update(
        "ns/web:http", {("internal", 4): [A, B, C], ("external", 4): [A, B, C]}, 60
    )
    internal, external = pickers[("internal", 4)], pickers[("external", 4)]
    pick = internal.candidates("c")[0]
    internal.report_success(pick, "c")
    assert external.candidates("c")[0] == pick


def test_affinity_is_dropped_when_the_endpoint_goes_away_and_kept_otherwise():
    balancer, picker, _ = make(affinity=60)
    for client in ("c1", "c2", "c3"):
        picker.report_success(picker.candidates(client)[0], client)
    pins = {client: picker.candidates(client)[0] for client in ("c1", "c2", "c3")}
    gone = pins["c1"]
    survivors = [b for b in (A, B, C) if b != gone] + [Backend("10.1.0.9", 80)]
    assert balancer.update("ns/web:http", {KEY: survivors}, 60)[KEY] is picker
    for client in ("c2", "c3"):
        if pins[client] != gone:
            assert picker.candidates(client)[0] == pins[client]
    assert picker.candidates("c1")[0] in survivors


def test_failing_backend_cools_down_for_a_growing_time():
    _, picker, clock = make(backends=[A, B])
    before = COOLDOWNS.value
    picker.report_failure(A)
    assert COOLDOWNS.value == before + 1
    assert [picker.candidates("c")[0] for _ in range(4)] == [B] * 4
    assert picker.candidates("c")[-1] == A  # still a last-resort fallback
    clock.now += 1.01  # first cool-down: 1 s
    assert A in {picker.candidates("c")[0] for _ in range(2)}
    picker.report_failure(A)  # second consecutive failure: 2 s
    clock.now += 1.5
    assert {picker.candidates("c")[0] for _ in range(4)} == {B}
    clock.now += 0.6
    assert A in {picker.candidates("c")[0] for _ in range(2)}
    picker.report_success(A, "c")  # success clears the history
    picker.report_failure(A)
    clock.now += 1.01
    assert A in {picker.candidates("c")[0] for _ in range(2)}


def test_cooldown_is_capped():
    _, picker, clock = make(backends=[A, B], cooldown_cap=5.0)
    for _ in range(10):
        picker.report_failure(A)
    clock.now += 5.01
    assert A in {picker.candidates("c")[0] for _ in range(2)}


def test_all_backends_cooling_still_returns_them_soonest_first():
    _, picker, clock = make(backends=[A, B])
    picker.report_failure(A)
    picker.report_failure(A)
    clock.now += 0.1
    picker.report_failure(B)
    assert picker.candidates("c") == [B, A]


def test_cooldown_is_shared_across_service_ports():
    balancer, picker, _ = make(backends=[A, B])
    other = balancer.update("ns/other:http", {KEY: [A, B]}, None)[KEY]
    picker.report_failure(A)
    assert {other.candidates("c")[0] for _ in range(4)} == {B}


def test_failed_pinned_backend_is_replaced_by_the_next_that_answers():
    _, picker, _ = make(affinity=60)
    pinned = picker.candidates("c")[0]
    picker.report_success(pinned, "c")
    picker.report_failure(pinned)
    nxt = picker.candidates("c")[0]
    assert nxt != pinned
    picker.report_success(nxt, "c")
    assert picker.candidates("c")[0] == nxt


def test_sweep_forgets_stale_pins_and_old_failures():
    balancer, picker, clock = make(affinity=10)
    picker.report_success(A, "c")
    picker.report_failure(B)
    clock.now += 100
    balancer.sweep()
    assert not balancer.failures
    assert balancer._ports["ns/web:http"].affinity is not None
    assert len(balancer._ports["ns/web:http"].affinity) == 0


def test_turning_affinity_off_forgets_pins():
    balancer, picker, _ = make(affinity=60)
    picker.report_success(A, "c")
    balancer.update("ns/web:http", {KEY: [A, B, C]}, None)
    assert {picker.candidates("c")[0] for _ in range(3)} == {A, B, C}


def test_local_traffic_picker_routes_by_client_and_keeps_affinity_per_list():
    clock = Clock()
    balancer = Balancer(clock=clock, rng=random.Random(5))
    pickers = balancer.update("ns/lb:http", {("internal", 4): [A, B], ("external", 4): [C]}, 60)
    split = LocalTrafficPicker(
        pickers[("external", 4)], pickers[("internal", 4)], lambda ip: ip.startswith("10.")
    )
    assert split.candidates("192.0.2.1") == [C]
    inside = split.candidates("10.244.0.5")[0]
    assert inside in (A, B)
    split.report_success(inside, "10.244.0.5")
    assert [split.candidates("10.244.0.5")[0] for _ in range(3)] == [inside] * 3
    split.report_failure(C)
    assert balancer.failures.cooling(C, clock.now)
