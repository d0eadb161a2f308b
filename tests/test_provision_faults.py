"""resolver.provision under faults (issue 10 items 3 and 4, issue 12's missing charon), with
the tests' FakeBackend and a pinned clock:

- a state file that cannot be trusted (empty, truncated, random bytes, wrong schema, a
  directory) never removes a tunnel: what the backend holds under our names is adopted with a
  short lease, set up again under the DNS key by the next lookup, torn down when unused; the
  file is kept as .bad;
- a state write that fails undoes the tunnel it was to record (its drop shunt stays) and the
  lookup fails with StateUnrecorded, also for a lookup that came in while the write was on;
- an IKE daemon missing at start-up removes nothing, fails lookups at once, keeps the wanted
  state in the file, and the retry reconciles when it appears.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import dns.name
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

import resolver.provision as provision_module
import resolver.statefile as statefile_module
from resolver.errors import IkeDaemonUnreachable, StateUnrecorded
from resolver.ipseckey import IpsecKey
from resolver.policy import SetupFailure, classify
from resolver.provision import ADOPTED_LEASE, Provisioner
from resolver.provisioning.watch import TunnelWatch
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.events import BackendEvent, DaemonConnected, HeldSa
from resolver.tunnels.intents import (
    InstallFloor,
    InstallShunt,
    InstallTunnel,
    Intent,
    PolicyKey,
    RemoveShunt,
    RemoveTunnel,
    TunnelSpec,
    tunnel_spec,
)
from tests.fakes import FakeBackend
from tests.helpers import aio, until

WHEN = 1_800_000_000.0
BOB = IPv4Address("198.51.100.11")
CAROL = IPv4Address("198.51.100.12")
DAVE = IPv4Address("198.51.100.13")


def spec_for(name: str, address: IPv4Address) -> TunnelSpec:
    owner = dns.name.from_text(name)
    key = IpsecKey.from_public_key(owner, ed25519.Ed25519PrivateKey.generate().public_key(),
                                   ttl=60)
    return tunnel_spec(key, address, None)


BOB_SPEC, CAROL_SPEC = spec_for("bob.example.test.", BOB), spec_for("carol.example.test.", CAROL)


def prov(backend: FakeBackend, tmp: Path, **kw: float) -> Provisioner:
    cfg = ProvisionConfig(state_file=tmp / "state.json", **kw)  # type: ignore[arg-type]
    return Provisioner(backend, cfg)


def removals(fb: FakeBackend) -> list[Intent]:
    return [i for i in fb.intents if isinstance(i, RemoveTunnel | RemoveShunt)]


# --- state that cannot be trusted: adopt, never remove -------------------------------------

GOOD_DOC = json.dumps({"version": 1, "tunnels": [], "shunts": []})
CORRUPTIONS = {
    "empty": b"",
    "truncated": GOOD_DOC.encode()[: len(GOOD_DOC) // 2],
    "random": bytes(range(256)) * 3,
    "wrong schema": json.dumps({"version": 1, "tunnels": {"isk-bob": 1}, "shunts": []}).encode(),
    "a list": b"[]",
    "bad tunnel": json.dumps({"version": 1, "shunts": [],
                              "tunnels": [{"name": "isk-x", "destination": "nonsense"}]}).encode(),
    "deep nesting": b"[" * 100_000,
}


def corrupt(path: Path, kind: str) -> None:
    if kind == "directory":
        path.mkdir()
        (path / "inside").write_text("x")
    else:
        path.write_bytes(CORRUPTIONS[kind])


def held_by_charon() -> set[PolicyKey]:
    return {PolicyKey.tunnel(BOB_SPEC.name), PolicyKey.tunnel(CAROL_SPEC.name),
            PolicyKey.shunt(DAVE)}


@pytest.mark.parametrize("kind", [*CORRUPTIONS, "directory"])
@aio
async def test_corrupt_state_adopts_what_is_held_and_keeps_the_file(tmp_path: Path,
                                                                    kind: str) -> None:
    state = tmp_path / "state.json"
    corrupt(state, kind)
    fb = FakeBackend()
    fb.items = held_by_charon()
    p = prov(fb, tmp_path, lease=600, grace=60)
    await p.reconcile(WHEN)
    assert removals(fb) == [] and fb.items == held_by_charon()  # nothing removed
    assert p.counters.adopted == 2 and p.shunted() == {DAVE}
    bad = tmp_path / "state.json.bad"
    if kind == "directory":
        assert (bad / "inside").read_text() == "x"
    else:
        assert bad.read_bytes() == CORRUPTIONS[kind]  # kept as it was, not overwritten
    doc = json.loads(state.read_text())  # a fresh, valid file that records the adoption
    assert sorted(e["name"] for e in doc["adopted"]) == sorted([BOB_SPEC.name, CAROL_SPEC.name])
    assert [e["destination"] for e in doc["shunts"]] == [str(DAVE)]


@aio
async def test_adopted_tunnels_and_shunts_expire_when_unused(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"")
    fb = FakeBackend()
    fb.items = held_by_charon()
    p = prov(fb, tmp_path, lease=600, grace=10)
    await p.reconcile(WHEN)
    await p.expire(WHEN + ADOPTED_LEASE + 9)
    assert removals(fb) == []  # short lease + grace not over yet
    await p.expire(WHEN + ADOPTED_LEASE + 11)
    assert set(removals(fb)) == {RemoveTunnel(BOB_SPEC.name), RemoveTunnel(CAROL_SPEC.name),
                                 RemoveShunt(DAVE)}
    assert fb.items == set() and p.counters.adopted == 0
    assert "adopted" not in json.loads((tmp_path / "state.json").read_text())


@aio
async def test_a_lookup_sets_an_adopted_tunnel_up_again_under_the_dns_key(
        tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"{")
    fb = FakeBackend()
    fb.items = held_by_charon()
    p = prov(fb, tmp_path, lease=600, grace=10)
    await p.reconcile(WHEN)
    fb.intents.clear()
    lease_end = await p.ensure(BOB_SPEC, WHEN + 1, shunt=True)
    # not taken as it is (its key is unknown): dropped meanwhile, removed, set up afresh
    assert fb.intents == [InstallShunt(BOB), RemoveTunnel(BOB_SPEC.name),
                          InstallTunnel(BOB_SPEC, 3.0), InstallFloor(BOB), RemoveShunt(BOB)]
    assert lease_end == WHEN + 601 and p.tunnels() == {BOB: BOB_SPEC}
    assert p.counters.adopted == 1
    fb.intents.clear()
    await p.expire(WHEN + ADOPTED_LEASE + 11)  # carol's adoption ends, bob's tunnel is ours
    assert set(removals(fb)) == {RemoveTunnel(CAROL_SPEC.name), RemoveShunt(DAVE)}
    assert p.tunnels() == {BOB: BOB_SPEC}


@aio
async def test_adoption_survives_a_restart_while_its_lease_runs(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"\x00")
    fb = FakeBackend()
    fb.items = held_by_charon()
    await prov(fb, tmp_path, grace=10).reconcile(WHEN)
    fb2 = FakeBackend()
    fb2.items = {PolicyKey.tunnel(BOB_SPEC.name), PolicyKey.shunt(DAVE)}  # carol's went away
    p2 = prov(fb2, tmp_path, grace=10)
    await p2.reconcile(WHEN + 5)
    assert removals(fb2) == [] and p2.counters.adopted == 1  # bob's still adopted, not a stray
    fb3 = FakeBackend()
    fb3.items = {PolicyKey.tunnel(BOB_SPEC.name)}
    await prov(fb3, tmp_path, grace=10).reconcile(WHEN + ADOPTED_LEASE + 11)
    assert removals(fb3) == [RemoveTunnel(BOB_SPEC.name)]  # its lease ended: a stray now


@aio
async def test_a_missing_state_file_still_means_nothing_is_wanted(tmp_path: Path) -> None:
    """Deleting the state file is how an operator says "remove every tunnel of ours"; only an
    unreadable one is adopted."""
    fb = FakeBackend()
    fb.items = held_by_charon()
    await prov(fb, tmp_path).reconcile(WHEN)
    assert fb.items == set()


# --- a state write that fails: undo, clear error ---------------------------------------------


def failing_writes(monkeypatch: pytest.MonkeyPatch, err: int = errno.ENOSPC,
                   delay: float = 0.0) -> list[bool]:
    """Make every state write fail with `err` (after `delay` s) while the returned switch is
    on; switch it off (`switch[0] = False`) to let writes through again."""
    switch = [True]
    real = statefile_module.write_atomically

    def write(path: Path, data: bytes) -> None:
        if switch[0]:
            if delay:
                time.sleep(delay)
            raise OSError(err, os.strerror(err))
        real(path, data)

    monkeypatch.setattr(statefile_module, "write_atomically", write)
    return switch


@pytest.mark.parametrize(("err", "why"), [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system")])
@aio
async def test_unrecorded_tunnel_is_undone_and_its_shunt_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, why: str) -> None:
    fb = FakeBackend()
    p = prov(fb, tmp_path, failure_hold=0)
    switch = failing_writes(monkeypatch, err)
    with pytest.raises(StateUnrecorded) as caught:
        await p.ensure(BOB_SPEC, WHEN, shunt=True)
    assert why in str(caught.value) and str(tmp_path / "state.json") in str(caught.value)
    assert fb.intents == [InstallShunt(BOB), InstallTunnel(BOB_SPEC, 3.0),
                          RemoveTunnel(BOB_SPEC.name)]  # no RemoveShunt: drop, never clear
    assert fb.items == {PolicyKey.shunt(BOB)} and p.tunnels() == {} and p.shunted() == {BOB}
    assert classify(caught.value) is SetupFailure.UNRECORDED  # SERVFAIL EDE 0 (test_capture)
    # the same lookup again: the same failure, never an answer over an unrecorded SA
    with pytest.raises(StateUnrecorded):
        await p.ensure(BOB_SPEC, WHEN + 1, shunt=True)
    assert fb.items == {PolicyKey.shunt(BOB)}
    switch[0] = False  # space again
    await p.ensure(BOB_SPEC, WHEN + 2, shunt=True)
    assert fb.items == {PolicyKey.tunnel(BOB_SPEC.name), PolicyKey.floor(BOB)}
    assert p.tunnels() == {BOB: BOB_SPEC}
    doc = json.loads((tmp_path / "state.json").read_text())
    assert [e["name"] for e in doc["tunnels"]] == [BOB_SPEC.name] and doc["shunts"] == []


@aio
async def test_a_lookup_during_the_failing_write_is_not_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second lookup arrives while the first one's tunnel is up but its write is still on:
    it must share the first one's fate, not be answered over the tunnel about to be undone."""
    fb = FakeBackend()
    p = prov(fb, tmp_path, failure_hold=0)
    failing_writes(monkeypatch, delay=0.2)
    first = asyncio.create_task(p.ensure(BOB_SPEC, WHEN))
    await until(lambda: fb.of(InstallTunnel), "the setup reached the backend")
    await asyncio.sleep(0.02)  # the tunnel is in the books now, its write on the thread
    results = await asyncio.gather(first, p.ensure(BOB_SPEC, WHEN), return_exceptions=True)
    assert [type(r) for r in results] == [StateUnrecorded, StateUnrecorded]
    assert fb.items == set()


