"""Smoke tests that prove the lab is real: validated DNS, broken zones, dynamic updates, ESP.

Every query starts inside a lab namespace (alice) and goes through the lab's own Unbound, the
independent validator the resolver is later compared with. The tunnel test does by hand what the
resolver will automate: key from a validated answer -> VICI load-conn -> initiate -> traffic,
watched on the wire from the switch namespace.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rdatatype
import pytest

from lab import ike, keys
from lab.core import Lab
from lab.demo import key_from_answer
from lab.net import (
    LabError,
    blackholes_present,
    etc_netns_dirs,
    is_zombie,
    kernel_esp_error,
    list_namespaces,
    other_instances_up,
    poll,
    wait_until,
)
from lab.probes import Dig
from lab.topology import BLACKHOLE_PREFIXES, EXPECTATIONS, HOSTS, Expectation
from lab.wire import Capture
from resolver import ipseckey
from tests.helpers import esp_ping

pytestmark = pytest.mark.integration


def published_key_b64(lab: Lab, host: str) -> str:
    """The base64 IPSECKEY key field we expect in DNS for a host, from its private key."""
    return base64.b64encode(keys.ipseckey_key_field(lab.public_key(host))).decode()


@pytest.mark.parametrize("exp", EXPECTATIONS, ids=lambda e: f"{e.qname}{e.rdtype}")
def test_validation_outcome(lab: Lab, exp: Expectation) -> None:
    """Each lab name validates (or fails) in Unbound exactly as the topology promises."""
    d = lab.dig("alice", exp.qname, exp.rdtype)
    assert d.status == exp.rcode, d.text
    assert d.ad == exp.ad, d.text
    if exp.rcode == "NOERROR":
        assert d.rdatas(exp.rdtype), d.text
        # Signed zones come with signatures, the unsigned one without.
        assert bool(d.rdatas("RRSIG", exp.rdtype)) == exp.ad, d.text


def test_bob_ipseckey_is_secure_and_is_bobs_key(lab: Lab) -> None:
    """bob.example.test IPSECKEY: AD set, RRSIG present, key field = bob's public key."""
    d = lab.dig("alice", "bob.example.test", "IPSECKEY")
    assert d.status == "NOERROR" and d.ad, d.text
    assert d.rdatas("RRSIG", "IPSECKEY"), d.text
    (rr,) = d.rdatas("IPSECKEY")
    prec, gtype, alg, gw, key = rr.split(None, 4)
    assert (prec, gtype, alg, gw) == ("10", "0", "4", ".")
    assert key.replace(" ", "") == published_key_b64(lab, "bob")


@pytest.mark.parametrize("host,alg", [("carol", 2), ("dave", 3), ("gw", 4)])
def test_key_encodings_match_private_keys(lab: Lab, host: str, alg: int) -> None:
    """RSA (RFC 3110), ECDSA (X||Y) and Ed25519 fields round-trip to the hosts' keys."""
    r = lab.query("alice", f"{host}.example.test", "IPSECKEY")
    assert r.flags & dns.flags.AD
    rrs = [rr for s in r.answer if s.rdtype == dns.rdatatype.IPSECKEY for rr in s]
    assert [rr.algorithm for rr in rrs] == [alg]
    assert base64.b64encode(rrs[0].key).decode() == published_key_b64(lab, host)
    key = ipseckey.IpsecKey.from_rdata(r.question[0].name, rrs[0], 0)
    assert key.spki_pem() == lab.public_key_pem(host)


def test_ipv6_transport_and_gateway_records(lab: Lab) -> None:
    """Unbound answers over IPv6; srv's records carry gw as gateway, by address and by name."""
    d = lab.dig("alice", "alice.example.test", "AAAA", server=HOSTS["unbound"].v6)
    assert d.status == "NOERROR" and d.ad, d.text
    assert any(ln.endswith(HOSTS["alice"].v6) for ln in d.records), d.text
    srv = lab.dig("alice", "srv.example.test", "IPSECKEY")
    assert srv.ad
    assert [r.rsplit(None, 1)[0] for r in srv.rdatas("IPSECKEY")] == ["10 1 4 198.51.100.20"]
    byname = lab.dig("alice", "srv-byname.example.test", "IPSECKEY")
    assert byname.ad
    assert [r.rsplit(None, 1)[0] for r in byname.rdatas("IPSECKEY")] == [
        "10 3 4 gw.example.test."]
    multi = lab.query("alice", "multi.example.test", "IPSECKEY")
    precs = sorted(rr.precedence for s in multi.answer if s.rdtype == dns.rdatatype.IPSECKEY
                   for rr in s)
    assert precs == [10, 20, 30]


