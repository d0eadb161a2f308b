"""The watch (resolver/provisioning/watch.py, Provisioner Rule 6) and one address, one key (Rule 7).

The Provisioner and TunnelWatch run for real; the IKE daemon is a FakeBackend (from
tests/test_provision.py) that also holds SAs and reports events the way ViciBackend does:
through the sink given to `watch`, on the loop. The VICI listener's translation of charon's
messages is checked against the message shapes charon 5.9.8 sent in the lab.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import dns.name
import pytest

from resolver.cache import WireCache, WireEntry
from resolver.errors import AddressBound, IkeDaemonUnreachable, TunnelTimeout
from resolver.policy import (
    EDE_NO_KEY,
    Group,
    Refuse,
    SetupFailure,
    Tunnel,
    classify,
)
from resolver.provision import Provisioner
from resolver.provisioning import watch as watch_module
from resolver.provisioning.watch import TunnelWatch
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.events import (
    BackendEvent,
    ChildSaCameUp,
    ChildSaRekeyed,
    ChildSaWentDown,
    DaemonConnected,
    DaemonDisconnected,
    HeldSa,
)
from resolver.tunnels.intents import (
    InstallFloor,
    InstallShunt,
    InstallTunnel,
    Intent,
    RemoveFloor,
    RemoveShunt,
    RemoveTunnel,
    TunnelSpec,
    tunnel_spec,
)
from resolver.tunnels.vici_listener import EventListener
from tests.fakes import FakeBackend
from tests.helpers import aio, until
from tests.test_provision import BOB, CAROL, KEY1, SPEC, WHEN, key

MULTI = dns.name.from_text("multi.example.test.")
CAROL_SPEC = tunnel_spec(key(dns.name.from_text("carol.example.test.")), CAROL, None)
DAVE_SPEC = tunnel_spec(key(dns.name.from_text("dave.example.test.")),
                        IPv4Address("198.51.100.13"), None)


class Charon(FakeBackend):
    """FakeBackend that holds the SAs it installed and reports events like ViciBackend."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, HeldSa] = {}
        self.sink: Callable[[BackendEvent], None] | None = None
        self.ids = 0
        self.reachable = True

    async def apply(self, intent: Intent) -> None:
        if isinstance(intent, InstallTunnel | RemoveTunnel) and not self.reachable:
            self.intents.append(intent)
            raise IkeDaemonUnreachable("charon.vici: connection refused")
        await super().apply(intent)
        if isinstance(intent, InstallTunnel) and intent.spec.name not in self.held:
            self.ids += 1
            self.held[intent.spec.name] = HeldSa(intent.spec.name, str(self.ids), str(self.ids))
        elif isinstance(intent, RemoveTunnel):
            self.held.pop(intent.name, None)

    def watch(self, sink: Callable[[BackendEvent], None]) -> bool:
        self.sink = sink
        return True

    async def live(self) -> frozenset[HeldSa]:
        if not self.reachable:
            raise IkeDaemonUnreachable("charon.vici: connection refused")
        return frozenset(self.held.values())

    def report(self, event: BackendEvent) -> None:
        assert self.sink is not None
        asyncio.get_running_loop().call_soon(self.sink, event)  # as call_soon_threadsafe does

    def delete(self, name: str) -> None:
        """The peer deleted the SA: gone from charon, and reported."""
        sa = self.held.pop(name)
        self.report(ChildSaWentDown(name, "peer deleted it", gone_child=frozenset({sa.child_id})))

    def die(self) -> None:
        self.held.clear()
        self.reachable = False
        self.report(DaemonDisconnected("event session ended (closed by charon)"))

    def back(self) -> None:
        self.reachable = True
        self.report(DaemonConnected(first=False))

    def installs(self) -> int:
        return sum(isinstance(i, InstallTunnel) for i in self.intents)


class Clock:
    def __init__(self) -> None:
        self.now = WHEN

    def __call__(self) -> float:
        return self.now


