"""resolver.capture with a scripted Resolution, a FakeBackend and a pinned clock.

One scenario per behaviour: the decision table end to end (tunnel then answer, SERVFAIL with the
right EDE, clear answers), TTL capping, CNAME handling, gateways by name, coalescing, and that
groups which ignore keys never wait for the IPSECKEY lookup.
"""

from __future__ import annotations

import asyncio
import errno
import os
from ipaddress import IPv4Address
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver import statefile
from resolver.capture import CaptureHandler
from resolver.errors import IkeDaemonUnreachable, TunnelTimeout
from resolver.ipseckey import IpsecKey
from resolver.policy import Policy, PolicyConfig
from resolver.provision import Provisioner
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.intents import (
    InstallFloor,
    InstallShunt,
    InstallTunnel,
    RemoveShunt,
    RemoveTunnel,
)
from resolver.validator.response import Security, ValidatedAnswer, Verdict
from tests.fakes import FakeBackend
from tests.helpers import aio, ede, run, until

WHEN = 1_800_000_000.0
A, AAAA, IPSECKEY = dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.IPSECKEY
SECURE = Verdict(Security.SECURE)




def n(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


BOB = n("bob.example.test.")
BOB_KEY = IpsecKey.from_public_key(BOB, ed25519.Ed25519PrivateKey.generate().public_key())


def rrset(name: str, ttl: int, rdtype: str, *texts: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(n(name), ttl, "IN", rdtype, *texts)


def answer(*rrsets: dns.rrset.RRset, verdict: Verdict = SECURE, rcode: int = 0,
           ttl: int | None = None) -> ValidatedAnswer:
    if ttl is None:
        ttl = min((r.ttl for r in rrsets), default=30)
    return ValidatedAnswer(verdict=verdict, rcode=rcode, answer=list(rrsets), authority=[],
                           ttl=ttl)


def key_rrset(name: str = "bob.example.test.", ttl: int = 120, key: IpsecKey = BOB_KEY
              ) -> dns.rrset.RRset:
    return rrset(name, ttl, "IPSECKEY", key.to_rdata().to_text())


class Script:
    """A scripted Resolution: answers by (name, type); a missing entry hangs forever."""

    def __init__(self, answers: dict[tuple[str, int], ValidatedAnswer]) -> None:
        self.answers = {(n(k[0]), k[1]): v for k, v in answers.items()}
        self.calls: list[tuple[dns.name.Name, int]] = []

    async def resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float,
                      *, fresh: bool = False) -> ValidatedAnswer:
        self.calls.append((qname, int(qtype)))
        await asyncio.sleep(0)
        if (qname, int(qtype)) not in self.answers:
            await asyncio.sleep(3600)
        return self.answers[(qname, int(qtype))]


class Plain:
    def __init__(self) -> None:
        self.queries: list[dns.message.Message] = []

    async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message:
        self.queries.append(query)
        return dns.message.make_response(query)


def handler(script: Script, *, group: str = "private", backend: FakeBackend | None = None,
            strict: bool | None = False, lease: float = 600, max_ttl: int = 300,
            own: tuple[IPv4Address, ...] = ()) -> tuple[CaptureHandler, FakeBackend, Plain]:
    fb = backend or FakeBackend()
    plain = Plain()
    section: dict[str, object] = {"default": group, "max_ttl": max_ttl}
    if strict is not None:  # None: what a configuration without the key gets
        section["strict"] = strict
    policy = Policy(PolicyConfig.from_section(section), own_addresses=own)
    prov = Provisioner(fb, ProvisionConfig(lease=lease, failure_hold=0))
    return CaptureHandler(plain, script, policy, prov), fb, plain


def query(name: str = "bob.example.test.", rdtype: str = "A", do: bool = True
          ) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, want_dnssec=do, use_edns=0)


BOB_A = rrset("bob.example.test.", 300, "A", "198.51.100.11")
BOB_A_SIG = rrset("bob.example.test.", 300, "RRSIG",
                  "A 15 3 300 20300101000000 20200101000000 1 example.test. AAAA")
NODATA = answer(ttl=15)  # secure proof of no IPSECKEY (negative TTL 15)


