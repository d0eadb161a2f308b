"""resolver.endpoints.manager and its pure core (resolver.endpoints.core) with a scripted
resolver, a fake provisioner and a pinned clock.

Scenarios, one behaviour each (the Rules of the module docstring):
  * add: secure key + A + AAAA -> a tunnel per address; the ENDPOINT dict of the protocol.
  * add refused: NXDOMAIN, no address, insecure zone, no IPSECKEY, bogus key, bogus address.
  * the peer moves: the new tunnel is up before the old one is released; if it fails, the old
    one stays.
  * key rollover: both keys published -> the tunnel keeps the old key; old key gone -> new key.
  * timers: the next refresh follows the TTL (bounded), failures back off, keepalives extend.
  * persistence: the state file round-trips, a restart restores and re-resolves, a damaged
    file is kept aside.
  * tunnel failures: the endpoint is kept, the code says whose fault, nothing is torn down.
  * the real Provisioner (with a fake backend) under the manager.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.endpoints.core import (
    MIN_REFRESH,
    REFRESH_SLACK,
    Endpoint,
    EndpointError,
    Failure,
    Health,
    Observation,
    choose_key,
    dump_state,
    health,
    load_state,
    next_refresh,
    observe,
    parse_group,
    plan_tunnels,
    retry_delay,
)
from resolver.endpoints.manager import EndpointManager
from resolver.errors import IkeDaemonUnreachable, ProvisioningError, TunnelTimeout
from resolver.ipseckey import IpsecKey, ipseckey_rdata_for
from resolver.policy import Group
from resolver.provision import Provisioner
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.intents import (
    InstallTunnel,
    RemoveTunnel,
    TunnelSpec,
    tunnel_spec,
)
from resolver.validator.response import Security, Verdict
from tests.fakes import FakeBackend
from tests.helpers import aio

WHEN = 1_800_000_000.0
BOB = dns.name.from_text("bob.example.test.")
BOB4, BOB4_NEW = IPv4Address("198.51.100.11"), IPv4Address("198.51.100.111")
BOB6 = IPv6Address("2001:db8:100::11")
PRIV_OLD = ed25519.Ed25519PrivateKey.generate()
PRIV_NEW = ed25519.Ed25519PrivateKey.generate()
SECURE = Verdict(Security.SECURE)


@dataclass
class Answer:
    """A ValidatedAnswer look-alike (policy.AnswerLike)."""

    verdict: Verdict
    rcode: int
    answer: list[dns.rrset.RRset]
    ttl: int
    authority: list[dns.rrset.RRset] = field(default_factory=list)


def addr_answer(name: dns.name.Name, rdtype: str, addrs: list[str], ttl: int = 300,
                verdict: Verdict = SECURE) -> Answer:
    if not addrs:
        return Answer(verdict, dns.rcode.NOERROR, [], ttl)
    return Answer(verdict, dns.rcode.NOERROR,
                  [dns.rrset.from_text_list(name, ttl, "IN", rdtype, addrs)], ttl)


def key_answer(name: dns.name.Name, privs: list[ed25519.Ed25519PrivateKey], ttl: int = 300,
               verdict: Verdict = SECURE) -> Answer:
    if not privs:
        return Answer(verdict, dns.rcode.NOERROR, [], ttl)
    rrset = dns.rrset.from_rdata_list(name, ttl, [ipseckey_rdata_for(p.public_key())
                                                  for p in privs])
    return Answer(verdict, dns.rcode.NOERROR, [rrset], ttl)


NXDOMAIN = Answer(SECURE, dns.rcode.NXDOMAIN, [], 60)


class Zone:
    """A scripted resolver: what bob.example.test publishes right now."""

    def __init__(self) -> None:
        self.a: list[str] = [str(BOB4)]
        self.aaaa: list[str] = [str(BOB6)]
        self.keys = [PRIV_OLD]
        self.ttl = 300
        self.key_verdict = SECURE
        self.addr_verdict = SECURE
        self.nxdomain = False
        self.raise_on: set[int] = set()
        self.calls: list[tuple[dns.name.Name, int, bool]] = []

    async def resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float,
                      *, fresh: bool = False) -> Answer:
        self.calls.append((qname, int(qtype), fresh))
        if int(qtype) in self.raise_on:
            from resolver.errors import UpstreamError
            raise UpstreamError("all upstreams timed out")
        if self.nxdomain:
            return NXDOMAIN
        if qtype == dns.rdatatype.A:
            return addr_answer(qname, "A", self.a, self.ttl, self.addr_verdict)
        if qtype == dns.rdatatype.AAAA:
            return addr_answer(qname, "AAAA", self.aaaa, self.ttl, self.addr_verdict)
        return key_answer(qname, self.keys, self.ttl, self.key_verdict)


class FakeTunnels:
    """Provisioner look-alike: ensure/tunnels/release; records the order of events."""

    def __init__(self) -> None:
        self.up: dict[IPv4Address | IPv6Address, TunnelSpec] = {}
        self.pinned: set[IPv4Address | IPv6Address] = set()
        self.events: list[tuple[str, str]] = []
        self.fail: dict[IPv4Address | IPv6Address, ProvisioningError] = {}
        self.shunts: list[bool] = []

    def pin(self, destination: IPv4Address | IPv6Address, pinned: bool = True) -> None:
        if pinned:
            self.pinned.add(destination)
        else:
            self.pinned.discard(destination)

    async def ensure(self, spec: TunnelSpec, now: float, *, shunt: bool = False) -> float:
        self.shunts.append(shunt)
        self.events.append(("ensure", str(spec.destination)))
        err = self.fail.get(spec.destination)
        if err is not None:
            raise err
        self.up[spec.destination] = spec
        return now + 600

    async def release(self, destination: IPv4Address | IPv6Address, now: float) -> None:
        self.events.append(("release", str(destination)))
        self.up.pop(destination, None)
        self.pinned.discard(destination)

    def tunnels(self) -> dict[IPv4Address | IPv6Address, TunnelSpec]:
        return dict(self.up)


def key_of(priv: ed25519.Ed25519PrivateKey, ttl: int = 300) -> IpsecKey:
    return IpsecKey.from_public_key(BOB, priv.public_key(), ttl=ttl)


def manager(zone: Zone | None = None, tunnels: FakeTunnels | None = None,
            state: Path | None = None, **kw: Any) -> tuple[EndpointManager, Zone, FakeTunnels]:
    z, t = zone or Zone(), tunnels or FakeTunnels()
    return EndpointManager(z, t, state, **kw), z, t


# --- pure core ------------------------------------------------------------------------------


def test_observe_secure_name() -> None:
    obs = observe(BOB, addr_answer(BOB, "A", [str(BOB4)], 120),
                  addr_answer(BOB, "AAAA", [str(BOB6)], 300), key_answer(BOB, [PRIV_OLD], 60))
    assert isinstance(obs, Observation)
    assert obs.addresses == (BOB4, BOB6)  # IPv4 first, then IPv6
    assert [k.public_key for k in obs.keys] == [key_of(PRIV_OLD).public_key]
    assert obs.security is Security.SECURE and obs.ttl == 60  # the smallest TTL


BOGUS = Verdict(Security.BOGUS, "signature expired", 7)
INSECURE = Verdict(Security.INSECURE, "unsigned zone")


@pytest.mark.parametrize(("a", "aaaa", "key", "code", "words"), [
    (NXDOMAIN, NXDOMAIN, NXDOMAIN, "unknown-name", "does not exist"),
    (addr_answer(BOB, "A", []), addr_answer(BOB, "AAAA", []), key_answer(BOB, [PRIV_OLD]),
     "unknown-name", "no A or AAAA"),
    (addr_answer(BOB, "A", ["198.51.100.11"]), addr_answer(BOB, "AAAA", []),
     key_answer(BOB, []), "no-secure-key", "publishes no DNSSEC-secure IPSECKEY"),
    (addr_answer(BOB, "A", ["198.51.100.11"], verdict=INSECURE), addr_answer(BOB, "AAAA", [],
     verdict=INSECURE), key_answer(BOB, [PRIV_OLD], verdict=INSECURE), "no-secure-key",
     "insecure"),
    (addr_answer(BOB, "A", ["198.51.100.11"]), addr_answer(BOB, "AAAA", []),
     key_answer(BOB, [PRIV_OLD], verdict=BOGUS), "no-secure-key", "signature expired"),
    (addr_answer(BOB, "A", ["198.51.100.11"], verdict=BOGUS), addr_answer(BOB, "AAAA", []),
     key_answer(BOB, [PRIV_OLD]), "resolution-failed", "A is bogus"),
    (addr_answer(BOB, "A", ["198.51.100.11"]), addr_answer(BOB, "AAAA", []),
     ProvisioningError("x"), "no-secure-key", "IPSECKEY lookup failed"),
    (Answer(Verdict(Security.INDETERMINATE, "timeout"), dns.rcode.SERVFAIL, [], 0),
     addr_answer(BOB, "AAAA", []), key_answer(BOB, [PRIV_OLD]), "resolution-failed",
     "indeterminate"),
])
def test_observe_refusals(a: Any, aaaa: Any, key: Any, code: str, words: str) -> None:
    res = observe(BOB, a, aaaa, key)
    assert isinstance(res, Failure), res
    assert res.code == code and words in res.reason, res


def test_observe_follows_cname_to_the_key_owner() -> None:
    alias = dns.name.from_text("vpn.example.test.")
    cname = dns.rrset.from_text(alias, 300, "IN", "CNAME", "bob.example.test.")
    a = addr_answer(BOB, "A", [str(BOB4)])
    a.answer.insert(0, cname)
    key = key_answer(BOB, [PRIV_OLD])
    key.answer.insert(0, cname)
    # A stray IPSECKEY at the alias itself must not count: only the addresses' owner's does.
    key.answer.append(key_answer(alias, [PRIV_NEW]).answer[0])
    obs = observe(alias, a, addr_answer(alias, "AAAA", []), key)
    assert isinstance(obs, Observation)
    assert obs.addresses == (BOB4,) and [k.owner for k in obs.keys] == [BOB]
    assert [k.public_key for k in obs.keys] == [key_of(PRIV_OLD).public_key]


def test_choose_key_keeps_the_current_key_while_published() -> None:
    old, new = key_of(PRIV_OLD), key_of(PRIV_NEW)
    old_again = key_of(PRIV_OLD, ttl=17)  # same key, another TTL: still "the current key"
    assert choose_key(old, [new, old_again]) is old
    assert choose_key(old, [new]) is new
    assert choose_key(None, [new, old]) is new  # a new endpoint takes the best key


def test_plan_moves_address_make_before_break() -> None:
    old_key = key_of(PRIV_OLD)
    held: dict[IPv4Address | IPv6Address, TunnelSpec] = {
        BOB4: tunnel_spec(old_key, BOB4, None), BOB6: tunnel_spec(old_key, BOB6, None)}
    obs = Observation((BOB4_NEW, BOB6), (key_of(PRIV_OLD, ttl=5),), Security.SECURE, 5)
    plan = plan_tunnels(old_key, held, obs)
    assert plan.key is old_key
    assert [s.destination for s in plan.up] == [BOB4_NEW, BOB6]
    assert plan.up[1] is held[BOB6]  # unchanged tunnel: the very spec we hold
    assert [s.destination for s in plan.down] == [BOB4]


def test_next_refresh_follows_ttl_within_bounds() -> None:
    assert next_refresh(WHEN, 300) == WHEN + 300 + REFRESH_SLACK
    assert next_refresh(WHEN, 0) == WHEN + MIN_REFRESH + REFRESH_SLACK
    assert [retry_delay(n) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert retry_delay(50) == 300.0


def test_parse_group() -> None:
    assert parse_group(None) is None
    assert parse_group("private") is Group.PRIVATE
    for bad in ("clear", "block", "nonsense"):
        with pytest.raises(EndpointError) as e:
            parse_group(bad)
        assert e.value.code == "bad-request"


# --- the manager --------------------------------------------------------------------------


@aio
async def test_add_brings_up_a_tunnel_per_address(tmp_path: Path) -> None:
    m, zone, t = manager(state=tmp_path / "state" / "endpoints.json")
    result = await m.add(BOB, None, WHEN)
    assert set(t.up) == {BOB4, BOB6} and t.pinned == {BOB4, BOB6}
    assert t.up[BOB4].remote_id == "bob.example.test" and t.up[BOB6].remote_addr == BOB6
    assert all(fresh for *_, fresh in zone.calls)  # an operator asked: no cached answer
    for field_name in ("name", "addresses", "algorithm", "fingerprint", "security", "tunnel",
                       "next_refresh", "error"):
        assert field_name in result
    assert result["name"] == "bob.example.test."
    assert result["addresses"] == [str(BOB4), str(BOB6)]
    assert result["algorithm"] == "ed25519"
    assert result["fingerprint"] == key_of(PRIV_OLD).fingerprint()
    assert result["security"] == "secure" and result["tunnel"] == "up"
    assert result["next_refresh"] == WHEN + 300 + REFRESH_SLACK and result["error"] == ""
    state = tmp_path / "state" / "endpoints.json"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state.parent).st_mode) == 0o700
    assert json.loads(state.read_text())["endpoints"][0]["name"] == "bob.example.test."


@aio
async def test_add_refused_adds_nothing(tmp_path: Path) -> None:
    m, zone, t = manager(state=tmp_path / "endpoints.json")
    zone.nxdomain = True
    with pytest.raises(EndpointError) as e:
        await m.add(BOB, None, WHEN)
    assert e.value.code == "unknown-name"
    zone.nxdomain, zone.keys = False, []
    with pytest.raises(EndpointError) as e:
        await m.add(BOB, None, WHEN)
    assert e.value.code == "no-secure-key"
    assert m.list(WHEN) == {"endpoints": []} and not t.up
    assert not (tmp_path / "endpoints.json").exists()


@aio
async def test_own_and_loopback_addresses_are_never_tunnelled() -> None:
    from resolver.policy import Policy, PolicyConfig

    m, zone, t = manager(policy=Policy(PolicyConfig(), own_addresses=[BOB6]))
    zone.a = ["127.0.0.1"]
    with pytest.raises(EndpointError) as e:
        await m.add(BOB, None, WHEN)
    assert e.value.code == "bad-request" and "nothing to tunnel" in str(e.value)
    assert not t.up and m.list(WHEN) == {"endpoints": []}
    zone.a = [str(BOB4)]
    await m.add(BOB, None, WHEN)
    assert set(t.up) == {BOB4}  # BOB6 is "ours" in this test
    assert m.status(BOB, WHEN)["addresses"] == [str(BOB4)]


@aio
async def test_add_with_tunnel_failure_keeps_endpoint_and_retries() -> None:
    m, _zone, t = manager()
    t.fail[BOB6] = TunnelTimeout("no CHILD_SA within 3 s")
    with pytest.raises(EndpointError) as e:
        await m.add(BOB, None, WHEN)
    assert e.value.code == "tunnel-failed"
    assert "retrying in 5 s" in str(e.value) and "no CHILD_SA" in str(e.value)
    st = m.status(BOB, WHEN)
    assert st["tunnel"] == "partial" and "2001:db8:100::11" in st["error"]
    # the failed destination stays pinned: the Provisioner keeps its conn loaded (parked),
    # so that bob can initiate to us while our own tries fail (issue 11)
    assert t.pinned == {BOB4, BOB6}
    assert st["next_refresh"] == WHEN + 5.0
    assert m.next_deadline() == WHEN + 5.0
    del t.fail[BOB6]
    await m.tick(WHEN + 5.0)
    st = m.status(BOB, WHEN + 5.0)
    assert st["tunnel"] == "up" and st["error"] == "" and "code" not in st


@aio
async def test_failed_destination_is_released_with_the_endpoint_or_its_address() -> None:
    m, zone, t = manager()
    t.fail[BOB6] = TunnelTimeout("no CHILD_SA within 3 s")
    with pytest.raises(EndpointError):
        await m.add(BOB, None, WHEN)
    zone.aaaa = []  # the failed address is no longer published
    await m.refresh(BOB, WHEN + 1)
    assert ("release", str(BOB6)) in t.events and t.pinned == {BOB4}
    assert m.status(BOB, WHEN + 1)["tunnel"] == "up"
    zone.aaaa = [str(BOB6)]
    with pytest.raises(EndpointError):
        await m.refresh(BOB, WHEN + 2)
    t.events.clear()
    await m.remove(BOB, WHEN + 3)
    assert sorted(t.events) == [("release", str(BOB4)), ("release", str(BOB6))]
    assert t.pinned == set()


@aio
async def test_ike_daemon_unreachable_code() -> None:
    m, _zone, t = manager()
    t.fail[BOB4] = t.fail[BOB6] = IkeDaemonUnreachable("charon.vici: connection refused")
    with pytest.raises(EndpointError) as e:
        await m.add(BOB, None, WHEN)
    assert e.value.code == "ike-unreachable"
    assert m.status(BOB, WHEN)["tunnel"] == "failed"


@aio
async def test_peer_moves_new_tunnel_first_then_old_released() -> None:
    m, zone, t = manager()
    await m.add(BOB, None, WHEN)
    t.events.clear()
    zone.a = [str(BOB4_NEW)]
    result = await m.refresh(BOB, WHEN + 10)
    assert ("ensure", str(BOB4_NEW)) in t.events
    assert t.events.index(("ensure", str(BOB4_NEW))) < t.events.index(("release", str(BOB4)))
    assert set(t.up) == {BOB4_NEW, BOB6} and t.pinned == {BOB4_NEW, BOB6}
    assert result["endpoints"][0]["addresses"] == [str(BOB4_NEW), str(BOB6)]
    assert result["endpoints"][0]["tunnel"] == "up"


@aio
async def test_peer_moves_but_new_tunnel_fails_old_one_stays() -> None:
    m, zone, t = manager()
    await m.add(BOB, None, WHEN)
    zone.a = [str(BOB4_NEW)]
    t.fail[BOB4_NEW] = TunnelTimeout("timeout")
    with pytest.raises(EndpointError):
        await m.refresh(BOB, WHEN + 10)
    assert BOB4 in t.up and ("release", str(BOB4)) not in t.events
    assert "old address" in m.status(BOB, WHEN)["tunnels"]
    del t.fail[BOB4_NEW]
    await m.refresh(BOB, WHEN + 20)
    assert set(t.up) == {BOB4_NEW, BOB6}


@aio
async def test_key_rollover_make_before_break() -> None:
    m, zone, t = manager()
    await m.add(BOB, None, WHEN)
    first = dict(t.up)
    # Phase 1 of `autosp publish --key new`: both keys published (the new one may sort first).
    zone.keys = [PRIV_NEW, PRIV_OLD]
    await m.refresh(BOB, WHEN + 10)
    assert t.up == first  # the very same specs: the provisioner sees nothing to change
    assert m.status(BOB, WHEN)["fingerprint"] == key_of(PRIV_OLD).fingerprint()
    assert m.status(BOB, WHEN)["keys_published"] == 2
    # Phase 2: the old key is gone: the tunnels move to the new key (same destinations).
    zone.keys = [PRIV_NEW]
    await m.refresh(BOB, WHEN + 20)
    assert {d: s.key.public_key for d, s in t.up.items()} == {
        BOB4: key_of(PRIV_NEW).public_key, BOB6: key_of(PRIV_NEW).public_key}
    assert not any(e[0] == "release" for e in t.events)  # replaced in place, never torn down
    assert m.status(BOB, WHEN)["fingerprint"] == key_of(PRIV_NEW).fingerprint()


@aio
async def test_failed_key_replacement_keeps_old_key_in_use() -> None:
    m, zone, t = manager()
    await m.add(BOB, None, WHEN)
    first = dict(t.up)
    zone.keys = [PRIV_NEW]
    t.fail[BOB4] = t.fail[BOB6] = TunnelTimeout("AUTH_FAILED")  # bob still signs with old
    with pytest.raises(EndpointError) as e:
        await m.refresh(BOB, WHEN + 10)
    assert e.value.code == "tunnel-failed" and "AUTH_FAILED" in str(e.value)
    assert t.up == first
    st = m.status(BOB, WHEN)
    assert st["fingerprint"] == key_of(PRIV_OLD).fingerprint()  # what the tunnels really use
    t.fail.clear()
    await m.tick(WHEN + 15)  # the retry
    st = m.status(BOB, WHEN)
    assert st["fingerprint"] == key_of(PRIV_NEW).fingerprint() and st["tunnel"] == "up"
    assert {s.key.public_key for s in t.up.values()} == {key_of(PRIV_NEW).public_key}


@aio
async def test_failed_refresh_keeps_tunnels_and_backs_off() -> None:
    m, zone, t = manager()
    await m.add(BOB, None, WHEN)
    zone.key_verdict = BOGUS
    with pytest.raises(EndpointError) as e:
        await m.refresh(BOB, WHEN + 10)
    assert e.value.code == "no-secure-key"
    assert set(t.up) == {BOB4, BOB6}  # Rule 4
    st = m.status(BOB, WHEN)
    assert st["tunnel"] == "up" and "signature expired" in st["error"]
    assert st["next_refresh"] == WHEN + 10 + 5.0
    await m.tick(WHEN + 15)
    assert m.status(BOB, WHEN)["next_refresh"] == WHEN + 15 + 10.0  # doubled


@aio
async def test_timer_refresh_at_ttl_and_keepalive() -> None:
    m, zone, t = manager(keepalive=50.0)
    zone.ttl = 120
    await m.add(BOB, None, WHEN)
    assert m.next_deadline() == WHEN + 50.0  # the keepalive comes first
    zone.calls.clear()
    await m.tick(WHEN + 50.0)
    assert zone.calls == [] and t.events.count(("ensure", str(BOB4))) == 2  # extended only
    assert m.next_deadline() == WHEN + 100.0
    await m.tick(WHEN + 100.0)
    await m.tick(WHEN + 121.0)  # TTL out: re-resolved (through the cache: TTL ran out)
    assert len(zone.calls) == 3 and not any(fresh for *_, fresh in zone.calls)


@aio
async def test_run_loop_refreshes_when_due() -> None:
    m, zone, t = manager()
    await m.add(BOB, None, WHEN)
    now = [WHEN]
    task = asyncio.create_task(m.run(lambda: now[0]))
    await asyncio.sleep(0.01)
    calls = len(zone.calls)
    now[0] = WHEN + 400  # past the TTL: due at once; the wake event makes the loop look again
    zone.a = [str(BOB4_NEW)]
    m._wake.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if BOB4_NEW in t.up:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(zone.calls) > calls and BOB4_NEW in t.up


@aio
async def test_remove_releases_and_forgets(tmp_path: Path) -> None:
    m, _zone, t = manager(state=tmp_path / "e.json")
    await m.add(BOB, None, WHEN)
    assert await m.remove(BOB, WHEN) == {"removed": "bob.example.test."}
    assert not t.up and not t.pinned and m.list(WHEN) == {"endpoints": []}
    assert json.loads((tmp_path / "e.json").read_text())["endpoints"] == []
    for op in (m.remove(BOB, WHEN), m.refresh(BOB, WHEN)):
        with pytest.raises(EndpointError) as e:
            await op
        assert e.value.code == "not-found"
    with pytest.raises(EndpointError):
        m.status(BOB, WHEN)


@aio
async def test_private_group_asks_for_shunts() -> None:
    m, _zone, t = manager()
    await m.add(BOB, "private", WHEN)
    assert t.shunts and all(t.shunts)
    assert m.status(BOB, WHEN)["group"] == "private"


@aio
async def test_group_from_policy() -> None:
    from resolver.policy import Policy, PolicyConfig

    cfg = PolicyConfig(suffixes=((dns.name.from_text("example.test."), Group.PRIVATE),))
    m, _zone, t = manager(policy=Policy(cfg))
    result = await m.add(BOB, None, WHEN)
    assert result["group"] == "private (from the policy)"
    assert t.shunts and all(t.shunts)  # private by policy: drop while negotiating/failed
    m2, _zone2, t2 = manager()
    assert "group" not in await m2.add(BOB, None, WHEN) and not any(t2.shunts)


@aio
async def test_restart_restores_endpoints_and_key(tmp_path: Path) -> None:
    state = tmp_path / "e.json"
    m, zone, _t = manager(state=state)
    await m.add(BOB, None, WHEN)
    zone.keys = [PRIV_NEW, PRIV_OLD]  # mid-rollover when the resolver is killed
    m2, _, t2 = manager(zone=zone, state=state)
    m2.load()
    st = m2.status(BOB, WHEN)
    assert st["tunnel"] == "pending" and st["addresses"] == [str(BOB4), str(BOB6)]
    assert m2.next_deadline() == 0.0  # due at once
    await m2.tick(WHEN + 1)
    assert set(t2.up) == {BOB4, BOB6}
    # The key in use survived the restart: still the old one while both are published.
    assert {s.key.public_key for s in t2.up.values()} == {key_of(PRIV_OLD).public_key}
    assert m2.status(BOB, WHEN)["tunnel"] == "up"


def test_state_round_trip_and_damage(tmp_path: Path) -> None:
    k = key_of(PRIV_OLD)
    ep = Endpoint(name=BOB, group=Group.PRIVATE, added_at=WHEN, addresses=(BOB4, BOB6), key=k,
                  security=Security.SECURE, tunnels={BOB4: tunnel_spec(k, BOB4, None)})
    back = load_state(dump_state([ep]))
    assert len(back) == 1
    b = back[0]
    assert (b.name, b.group, b.addresses, b.key, b.security) == (
        BOB, Group.PRIVATE, (BOB4, BOB6), k, Security.SECURE)
    assert b.tunnels == ep.tunnels and b.restored
    for bad in (b"[]", b'{"version": 2}', b'{"version": 1, "endpoints": [{"name": 5}]}',
                b"not json"):
        with pytest.raises(ValueError):
            load_state(bad)
    doc = json.loads(dump_state([ep]))
    doc["endpoints"][0]["key"]["public_key"] = "AAAA"  # not an Ed25519 key
    with pytest.raises(ValueError):
        load_state(json.dumps(doc).encode())
    state = tmp_path / "e.json"
    state.write_bytes(b"garbage")
    m, _, _ = manager(state=state)
    m.load()
    assert m.endpoints == {} and (tmp_path / "e.json.bad").read_bytes() == b"garbage"


def test_health_states() -> None:
    k = key_of(PRIV_OLD)
    s4 = tunnel_spec(k, BOB4, None)
    ep = Endpoint(name=BOB, addresses=(BOB4,), key=k, tunnels={BOB4: s4}, last_refresh=WHEN)
    assert health(ep, {BOB4: s4}) is Health.UP
    assert health(ep, {}) is Health.DOWN  # the provisioner lost it and no error yet
    ep.error = "x"
    assert health(ep, {}) is Health.FAILED


# --- under the real Provisioner -------------------------------------------------------------


@aio
async def test_with_real_provisioner(tmp_path: Path) -> None:
    backend = FakeBackend()
    prov = Provisioner(backend, ProvisionConfig(lease=600, grace=60))
    zone = Zone()
    m = EndpointManager(zone, prov, tmp_path / "e.json", keepalive=200)
    await m.add(BOB, None, WHEN)
    installs = [i for i in backend.intents if isinstance(i, InstallTunnel)]
    assert sorted(str(i.spec.destination) for i in installs) == [str(BOB4), str(BOB6)]
    assert m.status(BOB, WHEN)["tunnel"] == "up"
    # A TTL change alone must not replace anything.
    zone.ttl = 17
    await m.refresh(BOB, WHEN + 10)
    assert len([i for i in backend.intents if isinstance(i, InstallTunnel)]) == 2
    # Pinned: no lease expiry, even without keepalives (Rule 5).
    await prov.expire(WHEN + 10_000)
    assert set(prov.tunnels()) == {BOB4, BOB6}
    assert not any(isinstance(i, RemoveTunnel) for i in backend.intents)
    # Key rollover, phase 2: the provisioner replaces the connection with the new key.
    zone.keys = [PRIV_NEW]
    await m.refresh(BOB, WHEN + 3000)
    assert {s.key.public_key for s in prov.tunnels().values()} == {key_of(PRIV_NEW).public_key}
    assert m.status(BOB, WHEN + 3000)["tunnel"] == "up"
    assert ip_address(str(BOB4)) in prov.tunnels()
    assert not any(isinstance(i, RemoveTunnel) for i in backend.intents)  # replaced in place
    # The peer moves: the new address's tunnel is installed, then the old one removed.
    zone.a = [str(BOB4_NEW)]
    await m.refresh(BOB, WHEN + 3100)
    last, before = backend.intents[-1], backend.intents[-2]
    assert isinstance(before, InstallTunnel) and before.spec.destination == BOB4_NEW
    assert isinstance(last, RemoveTunnel) and last.name == tunnel_spec(
        key_of(PRIV_NEW), BOB4, None).name
    assert set(prov.tunnels()) == {BOB4_NEW, BOB6}
    # remove releases everything.
    await m.remove(BOB, WHEN + 3200)
    assert prov.tunnels() == {}
    await prov.expire(WHEN + 10**6)