def test_nsupdate_adds_a_signed_record(lab: Lab) -> None:
    """A TSIG-signed UPDATE adds a name that named signs at once and Unbound validates."""
    name = f"t{secrets.token_hex(4)}.example.test"
    ns = lab.addr("ns-example")
    script = (f"server {ns}\nzone example.test\n"
              f"update add {name} 60 IN TXT \"smoke\"\nsend\n")
    # Without the key the update is refused: the zone is not open to anyone.
    refused = lab.exec("alice", ["nsupdate", "-t", "3"], input=script, check=False)
    assert refused.returncode != 0 and "REFUSED" in refused.stdout + refused.stderr
    lab.exec("alice", ["nsupdate", "-t", "3", "-k", str(lab.tsig_keyfile)], input=script)

    def signed() -> Dig | None:
        d = lab.dig("alice", name, "TXT", server=ns)
        return d if d.rdatas("RRSIG", "TXT") else None

    direct = wait_until(signed, 5, f"{name} never came back signed")
    assert direct.rdatas("TXT") == ['"smoke"'], direct.text
    lab.flush("example.test")
    via = lab.dig("alice", name, "TXT")
    assert via.status == "NOERROR" and via.ad, via.text


def test_namespaces_have_no_default_route_and_host_has_blackholes(lab: Lab) -> None:
    """The safety net: nothing in the lab can route out, nothing outside can route in."""
    for host in HOSTS:
        for fam in ("-4", "-6"):
            out = subprocess.run(["ip", "-n", lab.ns(host), fam, "route", "show", "default"],
                                 capture_output=True, text=True, check=True).stdout
            assert out.strip() == "", f"{host} has a default route: {out}"
    assert blackholes_present() == list(BLACKHOLE_PREFIXES)


def test_tunnel_from_dns_key_carries_ping_as_esp(lab: Lab) -> None:
    """alice -> bob: key from DNS, VICI load-conn + initiate (lab.tunnel), ping goes as
    ESP-in-UDP only."""
    b = lab.addr("bob")
    # Control: before the tunnel, the same capture does see the ping in clear, so "no ICMP"
    # below means encrypted, not "capture blind".
    clear = lab.ping_on_wire("alice", b, port="bob", count=1)
    assert clear.returncode == 0, clear.report()
    assert clear.capture.matching("ICMP echo request"), clear.report()
    answer = lab.query("alice", "bob.example.test", "IPSECKEY")
    spki = key_from_answer(answer, "bob.example.test")
    with lab.tunnel("alice", "smoke-bob", b, "bob.example.test", spki) as states:
        assert states.get("smoke-bob") == "INSTALLED"
        assert "INSTALLED" in lab.child_states("bob").values()
        w = esp_ping(lab, b, port="bob")
        if lab.esp == "libipsec":  # userland ESP is always UDP-encapsulated on 4500
            assert all(".4500 > " in ln and "UDP-encap" in ln
                       for ln in w.esp_out + w.esp_back), w.report()


def test_wrong_key_is_rejected(lab: Lab) -> None:
    """A connection to bob that expects carol's key never installs a CHILD_SA."""
    conn = ike.initiator_conn("smoke-wrong", HOSTS["alice"], lab.addr("bob"),
                              "bob.example.test", lab.public_key_pem("alice"),
                              lab.public_key_pem("carol"))
    with lab.vici("alice") as s:
        s.load_conn(conn)
        try:
            with pytest.raises(LabError):
                ike.initiate(s, "smoke-wrong", "smoke-wrong", timeout_ms=4000)
            assert "smoke-wrong" not in ike.child_states(s)
        finally:
            s.unload_conn({"name": "smoke-wrong"})


def test_gateway_tunnel_reaches_srv_and_nothing_else_does(lab: Lab) -> None:
    """srv (203.0.113.21) is reachable from alice only through a tunnel to gw."""
    srv = HOSTS["srv"].v4
    assert lab.ping("plain", srv)[0] != 0  # no route: the lab has no default routes
    with lab.tunnel("alice", "smoke-gw", lab.addr("gw"), "gw.example.test",
                    lab.public_key_pem("gw"), remote_ts=["203.0.113.0/24"]):
        rc, out = lab.ping("alice", srv, count=2)
        assert rc == 0, out


