"""Rule 9 of resolver.provision, with the tests' FakeBackend and a pinned clock: the floor under
a private destination's tunnel goes in once the tunnel is up and before the negotiating shunt
comes out, stays while the tunnel is wanted (DOWN too), goes after the tunnel at lease end or
release, and reconcile keeps exactly the floors the state file's tunnels want (all of them when
the state cannot be trusted). What the floor does in the kernel is tested in
tests/integration/test_provision_xfrm.py and, with charon, tests/integration/test_charon_watch.py.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import dns.name
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.errors import ProvisioningError
from resolver.ipseckey import IpsecKey
from resolver.provision import Provisioner
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.intents import (
    InstallFloor,
    InstallShunt,
    InstallTunnel,
    Intent,
    PolicyKey,
    RemoveFloor,
    RemoveShunt,
    RemoveTunnel,
    TunnelSpec,
    tunnel_spec,
)
from tests.fakes import FakeBackend
from tests.helpers import aio

WHEN = 1_800_000_000.0
BOB, CAROL = IPv4Address("198.51.100.11"), IPv4Address("198.51.100.12")


def spec(owner: str, dest: IPv4Address) -> TunnelSpec:
    key = IpsecKey.from_public_key(dns.name.from_text(owner),
                                   ed25519.Ed25519PrivateKey.generate().public_key(), ttl=60)
    return tunnel_spec(key, dest, None)


BOB_SPEC = spec("bob.example.test.", BOB)
CAROL_SPEC = spec("carol.example.test.", CAROL)


def prov(fb: FakeBackend, tmp: Path | None = None, *, private: frozenset[IPv4Address] = frozenset(),
         **kw: float) -> Provisioner:
    """`private`: the destinations the policy makes private (must_drop), as after a restart."""
    cfg = ProvisionConfig(state_file=tmp / "state.json" if tmp else None, **kw)  # type: ignore[arg-type]
    return Provisioner(fb, cfg, must_drop=lambda s: s.destination in private)


def floors(fb: FakeBackend) -> list[Intent]:
    return [i for i in fb.intents if isinstance(i, InstallFloor | RemoveFloor)]


@aio
async def test_a_private_tunnel_is_floored_before_its_shunt_goes_until_its_lease_ends() -> None:
    fb = FakeBackend()
    p = prov(fb, lease=100, grace=10)
    await p.ensure(BOB_SPEC, WHEN, shunt=True)
    assert fb.intents == [InstallShunt(BOB), InstallTunnel(BOB_SPEC, 3.0), InstallFloor(BOB),
                          RemoveShunt(BOB)]
    await p.ensure(BOB_SPEC, WHEN + 50, shunt=True)  # answered from the books: nothing new
    assert len(fb.intents) == 4
    fb.intents.clear()
    assert await p.expire(WHEN + 160) is None
    # the tunnel first, then its floor: no moment with neither
    assert fb.intents == [RemoveTunnel(BOB_SPEC.name), RemoveFloor(BOB)]
    assert fb.items == set()


@aio
async def test_a_tunnel_that_is_not_private_has_no_floor() -> None:
    fb = FakeBackend()
    p = prov(fb, lease=100, grace=10)
    await p.ensure(CAROL_SPEC, WHEN)
    await p.expire(WHEN + 110)
    assert floors(fb) == [] and fb.kinds() == ["InstallTunnel", "RemoveTunnel"]


@aio
async def test_the_policy_alone_makes_a_tunnel_private() -> None:
    fb = FakeBackend()
    p = prov(fb, private=frozenset({BOB}))
    await p.ensure(BOB_SPEC, WHEN)  # shunt=False (e.g. restored at reconcile), yet private
    assert floors(fb) == [InstallFloor(BOB)]


@aio
async def test_a_tunnel_that_becomes_private_is_floored_once() -> None:
    """Two names, two groups, one address: the private one's lookup finds the tunnel up."""
    fb = FakeBackend()
    p = prov(fb)
    await p.ensure(BOB_SPEC, WHEN)
    assert floors(fb) == []
    await p.ensure(BOB_SPEC, WHEN + 1, shunt=True)
    await p.ensure(BOB_SPEC, WHEN + 2, shunt=True)
    assert floors(fb) == [InstallFloor(BOB)]


@aio
async def test_release_removes_the_floor_after_the_tunnel() -> None:
    fb = FakeBackend()
    p = prov(fb)
    await p.ensure(BOB_SPEC, WHEN, shunt=True)
    fb.intents.clear()
    await p.release(BOB, WHEN + 1)
    assert fb.intents == [RemoveTunnel(BOB_SPEC.name), RemoveFloor(BOB)]


