"""Issue 11 end to end: hosts that run only ipseckey-resolver, on bare charons (`Lab.bare`: each
charon holds its own key and nothing else), get authenticated tunnels from one lookup.

Real daemons on both ends (lab/resolverd.py), real charons, the wire watched on the lab switch.
The in-process initiators of `test_admission_rules` are this project's own ViciBackend (what the
daemon uses), so that one responder configuration can be tried by several initiators without a
daemon start each. Daemons are shared in order where a test builds on the previous one (the
kill -9 test restarts the responder the first test used); between scenarios the hosts' charons
are wiped (`Lab.wipe_charon`) so that no SA, conn or credential carries over.

Run: `LAB_ID=r .venv/bin/python -m pytest -q tests/integration/test_responder.py`
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import dns.name
import dns.rcode
import pytest

from lab import Lab, ike
from lab.net import wait_until
from lab.resolverd import ResolverDaemon
from lab.topology import HOSTS, PEERS
from resolver.errors import ProvisioningError
from resolver.ipseckey import IpsecKey
from resolver.responder.core import WILDCARD, conn_name
from resolver.tunnels.config import Identity
from resolver.tunnels.intents import InstallTunnel, RemoveTunnel, connection_name, tunnel_spec
from resolver.tunnels.vici import ViciBackend
from resolver.tunnels.xfrm import XfrmPolicies
from tests.helpers import addresses, ede, esp_ping, run

pytestmark = pytest.mark.integration

EDE_TUNNEL = 23


class Hosts:
    """At most one daemon per lab host; a start stops the one running there first."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.running: dict[str, ResolverDaemon] = {}

    def start(self, host: str, name: str, sections: dict[str, dict[str, Any]] | None = None,
              *, fresh: bool = True) -> ResolverDaemon:
        self.stop(host)
        if fresh:
            shutil.rmtree(self.lab.run_dir / name, ignore_errors=True)
        d = ResolverDaemon(self.lab, host, name=name, sections=sections)
        d.start()
        self.running[host] = d
        return d

    def stop(self, host: str) -> None:
        d = self.running.pop(host, None)
        if d is not None:
            d.stop()

    def reset(self, *hosts: str) -> None:
        """Daemons stopped, charons wiped, our XFRM policies gone, in these hosts."""
        for host in hosts:
            self.stop(host)
            self.lab.wipe_charon(host)
            x = XfrmPolicies(self.lab.ns(host))
            try:
                x.flush_ours()
            finally:
                x.close()


@pytest.fixture(scope="module")
def hosts(lab: Lab) -> Iterator[Hosts]:
    with lab.bare(*PEERS):
        h = Hosts(lab)
        try:
            yield h
        finally:
            h.reset(*list(h.running))
            lab.clear_resolv_conf("alice")


def log_lines(d: ResolverDaemon, needle: str) -> list[str]:
    return [ln for ln in d.log.read_text(errors="replace").splitlines() if needle in ln]


def ike_ids(lab: Lab, host: str, conn: str) -> set[str]:
    return {str(sa["uniqueid"]) for name, sa in lab.ike_sas(host) if name == conn}


def stats(lab: Lab, d: ResolverDaemon) -> dict[str, float]:
    """The daemon's metrics (`autosp stats --json`), flat: name{labels} -> value."""
    r = lab.autosp(d.host, "--json", "stats", control=d.control)
    assert r.returncode == 0, r.stdout + r.stderr
    out = {}
    for family in json.loads(r.stdout)["metrics"]:
        for sample in family["samples"]:
            name = sample["name"].removeprefix("ipseckey_resolver_")
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample["labels"].items()))
            out[f"{name}{{{labels}}}" if labels else name] = sample["value"]
    return out


ALICE_CONN = conn_name(dns.name.from_text("alice.example.test."))


# --- an unconfigured responder ------------------------------------------------------------------