@aio
async def test_a_shunt_whose_write_fails_is_kept_without_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal's drop shunt: in place whether or not the file could record it (the answer
    is SERVFAIL either way), so no exception reaches the query handler."""
    fb = FakeBackend()
    p = prov(fb, tmp_path)
    failing_writes(monkeypatch)
    await p.shunt([CAROL], WHEN)
    assert fb.items == {PolicyKey.shunt(CAROL)} and p.shunted() == {CAROL}


# --- no IKE daemon at start-up -----------------------------------------------------------------


class Absent(FakeBackend):
    """The IKE daemon's socket is not there (yet): its side fails, XFRM works."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False

    async def installed(self) -> frozenset[PolicyKey]:
        if not self.up:
            raise IkeDaemonUnreachable("IKE daemon at unix:///run/charon.vici: no such file")
        return await super().installed()

    async def apply(self, intent: Intent) -> None:
        if not self.up and isinstance(intent, InstallTunnel | RemoveTunnel):
            raise IkeDaemonUnreachable("IKE daemon at unix:///run/charon.vici: no such file")
        await super().apply(intent)


def saved_state(tmp_path: Path) -> None:
    """A state file from a previous run: bob's tunnel (leased), a shunt for dave."""
    fb = FakeBackend()
    p = prov(fb, tmp_path)

    async def build() -> None:
        await p.ensure(BOB_SPEC, WHEN)
        await p.shunt([DAVE], WHEN)

    asyncio.run(build())