@aio
async def test_a_lost_tunnel_keeps_its_floor_and_is_floored_again_when_back() -> None:
    fb = FakeBackend()
    p = prov(fb)
    await p.ensure(BOB_SPEC, WHEN, shunt=True)
    fb.items.discard(PolicyKey.tunnel(BOB_SPEC.name))  # charon lost it
    fb.intents.clear()
    assert await p.lost([BOB_SPEC.name], "charon connection lost", WHEN + 1) == [BOB]
    assert fb.intents == [InstallShunt(BOB)]  # the floor is not touched
    assert fb.items == {PolicyKey.floor(BOB), PolicyKey.shunt(BOB)}
    assert await p.repair(BOB, WHEN + 2)
    # put in again (charon came back with a new TUN device), before the shunt goes
    assert fb.intents[1:] == [InstallTunnel(BOB_SPEC, 3.0), InstallFloor(BOB), RemoveShunt(BOB)]


class FloorFails(FakeBackend):
    async def apply(self, intent: Intent) -> None:
        if isinstance(intent, InstallFloor):
            self.intents.append(intent)
            raise ProvisioningError("XFRM netlink: InstallFloor 198.51.100.11: no route")
        await super().apply(intent)


@aio
async def test_a_floor_that_cannot_be_put_in_is_logged_and_the_tunnel_still_serves(
        caplog: pytest.LogCaptureFixture) -> None:
    fb = FloorFails()
    p = prov(fb)
    assert await p.ensure(BOB_SPEC, WHEN, shunt=True) > WHEN
    assert p.tunnels() == {BOB: BOB_SPEC} and fb.kinds()[-1] == "RemoveShunt"
    assert any("InstallFloor failed" in r.getMessage() and "no route" in r.getMessage()
               for r in caplog.records)


@aio
async def test_reconcile_keeps_the_floors_the_state_wants_and_removes_the_others(
        tmp_path: Path) -> None:
    fb = FakeBackend()
    p = prov(fb, tmp_path, private=frozenset({BOB}))
    await p.ensure(BOB_SPEC, WHEN, shunt=True)
    await p.ensure(CAROL_SPEC, WHEN)
    await p.close()
    # kill -9; then charon lost bob's tunnel; a floor of ours for carol (e.g. from a time
    # when carol was private) is a stray now
    fb2 = FakeBackend()
    fb2.items = {PolicyKey.floor(BOB), PolicyKey.tunnel(CAROL_SPEC.name),
                 PolicyKey.floor(CAROL)}
    p2 = prov(fb2, tmp_path, private=frozenset({BOB}))
    await p2.reconcile(WHEN + 1)
    assert RemoveFloor(CAROL) in fb2.intents and RemoveFloor(BOB) not in fb2.intents
    assert fb2.items == {PolicyKey.tunnel(BOB_SPEC.name), PolicyKey.floor(BOB),
                         PolicyKey.tunnel(CAROL_SPEC.name)}


@aio
async def test_untrusted_state_keeps_every_floor(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"{")
    fb = FakeBackend()
    fb.items = {PolicyKey.tunnel(BOB_SPEC.name), PolicyKey.floor(BOB), PolicyKey.floor(CAROL)}
    p = prov(fb, tmp_path, private=frozenset({BOB}))
    await p.reconcile(WHEN)
    assert floors(fb) == [] and fb.items >= {PolicyKey.floor(BOB), PolicyKey.floor(CAROL)}


@aio
async def test_a_floor_goes_with_its_tunnel_even_if_the_policy_changed_meanwhile() -> None:
    """A reload (SIGHUP) can move a destination out of `private` while its tunnel is up: its
    floor still goes at the lease end, never left behind to block it in clear."""
    private = {BOB}
    fb = FakeBackend()
    p = Provisioner(fb, ProvisionConfig(lease=100, grace=10),
                    must_drop=lambda s: s.destination in private)
    await p.ensure(BOB_SPEC, WHEN)
    assert floors(fb) == [InstallFloor(BOB)]
    private.clear()
    await p.expire(WHEN + 110)
    assert floors(fb) == [InstallFloor(BOB), RemoveFloor(BOB)] and fb.items == set()


@aio
async def test_a_tunnel_the_policy_makes_private_while_it_is_up_is_floored_on_its_next_lookup(
        ) -> None:
    private: set[IPv4Address] = set()
    fb = FakeBackend()
    p = Provisioner(fb, ProvisionConfig(), must_drop=lambda s: s.destination in private)
    await p.ensure(BOB_SPEC, WHEN)
    private.add(BOB)  # a reload
    await p.ensure(BOB_SPEC, WHEN + 1)
    await p.ensure(BOB_SPEC, WHEN + 2)
    assert floors(fb) == [InstallFloor(BOB)]
