"""CaptureHandler end to end against the lab: real signed zones, real charon in alice and peers.

The resolution side here is a stand-in for resolve.Resolution: it asks the lab's validating
Unbound from inside alice and maps its answer to a verdict (AD -> secure, SERVFAIL -> bogus,
no AD -> insecure). Unbound is the project's independent oracle, so these scenarios check the
capture + policy + provisioning path on real data while the validator is built separately;
tests/integration for the resolver core run the same names through our own validator.

Scenarios:
  * private: `bob A` -> the tunnel is up before the answer, ping goes over ESP only.
  * private: `plain A` (no IPSECKEY) -> SERVFAIL, EDE 28, drop shunt; private-or-clear: clear.
  * the bad-signature IPSECKEY -> SERVFAIL whatever the group (never "no key").
  * the unsigned zone's IPSECKEY never authenticates a peer.
  * bob's charon stopped -> SERVFAIL (EDE 23) within the timeout, nothing reaches bob in clear.
  * fifty concurrent lookups of bob make one tunnel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

from lab import Lab
from resolver.capture import CaptureHandler
from resolver.policy import Policy, PolicyConfig
from resolver.validator.response import Security, ValidatedAnswer, Verdict
from tests.helpers import AliceTunnels, blocked_ping, ede, esp_ping

pytestmark = pytest.mark.integration


class UnboundResolution:
    """resolve() through the lab's Unbound, queried from inside alice (a thread per query)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    async def resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float,
                      *, fresh: bool = False) -> ValidatedAnswer:
        r = await asyncio.to_thread(self.lab.query, "alice", qname.to_text(), qtype)
        if r.rcode() == dns.rcode.SERVFAIL:
            return ValidatedAnswer(Verdict(Security.BOGUS, "Unbound: SERVFAIL", ede=6),
                                   r.rcode(), [], [], 0)
        security = Security.SECURE if r.flags & dns.flags.AD else Security.INSECURE
        rrsets = r.answer or r.authority
        ttl = min((x.ttl for x in rrsets), default=0)
        return ValidatedAnswer(Verdict(security), r.rcode(), list(r.answer), list(r.authority),
                               ttl)


class Plain:
    async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message:
        raise AssertionError("only A/AAAA queries in these tests")


class Stack(AliceTunnels):
    """alice's tunnels under a CaptureHandler with [policy] default = `group`."""

    def __init__(self, lab: Lab, group: str) -> None:
        super().__init__(lab)
        policy = Policy(PolicyConfig.from_section({"default": group}),
                        own_addresses=self.ident.addresses)
        self.handler = CaptureHandler(Plain(), UnboundResolution(lab), policy, self.provisioner)

    def ask(self, name: str, rdtype: str = "A") -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, want_dnssec=True, use_edns=0)
        return asyncio.run(self.handler.handle(q, time.time()))


@pytest.fixture
def private(lab: Lab) -> Iterator[Stack]:
    with Stack(lab, "private") as s:
        yield s


def test_lookup_brings_tunnel_up_before_answer(lab: Lab, private: Stack) -> None:
    reply = private.ask("bob.example.test.")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AD
    bob = lab.addr("bob")
    assert [str(rd) for r in reply.answer if r.rdtype == dns.rdatatype.A for rd in r] == [bob]
    # by the time the answer exists, charon lists the CHILD_SA as INSTALLED
    states = asyncio.run(private.vici.child_states())
    assert list(states.values()) == ["INSTALLED"]
    assert reply.answer[0].ttl <= 300
    esp_ping(lab, bob, port="bob")


def test_no_key_private_and_private_or_clear(lab: Lab, private: Stack) -> None:
    reply = private.ask("plain.example.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 28
    assert asyncio.run(private.xfrm.installed())  # drop shunt for plain's address
    blocked_ping(lab, lab.addr("plain"), port="plain")
    with Stack(lab, "private-or-clear") as opportunistic:
        assert opportunistic.ask("plain.example.test.").rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("group", ["private", "private-or-clear"])
def test_bad_signature_ipseckey_is_servfail(lab: Lab, group: str) -> None:
    with Stack(lab, group) as s:
        reply = s.ask("host.badsig.test.")
        assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 6
        assert asyncio.run(s.vici.installed()) == frozenset()


def test_unsigned_zone_key_never_authenticates(lab: Lab, private: Stack) -> None:
    reply = private.ask("host.unsigned.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 28
    assert asyncio.run(private.vici.installed()) == frozenset()


def test_dead_peer_servfail_within_timeout(lab: Lab, private: Stack) -> None:
    bob = lab.addr("bob")
    with lab.charon_stopped("bob"):
        t0 = time.monotonic()
        reply = private.ask("bob.example.test.")
        assert time.monotonic() - t0 < 3.0 + 1.0
        assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 23
        blocked_ping(lab, bob, port="bob", eperm=False)


def test_fifty_concurrent_lookups_one_tunnel(lab: Lab, private: Stack) -> None:
    async def many() -> list[dns.message.Message]:
        qs = [dns.message.make_query("bob.example.test.", "A", use_edns=0) for _ in range(50)]
        return await asyncio.gather(*(private.handler.handle(q, time.time()) for q in qs))

    replies = asyncio.run(many())
    assert all(r.rcode() == dns.rcode.NOERROR for r in replies)
    assert private.provisioner.counters.setups == 1
    assert len(asyncio.run(private.vici.child_states())) == 1