async def watched(tmp: Path | None = None, **cfg: Any) -> tuple[Charon, Provisioner,
                                                                 TunnelWatch, list[int]]:
    """A Provisioner over a Charon, with a running watch and a counting `on_lost` hook."""
    charon = Charon()
    config = ProvisionConfig(state_file=tmp / "state.json" if tmp else None, **cfg)
    p = Provisioner(charon, config)
    cleared: list[int] = []
    p.on_lost.append(lambda: cleared.append(1))
    w = TunnelWatch(p, Clock(), interval=0)
    assert w.start()
    charon.report(DaemonConnected(first=True))
    await until(lambda: w.connected, "connected")
    return charon, p, w, cleared


# --- Rule 6: the watch -------------------------------------------------------------------------


@aio
async def test_sa_lost_is_shunted_not_answered_then_repaired() -> None:
    charon, p, w, cleared = await watched()
    await p.ensure(SPEC, WHEN, shunt=True)
    await p.ensure(CAROL_SPEC, WHEN)  # not private: no shunt when lost
    assert p.tunnels() == {BOB: SPEC, CAROL: CAROL_SPEC} and p.shunted() == frozenset()
    charon.gate = asyncio.Event()  # the repair will wait here: look at the state in between
    charon.delete(SPEC.name)
    await until(lambda: BOB in p.shunted(), "drop shunt for the lost private tunnel")
    assert p.tunnels() == {CAROL: CAROL_SPEC}  # `autosp status` / answers: not up
    assert p.lease_left(BOB, WHEN) is None and cleared == [1]
    assert p.counters.lost == 1 and p.counters.down == 1
    await until(lambda: charon.installs() == 3, "repair started at once")
    lookup = asyncio.create_task(p.ensure(SPEC, WHEN + 1, shunt=True))  # joins the repair
    await asyncio.sleep(0.01)
    assert not lookup.done()
    charon.gate.set()
    await lookup
    await until(lambda: p.tunnels() == {BOB: SPEC, CAROL: CAROL_SPEC}, "back")
    assert p.shunted() == frozenset() and charon.intents[-1] == RemoveShunt(BOB)
    assert charon.installs() == 3 and p.counters.down == 0
    await w.close()


@aio
async def test_rekey_replacement_and_own_teardown_are_not_losses() -> None:
    charon, p, w, cleared = await watched()
    await p.ensure(SPEC, WHEN, shunt=True)
    old = charon.held[SPEC.name]
    charon.report(ChildSaRekeyed(SPEC.name))
    # the old CHILD_SA of a rekey (or of a make-before-break replacement) goes; a new one is held
    charon.held[SPEC.name] = HeldSa(SPEC.name, old.ike_id, "99")
    charon.report(ChildSaWentDown(SPEC.name, "old one deleted",
                                  gone_child=frozenset({old.child_id})))
    charon.report(ChildSaCameUp(SPEC.name))
    await until(lambda: len(charon.intents) >= 6, what="the rekey handled")
    await asyncio.sleep(0.05)  # and nothing more follows
    # shunted while charon was asked (fail closed), then the shunt was taken out again
    assert p.counters.lost == 0 and cleared == [] and p.shunted() == frozenset()
    assert p.tunnels() == {BOB: SPEC}
    assert [type(i) for i in charon.intents] == [InstallShunt, InstallTunnel, InstallFloor,
                                                 RemoveShunt, InstallShunt, RemoveShunt]
    await p.release(BOB, WHEN)  # our own teardown reports a down too
    charon.report(ChildSaWentDown(SPEC.name, "terminated by us"))
    await until(lambda: len(charon.intents) >= 8, what="the release done")
    await asyncio.sleep(0.05)  # and the down it reported handled
    assert p.counters.lost == 0 and cleared == [] and p.shunted() == frozenset()
    assert [type(i) for i in charon.intents][6:] == [RemoveTunnel, RemoveFloor]
    await w.close()


