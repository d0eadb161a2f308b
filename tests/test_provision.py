"""resolver.provision with the tests' FakeBackend (tests/fakes.py) and a pinned clock:
coalescing, timeouts, leases, replacement, shunts, the state file and reconcile; the backend
composite and factory, the dry run, naming and the [provision] table."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import dns.name
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.errors import (
    ConfigError,
    IkeDaemonUnreachable,
    ProvisioningError,
    TunnelRejected,
    TunnelTimeout,
)
from resolver.ipseckey import IpsecKey
from resolver.policy import SetupFailure, classify
from resolver.provision import Provisioner
from resolver.tunnels.backend import CompositeBackend
from resolver.tunnels.config import Identity, ProvisionConfig
from resolver.tunnels.dryrun import DryRunBackend
from resolver.tunnels.intents import (
    InstallFloor,
    InstallShunt,
    InstallTunnel,
    Intent,
    ItemKind,
    PolicyKey,
    RemoveShunt,
    RemoveTunnel,
    connection_name,
    tunnel_spec,
)
from tests.fakes import FakeBackend
from tests.helpers import aio, until

WHEN = 1_800_000_000.0  # pinned clock (POSIX seconds)
BOB_NAME = dns.name.from_text("bob.example.test.")
BOB = IPv4Address("198.51.100.11")
CAROL = IPv4Address("198.51.100.12")


def key(owner: dns.name.Name = BOB_NAME) -> IpsecKey:
    return IpsecKey.from_public_key(owner, ed25519.Ed25519PrivateKey.generate().public_key(),
                                    ttl=60)


KEY1, KEY2 = key(), key()
SPEC = tunnel_spec(KEY1, BOB, None)


def prov(backend: FakeBackend, tmp: Path | None = None, **kw: float) -> Provisioner:
    cfg = ProvisionConfig(state_file=tmp / "state.json" if tmp else None, **kw)  # type: ignore[arg-type]
    return Provisioner(backend, cfg)


@aio
async def test_install_then_extend_lease() -> None:
    fb = FakeBackend()
    p = prov(fb, lease=600, grace=60)
    assert await p.ensure(SPEC, WHEN) == WHEN + 600
    assert fb.kinds() == ["InstallTunnel"]
    assert fb.intents[0] == InstallTunnel(SPEC, 3.0)
    assert await p.ensure(SPEC, WHEN + 100) == WHEN + 700  # each answer extends the lease
    assert fb.kinds() == ["InstallTunnel"]
    assert p.lease_left(BOB, WHEN + 100) == 600
    assert p.counters.setups == 1 and p.counters.active == 1
    assert p.tunnels() == {BOB: SPEC}


@aio
async def test_fifty_concurrent_lookups_make_one_tunnel() -> None:
    fb = FakeBackend()
    fb.gate = asyncio.Event()
    p = prov(fb)
    tasks = [asyncio.create_task(p.ensure(SPEC, WHEN)) for _ in range(50)]
    await asyncio.sleep(0)
    fb.gate.set()
    results = await asyncio.gather(*tasks)
    assert set(results) == {WHEN + 600}
    assert fb.kinds() == ["InstallTunnel"]
    assert p.counters.coalesced == 49 and p.counters.setups == 1


@aio
async def test_concurrent_failure_is_shared_and_held() -> None:
    fb = FakeBackend()
    fb.gate = asyncio.Event()
    fb.fail = TunnelRejected("AUTH_FAILED")
    p = prov(fb, failure_hold=10)
    tasks = [asyncio.create_task(p.ensure(SPEC, WHEN)) for _ in range(5)]
    await asyncio.sleep(0)
    fb.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TunnelRejected) for r in results)
    # one attempt, then the half-open IKE_SA is terminated and the connection unloaded
    assert fb.kinds() == ["InstallTunnel", "RemoveTunnel"]
    assert p.counters.failures == 1 and p.counters.active == 0
    with pytest.raises(TunnelRejected):  # held: answered from memory, no new attempt
        await p.ensure(SPEC, WHEN + 5)
    assert fb.kinds() == ["InstallTunnel", "RemoveTunnel"]
    fb.fail = None
    assert await p.ensure(SPEC, WHEN + 11) == WHEN + 611  # hold over: tried again
    assert fb.kinds()[-1] == "InstallTunnel" and p.counters.setups == 1


@aio
async def test_hanging_backend_times_out() -> None:
    fb = FakeBackend()
    fb.hang = True
    p = prov(fb, timeout=0.1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TunnelTimeout, match=r"within 0\.1 s"):
        await p.ensure(SPEC, WHEN)
    assert loop.time() - t0 < 1.0  # timeout + 0.5 s safety margin
    assert fb.kinds() == ["InstallTunnel", "RemoveTunnel"]


@aio
async def test_shunt_while_negotiating_removed_on_success() -> None:
    fb = FakeBackend()
    fb.gate = asyncio.Event()
    p = prov(fb)
    task = asyncio.create_task(p.ensure(SPEC, WHEN, shunt=True))
    await until(lambda: len(fb.kinds()) >= 2, what="shunt and tunnel asked for")
    assert fb.kinds() == ["InstallShunt", "InstallTunnel"]  # drop while negotiating
    assert p.shunted() == {BOB}
    fb.gate.set()
    await task
    # the floor goes in before the shunt comes out: never a moment without either (Rule 9)
    assert fb.kinds() == ["InstallShunt", "InstallTunnel", "InstallFloor", "RemoveShunt"]
    assert p.shunted() == frozenset()
    assert fb.items == {PolicyKey.tunnel(SPEC.name), PolicyKey.floor(BOB)}


@aio
async def test_shunt_kept_after_failure_then_expires() -> None:
    fb = FakeBackend()
    fb.fail = TunnelTimeout("no answer")
    p = prov(fb, lease=600, grace=60)
    with pytest.raises(TunnelTimeout):
        await p.ensure(SPEC, WHEN, shunt=True)
    assert fb.kinds() == ["InstallShunt", "InstallTunnel", "RemoveTunnel"]
    assert fb.items == {PolicyKey.shunt(BOB)}  # drop after failure in private
    assert await p.expire(WHEN + 659) == WHEN + 660
    assert fb.items == {PolicyKey.shunt(BOB)}
    assert await p.expire(WHEN + 660) is None
    assert fb.items == set() and fb.kinds()[-1] == "RemoveShunt"


@aio
async def test_key_replacement_make_before_break() -> None:
    fb = FakeBackend()
    p = prov(fb)
    await p.ensure(SPEC, WHEN, shunt=True)
    new = tunnel_spec(KEY2, BOB, None)
    assert new.name == SPEC.name and new != SPEC
    fb.intents.clear()
    await p.ensure(new, WHEN + 1, shunt=True)
    # no shunt (it would block the working tunnel), no RemoveTunnel before the new SA is up
    assert fb.intents == [InstallTunnel(new, 3.0, replaces=True), InstallFloor(BOB)]
    assert p.counters.replacements == 1 and p.tunnels() == {BOB: new}


@aio
async def test_failed_replacement_keeps_old_tunnel() -> None:
    fb = FakeBackend()
    p = prov(fb, failure_hold=0)
    await p.ensure(SPEC, WHEN)
    fb.fail = TunnelRejected("AUTH_FAILED")
    fb.intents.clear()
    new = tunnel_spec(KEY2, BOB, None)
    with pytest.raises(TunnelRejected):
        await p.ensure(new, WHEN + 1)
    # the old configuration is loaded again (same connection name); the old SA was never touched
    assert fb.intents == [InstallTunnel(new, 3.0, replaces=True), InstallTunnel(SPEC, 3.0)]
    assert p.tunnels() == {BOB: SPEC} and p.counters.failures == 1


@aio
async def test_replacement_under_another_name() -> None:
    fb = FakeBackend()
    p = prov(fb)
    await p.ensure(SPEC, WHEN)
    multi = tunnel_spec(key(dns.name.from_text("multi.example.test.")), BOB, None)
    assert multi.name != SPEC.name
    fb.intents.clear()
    # after bob's lease ended (before it, the address is bound to bob's key: Rule 7, see
    # tests/test_provision_watch.py)
    await p.ensure(multi, WHEN + 601)
    assert fb.intents == [InstallTunnel(multi, 3.0), RemoveTunnel(SPEC.name)]  # new, then old


@aio
async def test_pin_and_release(tmp_path: Path) -> None:
    fb = FakeBackend()
    p = prov(fb, tmp_path, lease=100, grace=0)
    await p.ensure(SPEC, WHEN)
    p.pin(BOB)
    assert await p.expire(WHEN + 1000) is None  # pinned: never expires
    assert p.tunnels() == {BOB: SPEC}
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["tunnels"][0]["pinned"] is True
    p2 = prov(FakeBackend(), tmp_path, lease=100, grace=0)
    await p2.reconcile(WHEN + 5000)  # long after its lease: restored because pinned
    assert p2.tunnels() == {BOB: SPEC}
    await p.release(BOB, WHEN + 1000)
    await p.release(BOB, WHEN + 1000)  # idempotent
    assert fb.intents[-1] == RemoveTunnel(SPEC.name) and fb.kinds().count("RemoveTunnel") == 1
    assert p.tunnels() == {} and p.counters.teardowns == 1
    assert json.loads((tmp_path / "state.json").read_text())["tunnels"] == []


@aio
async def test_pinned_failure_keeps_the_conn_until_released() -> None:
    """A pinned peer whose setup fails keeps its conn (the peer may initiate to us through it);
    an unpinned one is removed; `release` removes the kept one."""
    fb = FakeBackend(TunnelRejected("bob refused"))
    p = prov(fb, failure_hold=0)
    with pytest.raises(TunnelRejected):
        await p.ensure(tunnel_spec(KEY1, CAROL, None), WHEN)
    assert fb.intents[-1] == RemoveTunnel(tunnel_spec(KEY1, CAROL, None).name)
    p.pin(BOB)
    with pytest.raises(TunnelRejected):
        await p.ensure(SPEC, WHEN)
    assert fb.intents[-1] == RemoveTunnel(SPEC.name, keep_conn=True)
    assert p.tunnels() == {} and p.counters.active == 0  # not up: never answered from
    assert await p.expire(WHEN + 10_000) is None and fb.intents[-1].keep_conn  # type: ignore[union-attr]
    fb.fail = None  # bob is back: the same conn comes up
    assert await p.ensure(SPEC, WHEN + 1) == WHEN + 601
    fb.fail = TunnelRejected("again")
    await p.release(BOB, WHEN + 2)
    assert fb.intents[-1] == RemoveTunnel(SPEC.name)


@aio
async def test_lease_end_tears_down() -> None:
    fb = FakeBackend()
    p = prov(fb, lease=100, grace=10)
    await p.ensure(SPEC, WHEN)
    await p.ensure(tunnel_spec(key(), CAROL, None), WHEN + 50)
    assert await p.expire(WHEN + 109) == WHEN + 110
    assert p.counters.active == 2
    assert await p.expire(WHEN + 110) == WHEN + 160
    assert fb.intents[-1] == RemoveTunnel(SPEC.name)
    assert p.lease_left(BOB, WHEN + 110) is None and p.counters.teardowns == 1
    assert await p.expire(WHEN + 160) is None and p.counters.active == 0


@aio
async def test_shunt_api_for_refusals() -> None:
    fb = FakeBackend()
    p = prov(fb, lease=100, grace=0)
    await p.shunt([BOB, CAROL], WHEN)
    await p.shunt([BOB], WHEN + 50)  # extended, not installed twice
    assert fb.kinds() == ["InstallShunt", "InstallShunt"]
    await p.expire(WHEN + 100)
    assert fb.items == {PolicyKey.shunt(BOB)}


@aio
async def test_state_file_and_reconcile(tmp_path: Path) -> None:
    fb = FakeBackend()
    p = prov(fb, tmp_path, lease=100, grace=10)
    carol = tunnel_spec(key(dns.name.from_text("carol.example.test.")), CAROL, None)
    await p.ensure(SPEC, WHEN)
    await p.ensure(carol, WHEN - 95)  # its lease ends at WHEN + 5: gone after WHEN + 15
    await p.shunt([IPv6Address("2001:db8::99")], WHEN)
    doc = json.loads((tmp_path / "state.json").read_text())
    assert {t["name"] for t in doc["tunnels"]} == {SPEC.name, carol.name}
    assert doc["shunts"] == [{"destination": "2001:db8::99", "expires_at": WHEN + 100}]
    assert not list(tmp_path.glob(".*.tmp"))  # tmp renamed away
    # kill -9: the kernel/daemon keep some things, lose others, and have a stray
    fb2 = FakeBackend()
    fb2.items = {PolicyKey.tunnel("isk-stray-0123456789"), PolicyKey.shunt(CAROL),
                 PolicyKey.tunnel(carol.name)}
    p2 = prov(fb2, tmp_path, lease=100, grace=10)
    await p2.reconcile(WHEN + 20)
    assert fb2.items == {PolicyKey.tunnel(SPEC.name), PolicyKey.shunt(IPv6Address("2001:db8::99"))}
    assert RemoveTunnel("isk-stray-0123456789") in fb2.intents
    assert RemoveTunnel(carol.name) in fb2.intents  # lease over: a stray now
    assert RemoveShunt(CAROL) in fb2.intents
    assert p2.lease_left(BOB, WHEN + 20) == 80  # the old lease, not a fresh one
    assert p2.tunnels() == {BOB: SPEC}


@aio
async def test_state_file_of_version_1_still_loads(tmp_path: Path) -> None:
    """A state file as the resolver has written it since version 1: each tunnel's spec and key
    fields flat in one object. Changing this format needs a migration, not a silent reset."""
    pub = base64.b64encode(KEY1.public_key).decode()
    doc = {"version": 1, "shunts": [{"destination": "2001:db8::99", "expires_at": WHEN + 50}],
           "tunnels": [{"name": SPEC.name, "destination": "198.51.100.11",
                        "remote_addr": "198.51.100.11", "remote_id": "bob.example.test",
                        "owner": "bob.example.test.", "precedence": 10, "gateway": ".",
                        "algorithm": 4, "public_key": pub, "ttl": 0,
                        "expires_at": WHEN + 100, "pinned": True}]}
    (tmp_path / "state.json").write_text(json.dumps(doc))
    fb = FakeBackend()
    p = prov(fb, tmp_path)
    await p.reconcile(WHEN)
    assert p.tunnels() == {BOB: SPEC}
    assert p.lease_left(BOB, WHEN) == 100 and p.shunted() == {IPv6Address("2001:db8::99")}
    await p.expire(WHEN + 10**6)
    assert p.tunnels() == {BOB: SPEC}  # pinned: kept
    assert json.loads((tmp_path / "state.json").read_text()) == doc | {"shunts": []}


def test_connection_names() -> None:
    weird = dns.name.from_text(r"a\.b\032c\$;rm.example.test.")
    n = connection_name(weird, BOB)
    assert re.fullmatch(r"isk-[a-z0-9-]{1,20}-[0-9a-f]{10}", n), n
    assert n.startswith("isk-abcrm-")
    assert connection_name(BOB_NAME, BOB) != connection_name(BOB_NAME, CAROL)
    assert connection_name(BOB_NAME, BOB) == connection_name(dns.name.from_text("BOB.example.test"),
                                                             BOB)
    long = dns.name.from_text("x" * 63 + ".test.")
    assert len(connection_name(long, BOB)) == len("isk-") + 20 + 1 + 10
    assert connection_name(dns.name.from_text(r"\255.test."), BOB).startswith("isk-x-")


def test_tunnel_specs_for_gateways() -> None:
    owner = dns.name.from_text("srv.example.test.")
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    srv = IPv4Address("203.0.113.21")
    gw = IPv4Address("198.51.100.20")
    s = tunnel_spec(IpsecKey.from_public_key(owner, pub, gateway=gw), srv, None)
    assert (s.destination, s.remote_addr, s.remote_id) == (srv, gw, "198.51.100.20")
    gname = dns.name.from_text("gw.example.test.")
    s = tunnel_spec(IpsecKey.from_public_key(owner, pub, gateway=gname), srv, gw)
    assert (s.remote_addr, s.remote_id) == (gw, "gw.example.test")
    with pytest.raises(ValueError, match="no address"):
        tunnel_spec(IpsecKey.from_public_key(owner, pub, gateway=gname), srv, None)
    assert (SPEC.remote_addr, SPEC.remote_id) == (BOB, "bob.example.test")


def test_classify() -> None:
    assert classify(TunnelTimeout("x")) is SetupFailure.TIMEOUT
    assert classify(IkeDaemonUnreachable("x")) is SetupFailure.DAEMON_UNREACHABLE
    assert classify(TunnelRejected("x")) is SetupFailure.REJECTED
    assert classify(ProvisioningError("x")) is SetupFailure.REJECTED


def test_provision_config() -> None:
    c = ProvisionConfig.from_section({"backend": "dryrun", "timeout": 2, "lease": 60,
                                      "state_file": "/tmp/x.json", "shunts": "none"})
    assert (c.backend, c.timeout, c.lease, c.state_file, c.shunts) == (
        "dryrun", 2.0, 60.0, Path("/tmp/x.json"), "none")
    # A file's [provision] keeps the tunnels by default (a restart must not remove them as
    # strays); only a config built in code (these tests) keeps nothing.
    default = ProvisionConfig.from_section({})
    assert default.state_file == Path("/var/lib/ipseckey-resolver/state.json")
    assert default == ProvisionConfig(state_file=default.state_file)
    assert ProvisionConfig().state_file is None


@pytest.mark.parametrize(("section", "message"), [
    ({"backend": "magic"}, "key 'backend': must be one of vici, dryrun"),
    ({"timeout": 0}, "key 'timeout': must be a number of seconds"),
    ({"lease": "long"}, "key 'lease'"),
    ({"vici_socket": "/run/charon.vici"}, "key 'vici_socket': must be a unix://"),
    ({"lease_time": 1}, "key 'lease_time': unknown key"),
    ({"state_file": "state.json"}, "key 'state_file': 'state.json' is not an absolute path"),
])
def test_provision_config_errors(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"f.toml: [provision] {message}")):
        ProvisionConfig.from_section(section, "f.toml")


def test_identity() -> None:
    i = Identity.from_section({"fqdn": "alice.example.test.", "private_key": "/k.pem",
                               "addresses": ["198.51.100.10", "2001:db8:100::10"]})
    assert i.fqdn == "alice.example.test" and i.private_key == Path("/k.pem")
    assert i.local_address(6) == IPv6Address("2001:db8:100::10")
    with pytest.raises(ConfigError, match=r"\[identity\] key 'fqdn': required"):
        Identity.from_section({"private_key": "/k"})
    with pytest.raises(ConfigError, match=r"key 'addresses'"):
        Identity.from_section({"fqdn": "a.b", "private_key": "/k", "addresses": ["nope"]})


@aio
async def test_composite_routes_intents() -> None:
    tunnels, shunts = FakeBackend(), FakeBackend()
    c = CompositeBackend(tunnels, shunts)
    await c.apply(InstallTunnel(SPEC, 1.0))
    await c.apply(InstallShunt(BOB))
    assert tunnels.kinds() == ["InstallTunnel"] and shunts.kinds() == ["InstallShunt"]
    assert await c.installed() == {PolicyKey.tunnel(SPEC.name), PolicyKey.shunt(BOB)}
    no_shunts = CompositeBackend(tunnels, None)
    await no_shunts.apply(RemoveShunt(BOB))
    assert {k.kind for k in await no_shunts.installed()} == {ItemKind.TUNNEL}


@aio
async def test_dry_run_backend(caplog: pytest.LogCaptureFixture) -> None:
    d = DryRunBackend()
    p = Provisioner(d, ProvisionConfig(backend="dryrun"))
    await p.ensure(SPEC, WHEN)
    assert await d.installed() == {PolicyKey.tunnel(SPEC.name)}
    await d.apply(InstallShunt(CAROL))
    assert await d.installed() == {PolicyKey.tunnel(SPEC.name), PolicyKey.shunt(CAROL)}
    await d.apply(RemoveTunnel(SPEC.name))
    await d.apply(RemoveShunt(CAROL))
    assert await d.installed() == frozenset()
    assert d.log == [InstallTunnel(SPEC, 3.0), InstallShunt(CAROL), RemoveTunnel(SPEC.name),
                     RemoveShunt(CAROL)]
    # every intent says, as a warning, that nothing is protected (unless quiet: the tests' fake)
    said = [r for r in caplog.records if "nothing is protected" in r.getMessage()]
    assert len(said) == 4 and all(r.levelname == "WARNING" for r in said)
    caplog.clear()
    await DryRunBackend(quiet=True).apply(InstallShunt(CAROL))
    assert not caplog.records


def test_make_backend(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from resolver.tunnels.backend import make_backend
    from resolver.tunnels.vici import ViciBackend

    dry = make_backend(ProvisionConfig(backend="dryrun", shunts="none"), None)
    assert isinstance(dry.tunnels, DryRunBackend) and dry.shunts is None
    with pytest.raises(ConfigError, match=r"\[identity\] is required"):
        make_backend(ProvisionConfig(), None)  # vici is the default; never a silent dry run
    missing = Identity("a.example.test", tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="private_key"):
        make_backend(ProvisionConfig(shunts="none"), missing)
    pem = tmp_path / "host.pem"
    pem.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pem.chmod(0o644)
    with pytest.raises(ConfigError, match=r"private_key.*0644 are too open.*chmod 600"):
        make_backend(ProvisionConfig(shunts="none"), Identity("a.example.test", pem))
    pem.chmod(0o600)
    vici = make_backend(ProvisionConfig(shunts="none"), Identity("a.example.test", pem))
    assert isinstance(vici.tunnels, ViciBackend)
    vici.tunnels.close()


@aio
async def test_setups_in_flight_are_bounded_and_a_slot_wait_has_its_own_bound() -> None:
    """max_setups=2: five peers at once reach the backend at most two at a time; when the two
    in flight hang, the others fail (closed) after queue_timeout instead of queueing forever,
    without ever reaching the backend."""
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    prov = Provisioner(backend, ProvisionConfig(timeout=0.5, max_setups=2, failure_hold=0,
                                                queue_timeout=0.3))
    specs = [tunnel_spec(key(dns.name.from_text(f"p{i}.example.test.")),
                         IPv4Address(f"198.51.100.{20 + i}"), None) for i in range(5)]
    tasks = [asyncio.create_task(prov.ensure(s, WHEN)) for s in specs]
    await until(lambda: sum(isinstance(i, InstallTunnel) for i in backend.intents) >= 2)
    await asyncio.sleep(0.05)  # room for a third to start, if the bound did not hold
    started = [i for i in backend.intents if isinstance(i, InstallTunnel)]
    assert len(started) == 2  # the other three wait for a slot
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, TunnelTimeout) for r in results), results
    assert sum("none finished within 0.3 s" in str(r) for r in results) == 3
    assert len([i for i in backend.intents if isinstance(i, InstallTunnel)]) == 2


@aio
async def test_a_queued_setup_gets_its_whole_timeout() -> None:
    """The turn, not the query, starts the setup's timeout: with one slot and setups that take
    most of the timeout each, three in a row all succeed (counted from the query, the later
    ones would fail although the IKE daemon makes each in time)."""

    class Slow(FakeBackend):
        async def apply(self, intent: Intent) -> None:
            if isinstance(intent, InstallTunnel):
                await asyncio.sleep(0.2)
            await super().apply(intent)

    prov = Provisioner(Slow(), ProvisionConfig(timeout=0.3, max_setups=1, failure_hold=0))
    specs = [tunnel_spec(key(dns.name.from_text(f"s{i}.example.test.")),
                         IPv4Address(f"198.51.100.{60 + i}"), None) for i in range(3)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.gather(*(prov.ensure(s, WHEN) for s in specs))
    assert loop.time() - t0 >= 0.6 and prov.counters.setups == 3


@aio
async def test_queued_setups_proceed_when_slots_free_up() -> None:
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    prov = Provisioner(backend, ProvisionConfig(timeout=2.0, max_setups=1))
    specs = [tunnel_spec(key(dns.name.from_text(f"q{i}.example.test.")),
                         IPv4Address(f"198.51.100.{40 + i}"), None) for i in range(3)]
    tasks = [asyncio.create_task(prov.ensure(s, WHEN)) for s in specs]
    await until(lambda: any(isinstance(i, InstallTunnel) for i in backend.intents))
    await asyncio.sleep(0.05)  # room for a second to start, if the bound did not hold
    assert len([i for i in backend.intents if isinstance(i, InstallTunnel)]) == 1
    backend.gate.set()
    await asyncio.gather(*tasks)
    assert len([i for i in backend.intents if isinstance(i, InstallTunnel)]) == 3
    assert prov.counters.setups == 3