def _secure(lab: Lab, qname: str, rdtype: str) -> dns.message.Message:
    """A validated (AD) answer from the lab Unbound, asked from alice."""
    answer = lab.query("alice", qname, rdtype)
    assert answer.flags & dns.flags.AD, answer.to_text()
    return answer


def _first(answer: dns.message.Message, rdtype: str) -> Any:
    """The first rdata of `rdtype` in the answer section."""
    return next(rr for s in answer.answer if s.rdtype == dns.rdatatype.from_text(rdtype)
                for rr in s)


def _installed_children(lab: Lab, host: str) -> list[tuple[str, list[str], list[str]]]:
    """(IKE local id, local TS, remote TS) of every INSTALLED CHILD_SA of `host`'s charon."""
    return [(v["local-id"], c["local-ts"], c["remote-ts"]) for v, c in lab.child_sas(host)
            if c["state"] == "INSTALLED"]


@pytest.mark.parametrize("owner,family", [("srv", 4), ("srv-byname", 4), ("srv-byname", 6)],
                         ids=["by-address", "by-name", "by-name-ipv6"])
def test_gateway_protects_exactly_the_host_its_record_names(lab: Lab, owner: str,
                                                             family: int) -> None:
    """RFC 4025 gateway: alice keys a tunnel to gw from srv's IPSECKEY and asks for srv only.

    gw answers to the identity a resolver derives from the record (its address for
    "10 1 4 198.51.100.20", gw.example.test for the name form), narrows to srv's /32 (/128)
    although it offers the whole net, and srv's replies leave gw only as ESP. The capture
    behind gw shows srv itself answering (gw forwards; it never answers for srv).
    """
    qname = f"{owner}.example.test"
    answer = _secure(lab, qname, "IPSECKEY")
    spki = key_from_answer(answer, qname)
    assert spki == lab.public_key_pem("gw")
    rr = _first(answer, "IPSECKEY")
    if rr.gateway_type == 1:  # IPv4 address: that address is where and who
        gw_addr = gw_id = str(rr.gateway)
    else:
        assert rr.gateway_type == 3, rr
        gw_id = rr.gateway.to_text(omit_final_dot=True)
        gw_addr = _first(_secure(lab, rr.gateway.to_text(), "A" if family == 4 else "AAAA"),
                         "A" if family == 4 else "AAAA").address
    srv = _first(_secure(lab, qname, "A" if family == 4 else "AAAA"),
                 "A" if family == 4 else "AAAA").address
    plen = 32 if family == 4 else 128
    a = lab.addr("alice", family)
    with lab.tunnel("alice", f"smoke-{owner}{family}", gw_addr, gw_id, spki,
                    remote_ts=[f"{srv}/{plen}"]):
        assert _installed_children(lab, "gw") == [(gw_id, [f"{srv}/{plen}"], [f"{a}/{plen}"])]
        with Capture(lab.ns("srv"), "eth0", ["icmp", "or", "icmp6"]) as behind:
            esp_ping(lab, srv, peer=gw_addr, port="gw", watch=(a,), family=family, count=2)
        assert len(behind.matching(f"{a} > {srv}:", "echo request")) >= 2, behind.lines
        assert len(behind.matching(f"{srv} > {a}:", "echo reply")) >= 2, behind.lines


def test_multi_name_is_bobs_identity_too(lab: Lab) -> None:
    """multi.example.test (bob's address; bob's key at precedence 10 of three): a tunnel keyed
    from its IPSECKEY with remote id multi.example.test reaches bob; a broken-zone name that
    also carries bob's key is not an identity bob answers to (such a key must not work)."""
    answer = _secure(lab, "multi.example.test", "IPSECKEY")
    spki = key_from_answer(answer, "multi.example.test")
    assert spki == lab.public_key_pem("bob")
    b = _first(_secure(lab, "multi.example.test", "A"), "A").address
    assert b == lab.addr("bob")
    a = lab.addr("alice")
    with lab.tunnel("alice", "smoke-multi", b, "multi.example.test", spki):
        assert ("multi.example.test", [f"{b}/32"], [f"{a}/32"]) in _installed_children(lab, "bob")
        esp_ping(lab, b, port="bob", count=2)
    with pytest.raises(LabError, match="smoke-unsigned"):
        with lab.tunnel("alice", "smoke-unsigned", b, "host.unsigned.test", spki):
            pass