def test_unconfigured_responder_ipv4_and_ipv6(lab: Lab, hosts: Hosts) -> None:
    """bob runs only ipseckey-resolver and was never told about alice: alice's lookups bring
    tunnels up, both families, and pings cross the wire as ESP only."""
    bob = hosts.start("bob", "r-bob")
    hosts.start("alice", "r-alice")
    assert lab.conns("bob") == [WILDCARD]
    lab.set_resolv_conf("alice", "nameserver 127.0.0.1\n")
    try:
        w4 = esp_ping(lab, "bob.example.test", peer=lab.addr("bob"), port="bob")
        w6 = esp_ping(lab, "bob.example.test", peer=lab.addr("bob", 6), port="bob", family=6)
    finally:
        lab.clear_resolv_conf("alice")
    assert f"({lab.addr('bob')})" in w4.output.splitlines()[0]
    assert f"({lab.addr('bob', 6)})" in w6.output.splitlines()[0]
    assert sorted(lab.conns("bob")) == sorted([WILDCARD, ALICE_CONN])
    # whichever family came first (ping's lookup asks A and AAAA at once)
    how = log_lines(bob, "responder: alice.example.test (198.51.100.10) authenticated") + \
        log_lines(bob, "responder: alice.example.test (2001:db8:100::10) authenticated")
    assert len(how) == 1, bob.tail()
    assert "DNSSEC-secure IPSECKEY (ed25519 SHA256:" in how[0]
    # both families rode the one learned conn (its selectors hold both of alice's addresses)
    states = [c["state"] for _, c in lab.child_sas("bob") if c["name"] == ALICE_CONN]
    assert states == ["INSTALLED", "INSTALLED"]


def test_responder_kill9_and_restart_keeps_sas_and_removes_strays(lab: Lab,
                                                                   hosts: Hosts) -> None:
    bob = hosts.running["bob"]
    before = ike_ids(lab, "bob", ALICE_CONN)
    assert len(before) == 2
    stray = "iskr-ghost-0123456789"  # a learned conn of ours with no SA: a stray
    with lab.vici("bob") as s:
        s.load_conn({stray: {"version": "2", "remote": {"auth": "pubkey", "id": "ghost.test"},
                             "local": {"auth": "pubkey", "id": "bob.example.test",
                                       "pubkeys": [lab.public_key_pem("bob")]},
                             "children": {stray: {"remote_ts": ["203.0.113.7/32"]}}}})
    bob.kill9()
    bob.start()
    # The responder takes over charon's conns once the daemon serves (its own start step),
    # so the stray goes shortly after the first answer, not before it.
    wait_until(lambda: sorted(lab.conns("bob")) == sorted([WILDCARD, ALICE_CONN]), 10.0,
               f"the stray was not removed: {lab.conns('bob')}")
    assert ike_ids(lab, "bob", ALICE_CONN) == before  # the SAs survived, adopted as they were
    assert log_lines(bob, f"responder: kept {ALICE_CONN} from a previous run")
    assert log_lines(bob, f"responder: removing {stray} left by a previous run")
    esp_ping(lab, lab.addr("bob"), peer=lab.addr("bob"), port="bob", count=2)


def test_charon_restart_gets_the_wildcard_and_learned_conns_back(lab: Lab,
                                                                  hosts: Hosts) -> None:
    """bob's charon restarts under his daemon: everything charon held is gone; the daemon
    loads its key, the wildcard and the conns it learned again, and new peers get in."""
    lab.restart_charon("bob")
    wait_until(lambda: sorted(lab.conns("bob")) == sorted([WILDCARD, ALICE_CONN]), 10.0,
               "the responder did not load its conns into the new charon")
    assert try_tunnel(lab, "carol", "carol.example.test", "bob") is None
    assert log_lines(hosts.running["bob"], "responder: charon (re)connected")


# --- initiators that must be refused ------------------------------------------------------------


