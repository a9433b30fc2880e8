"""Which clients count as local (this node, the cluster CIDRs) for externalTrafficPolicy."""

from __future__ import annotations

from kpx.local import LocalClients, addresses_in, local_addresses


def test_node_addresses_and_cluster_cidrs_are_local():
    local = LocalClients(["10.244.0.0/16", "fd00:244::/56"], {"192.168.1.5", "fd00::5"})
    assert local("192.168.1.5")
    assert local("::ffff:192.168.1.5")
    assert local("10.244.3.7")
    assert local("fd00:244:0:12::9")
    assert local("fd00:0:0::5")  # compared in canonical form
    assert not local("192.168.1.6")
    assert not local("203.0.113.9")
    assert not local("not an ip")


def test_this_hosts_addresses_are_found():
    found = local_addresses()
    assert found is not None and "127.0.0.1" in found


def test_health_check_listeners_follow_nodeport_addresses():
    addrs = {"127.0.0.1", "192.168.1.5", "10.0.0.1"}
    assert addresses_in([], addrs) is None  # all addresses
    assert addresses_in(["192.168.0.0/16", "10.0.0.0/8"], addrs) == ["10.0.0.1", "192.168.1.5"]
    assert addresses_in(["172.16.0.0/12"], addrs) == []