def _tunnel_ping(lab: Lab, peer: str, peer_addr: str, name: str, *, family: int = 4,
                 count: int = 3) -> dict[str, object]:
    """alice -> peer at peer_addr with the key from the validated IPSECKEY answer; ping over ESP.

    Returns alice's CHILD_SA (as VICI lists it) for further checks.
    """
    qname = f"{peer}.example.test"
    answer = lab.query("alice", qname, "IPSECKEY")
    spki = key_from_answer(answer, qname)
    with lab.tunnel("alice", name, peer_addr, qname, spki):
        child = next(c for _, c in lab.child_sas("alice") if c["name"] == name)
        esp_ping(lab, peer_addr, port=peer, family=family, count=count)
    return dict(child)


@pytest.mark.parametrize("peer,family,alg", [("carol", 4, 2), ("dave", 4, 3), ("bob", 6, 4)],
                         ids=["carol-rsa", "dave-ecdsa", "bob-ipv6"])
def test_tunnel_per_key_type_and_family(lab: Lab, peer: str, family: int, alg: int) -> None:
    """RSA (alg 2) and ECDSA P-256 (alg 3) keys from DNS, and IPv6 IKE + TS, carry ESP pings."""
    r = lab.query("alice", f"{peer}.example.test", "IPSECKEY")
    assert [rr.algorithm for s in r.answer if s.rdtype == dns.rdatatype.IPSECKEY
            for rr in s] == [alg]
    addr_type = "AAAA" if family == 6 else "A"
    addrs = lab.query("alice", f"{peer}.example.test", addr_type)
    assert addrs.flags & dns.flags.AD
    (peer_addr,) = [rr.to_text() for s in addrs.answer
                    if s.rdtype == dns.rdatatype.from_text(addr_type) for rr in s]
    assert peer_addr == lab.addr(peer, family)
    child = _tunnel_ping(lab, peer, peer_addr, f"smoke-{peer}{family}", family=family)
    plen = 128 if family == 6 else 32
    assert child["local-ts"] == [f"{lab.addr('alice', family)}/{plen}"], child
    assert child["remote-ts"] == [f"{peer_addr}/{plen}"], child


def test_moved_responder_takes_a_new_tunnel_at_its_new_address(lab: Lab) -> None:
    """bob moves while an SA to his old address is up; a new conn to the new address works.

    The old SA stays bound to the old address (MOBIKE is off in the lab): it must not wander to
    another path or family. After moving back, bob still accepts tunnels at his old address.
    """
    old, new = HOSTS["bob"].v4, "198.51.100.111"
    assert lab.addr("bob") == old
    with lab.tunnel("alice", "smoke-premove", old, "bob.example.test",
                    lab.public_key_pem("bob")):
        lab.move("bob", new)
        try:
            assert lab.addr("bob") == new
            child = _tunnel_ping(lab, "bob", new, "smoke-moved")
            assert child["remote-ts"] == [f"{new}/32"], child
            bob_ts = {ts for _, c in lab.child_sas("bob") for ts in c["local-ts"]}
            assert bob_ts <= {f"{old}/32", f"{new}/32"}, bob_ts
        finally:
            lab.move("bob", old)
    assert lab.addr("bob") == old
    _tunnel_ping(lab, "bob", old, "smoke-movedback", count=1)


def _wait_child_from(lab: Lab, host: str, local: str, name: str, timeout: float = 5) -> list[str]:
    """Wait until `host` has CHILD_SA `name` INSTALLED in an IKE_SA from `local`; its local TS."""
    ts = poll(lambda: [c["local-ts"] for v, c in lab.child_sas(host)
                       if v["local-host"] == local and v["state"] == "ESTABLISHED"
                       and c["name"] == name and c["state"] == "INSTALLED"], timeout)
    assert ts, f"{host}: no {name} from {local} after {timeout} s"
    return list(ts[0])


def test_moved_initiator_reauthenticates_from_its_new_address(lab: Lab) -> None:
    """alice moves with a tunnel up; without MOBIKE her charon re-authenticates by itself."""
    old, new, b = HOSTS["alice"].v4, "198.51.100.110", lab.addr("bob")
    with lab.tunnel("alice", "smoke-initmove", b, "bob.example.test", lab.public_key_pem("bob")):
        lab.move("alice", new)
        try:
            assert _wait_child_from(lab, "alice", new, "smoke-initmove") == [f"{new}/32"]
            esp_ping(lab, b, port="bob", watch=(b,), count=2)  # from alice's new address
        finally:
            lab.move("alice", old)
        # And back: closing before the re-authentication is done would wait for a DELETE sent
        # from the vanished address to time out.
        assert _wait_child_from(lab, "alice", old, "smoke-initmove") == [f"{old}/32"]