@aio
async def test_private_secure_key_tunnel_then_answer() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A, BOB_A_SIG),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset(ttl=120))})
    h, fb, _ = handler(script)
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AD
    assert [str(rd) for rd in reply.answer[0]] == ["198.51.100.11"]
    assert reply.answer[0].ttl == 120  # min(address 300, IPSECKEY 120, max_ttl 300, lease 600)
    # a negotiating shunt, the tunnel, its floor, the shunt removed once the tunnel is up
    assert [type(i) for i in fb.intents] == [InstallShunt, InstallTunnel, InstallFloor,
                                             RemoveShunt]
    spec = fb.of(InstallTunnel)[0].spec  # type: ignore[attr-defined]
    assert (str(spec.destination), spec.remote_id) == ("198.51.100.11", "bob.example.test")
    assert h.counters.tunnelled == 1
    # both lookups were started before either finished
    assert script.calls[:2] == [(BOB, A), (BOB, IPSECKEY)]


@aio
async def test_ttl_capped_by_lease_and_max_ttl() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset(ttl=3000))})
    h, _, _ = handler(script, lease=45, max_ttl=200)
    assert (await h.handle(query(), WHEN)).answer[0].ttl == 45
    h, _, _ = handler(script, lease=600, max_ttl=200)
    assert (await h.handle(query(), WHEN)).answer[0].ttl == 200


@aio
async def test_private_without_key_is_servfail_with_shunt() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): NODATA})
    h, fb, _ = handler(script)
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert ede(reply) == (28, "no IPSECKEY for private destination")
    assert [type(i) for i in fb.intents] == [InstallShunt]


@aio
async def test_private_or_clear_without_key_answers_clear() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): NODATA})
    h, fb, _ = handler(script, group="private-or-clear")
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0].ttl == 15  # negative TTL
    assert fb.intents == []


@aio
async def test_unsigned_zone_key_never_authenticates() -> None:
    insecure = Verdict(Security.INSECURE)
    script = Script({("bob.example.test.", A): answer(BOB_A, verdict=insecure),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset(), verdict=insecure)})
    h, fb, _ = handler(script)
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 28
    assert fb.of(InstallTunnel) == []


@aio
async def test_bogus_ipseckey_is_servfail() -> None:
    bogus = Verdict(Security.BOGUS, "signature mismatch", ede=6)
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset(), verdict=bogus)})
    for group in ("private", "private-or-clear", "clear-or-private"):
        h, fb, _ = handler(script, group=group)
        reply = await h.handle(query(), WHEN)
        code, text = ede(reply)
        assert reply.rcode() == dns.rcode.SERVFAIL and code == 6 and "signature mismatch" in text
        assert fb.intents == []


@aio
async def test_bogus_address_is_servfail() -> None:
    bogus = Verdict(Security.BOGUS, "expired", ede=7)
    script = Script({("bob.example.test.", A): answer(BOB_A, verdict=bogus)})
    h, _, _ = handler(script, group="clear")  # even in clear; and the IPSECKEY is not awaited
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 7


@aio
async def test_tunnel_timeout_private_is_servfail() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    h, fb, _ = handler(script, backend=FakeBackend(TunnelTimeout("no CHILD_SA within 3 s")))
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL
    code, text = ede(reply)
    assert code == 23 and "timed out" in text
    assert [type(i) for i in fb.intents] == [InstallShunt, InstallTunnel, RemoveTunnel]
    assert h.provisioner.shunted() == {IPv4Address("198.51.100.11")}  # drop after failure


@aio
async def test_daemon_unreachable_ede() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    h, _, _ = handler(script, backend=FakeBackend(IkeDaemonUnreachable("no socket")))
    reply = await h.handle(query(), WHEN)
    assert ede(reply) == (14, "IKE daemon unreachable: no socket")


