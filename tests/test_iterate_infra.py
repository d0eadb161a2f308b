"""Delegation cache and server health for iterative mode (pure: the clock is a parameter)."""

from __future__ import annotations

import random

import dns.name
import pytest

from resolver.iterate.infra import (
    BLOCK_BASE,
    BLOCK_MAX,
    MAX_TTL,
    MIN_RTO,
    MIN_TTL,
    NEGATIVE_TTL,
    Delegation,
    DelegationCache,
    ServerTable,
)

N = dns.name.from_text
FAST, SLOW, NEW, DEAD = ("192.0.2.1", 53), ("192.0.2.2", 53), ("192.0.2.3", 53), ("192.0.2.4", 53)
ZONE = N("example.test.")


def test_rto_follows_rtt_and_doubles_on_timeouts() -> None:
    t = ServerTable(max_rto=1.5, unknown_rto=0.4)
    assert t.rto(NEW, 0) == 0.4
    t.record_rtt(FAST, 0.001, 0)
    assert t.rto(FAST, 0) == MIN_RTO  # a LAN server: floor, not 5 ms
    t.record_rtt(SLOW, 0.3, 0)
    assert 0.3 < t.rto(SLOW, 0) <= 1.5
    rtos = []
    for i in range(5):
        t.record_timeout(DEAD, float(i))
        rtos.append(t.rto(DEAD, float(i)))
    assert rtos == [0.8, 1.5, 1.5, 1.5, 1.5]


def test_backoff_parks_a_server_for_growing_periods_until_it_answers() -> None:
    t = ServerTable()
    t.record_timeout(DEAD, 100.0)
    assert t.is_parked(DEAD, 100.0 + BLOCK_BASE - 0.01)
    assert not t.is_parked(DEAD, 100.0 + BLOCK_BASE + 0.01)
    t.record_timeout(DEAD, 200.0)
    assert t.is_parked(DEAD, 200.0 + 2 * BLOCK_BASE - 0.01)
    for i in range(20):
        t.record_timeout(DEAD, 300.0 + i)
    assert t.is_parked(DEAD, 319.0 + BLOCK_MAX - 0.01) and not t.is_parked(DEAD, 319.0 + BLOCK_MAX)
    t.record_rtt(DEAD, 0.01, 320.0)  # back: no more backoff
    assert not t.is_parked(DEAD, 320.0) and t.rto(DEAD, 320.0) == MIN_RTO


def test_order_prefers_fast_then_unknown_then_parked_then_lame() -> None:
    t = ServerTable()
    t.record_rtt(FAST, 0.002, 0)
    t.record_rtt(SLOW, 0.9, 0)
    t.record_timeout(DEAD, 0)
    lame = ("192.0.2.5", 53)
    t.record_rtt(lame, 0.001, 0)
    t.record_lame(ZONE, lame, 0)
    rng = random.Random(1)
    assert t.order([lame, DEAD, SLOW, NEW, FAST], ZONE, 1.0, rng) == [FAST, NEW, SLOW, DEAD,
                                                                       lame]
    # Lameness is per zone: the same server is fine for another zone.
    assert t.order([lame, FAST], N("other.test."), 1.0, rng)[0] == lame
    # Duplicates (an address behind two NS names) are asked once.
    assert t.order([FAST, FAST, NEW], ZONE, 1.0, rng) == [FAST, NEW]


def test_unknown_servers_are_spread() -> None:
    t = ServerTable()
    firsts = {t.order([NEW, DEAD, SLOW], ZONE, 0, random.Random(seed))[0] for seed in range(50)}
    assert firsts == {NEW, DEAD, SLOW}


def test_delegation_cache_closest_and_parent_side() -> None:
    c = DelegationCache()
    root = Delegation(dns.name.root, (N("a.root-servers.lab."),))
    test = Delegation(N("test."), (N("ns1.test."),))
    example = Delegation(ZONE, (N("ns.example.test."),))
    for d in (root, test, example):
        c.put(d, 60, 0)
    assert c.closest(N("bob.example.test."), 1) is example
    assert c.closest(N("example.test."), 1) is example
    assert c.closest(N("EXAMPLE.test."), 1) is example  # names compare without case
    assert c.closest(N("example.test."), 1, above=True) is test  # where its DS lives
    assert c.closest(N("test."), 1, above=True) is root
    assert c.closest(dns.name.root, 1, above=True) is None
    assert c.closest(N("x.unknown."), 1) is root
    assert c.closest(N("bob.example.test."), 61) is None  # all expired


@pytest.mark.parametrize(("ttl", "kept"), [(0, MIN_TTL), (60, 60), (10**9, MAX_TTL)])
def test_delegation_ttl_is_clamped(ttl: int, kept: int) -> None:
    c = DelegationCache()
    c.put(Delegation(ZONE, ()), ttl, 0)
    assert c.get(ZONE, kept - 0.5) is not None and c.get(ZONE, kept + 0.5) is None


def test_ns_addresses_and_negative_entries() -> None:
    c = DelegationCache()
    ns, gone = N("ns.example.test."), N("nxns-1.example.test.")
    assert c.addresses(ns, 0) is None  # unknown
    c.put_addresses(ns, ("198.51.100.4",), 60, 0)
    c.put_addresses(gone, (), 3600, 0)  # did not resolve: kept NEGATIVE_TTL, not 3600
    assert c.addresses(ns, 59) == ("198.51.100.4",)
    assert c.addresses(gone, NEGATIVE_TTL - 1) == ()
    assert c.addresses(gone, NEGATIVE_TTL + 1) is None
