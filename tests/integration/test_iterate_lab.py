"""Iterative mode against the lab's real BIND hierarchy, seen from the authoritative side.

The verdicts (AD / plain / SERVFAIL + EDE, rcodes) of iterative mode are compared with delv's
for every lab name in tests/integration/test_resolver_lab.py (parametrised over both modes).
Here the daemon runs in `plain` with `mode = "iterate"`, the lab root as its only root hint and
no forwarder, and what it sends is read from the authoritative servers' query logs (the lab's
named runs with `querylog yes`; lab/querylog.py), filtered by plain's addresses:

* QNAME minimisation: the root only ever sees names of one label, `test.` names of at most
  two, while the full names do reach example.test's server; DS records come with referrals.
* A zone with a dead name server (nothing at its address) and one with a lame name server
  (REFUSED) still resolve, validated (AD), for every kind of answer.
* An NXNSAttack-style delegation (nxns.test., 24 NS names that do not exist) ends in SERVFAIL
  with EDE 22, having sent at most `max_ns_lookups` lookups to the victim zone and at most
  `max_upstream_queries` queries in all.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

from lab.probes import Dig
from lab.querylog import QueryLog
from lab.resolverd import ResolverDaemon
from lab.topology import HOSTS, NXNS_NAMES, ZONES
from resolver.validator.types import Limits
from tests.integration.test_issue14_metrics import value

if TYPE_CHECKING:
    from lab.core import Lab

pytestmark = pytest.mark.integration

HOST = "plain"
ROOT = HOSTS[ZONES["."].server]


@contextmanager
def iterating(lab: Lab, **sections: dict[str, object]) -> Iterator[ResolverDaemon]:
    """A fresh daemon in `plain`, iterating from the lab root; it must exit 0."""
    daemon = ResolverDaemon(lab, HOST, name="iterate-lab", tunnels=False, sections={
        "upstream": {"mode": "iterate", "servers": [], "root_hints": [ROOT.v4, ROOT.v6]},
        **sections})
    daemon.start(timeout=15)
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, f"exit status {code}:\n{daemon.tail(60)}"


def dig(lab: Lab, *args: str) -> Dig:
    return lab.dig(HOST, *args, server="127.0.0.1",
                   options=("+dnssec", "+time=10", "+tries=1"))


def test_qname_minimisation_is_visible_in_the_query_logs(lab: Lab) -> None:
    log = QueryLog(lab, HOST)
    log.mark()
    with iterating(lab) as daemon:
        d = dig(lab, "bob.example.test.", "IPSECKEY")
        assert (d.status, d.ad) == ("NOERROR", True), daemon.tail()
        d = dig(lab, "a.b.c.no-such.example.test.", "A")
        assert (d.status, d.ad) == ("NXDOMAIN", True), daemon.tail()
    root, test = log.since("ns-root"), log.since("ns-test")
    example = [(q.name, q.rdtype) for q in log.since("ns-example")]
    # The daemon's first lookup (its readiness probe, example.test SOA) asked the root only
    # "test A"; test. got "example.test" and nothing longer.
    assert ("test", "A") in [(q.name, q.rdtype) for q in root], root
    assert "example.test" in [q.name for q in test], test
    assert all(q.labels <= 1 for q in root), root
    assert all(q.labels <= 2 for q in test), test
    # The log does show full names: example.test's server got them.
    assert ("bob.example.test", "IPSECKEY") in example
    assert ("a.b.c.no-such.example.test", "A") in example
    # The DS records came with the referrals (and validated: AD above), not asked again.
    assert not [q for q in log.since() if q.rdtype == "DS"]


@pytest.mark.parametrize("zone", ["dead-ns.test.", "lame-ns.test."])
def test_dead_and_lame_name_servers_do_not_stop_resolution(lab: Lab, zone: str) -> None:
    expected = [(f"host.{zone}", "A", "NOERROR"), (f"host.{zone}", "AAAA", "NOERROR"),
                (f"host.{zone}", "IPSECKEY", "NOERROR"), (f"host.{zone}", "TXT", "NOERROR"),
                (f"no-such-name.{zone}", "A", "NXDOMAIN"), (zone, "DNSKEY", "NOERROR")]
    log = QueryLog(lab, HOST)
    with iterating(lab) as daemon:
        log.mark()
        start = time.monotonic()
        for name, rdtype, rcode in expected:
            d = dig(lab, name, rdtype)
            assert (d.status, d.ad) == (rcode, True), f"{name} {rdtype}:\n{d.text}\n" + \
                daemon.tail()
        elapsed = time.monotonic() - start
    refused = [q for q in log.since("ns-example") if q.name.endswith(zone.rstrip("."))]
    # At most one wait for the dead server per address family, not one per lookup.
    assert elapsed < 6, elapsed
    print(f"{zone}: {len(expected)} lookups in {elapsed:.2f} s; "
          f"queries to the lame (REFUSED) server: {len(refused)}")


def test_nxns_delegation_stays_within_the_limits(lab: Lab) -> None:
    limits = Limits()
    log = QueryLog(lab, HOST)
    with iterating(lab) as daemon:
        log.mark()
        start = time.monotonic()
        d = dig(lab, "x.nxns.test.", "A")
        elapsed = time.monotonic() - start
        assert d.status == "SERVFAIL" and "EDE: 22" in d.text, d.text
        assert "NS names to resolve" in daemon.tail()
    victim = [q for q in log.since("ns-example") if q.name.startswith("nxns-")]
    assert 0 < len(victim) <= limits.max_ns_lookups < NXNS_NAMES, victim
    assert len(log.since()) <= limits.max_fetches, log.since()
    assert elapsed < 5, elapsed


def test_iteration_is_counted_in_the_metrics(lab: Lab) -> None:
    """Issue 14's numbers cover the iterate path too: every query the iterator sent (the
    servers' query logs count them) is in iterate_queries_total, and the referrals it followed
    in iterate_events_total. All servers in one count: a label per server would have no
    bound."""
    port = 9154

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    log = QueryLog(lab, HOST)
    log.mark()
    with iterating(lab, metrics={"listen": f"127.0.0.1:{port}"}) as daemon:
        for name, rdtype in (("bob.example.test.", "IPSECKEY"), ("carol.example.test.", "A")):
            d = dig(lab, name, rdtype)
            assert (d.status, d.ad) == ("NOERROR", True), daemon.tail()
        text: str = lab.call_in(HOST, scrape)
    prefix = "ipseckey_resolver_iterate_"
    sent = sum(value(text, f'{prefix}queries_total{{transport="{t}"}}') for t in ("udp", "tcp"))
    asked = log.since()
    assert sent == len(asked) > 0, (sent, asked)
    assert value(text, f'{prefix}events_total{{event="referral"}}') >= 2  # root, then test.
    assert f'{prefix}events_total{{event="timeout"}} 0' in text  # declared, none happened