def test_tunnel_failure_private_or_clear(caplog: pytest.LogCaptureFixture) -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    for strict in (None, True):  # the default is strict: SERVFAIL, never clear
        h, _, _ = handler(script, group="private-or-clear", strict=strict,
                          backend=FakeBackend(TunnelTimeout("x")))
        reply = run(h.handle(query(), WHEN))
        assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 23
        assert h.provisioner.shunted() == frozenset()  # private-or-clear: no drop shunt
    assert not [r for r in caplog.records if "in clear" in r.getMessage()]
    h, _, _ = handler(script, group="private-or-clear", strict=False,
                      backend=FakeBackend(TunnelTimeout("x")))
    for _ in range(2):  # the explicit opt-in answers in clear, with a warning every time
        assert run(h.handle(query(), WHEN)).rcode() == dns.rcode.NOERROR
    warned = [r for r in caplog.records if r.levelname == "WARNING"
              and "answered in clear after its tunnel failed" in r.getMessage()]
    assert len(warned) == 2 and "bob.example.test" in warned[0].getMessage()


@aio
async def test_clear_group_does_not_wait_for_ipseckey() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A)})  # IPSECKEY would hang forever
    h, fb, _ = handler(script, group="clear")
    reply = await asyncio.wait_for(h.handle(query(), WHEN), 1.0)
    assert reply.rcode() == dns.rcode.NOERROR and fb.intents == []


@aio
async def test_block_group() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A)})
    h, fb, _ = handler(script, group="block")
    reply = await asyncio.wait_for(h.handle(query(), WHEN), 1.0)
    assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 15
    assert [type(i) for i in fb.intents] == [InstallShunt]


@aio
async def test_own_address_answered_clear() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    h, fb, _ = handler(script, own=(IPv4Address("198.51.100.11"),))
    assert (await h.handle(query(), WHEN)).rcode() == dns.rcode.NOERROR
    assert fb.intents == []


@aio
async def test_other_types_go_to_the_plain_handler() -> None:
    h, fb, plain = handler(Script({}))
    for rdtype in ("MX", "IPSECKEY", "TXT"):
        await asyncio.wait_for(h.handle(query(rdtype=rdtype), WHEN), 1.0)
    assert len(plain.queries) == 3 and fb.intents == [] and h.counters.queries == 0


CNAME = rrset("www.example.test.", 300, "CNAME", "bob.example.test.")


@aio
async def test_cname_key_of_final_name() -> None:
    """www -> bob: the IPSECKEY that counts is bob's; the parallel IPSECKEY query of www
    followed the same chain, so no extra lookup is made."""
    script = Script({("www.example.test.", A): answer(CNAME, BOB_A),
                     ("www.example.test.", IPSECKEY): answer(CNAME, key_rrset())})
    h, fb, _ = handler(script)
    reply = await h.handle(query("www.example.test."), WHEN)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [r.rdtype for r in reply.answer] == [dns.rdatatype.CNAME, A]
    spec = fb.of(InstallTunnel)[0].spec  # type: ignore[attr-defined]
    assert spec.key.owner == BOB and spec.remote_id == "bob.example.test"
    assert (BOB, IPSECKEY) not in script.calls


@aio
async def test_cname_ignores_key_at_alias() -> None:
    """An IPSECKEY at the alias itself does not vouch for the target's address."""
    alias_key = IpsecKey.from_public_key(n("www.example.test."),
                                         ed25519.Ed25519PrivateKey.generate().public_key())
    script = Script({
        ("www.example.test.", A): answer(CNAME, BOB_A),
        # the chains differ (the alias answered IPSECKEY itself): look at the final name
        ("www.example.test.", IPSECKEY): answer(key_rrset("www.example.test.", key=alias_key)),
        ("bob.example.test.", IPSECKEY): answer(key_rrset()),
    })
    h, fb, _ = handler(script)
    await h.handle(query("www.example.test."), WHEN)
    assert (BOB, IPSECKEY) in script.calls
    spec = fb.of(InstallTunnel)[0].spec  # type: ignore[attr-defined]
    assert spec.key.public_key == BOB_KEY.public_key


def srv_behind_gw(gw: dict[tuple[str, int], ValidatedAnswer]) -> Script:
    """srv.example.test (203.0.113.21), whose IPSECKEY names gw.example.test as its gateway;
    `gw` holds the answers to gw's address lookups."""
    srv_key = IpsecKey.from_public_key(n("srv.example.test."),
                                       ed25519.Ed25519PrivateKey.generate().public_key(),
                                       gateway=n("gw.example.test."))
    return Script({
        ("srv.example.test.", A): answer(rrset("srv.example.test.", 60, "A", "203.0.113.21")),
        ("srv.example.test.", IPSECKEY): answer(key_rrset("srv.example.test.", key=srv_key)),
        **gw,
    })