@aio
async def test_sa_still_listed_while_being_deleted_is_lost() -> None:
    """charon may still list the CHILD_SA an event reported down (its IKE_SA is being
    deleted): the ids the event named never count as held."""
    charon, p, w, _ = await watched()
    await p.ensure(SPEC, WHEN, shunt=True)
    charon.gate = asyncio.Event()  # keep the repair from hiding the loss
    sa = charon.held[SPEC.name]
    charon.report(ChildSaWentDown(SPEC.name, "deleting", gone_child=frozenset({sa.child_id})))
    await until(lambda: p.counters.lost == 1 and BOB in p.shunted(), "lost")
    charon.gate.set()
    await until(lambda: p.tunnels() == {BOB: SPEC}, "repaired")
    charon.gate.clear()
    charon.report(ChildSaWentDown(SPEC.name, "deleting", gone_ike=frozenset({sa.ike_id})))
    await until(lambda: p.counters.lost == 2 and BOB in p.shunted(), "lost again")
    charon.gate.set()
    await w.close()


@aio
async def test_daemon_lost_every_tunnel_down_until_it_is_back(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    charon, p, w, cleared = await watched(failure_hold=10)
    await p.ensure(SPEC, WHEN, shunt=True)
    await p.ensure(CAROL_SPEC, WHEN)
    p.pin(CAROL)
    charon.die()
    await until(lambda: not p.tunnels(), "all down")
    assert p.shunted() == {BOB} and cleared == [1]  # only the private one is dropped
    assert "charon connection lost: event session ended (closed by charon)" in caplog.text
    assert "tunnel to bob.example.test (198.51.100.11) went down: charon connection lost" \
        in caplog.text
    # while charon is gone: a lookup fails at once (and is held), nothing is retried
    with pytest.raises(IkeDaemonUnreachable):
        await p.ensure(SPEC, WHEN + 1, shunt=True)
    with pytest.raises(IkeDaemonUnreachable):
        await p.ensure(DAVE_SPEC, WHEN + 1)  # a new destination: failed and held
    tries = charon.installs()
    await asyncio.sleep(0.1)
    assert charon.installs() == tries and not w.connected
    assert p.shunted() == {BOB}  # the failed lookup kept it shunted (and DOWN, still wanted)
    assert set(p.wanted_down(WHEN + 1)) == {BOB, CAROL}
    charon.back()
    await until(lambda: p.tunnels() == {BOB: SPEC, CAROL: CAROL_SPEC}, "both back")
    assert p.shunted() == frozenset()
    # failures held only because charon was unreachable are forgotten
    assert await p.ensure(DAVE_SPEC, WHEN + 2) == WHEN + 2 + 600
    assert "charon connection back" in caplog.text
    await w.close()


@aio
async def test_setup_spanning_a_daemon_loss_does_not_count() -> None:
    charon, p, w, _ = await watched(failure_hold=0)
    charon.gate = asyncio.Event()
    setup = asyncio.create_task(p.ensure(SPEC, WHEN, shunt=True))
    await until(lambda: charon.installs() == 1, "initiated")
    charon.die()
    await asyncio.sleep(0.02)
    charon.gate.set()  # charon said INSTALLED just before it went away
    with pytest.raises(IkeDaemonUnreachable, match="lost during setup"):
        await setup
    assert p.tunnels() == {} and p.shunted() == {BOB}
    await w.close()


@aio
async def test_failed_repair_stays_down_and_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch_module, "RETRY_FIRST", 0.05)
    charon, p, w, _ = await watched()
    await p.ensure(SPEC, WHEN, shunt=True)
    charon.fail = TunnelTimeout("peer gone")
    charon.delete(SPEC.name)
    await until(lambda: charon.installs() == 2, "first repair")
    await until(lambda: charon.installs() == 3, "retried after the backoff")
    assert p.tunnels() == {} and p.shunted() == {BOB} and BOB in p.wanted_down(WHEN)
    charon.fail = None
    await until(lambda: p.tunnels() == {BOB: SPEC}, "back once the peer answers", 3.0)
    assert p.shunted() == frozenset()
    await w.close()


