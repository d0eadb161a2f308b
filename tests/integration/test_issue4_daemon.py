"""Issue 4 end to end: the real `ipseckey-resolver` process in alice, real charon on every peer.

Unlike tests/integration/test_provision_*.py, which drive the parts in-process, every test here
starts the daemon as a program (`python -m resolver --config ...` via lab.resolverd) inside
alice's namespace, talks to it over DNS from inside alice, and looks at the outcome where it
really is: alice's charon (VICI / swanctl), alice's kernel XFRM policies, and the wire (tcpdump
on the lab switch). One behaviour per test. A daemon start costs about a second here, so the
tests that only add tunnels to distinct peers share one daemon per policy (`Daemons.shared`);
the lease, crash and restart tests get daemons of their own with fresh state files. Between
daemons alice's charon and XFRM tables are cleaned (our "isk-" conns and our shunts only).

Run: `LAB_ID=r .venv/bin/python -m pytest -q tests/integration/test_issue4_daemon.py`
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from lab import Lab, ike
from lab.net import poll
from lab.resolverd import ResolverDaemon
from lab.topology import HOSTS
from resolver.ipseckey import ipseckey_rdata_for
from resolver.tunnels.xfrm import XfrmPolicies, encode_update, shunt_rules
from tests.helpers import (
    addresses,
    blocked_ping,
    children,
    clean_alice,
    ede,
    esp_ping,
    floored,
    our_conns,
    shunted,
)

pytestmark = pytest.mark.integration

EDE_NO_KEY = 28  # Unable to conform to policy
EDE_TUNNEL = 23  # Network error: the tunnel did not come up
SETUP_TIMEOUT = 3.0  # [provision] timeout default

# --- helpers ----------------------------------------------------------------------------------


def address_ttl(reply: dns.message.Message) -> int:
    return min(r.ttl for r in reply.answer if r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA))


def _publish_ttlcap(lab: Lab, key_ttl: int) -> Callable[[], None]:
    """Publish ttlcap.example.test: A = bob's address (TTL 60), IPSECKEY = bob's key (TTL
    `key_ttl`), and make bob's charon answer to that identity. Returns the undo."""
    rdata = ipseckey_rdata_for(lab.public_key("bob"))
    lab.update(lambda m: (m.replace("ttlcap", 60, "A", lab.addr("bob")),
                          m.replace("ttlcap", key_ttl, rdata)))
    conns = lab.respond_as("bob", "ttlcap.example.test")

    def undo() -> None:
        lab.close_conns("bob", conns)
        lab.update(lambda m: m.delete("ttlcap"))

    return undo



# --- fixtures ---------------------------------------------------------------------------------


class Daemons:
    """The one daemon running in alice at a time (they all listen on 127.0.0.1:53).

    `shared(policy)` returns a running daemon with that [policy] and default [provision],
    reusing it across tests (a start costs about a second on this machine); `own(...)` starts a
    daemon for one test with a fresh state file. Switching stops the running one and cleans
    alice's charon (our "isk-" conns) and our XFRM policies, so no daemon inherits another's
    tunnels or shunts (its start-up reconcile would remove them anyway).
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.running: ResolverDaemon | None = None
        self.key: str | None = None

    def shared(self, policy: dict[str, Any]) -> ResolverDaemon:
        key = repr(sorted(policy.items()))
        if self.running is not None and self.key == key and self.running.proc is not None \
                and self.running.proc.poll() is None:
            return self.running
        return self._start("t4-shared", {"policy": policy}, key)

    def own(self, name: str, policy: dict[str, Any],
            provision: dict[str, Any] | None = None) -> ResolverDaemon:
        sections: dict[str, dict[str, Any]] = {"policy": policy}
        if provision:
            sections["provision"] = provision
        return self._start(name, sections, None)

    def _start(self, name: str, sections: dict[str, dict[str, Any]],
               key: str | None) -> ResolverDaemon:
        self.stop()
        shutil.rmtree(self.lab.run_dir / name, ignore_errors=True)
        d = ResolverDaemon(self.lab, "alice", sections=sections, name=name)
        d.start()
        self.running, self.key = d, key
        return d

    def stop(self) -> None:
        if self.running is not None:
            self.running.stop()
            self.running = self.key = None
        clean_alice(self.lab)


@pytest.fixture(scope="module")
def daemons(lab: Lab) -> Iterator[Daemons]:
    d = Daemons(lab)
    clean_alice(lab)
    try:
        yield d
    finally:
        d.stop()
        lab.clear_resolv_conf("alice")


@pytest.fixture
def private(daemons: Daemons) -> ResolverDaemon:
    """The shared daemon with [policy] default = "private" (max_ttl 5 for the TTL test)."""
    return daemons.shared({"default": "private", "max_ttl": 5})


@pytest.fixture
def opportunistic(daemons: Daemons) -> ResolverDaemon:
    """The shared daemon with [policy] default = "private-or-clear"."""
    return daemons.shared({"default": "private-or-clear"})


def tunnels_to(lab: Lab, address: str) -> list[dict[str, Any]]:
    """alice's IKE_SAs with `address` as the peer."""
    return [sa for _, sa in lab.ike_sas("alice") if sa.get("remote-host") == address]


