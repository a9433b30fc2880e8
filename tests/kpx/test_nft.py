"""nftables rendering as pure code: table state in, `nft -f` text out."""

from __future__ import annotations

from kpx.nft import ELEMENTS_PER_LINE, render_cleanup, render_delta, render_full, render_table
from kpx.rules import Steer, SteerKey


def test_full_render_replaces_the_table_in_one_transaction():
    text = render_full(
        {
            (4, "10.96.0.1", 80): "serve",
            (4, "10.96.0.2", 80): "reject",
            (4, "", 30080): "serve",
            (6, "fd00::1", 443): "serve",
        },
        10262,
    )
    lines = text.splitlines()
    assert lines[:3] == ["add table inet kpx", "delete table inet kpx", "table inet kpx {"]
    assert "add element inet kpx svc4 { 10.96.0.1 . 80 }" in lines
    assert "add element inet kpx svc4-reject { 10.96.0.2 . 80 }" in lines
    assert "add element inet kpx np4 { 30080 }" in lines
    assert "add element inet kpx svc6 { fd00::1 . 443 }" in lines
    assert "redirect to :10262" in text


def test_table_redirects_from_prerouting_and_output_and_rejects_in_filter_hooks():
    text = render_table(10262)
    assert "ip daddr . tcp dport @svc4 redirect to :10262" in text
    assert "ip6 daddr . tcp dport @svc6 redirect to :10262" in text
    assert "fib daddr type local tcp dport @np4 redirect to :10262" in text
    assert "ip daddr . tcp dport @svc4-reject reject with tcp reset" in text
    for hook in ("prerouting", "output"):
        assert f"type nat hook {hook} priority -100" in text
    for hook in ("input", "forward", "output"):
        assert f"type filter hook {hook} priority -10" in text
    assert text.count("ct state new") == 6  # never reset an established (draining) flow


def test_nodeport_addresses_restrict_node_ports_per_family():
    text = render_table(10262, ["192.0.2.0/24", "10.0.0.5/8"])
    assert "elements = { 192.0.2.0/24, 10.0.0.0/8 }" in text
    assert "fib daddr type local ip daddr @np-addresses4 tcp dport @np4 redirect" in text
    # No IPv6 CIDR given: no IPv6 NodePorts (kube-proxy's nodePortAddresses per family).
    assert "@np6 redirect" not in text and "@np6-reject" not in text


def test_rendering_is_deterministic():
    state: dict[SteerKey, Steer] = {
        (4, f"10.96.0.{i}", 80): "serve" if i % 2 else "reject" for i in range(1, 50)
    }
    assert render_full(state, 1) == render_full(dict(reversed(list(state.items()))), 1)


def test_large_sets_are_chunked():
    state = {(4, f"10.96.{i // 250}.{i % 250}", 80): "serve" for i in range(2500)}
    adds = [ln for ln in render_full(state, 1).splitlines() if ln.startswith("add element")]
    assert len(adds) == 3
    assert adds[0].count(" . ") == ELEMENTS_PER_LINE


def test_delta_new_frontend_costs_one_element():
    applied = {(4, "10.96.0.1", 80): "serve"}
    assert render_delta(applied, {(4, "10.96.0.2", 80): "serve"}) == (
        "add element inet kpx svc4 { 10.96.0.2 . 80 }\n"
    )


def test_delta_frontend_losing_its_endpoints_moves_to_the_reject_set():
    applied = {(4, "10.96.0.1", 80): "serve", (4, "", 30080): "serve"}
    assert render_delta(applied, {(4, "10.96.0.1", 80): "reject", (4, "", 30080): "reject"}) == (
        "delete element inet kpx np4 { 30080 }\n"
        "delete element inet kpx svc4 { 10.96.0.1 . 80 }\n"
        "add element inet kpx np4-reject { 30080 }\n"
        "add element inet kpx svc4-reject { 10.96.0.1 . 80 }\n"
    )


def test_delta_removal_and_no_op():
    applied = {(6, "fd00::1", 80): "reject"}
    assert render_delta(applied, {(6, "fd00::1", 80): None}) == (
        "delete element inet kpx svc6-reject { fd00::1 . 80 }\n"
    )
    assert render_delta(applied, {(6, "fd00::1", 80): "reject"}) == ""
    assert render_delta(applied, {(4, "10.0.0.1", 80): None}) == ""


def test_cleanup_never_fails_on_a_missing_table():
    assert render_cleanup() == "add table inet kpx\ndelete table inet kpx\n"


def test_local_only_frontends_redirect_host_and_cluster_sources_and_drop_others():
    text = render_table(10262, cluster_cidrs=["10.244.0.0/16"])
    assert "ip saddr @cluster4 ip daddr . tcp dport @svc4-local redirect to :10262" in text
    assert "ip daddr . tcp dport @svc4-local drop" in text
    assert "fib daddr type local tcp dport @np4-local drop" in text
    assert "-local reject" not in text  # kube-proxy drops what is not short-circuited
    host = text[text.index("chain steer-host4") :]
    assert "ip daddr . tcp dport @svc4-local redirect to :10262" in host.split("}")[0]
    output = text[text.index("chain nat-output") :].split("}")[0]
    assert "jump steer-host4" in output
    prerouting = text[text.index("chain nat-prerouting") :].split("}")[0]
    assert "steer-host" not in prerouting  # only the node's own processes skip the CIDR check
    assert "@cluster6" not in text  # no IPv6 cluster CIDR given
    assert render_delta({(4, "", 30080): "serve"}, {(4, "", 30080): "local"}) == (
        "delete element inet kpx np4 { 30080 }\nadd element inet kpx np4-local { 30080 }\n"
    )


def test_local_policy_frontends_without_local_endpoints_are_dropped_not_rejected():
    text = render_table(10262)
    refuse = text[text.index("chain refuse4") :].split("}")[0]
    assert "ip daddr . tcp dport @svc4-drop drop" in refuse
    assert "fib daddr type local tcp dport @np4-drop drop" in refuse
    assert "ip daddr . tcp dport @svc4-reject reject with tcp reset" in refuse
    assert "@svc6-drop drop" in text
    assert "@svc4-drop redirect" not in text and "@np4-drop redirect" not in text
    assert render_delta({(4, "10.96.0.1", 80): "serve"}, {(4, "10.96.0.1", 80): "drop"}) == (
        "delete element inet kpx svc4 { 10.96.0.1 . 80 }\n"
        "add element inet kpx svc4-drop { 10.96.0.1 . 80 }\n"
    )