@aio
async def test_down_tunnel_ends_with_its_lease() -> None:
    charon, p, w, _ = await watched(lease=100, grace=10)
    await p.ensure(SPEC, WHEN)
    charon.fail = TunnelTimeout("peer gone")
    charon.delete(SPEC.name)
    await until(lambda: p.counters.down == 1, "down")
    await p.expire(WHEN + 111)
    assert p.wanted_down(WHEN + 111) == {} and RemoveTunnel(SPEC.name) in charon.intents
    assert p.counters.down == 0
    await w.close()


@aio
async def test_audit_on_reconnect_finds_what_charon_lost_silently() -> None:
    charon, p, w, _ = await watched()
    await p.ensure(SPEC, WHEN, shunt=True)
    charon.held.clear()  # no event reached us (e.g. lost while the listener reconnected)
    charon.gate = asyncio.Event()
    charon.report(DaemonConnected(first=False))
    await until(lambda: BOB in p.shunted() and p.tunnels() == {}, "audit marks it down")
    charon.gate.set()
    await until(lambda: p.tunnels() == {BOB: SPEC}, "repaired")
    await w.close()


@aio
async def test_state_file_keeps_down_tunnels_and_reconcile_retries(tmp_path: Path) -> None:
    charon, p, w, _ = await watched(tmp_path)
    await p.ensure(SPEC, WHEN, shunt=True)
    charon.die()
    await until(lambda: p.counters.down == 1, "down")
    await p.close()
    await w.close()
    # restart while charon is still gone: the tunnel stays wanted (DOWN, private: shunted)
    charon2 = Charon()
    charon2.fail = IkeDaemonUnreachable("not ready")  # charon answers, but no SA comes up
    p2 = Provisioner(charon2, ProvisionConfig(state_file=tmp_path / "state.json"),
                     must_drop=lambda s: s.destination == BOB)  # the policy says private
    await p2.reconcile(WHEN + 1)
    assert p2.tunnels() == {} and p2.wanted_down(WHEN + 1) == {BOB: SPEC.name}
    assert p2.shunted() == {BOB}


# --- Rule 7: one address, one key ----------------------------------------------------------------


def other_name_spec(same_key: bool) -> TunnelSpec:
    k = key(MULTI)
    if same_key:
        k = type(k)(owner=MULTI, precedence=k.precedence, gateway=k.gateway,
                    algorithm=KEY1.algorithm, public_key=KEY1.public_key, ttl=k.ttl)
    return tunnel_spec(k, BOB, None)


@aio
async def test_same_key_under_another_name_rides_the_tunnel() -> None:
    fb = FakeBackend()
    p = Provisioner(fb, ProvisionConfig(lease=600))
    await p.ensure(SPEC, WHEN)
    multi = other_name_spec(same_key=True)
    assert multi.name != SPEC.name
    assert await p.ensure(multi, WHEN + 10) == WHEN + 610  # bob's tunnel, lease extended
    assert fb.kinds() == ["InstallTunnel"] and p.tunnels() == {BOB: SPEC}


@aio
async def test_another_key_for_a_bound_address_is_refused() -> None:
    fb = FakeBackend()
    p = Provisioner(fb, ProvisionConfig(lease=600, grace=60))
    await p.ensure(SPEC, WHEN)
    squatter = other_name_spec(same_key=False)
    with pytest.raises(AddressBound, match=r"198\.51\.100\.11 is bound to the key of "
                                           r"bob\.example\.test"):
        await p.ensure(squatter, WHEN + 10, shunt=True)
    assert fb.kinds() == ["InstallTunnel"] and p.tunnels() == {BOB: SPEC}
    assert p.counters.bound == 1 and p.shunted() == frozenset()
    # the name that made it may still re-key it (Rule 4: a key rollover)
    rolled = tunnel_spec(key(), BOB, None)
    await p.ensure(rolled, WHEN + 20)
    assert p.tunnels() == {BOB: rolled}
    # after its lease ends, the next name binds the address
    await p.ensure(squatter, WHEN + 20 + 601)
    assert p.tunnels() == {BOB: squatter}