def test_resolv_conf_per_host(lab: Lab) -> None:
    """set_resolv_conf makes getent in alice resolve through the lab Unbound; clear undoes it."""
    bob = {lab.addr("bob", 4), lab.addr("bob", 6)}
    host_view = Path("/etc/resolv.conf").read_text()
    lab.set_resolv_conf("alice", f"nameserver {lab.unbound_addr}\noptions timeout:1 attempts:1")
    try:
        got = lab.exec("alice", ["getent", "hosts", "bob.example.test"], timeout=15)
        assert got.stdout.split()[0] in bob, got.stdout
        v4 = lab.exec("alice", ["getent", "ahostsv4", "bob.example.test"], timeout=15)
        assert v4.stdout.split()[0] == lab.addr("bob"), v4.stdout
        # Only alice is affected.
        assert lab.exec("bob", ["cat", "/etc/resolv.conf"]).stdout == host_view
    finally:
        lab.clear_resolv_conf("alice")
    assert not lab.resolv_conf_path("alice").parent.exists()
    assert lab.exec("alice", ["cat", "/etc/resolv.conf"]).stdout == host_view
    after = lab.exec("alice", ["getent", "hosts", "bob.example.test"], check=False, timeout=30)
    assert after.returncode != 0 and not bob & set(after.stdout.split()), after.stdout


def test_esp_data_path_is_a_config_choice(lab: Lab, tmp_path: Path) -> None:
    """LAB_ESP picks charon's plugins; `kernel` is refused clearly where the kernel lacks ESP."""
    conf = (lab.charon_dir("alice") / "strongswan.conf").read_text()
    load = next(ln.split("=", 1)[1].split() for ln in conf.splitlines()
                if ln.strip().startswith("load ="))
    assert ("kernel-libipsec" in load) == (lab.esp == "libipsec"), load
    assert "kernel-netlink" in load
    with pytest.raises(LabError, match="LAB_ESP must be one of"):
        Lab(lab_id="x", esp="userland")
    other = Lab(lab_id=(lab.lab_id + "k")[-4:], state_dir=tmp_path / "lab", esp="kernel")
    assert other.prefix != lab.prefix
    kernel_has_esp = kernel_esp_error(other.prefix) is None
    if kernel_has_esp:
        try:
            other.up()
            assert other.is_up()
        finally:
            other.down()
    else:
        t0 = time.monotonic()
        with pytest.raises(LabError, match=r"LAB_ESP=kernel.*cannot hold an ESP SA"):
            other.up()
        assert time.monotonic() - t0 < 5
        assert [n for n in list_namespaces() if n.startswith(other.prefix)] == []
    assert lab.is_up()  # the session lab is untouched


def test_down_leaves_nothing_then_up_again(lab: Lab) -> None:
    """`python -m lab down` from another process (as after a crash) removes every trace.

    Runs last in this file; it brings the session lab back up for later test files.
    """
    pids = lab.pids()
    assert len(pids) >= 10  # 4 named, unbound, 5 charon
    lab.set_resolv_conf("plain", f"nameserver {lab.unbound_addr}")  # down must remove it
    env_id = {"LAB_ID": lab.lab_id, "LAB_DIR": str(lab.state_dir)}
    try:
        subprocess.run([sys.executable, "-m", "lab", "down"], check=True, timeout=60,
                       env={**os.environ, **env_id}, cwd=Path(__file__).resolve().parents[2])
        assert [n for n in list_namespaces() if n.startswith(lab.prefix)] == []
        # Killed daemons may linger as zombies until their parent reaps them: not running.
        poll(lambda: all(is_zombie(p) for p in pids), 5)
        assert [p for p in pids if not is_zombie(p)] == []
        if not other_instances_up(lab.switch_ns):
            assert blackholes_present() == []
        assert not lab.run_dir.exists()
        assert etc_netns_dirs(lab.prefix) == []
        assert lab.private_key("alice").exists()  # the key cache survives
    finally:
        lab.up()
    assert lab.dig("alice", "bob.example.test", "IPSECKEY").status == "NOERROR"