# --- the tests (the shared private daemon first, so it starts once) ---------------------------


def test_ping_by_name_goes_over_esp_only(lab: Lab, private: ResolverDaemon) -> None:
    lab.set_resolv_conf("alice", "nameserver 127.0.0.1\n")
    b = lab.addr("bob")
    try:
        w = esp_ping(lab, "bob.example.test", peer=b, port="bob")
    finally:
        lab.clear_resolv_conf("alice")
    assert f"({b})" in w.output.splitlines()[0]  # the name resolved (through the daemon) to bob
    # the tunnel the lookup brought up (ping's resolver asks AAAA too: bob's IPv6 one may be up)
    assert tunnels_to(lab, b) and set(children(lab, "isk-bob-").values()) == {"INSTALLED"}


def test_private_without_ipseckey_is_servfail_and_dropped(lab: Lab,
                                                          private: ResolverDaemon) -> None:
    plain = lab.addr("plain")
    reply = private.query("plain.example.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert ede(reply)[0] == EDE_NO_KEY
    assert plain in shunted(lab)
    blocked_ping(lab, plain, port="plain")
    assert our_conns(lab, "plain-") == []


def test_unsigned_zone_key_never_authenticates_a_peer_private(lab: Lab,
                                                              private: ResolverDaemon) -> None:
    reply = private.query("host.unsigned.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == EDE_NO_KEY
    assert our_conns(lab, "host-") == []  # no conn was ever loaded with that key


def test_refused_name_does_not_cut_a_tunnel_to_the_same_address(lab: Lab,
                                                                private: ResolverDaemon) -> None:
    """host.unsigned.test has bob's address: its SERVFAIL must not shunt bob's working tunnel
    (regression: the drop shunt outranked charon's IPsec policy and blackholed bob)."""
    b = lab.addr("bob")
    assert private.query("bob.example.test.").rcode() == dns.rcode.NOERROR
    assert private.query("host.unsigned.test.").rcode() == dns.rcode.SERVFAIL
    assert b not in shunted(lab)
    esp_ping(lab, b, port="bob", count=2)


def test_fifty_concurrent_lookups_make_one_tunnel(lab: Lab, private: ResolverDaemon) -> None:
    dave = lab.addr("dave")
    assert tunnels_to(lab, dave) == []

    async def burst() -> list[dns.message.Message]:
        qs = [dns.message.make_query("dave.example.test.", "A", use_edns=0) for _ in range(50)]
        return list(await asyncio.gather(
            *(dns.asyncquery.udp(q, "127.0.0.1", timeout=8) for q in qs)))

    replies: list[dns.message.Message] = lab.call_in("alice", lambda: asyncio.run(burst()), 20)
    assert [r.rcode() for r in replies] == [dns.rcode.NOERROR] * 50
    assert all(addresses(r) == [dave] for r in replies)
    assert len(tunnels_to(lab, dave)) == 1, tunnels_to(lab, dave)
    assert list(children(lab, "isk-dave-").values()) == ["INSTALLED"]


@pytest.mark.parametrize("cap", ["max_ttl", "ipseckey_ttl"])
def test_answer_ttl_is_capped(lab: Lab, private: ResolverDaemon, cap: str) -> None:
    """TTL <= min(address TTL, IPSECKEY TTL, max_ttl, lease left); the daemon runs with
    max_ttl 5. bob: A and IPSECKEY TTL 60, so max_ttl binds; ttlcap: IPSECKEY TTL 3 binds.
    (The lease cap is checked in test_lease_end_tears_the_tunnel_down.)"""
    undo: Callable[[], None] | None = None
    name, limit = "bob.example.test.", 5
    if cap == "ipseckey_ttl":
        undo, name, limit = _publish_ttlcap(lab, key_ttl=3), "ttlcap.example.test.", 3
    try:
        auth = HOSTS["ns-example"].v4
        a_ttl = lab.query("alice", name, "A", server=auth).answer[0].ttl
        k_ttl = lab.query("alice", name, "IPSECKEY", server=auth).answer[0].ttl
        reply = private.query(name)
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == [lab.addr("bob")]
        # The tunnel to bob's address is up. ttlcap publishes bob's key for it, so it rides
        # bob's tunnel if that is up (one address, one key: DESIGN.md security requirement 7).
        to_bob = tunnels_to(lab, lab.addr("bob"))
        assert to_bob and {c["state"] for sa in to_bob
                           for c in (sa.get("child-sas") or {}).values()} == {"INSTALLED"}
        ttl = address_ttl(reply)
        assert 0 < ttl <= min(a_ttl, k_ttl, 5, limit), (ttl, a_ttl, k_ttl, limit)
    finally:
        if undo is not None:
            undo()


def test_dead_peer_is_servfail_within_timeout_and_nothing_leaks(lab: Lab,
                                                                private: ResolverDaemon) -> None:
    carol = lab.addr("carol")
    assert tunnels_to(lab, carol) == []
    with lab.charon_stopped("carol"):
        t0 = time.monotonic()
        reply = private.query("carol.example.test.")
        took = time.monotonic() - t0
        assert reply.rcode() == dns.rcode.SERVFAIL, reply
        assert took < SETUP_TIMEOUT + 1.0, f"SERVFAIL after {took:.2f} s"
        assert ede(reply)[0] == EDE_TUNNEL
        blocked_ping(lab, carol, port="carol", count=2, eperm=False)
        assert our_conns(lab, "carol-") == []  # the failed conn (and its trap) unloaded


# --- private-or-clear (shared daemon) ----------------------------------------------------------


def test_private_or_clear_without_ipseckey_answers_in_clear(lab: Lab,
                                                            opportunistic: ResolverDaemon) -> None:
    plain = lab.addr("plain")
    reply = opportunistic.query("plain.example.test.")
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == [plain]
    assert plain not in shunted(lab)
    rc, out = lab.ping("alice", plain)
    assert rc == 0, out  # clear by policy: nothing in the way


def test_unsigned_zone_key_never_authenticates_a_peer_opportunistic(
        lab: Lab, opportunistic: ResolverDaemon) -> None:
    reply = opportunistic.query("host.unsigned.test.")
    # insecure zone = "no key": answered in clear, and bob's key from there is never loaded
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == [lab.addr("bob")]
    assert our_conns(lab) == []
    assert tunnels_to(lab, lab.addr("bob")) == []


# --- daemons of their own ---------------------------------------------------------------------


def test_lease_end_tears_the_tunnel_down(lab: Lab, daemons: Daemons) -> None:
    lease, grace = 5.0, 0.5
    d = daemons.own("t4-lease", {"default": "private", "max_ttl": 3600},
                    {"lease": lease, "grace": grace})
    t0 = time.monotonic()
    reply = d.query("bob.example.test.")
    assert reply.rcode() == dns.rcode.NOERROR
    assert 0 < address_ttl(reply) <= lease  # the TTL cap by the lease left
    assert list(children(lab).values()) == ["INSTALLED"]
    assert floored(lab) == {lab.addr("bob")}  # private: the floor under the tunnel
    time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
    assert list(children(lab).values()) == ["INSTALLED"]  # still leased
    poll(lambda: not children(lab) and not our_conns(lab) and not floored(lab),
         t0 + lease + grace + 2.5 - time.monotonic(), 0.2)
    gone_after = time.monotonic() - t0
    assert children(lab) == {}, "CHILD_SA still there after lease + grace"
    assert our_conns(lab) == [], "conn still loaded after lease + grace"
    assert floored(lab) == set(), "floor still there after the tunnel's lease + grace"
    # nothing wanted any more: bob is reached in clear again, as before the lookup
    rc, out = lab.ping("alice", lab.addr("bob"))
    assert rc == 0, out
    assert gone_after >= lease - 0.5, f"torn down after {gone_after:.1f} s, before the lease end"
    sas = lab.exec("alice", ["swanctl", "--list-sas", "--uri", lab.vici_socket("alice")]).stdout
    assert "isk-" not in sas


def test_kill9_and_restart_restore_tunnels_and_remove_strays(lab: Lab, daemons: Daemons) -> None:
    foreign, stray = "t4-foreign-dave", "isk-stray-0123456789"
    stray_shunt = "198.51.100.99"
    d = daemons.own("t4-kill9", {"default": "private"})
    try:
        for n in ("bob", "carol"):
            assert d.query(f"{n}.example.test.").rcode() == dns.rcode.NOERROR
        before = {name: sa["uniqueid"] for name, sa in lab.ike_sas("alice")
                  if name.startswith("isk-")}
        assert len(before) == 2
        bob_conn = next(n for n in before if n.startswith("isk-bob-"))
        carol_conn = next(n for n in before if n.startswith("isk-carol-"))
        d.kill9()
        with lab.vici("alice") as s:
            # carol's tunnel is lost while the daemon is down (as if charon had restarted)
            ike.close(s, carol_conn)
            # a stray of ours (not in the state file), up, and a foreign conn, up
            s.load_conn(ike.initiator_conn(stray, HOSTS["alice"], lab.addr("gw"),
                                           "gw.example.test", lab.public_key_pem("alice"),
                                           lab.public_key_pem("gw")))
            ike.initiate(s, stray, stray)
            s.load_conn(ike.initiator_conn(foreign, HOSTS["alice"], lab.addr("dave"),
                                           "dave.example.test", lab.public_key_pem("alice"),
                                           lab.public_key_pem("dave")))
            ike.initiate(s, foreign, foreign)
        x = XfrmPolicies(lab.ns("alice"))
        try:
            acks = x.send([encode_update(r, x.next_seq())
                           for r in shunt_rules(ip_address(stray_shunt))])
        finally:
            x.close()
        assert set(acks.values()) == {0}, acks
        assert stray_shunt in shunted(lab)

        d.start()  # same config, same state file: reconcile runs before the first answer

        after = {name: sa["uniqueid"] for name, sa in lab.ike_sas("alice")}
        states = children(lab, prefix="")
        assert states.get(bob_conn) == "INSTALLED"
        assert after.get(bob_conn) == before[bob_conn], "bob's tunnel was rebuilt, not kept"
        assert states.get(carol_conn) == "INSTALLED", states  # restored from the state file
        assert stray not in lab.conns("alice") and stray not in states and stray not in after
        assert foreign in lab.conns("alice") and states.get(foreign) == "INSTALLED"  # not ours
        assert stray_shunt not in shunted(lab)
        rc, out = lab.ping("alice", lab.addr("carol"))
        assert rc == 0, out
    finally:
        clean_alice(lab, extra=(foreign, stray))