@aio
async def test_pinned_or_down_tunnel_still_binds_its_address() -> None:
    fb = FakeBackend()
    p = Provisioner(fb, ProvisionConfig(lease=100))
    await p.ensure(SPEC, WHEN)
    p.pin(BOB)
    with pytest.raises(AddressBound):
        await p.ensure(other_name_spec(same_key=False), WHEN + 1000)  # lease over, pinned
    p.pin(BOB, False)
    await p.lost([SPEC.name], "peer deleted it", WHEN + 50)
    with pytest.raises(AddressBound):  # down, but leased: still bound
        await p.ensure(other_name_spec(same_key=False), WHEN + 60)
    # the same key under the other name brings bob's tunnel back (it is bob's spec)
    await p.ensure(other_name_spec(same_key=True), WHEN + 61)
    assert p.tunnels() == {BOB: SPEC}


def test_address_bound_is_servfail_in_every_group_without_a_shunt() -> None:
    from resolver.policy import Policy, PolicyConfig

    policy = Policy(PolicyConfig())
    assert classify(AddressBound("x")) is SetupFailure.ADDRESS_BOUND
    for group, closed in ((Group.PRIVATE, True), (Group.PRIVATE_OR_CLEAR, False)):
        tunnel = Tunnel(group, (BOB,), (KEY1,), drop_while_negotiating=closed,
                        fail_closed=closed, reason="secure IPSECKEY")
        d = policy.after_setup_failure(tunnel, SetupFailure.ADDRESS_BOUND, "bound to bob")
        assert isinstance(d, Refuse) and d.ede == EDE_NO_KEY and d.drop == ()
        assert d.reason == "address bound to another name's key: bound to bob"


# --- the pieces around it ------------------------------------------------------------------------


def test_wire_cache_drops_a_reply_computed_before_a_clear() -> None:
    cache = WireCache(10)
    entry = WireEntry(b"x" * 20, WHEN, (), 1)
    generation = cache.generation
    cache.clear()  # a tunnel was lost while the reply was being computed
    cache.put((b"a", 1, 1, 0), entry, WHEN + 10, generation)
    assert cache.get((b"a", 1, 1, 0), WHEN) is None
    cache.put((b"a", 1, 1, 0), entry, WHEN + 10, cache.generation)
    assert cache.get((b"a", 1, 1, 0), WHEN) is entry


@pytest.mark.parametrize("lost_meanwhile", [False, True])
def test_server_does_not_store_a_reply_computed_across_a_loss(lost_meanwhile: bool) -> None:
    import dns.message
    import dns.rrset

    from resolver.server import Server

    cache = WireCache(10)

    class Handler:
        async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message:
            if lost_meanwhile:
                cache.clear()  # what Provisioner.on_lost does while this answer was computed
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                    "198.51.100.11"))
            return reply

    server = Server(Handler(), cache=cache, clock=lambda: WHEN)
    wire = dns.message.make_query("bob.example.test.", "A").to_wire()
    assert asyncio.run(server.slow_reply(wire, WHEN, udp=True)) is not None
    assert (server.fast_reply(wire, WHEN, udp=True) is None) is lost_meanwhile


# Messages as charon 5.9.8 sent them to a VICI listener in the lab (trimmed to what is read).
_CHILD = {"name": b"isk-bob-aa8231d363", "uniqueid": b"5", "state": b"INSTALLED"}
_DOWN = {"isk-bob-aa8231d363": {"uniqueid": b"3", "state": b"DELETING",
                                "child-sas": {"isk-bob-aa8231d363-5": _CHILD}}}
_REKEY = {"isk-bob-aa8231d363": {"uniqueid": b"2", "state": b"ESTABLISHED", "child-sas": {
    "isk-bob-aa8231d363": {"old": {**_CHILD, "state": b"REKEYED"}, "new": _CHILD}}}}