@pytest.mark.parametrize(("identity", "why"), [
    ("host.unsigned.test", "host.unsigned.test is in an unsigned zone (insecure)"),
    ("host.badsig.test", "the IPSECKEY of host.badsig.test is bogus"),
    ("carol.example.test", "198.51.100.13, which is not an address of carol.example.test"),
], ids=["unsigned-zone", "bogus-ipseckey", "claims-another-name"])
def test_refused_initiator_gets_servfail_naming_the_peers_refusal(
        lab: Lab, hosts: Hosts, identity: str, why: str) -> None:
    """dave's daemon claims `identity` (with dave's own key) and looks alice up; alice's
    responder refuses it, says why in its log, and dave's answer is SERVFAIL saying that
    alice refused us: in words, not conn names."""
    alice = hosts.running["alice"]
    dave = hosts.start("dave", f"r-dave-{identity.split('.')[1]}",
                       {"identity": {"fqdn": identity}, "provision": {"timeout": 1.0}})
    reply = dave.query("alice.example.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL
    code, text = ede(reply)
    assert code == EDE_TUNNEL
    assert "alice.example.test (198.51.100.10) refused our authentication " \
           "(AUTHENTICATION_FAILED)" in text, text
    assert "isk-" not in text and "went down" not in text
    wait_until(lambda: bool(log_lines(alice, f"refused '{identity}' from 198.51.100.13")), 2.0,
               "alice's log does not say why")
    [refusal] = log_lines(alice, f"refused '{identity}' from 198.51.100.13")
    assert why in refusal, refusal
    assert conn_name(dns.name.from_text(identity)) not in lab.conns("alice")
    hosts.stop("dave")


# --- [responder] accept, allow_keys, match_address ------------------------------------------------


def try_tunnel(lab: Lab, host: str, fqdn: str, peer: str, family: int = 4) -> str | None:
    """Our own initiator (ViciBackend, as the daemon has it) in `host` with identity `fqdn`,
    to `peer` with its published key: None if the CHILD_SA came up, else the error's words.
    Whatever it set up is removed again."""
    own = ip_address(lab.addr(host, family))
    backend = ViciBackend(lab.vici_socket(host),
                          Identity(fqdn, lab.private_key(host), (own,)))
    owner = dns.name.from_text(HOSTS[peer].fqdn)
    spec = tunnel_spec(IpsecKey.from_public_key(owner, lab.public_key(peer)),
                       ip_address(lab.addr(peer, family)), None)

    async def attempt() -> str | None:
        try:
            await backend.apply(InstallTunnel(spec, 2.0))
            return None
        except ProvisioningError as exc:
            return str(exc)
        finally:
            await backend.apply(RemoveTunnel(spec.name))
            backend.close()

    return run(attempt(), 10)


def test_admission_rules(lab: Lab, hosts: Hosts) -> None:
    """carol is the responder; alice, dave and "elsewhere" (alice's key, carol's address)
    come to her. Each rule admits one and refuses another."""
    hosts.reset("alice", "bob", "dave")
    strict = hosts.start("carol", "r-carol-strict", {"responder": {
        "accept": ["alice.example.test.", "elsewhere.example.test."],
        "allow_keys": [IpsecKey.from_public_key(dns.name.root, lab.public_key("alice"))
                       .fingerprint()]}})
    assert try_tunnel(lab, "alice", "alice.example.test", "carol") is None  # accepted, allowed
    assert try_tunnel(lab, "alice", "alice.example.test", "carol", family=6) is None
    refused = try_tunnel(lab, "dave", "dave.example.test", "carol")
    assert refused is not None and "AUTHENTICATION_FAILED" in refused
    assert log_lines(strict, "refused 'dave.example.test' from 198.51.100.13: "
                             "dave.example.test is not under [responder] accept")
    refused = try_tunnel(lab, "alice", "elsewhere.example.test", "carol")
    assert refused is not None and "AUTHENTICATION_FAILED" in refused
    assert log_lines(strict, "refused 'elsewhere.example.test' from 198.51.100.10: it comes "
                             "from 198.51.100.10, which is not an address of elsewhere")
    hosts.reset("carol", "alice")
    loose = hosts.start("carol", "r-carol-loose", {"responder": {
        "allow_keys": [IpsecKey.from_public_key(dns.name.root, lab.public_key("alice"))
                       .fingerprint()], "match_address": False}})
    assert try_tunnel(lab, "alice", "elsewhere.example.test", "carol") is None
    refused = try_tunnel(lab, "dave", "dave.example.test", "carol")
    assert refused is not None and "AUTHENTICATION_FAILED" in refused
    [line] = log_lines(loose, "refused 'dave.example.test' from 198.51.100.13")
    assert "is not in [responder] allow_keys" in line
    assert "ecdsa" not in line.lower() or "SHA256:" in line


# --- the credential pitfalls (lab-notes, "Measured 2026-12-03") -----------------------------------


def trusted_subjects(lab: Lab, host: str) -> list[str]:
    """Subjects of the raw public keys `host`'s charon trusts (swanctl --list-certs)."""
    out = lab.exec(host, ["swanctl", "--list-certs", "--uri", lab.vici_socket(host)]).stdout
    return [ln.split('"')[1] for ln in out.splitlines() if ln.strip().startswith("subject:")]


def test_a_stale_key_in_charon_admits_no_one_through_the_wildcard(lab: Lab,
                                                                  hosts: Hosts) -> None:
    """alice's key stays trusted in carol's charon after the conn that brought it is gone
    (Careful 1); carol's responder does not accept alice. The wildcard is selected, the stale
    key verifies, and still nothing comes up (its constraint fails)."""
    hosts.reset("alice", "carol")
    carol = hosts.start("carol", "r-carol-stale", {"responder": {"accept": ["other.test."]}})
    with lab.vici("carol") as s:  # a conn with alice's key, loaded and unloaded again
        s.load_conn(ike.responder_conn(HOSTS["carol"], HOSTS["alice"],
                                       lab.public_key_pem("carol"), lab.public_key_pem("alice")))
        s.unload_conn({"name": "peer-alice"})
    assert "alice.example.test" in trusted_subjects(lab, "carol")  # the pitfall is there
    refused = try_tunnel(lab, "alice", "alice.example.test", "carol")
    assert refused is not None and "AUTHENTICATION_FAILED" in refused
    assert not [sa for _, sa in lab.ike_sas("carol")], lab.ike_sas("carol")
    assert log_lines(carol, "refused 'alice.example.test' from 198.51.100.10: "
                            "alice.example.test is not under [responder] accept")
    charon_log = (lab.charon_dir("carol") / "charon.log").read_text()
    assert "constraint check failed: group membership to 'ipseckey-resolver-unknown-peer'" \
        in charon_log  # the stale key did verify; the wildcard's constraint said no


def test_a_psk_identity_never_counts_as_authenticated(lab: Lab, hosts: Hosts) -> None:
    """carol's charon holds a public-PSK wildcard someone else loaded (Careful 2): whoever has
    the PSK may claim any name there. carol's daemon warns about it at start; alice, with the
    PSK, claims dave's name and is established under that conn, but carol's responder never
    takes her for dave: nothing authenticated, admitted or learned."""
    hosts.reset("alice", "carol")
    psk = {"psk-any": {"version": "2", "mobike": "no",
                       "local": {"auth": "psk", "id": "carol.example.test"},
                       "remote": {"auth": "psk", "id": "%any"},
                       "children": {"psk-any": {"mode": "tunnel", "local_ts": ["dynamic"],
                                                "remote_ts": ["dynamic"]}}}}
    secret = {"type": "IKE", "data": b"public-psk", "owners": []}
    with lab.vici("carol") as s:
        s.load_conn(psk)
        s.load_shared(secret)
    carol = hosts.start("carol", "r-carol-psk")
    [warning] = log_lines(carol, "responder: charon holds conn 'psk-any'")
    assert "never taken as authenticated" in warning
    claim = {"psk-claim": {"version": "2", "mobike": "no", "remote_addrs": [lab.addr("carol")],
                           "local": {"auth": "psk", "id": "dave.example.test"},
                           "remote": {"auth": "psk", "id": "carol.example.test"},
                           "children": {"psk-claim": {"mode": "tunnel",
                                                      "local_ts": ["dynamic"],
                                                      "remote_ts": ["dynamic"]}}}}
    with lab.vici("alice") as s:
        s.load_conn(claim)
        s.load_shared(secret)
        ike.initiate(s, "psk-claim", "psk-claim")  # the pitfall is real: it is established
    try:
        [(_, sa)] = [(n, sa) for n, sa in lab.ike_sas("carol") if n == "psk-any"]
        assert sa["remote-id"] == "dave.example.test"
        time.sleep(0.5)
        assert not log_lines(carol, ") authenticated with")
        assert stats(lab, carol)["responder_admissions_total"] == 0
        assert conn_name(dns.name.from_text("dave.example.test.")) not in lab.conns("carol")
    finally:
        lab.close_conns("alice", ["psk-claim"])
        hosts.reset("alice", "carol")


def test_lease_end_unloads_a_learned_conn_and_its_credentials(lab: Lab, hosts: Hosts) -> None:
    """A learned conn without SAs is unloaded at its lease end, and charon's credential store
    is cleared of its key (the only conns are ours, so the responder reloads what it needs)."""
    hosts.reset("alice", "carol")
    carol = hosts.start("carol", "r-carol-lease", {"responder": {"lease": 5}})
    assert try_tunnel(lab, "alice", "alice.example.test", "carol") is None  # then removed
    assert ALICE_CONN in lab.conns("carol")
    assert "alice.example.test" in trusted_subjects(lab, "carol")
    wait_until(lambda: ALICE_CONN not in lab.conns("carol"), 12.0, "lease never ended")
    wait_until(lambda: "alice.example.test" not in trusted_subjects(lab, "carol"), 5.0,
               "alice's key is still trusted after her conn was unloaded")
    assert lab.conns("carol") == [WILDCARD]
    assert trusted_subjects(lab, "carol") == ["carol.example.test"]  # ours, reloaded
    assert log_lines(carol, "responder: dropped stale credentials")
    # and the responder still works: alice comes in again, through a fresh lookup
    assert try_tunnel(lab, "alice", "alice.example.test", "carol") is None


# --- pinned endpoints are responders too --------------------------------------------------------


def test_two_hosts_pinning_each_other_come_up(lab: Lab, hosts: Hosts) -> None:
    """No responder on either side (accept = "none"): bob pins carol first and fails (carol's
    charon knows no conn for him); bob's conn stays loaded, so when carol pins bob her
    initiation is accepted, and both endpoints are up."""
    hosts.reset("bob", "carol")
    off = {"responder": {"accept": "none"}}
    bob = hosts.start("bob", "r-bob-pin", off)
    carol = hosts.start("carol", "r-carol-pin", off)
    assert WILDCARD not in lab.conns("bob") and WILDCARD not in lab.conns("carol")
    first = lab.autosp("bob", "add", "carol.example.test", control=bob.control)
    assert first.returncode == 1 and "NO_PROPOSAL_CHOSEN" in first.stderr, first.stderr
    assert "added carol.example.test, but" in first.stderr  # kept, and retried
    parked = connection_name(dns.name.from_text("carol.example.test."),
                             ip_address(lab.addr("carol")))
    assert parked in lab.conns("bob")  # its setup failed; the conn stays (v4 and v6 both)
    second = lab.autosp("carol", "add", "bob.example.test", control=carol.control)
    assert second.returncode == 0, second.stdout + second.stderr
    assert lab.child_states("carol", "isk-bob-") and lab.child_states("bob", parked)

    def up(host: str, d: ResolverDaemon, name: str) -> bool:
        r = lab.autosp(host, "--json", "status", name, control=d.control)
        return r.returncode == 0 and json.loads(r.stdout).get("tunnel") == "up"

    wait_until(lambda: up("bob", bob, "carol.example.test"), 15.0,
               "bob's endpoint did not come up")
    assert up("carol", carol, "bob.example.test")
    esp_ping(lab, lab.addr("carol"), host="bob", peer=lab.addr("carol"), port="carol", count=2)


# --- a flood of identities ------------------------------------------------------------------------


FLOOD = 1000


def test_identity_flood_is_bounded_and_real_peers_still_get_in(lab: Lab, hosts: Hosts) -> None:
    """dave's charon initiates to bob with 1,000 random identities while carol, a real peer,
    connects: bob's lookups stay within their rate, bob keeps answering DNS, carol gets in."""
    hosts.reset("bob", "carol", "dave")
    bob = hosts.start("bob", "r-bob-flood")
    before = stats(lab, bob)
    tag = os.urandom(3).hex()
    names = [f"f{i}-{tag}.flood.example.test" for i in range(FLOOD)]
    t0 = time.monotonic()
    with lab.vici("dave") as s:
        for i, ident in enumerate(names):
            conn = ike.initiator_conn(f"flood{i}", HOSTS["dave"], lab.addr("bob"),
                                      "bob.example.test", lab.public_key_pem("dave"),
                                      lab.public_key_pem("bob"))
            conn[f"flood{i}"]["local"]["id"] = ident
            s.load_conn(conn)
        for i in range(FLOOD):
            for _ in s.initiate({"child": f"flood{i}", "ike": f"flood{i}", "timeout": -1,
                                 "init-limits": "no"}):
                pass
    sent = time.monotonic() - t0
    # while the flood is on: DNS answers, and a real peer gets in
    q0 = time.monotonic()
    assert bob.query("example.test.", "SOA", timeout=2.0).rcode() == dns.rcode.NOERROR
    dns_ms = 1000 * (time.monotonic() - q0)
    assert try_tunnel(lab, "carol", "carol.example.test", "bob") is None
    time.sleep(1.0)  # let the tail of the flood arrive
    elapsed = time.monotonic() - t0
    after = stats(lab, bob)
    lookups = after["responder_lookups_total"] - before["responder_lookups_total"]
    seen = sum(v - before.get(k, 0.0) for k, v in after.items()
               if k.startswith("responder_refusals_total"))
    print(f"\nflood: {FLOOD} identities initiated in {sent:.1f} s; bob saw {seen:.0f} refused, "
          f"{lookups:.0f} lookups in {elapsed:.1f} s; a DNS answer during it took "
          f"{dns_ms:.1f} ms")
    # dave's one address: a burst of 4 x 2/s, then 2/s; carol's own lookup besides
    assert lookups <= 8 + 2 * elapsed + 1, (lookups, elapsed)
    assert dns_ms < 1000
    hosts.reset("dave")


# --- fail closed by default -----------------------------------------------------------------------


def test_default_config_peer_refuses_ike_servfail_nothing_in_clear(lab: Lab,
                                                                  hosts: Hosts) -> None:
    """gw runs no resolver: its charon has no conn for anyone and answers NO_PROPOSAL_CHOSEN.
    alice's daemon with the default configuration answers SERVFAIL and says so; nothing
    reaches gw in clear."""
    hosts.reset("alice", "gw")
    alice = hosts.start("alice", "r-alice-default", {"policy": {}})
    reply = alice.query("gw.example.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL and addresses(reply) == []
    code, text = ede(reply)
    assert code == EDE_TUNNEL
    assert "gw.example.test (198.51.100.20) has no IKE configuration for us " \
           "(NO_PROPOSAL_CHOSEN)" in text, text
    assert log_lines(alice, "NO_PROPOSAL_CHOSEN")
    lab.set_resolv_conf("alice", "nameserver 127.0.0.1\n")
    try:
        w = lab.ping_on_wire("alice", "gw.example.test", peer=lab.addr("gw"), port="gw")
    finally:
        lab.clear_resolv_conf("alice")
    assert w.returncode != 0 and w.cleartext == [], w.report()


def test_spoofed_cleartext_from_a_private_peer_is_dropped(lab: Lab, hosts: Hosts) -> None:
    """gw is private for alice and has no tunnel: a drop shunt both ways. Datagrams that carol
    sends with gw's address as source are dropped by alice's kernel (XfrmInPolBlock); the same
    datagrams from carol's own address arrive."""
    hosts.reset("alice", "gw")
    alice = hosts.start("alice", "r-alice-private", {"policy": {"private": ["gw.example.test."]}})
    for rdtype in ("A", "AAAA"):
        assert alice.query("gw.example.test.", rdtype).rcode() == dns.rcode.SERVFAIL
    for family in (4, 6):
        gw, carol, target = (lab.addr(h, family) for h in ("gw", "carol", "alice"))
        with listening(lab, "alice", target) as (sock, port):
            blocked = xfrm_in_pol_block(lab, "alice")
            send_from(lab, "carol", gw, target, port, b"spoofed")
            send_from(lab, "carol", carol, target, port, b"honest")
            got = receive_all(sock)
        assert got == [(b"honest", carol)], (family, got)
        assert xfrm_in_pol_block(lab, "alice") > blocked


@contextlib.contextmanager
def listening(lab: Lab, host: str, address: str) -> Iterator[tuple[socket.socket, int]]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def bind() -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((address, 0))
        return s

    sock: socket.socket = lab.call_in(host, bind)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


def send_from(lab: Lab, host: str, source: str, target: str, port: int, data: bytes) -> None:
    """A datagram from inside `host` with `source` as its address (IP_TRANSPARENT: the address
    need not be the host's own; IP_FREEBIND alone gets ENETUNREACH for IPv4)."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET

    def send() -> None:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, 75, 1)  # IPV6_TRANSPARENT
            else:
                s.setsockopt(socket.IPPROTO_IP, 19, 1)  # IP_TRANSPARENT
            s.bind((source, 0))
            for _ in range(3):
                s.sendto(data, (target, port))

    lab.call_in(host, send)


def receive_all(sock: socket.socket, wait: float = 0.5) -> list[tuple[bytes, str]]:
    sock.settimeout(wait)
    got: list[tuple[bytes, str]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            data, addr = sock.recvfrom(100)
            if (data, addr[0]) not in got:
                got.append((data, addr[0]))
    return got


def xfrm_in_pol_block(lab: Lab, host: str) -> int:
    stat = lab.exec(host, ["cat", "/proc/net/xfrm_stat"]).stdout
    return next(int(ln.split()[1]) for ln in stat.splitlines() if ln.startswith("XfrmInPolBlock"))