@aio
async def test_missing_ike_daemon_at_start_removes_nothing_and_fails_fast(tmp_path: Path) -> None:
    await asyncio.to_thread(saved_state, tmp_path)
    fb = Absent()
    fb.items = {PolicyKey.tunnel("isk-stray-0123456789")}  # would be a stray: not touched now
    p = prov(fb, tmp_path)
    await p.reconcile(WHEN + 1)  # no exception: the daemon serves DNS
    assert not p.ike_ready
    assert fb.intents == [InstallShunt(DAVE)] and p.shunted() == {DAVE}  # XFRM needs no charon
    with pytest.raises(IkeDaemonUnreachable, match="not ready"):
        await p.ensure(CAROL_SPEC, WHEN + 2, shunt=True)
    assert fb.of(InstallTunnel) == []  # failed at once, nothing asked of the daemon
    # a write while waiting (a refusal's shunt) keeps the wanted tunnels in the file
    await p.shunt([CAROL], WHEN + 2)
    doc = json.loads((tmp_path / "state.json").read_text())
    assert [e["name"] for e in doc["tunnels"]] == [BOB_SPEC.name]
    assert sorted(e["destination"] for e in doc["shunts"]) == [str(CAROL), str(DAVE)]
    # the daemon appears: reconcile as at start, with the shunts added meanwhile kept
    fb.up = True
    await p.reconcile(WHEN + 3)
    assert p.ike_ready and p.tunnels() == {BOB: BOB_SPEC}
    assert RemoveTunnel("isk-stray-0123456789") in fb.intents
    assert p.shunted() == {CAROL, DAVE}
    assert await p.ensure(CAROL_SPEC, WHEN + 4, shunt=True) == WHEN + 604