@pytest.mark.parametrize(("label", "msg", "expected"), [
    ("child-updown", _DOWN, ChildSaWentDown(
        "isk-bob-aa8231d363", "charon reported its CHILD_SA down (IKE_SA #3 DELETING)",
        gone_child=frozenset({"5"}))),
    ("ike-updown", {"isk-bob-aa8231d363": {"uniqueid": b"3", "state": b"DELETING"}},
     ChildSaWentDown("isk-bob-aa8231d363", "charon reported its IKE_SA #3 down (DELETING)",
                     gone_ike=frozenset({"3"}))),
    ("child-updown", {"up": b"yes", **_DOWN}, ChildSaCameUp("isk-bob-aa8231d363")),
    ("child-rekey", _REKEY, ChildSaRekeyed("isk-bob-aa8231d363")),
    ("ike-updown", {"up": b"yes", "isk-bob-aa8231d363": {"uniqueid": b"3"}}, None),
    ("child-updown", {"peer-alice": _DOWN["isk-bob-aa8231d363"]}, None),  # not ours
])
def test_listener_reports_charons_events(label: str, msg: dict[str, Any],
                                         expected: BackendEvent | None) -> None:
    seen: list[BackendEvent] = []

    class Loop:
        def call_soon_threadsafe(self, fn: Callable[[BackendEvent], None],
                                 event: BackendEvent) -> None:
            fn(event)

    listener = EventListener("unix:///nonexistent", 1.0)
    listener.subscribe(Loop(), seen.append)  # type: ignore[arg-type]
    listener._event(label, msg)
    assert seen == ([expected] if expected is not None else [])


@aio
async def test_a_down_tunnel_is_never_answered_from() -> None:
    """`tunnels()` (autosp status/list) and `lease_left` (answers) leave a DOWN tunnel out;
    `lost` ignores names that are not tunnels of ours."""
    p = Provisioner(FakeBackend(), ProvisionConfig())
    await p.ensure(SPEC, WHEN)
    assert await p.lost(["isk-unknown-0000000000"], "not ours", WHEN) == []
    assert await p.lost([SPEC.name], "peer deleted it", WHEN) == [BOB]
    assert p.tunnels() == {} and p.lease_left(BOB, WHEN) is None
    assert p.held_names() == {} and p.wanted_down(WHEN) == {BOB: SPEC.name}


def test_listener_keeps_quiet_about_ike_sas_we_end_ourselves() -> None:
    """The old IKE_SAs of a make-before-break replacement: their downs are no loss."""
    seen: list[BackendEvent] = []

    class Loop:
        def call_soon_threadsafe(self, fn: Callable[[BackendEvent], None],
                                 event: BackendEvent) -> None:
            fn(event)

    listener = EventListener("unix:///nonexistent", 1.0)
    listener.subscribe(Loop(), seen.append)  # type: ignore[arg-type]
    listener.ending({"3"})
    listener._event("ike-updown", {"isk-bob-aa8231d363": {"uniqueid": b"3"}})
    listener._event("child-updown", _DOWN)
    assert seen == []
    listener._event("child-updown", {"isk-bob-aa8231d363": {**_DOWN["isk-bob-aa8231d363"],
                                                            "uniqueid": b"4"}})
    assert [type(e) for e in seen] == [ChildSaWentDown]


@aio
async def test_down_tunnel_taken_over_after_its_lease_leaves_no_stray_conn() -> None:
    fb = FakeBackend()
    p = Provisioner(fb, ProvisionConfig(lease=100, grace=60))
    await p.ensure(SPEC, WHEN)
    await p.lost([SPEC.name], "peer deleted it", WHEN + 10)
    squatter = other_name_spec(same_key=False)
    await p.ensure(squatter, WHEN + 101)  # bob's lease is over: the address is free again
    assert p.tunnels() == {BOB: squatter}
    assert fb.intents[-2:] == [InstallTunnel(squatter, 3.0), RemoveTunnel(SPEC.name)]