@aio
async def test_gateway_by_name() -> None:
    script = srv_behind_gw({
        ("gw.example.test.", A): answer(rrset("gw.example.test.", 60, "A", "198.51.100.20"))})
    h, fb, _ = handler(script)
    assert (await h.handle(query("srv.example.test."), WHEN)).rcode() == dns.rcode.NOERROR
    spec = fb.of(InstallTunnel)[0].spec  # type: ignore[attr-defined]
    assert (str(spec.destination), str(spec.remote_addr), spec.remote_id) == (
        "203.0.113.21", "198.51.100.20", "gw.example.test")


@aio
async def test_gateway_without_address_fails_closed() -> None:
    script = srv_behind_gw({("gw.example.test.", A): NODATA, ("gw.example.test.", AAAA): NODATA})
    h, fb, _ = handler(script)
    reply = await h.handle(query("srv.example.test."), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL and "gateway" in ede(reply)[1]
    assert fb.of(InstallTunnel) == []


@aio
async def test_fifty_concurrent_lookups_one_tunnel() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    fb = FakeBackend()
    fb.gate = asyncio.Event()  # the setup stays in flight until all fifty have asked
    h, _, _ = handler(script, backend=fb)
    lookups = [asyncio.create_task(h.handle(query(), WHEN)) for _ in range(50)]
    await until(lambda: fb.of(InstallTunnel), what="the setup reached the backend")
    await asyncio.sleep(0.01)  # and the other 49 had turns to join it
    assert len(fb.of(InstallTunnel)) == 1 and not any(t.done() for t in lookups)
    fb.gate.set()
    replies = await asyncio.gather(*lookups)
    assert all(r.rcode() == dns.rcode.NOERROR for r in replies)
    assert len(fb.of(InstallTunnel)) == 1


@aio
async def test_partial_failure_keeps_only_protected_addresses() -> None:
    two = rrset("bob.example.test.", 300, "A", "198.51.100.11", "198.51.100.12")
    script = Script({("bob.example.test.", A): answer(two, BOB_A_SIG),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    fb = FakeBackend(TunnelTimeout("x"), fail_for={IPv4Address("198.51.100.12")})
    h, _, _ = handler(script, backend=fb)
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [str(rd) for r in reply.answer if r.rdtype == A for rd in r] == ["198.51.100.11"]
    assert all(r.rdtype != dns.rdatatype.RRSIG for r in reply.answer)  # no longer matching


@aio
async def test_unprovable_ipseckey_is_never_no_key() -> None:
    indeterminate = Verdict(Security.INDETERMINATE, "no upstream", ede=22)
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(verdict=indeterminate)})
    h, _, _ = handler(script, group="private-or-clear")
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 22


@aio
async def test_tunnel_state_that_cannot_be_written_is_servfail_ede_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 4: a full or read-only state directory is a clear EDE, not "internal
    error"; the tunnel is undone and the private destination dropped (the shunt's own write
    fails too, and must not turn the reply into a bug)."""

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(statefile, "write_atomically", full)
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    h, fb, _ = handler(script)
    h.provisioner = Provisioner(fb, ProvisionConfig(state_file=tmp_path / "p.json",
                                                    failure_hold=0))
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL
    code, text = ede(reply)
    assert code == 0 and text.startswith("cannot record tunnel state: No space left on device")
    assert [type(i) for i in fb.intents] == [InstallShunt, InstallTunnel, RemoveTunnel]
    assert h.provisioner.shunted() == {IPv4Address("198.51.100.11")}


@aio
async def test_ike_daemon_not_connected_since_start_is_ede_14() -> None:
    script = Script({("bob.example.test.", A): answer(BOB_A),
                     ("bob.example.test.", IPSECKEY): answer(key_rrset())})
    h, fb, _ = handler(script)
    h.provisioner.ike_ready = False  # what reconcile leaves when charon is not there
    reply = await h.handle(query(), WHEN)
    assert reply.rcode() == dns.rcode.SERVFAIL
    code, text = ede(reply)
    assert code == 14 and "not ready" in text
    assert fb.of(InstallTunnel) == [] and h.provisioner.shunted() == {IPv4Address("198.51.100.11")}