@aio
async def test_connect_later_retries_until_the_daemon_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provision_module, "IKE_RETRY", 0.01)
    fb = Absent()
    p = prov(fb, tmp_path)
    await p.reconcile(WHEN)
    retry = asyncio.create_task(p.connect_later(lambda: WHEN + 1))
    await asyncio.sleep(0.05)
    assert not retry.done() and not p.ike_ready
    fb.up = True
    await asyncio.wait_for(retry, 1.0)
    assert p.ike_ready
    await p.ensure(BOB_SPEC, WHEN + 2)
    assert p.tunnels() == {BOB: BOB_SPEC}


@aio
async def test_private_tunnels_of_the_state_file_are_dropped_while_the_daemon_is_away(
        tmp_path: Path) -> None:
    """Charon missing at start also means their SAs are gone: a private destination's
    packets (from answers given before the restart) are dropped, never sent in clear."""
    await asyncio.to_thread(saved_state, tmp_path)
    fb = Absent()
    p = Provisioner(fb, ProvisionConfig(state_file=tmp_path / "state.json"),
                    must_drop=lambda spec: True)
    await p.reconcile(WHEN + 1)
    assert p.shunted() == {BOB, DAVE} and p.tunnels() == {}
    fb.up = True
    await p.reconcile(WHEN + 2)
    assert p.tunnels() == {BOB: BOB_SPEC} and p.shunted() == {DAVE}  # up: its shunt went


class Watched(Absent):
    """Absent, with the event session of a watchable backend (resolver/provisioning/watch.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.sink: Callable[[BackendEvent], None] | None = None

    def watch(self, sink: Callable[[BackendEvent], None]) -> bool:
        self.sink = sink
        return True

    async def live(self) -> frozenset[HeldSa]:
        return frozenset(HeldSa(k.ident, "1", "1") for k in await self.installed())


@aio
async def test_the_watch_reconciles_as_soon_as_charon_connects(tmp_path: Path) -> None:
    await asyncio.to_thread(saved_state, tmp_path)
    fb = Watched()
    p = prov(fb, tmp_path)
    await p.reconcile(WHEN + 1)
    watch = TunnelWatch(p, lambda: WHEN + 2, interval=0)
    assert watch.start() and fb.sink is not None
    try:
        fb.up = True
        fb.sink(DaemonConnected(first=True))  # what the VICI listener reports on connecting
        await until(lambda: p.ike_ready and p.tunnels(), "reconciled on connect", 1.5)
        assert p.ike_ready and p.tunnels() == {BOB: BOB_SPEC}  # no 2 s retry waited for
    finally:
        await watch.close()
