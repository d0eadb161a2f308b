"""Smoke tests that prove the lab is real: validated DNS, broken zones, dynamic updates, ESP.

Every query starts inside a lab namespace (alice) and goes through the lab's own Unbound, the
independent validator the resolver is later compared with. The tunnel test does by hand what the
resolver will automate: key from a validated answer -> VICI load-conn -> initiate -> traffic,
watched on the wire from the switch namespace.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dns.flags
import dns.rdatatype
import pytest

from lab import ike, keys
from lab.core import Lab
from lab.demo import key_from_answer
from lab.net import LabError, blackholes_present, is_zombie, list_namespaces, other_instances_up
from lab.topology import BLACKHOLE_PREFIXES, EXPECTATIONS, HOSTS, Expectation
from lab.wire import Capture

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Dig:
    """The parts of dig's output these tests look at."""

    status: str
    flags: frozenset[str]
    answer: list[str]  # answer-section lines
    text: str


def dig(lab: Lab, *args: str, host: str = "alice", server: str | None = None) -> Dig:
    """Run dig inside a lab host against the lab Unbound (or `server`)."""
    out = lab.exec(host, ["dig", f"@{server or lab.unbound_addr}", "+dnssec", "+time=2",
                          "+tries=2", "+nocmd", "+noall", "+comments", "+answer", *args]).stdout
    status = re.search(r"status: (\w+)", out)
    flags = re.search(r";; flags: ([a-z ]+);", out)
    assert status and flags, out
    answer = [ln for ln in out.splitlines() if ln and not ln.startswith(";")]
    return Dig(status.group(1), frozenset(flags.group(1).split()), answer, out)


def rdatas(d: Dig, rtype: str, covered: str | None = None) -> list[str]:
    """Rdata texts of the answer records of one type (RRSIGs: those covering `covered`)."""
    out = []
    for ln in d.answer:
        tok = ln.split(None, 4)
        if len(tok) == 5 and tok[3] == rtype:
            rdata = " ".join(tok[4].split())
            if covered is None or rdata.split()[0] == covered:
                out.append(rdata)
    return out


def published_key_b64(lab: Lab, host: str) -> str:
    """The base64 IPSECKEY key field we expect in DNS for a host, from its private key."""
    from cryptography.hazmat.primitives import serialization

    priv = serialization.load_pem_private_key(lab.private_key(host).read_bytes(), None)
    _, blob = keys.ipseckey_key_field(priv.public_key())  # type: ignore[arg-type]
    return base64.b64encode(blob).decode()


@pytest.mark.parametrize("exp", EXPECTATIONS, ids=lambda e: f"{e.qname}{e.rdtype}")
def test_validation_outcome(lab: Lab, exp: Expectation) -> None:
    """Each lab name validates (or fails) in Unbound exactly as the topology promises."""
    d = dig(lab, exp.qname, exp.rdtype)
    assert d.status == exp.rcode, d.text
    assert ("ad" in d.flags) == exp.ad, d.text
    if exp.rcode == "NOERROR":
        assert rdatas(d, exp.rdtype), d.text
        # Signed zones come with signatures, the unsigned one without.
        assert bool(rdatas(d, "RRSIG", exp.rdtype)) == exp.ad, d.text


def test_bob_ipseckey_is_secure_and_is_bobs_key(lab: Lab) -> None:
    """bob.example.test IPSECKEY: AD set, RRSIG present, key field = bob's public key."""
    d = dig(lab, "bob.example.test", "IPSECKEY")
    assert d.status == "NOERROR" and "ad" in d.flags, d.text
    assert rdatas(d, "RRSIG", "IPSECKEY"), d.text
    (rr,) = rdatas(d, "IPSECKEY")
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
    pub = keys.public_key_from_ipseckey(rrs[0].algorithm, rrs[0].key)
    assert keys.spki_pem(pub) == lab.public_key_pem(host)


def test_ipv6_transport_and_gateway_records(lab: Lab) -> None:
    """Unbound answers over IPv6; srv's records carry gw as gateway, by address and by name."""
    d = dig(lab, "alice.example.test", "AAAA", server=HOSTS["unbound"].v6)
    assert d.status == "NOERROR" and "ad" in d.flags, d.text
    assert any(ln.endswith(HOSTS["alice"].v6) for ln in d.answer), d.text
    srv = dig(lab, "srv.example.test", "IPSECKEY")
    assert "ad" in srv.flags
    assert [r.rsplit(None, 1)[0] for r in rdatas(srv, "IPSECKEY")] == ["10 1 4 198.51.100.20"]
    byname = dig(lab, "srv-byname.example.test", "IPSECKEY")
    assert "ad" in byname.flags
    assert [r.rsplit(None, 1)[0] for r in rdatas(byname, "IPSECKEY")] == [
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
    deadline = time.monotonic() + 5
    while True:
        direct = dig(lab, name, "TXT", server=ns)
        if rdatas(direct, "RRSIG", "TXT"):
            break
        assert time.monotonic() < deadline, f"{name} never came back signed:\n{direct.text}"
        time.sleep(0.05)
    assert rdatas(direct, "TXT") == ['"smoke"'], direct.text
    lab.flush("example.test")
    via = dig(lab, name, "TXT")
    assert via.status == "NOERROR" and "ad" in via.flags, via.text


def test_namespaces_have_no_default_route_and_host_has_blackholes(lab: Lab) -> None:
    """The safety net: nothing in the lab can route out, nothing outside can route in."""
    for host in HOSTS:
        for fam in ("-4", "-6"):
            out = subprocess.run(["ip", "-n", lab.ns(host), fam, "route", "show", "default"],
                                 capture_output=True, text=True, check=True).stdout
            assert out.strip() == "", f"{host} has a default route: {out}"
    assert blackholes_present() == list(BLACKHOLE_PREFIXES)


def test_tunnel_from_dns_key_carries_ping_as_esp(lab: Lab) -> None:
    """alice -> bob: key from DNS, VICI load-conn + initiate, ping goes as ESP-in-UDP only."""
    a, b = lab.addr("alice"), lab.addr("bob")
    # Control: before the tunnel, the same capture does see the ping in clear, so "no ICMP"
    # below means encrypted, not "capture blind".
    with Capture(lab.switch_ns, "v-bob", ["host", a, "and", "host", b]) as clear:
        lab.exec("alice", ["ping", "-c", "1", "-W", "1", b])
    assert clear.matching("ICMP echo request"), "\n".join(clear.lines)
    answer = lab.query("alice", "bob.example.test", "IPSECKEY")
    spki = key_from_answer(answer, "bob.example.test")
    conn = ike.initiator_conn("smoke-bob", HOSTS["alice"], b, "bob.example.test",
                              lab.public_key_pem("alice"), spki)
    try:
        with lab.vici("alice") as s:
            s.load_conn(conn)
            ike.initiate(s, "smoke-bob", "smoke-bob")
            assert ike.child_states(s).get("smoke-bob") == "INSTALLED"
        with lab.vici("bob") as s:
            assert "INSTALLED" in ike.child_states(s).values()
        with Capture(lab.switch_ns, "v-bob", ["host", a, "and", "host", b]) as cap:
            ping = lab.exec("alice", ["ping", "-c", "3", "-i", "0.2", "-W", "1", b], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        esp = cap.matching(f"{a}.4500 > {b}.4500", "ESP")
        back = cap.matching(f"{b}.4500 > {a}.4500", "ESP")
        assert len(esp) >= 3 and len(back) >= 3, "\n".join(cap.lines)
        assert cap.matching("ICMP") == [], "cleartext ICMP on the wire:\n" + "\n".join(cap.lines)
    finally:
        with lab.vici("alice") as s:
            for _ in s.terminate({"ike": "smoke-bob", "force": "yes", "timeout": 2000}):
                pass
            s.unload_conn({"name": "smoke-bob"})


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
    unreachable = lab.exec("plain", ["ping", "-c", "1", "-W", "1", srv], check=False)
    assert unreachable.returncode != 0  # no route: the lab has no default routes
    conn = ike.initiator_conn("smoke-gw", HOSTS["alice"], lab.addr("gw"), "gw.example.test",
                              lab.public_key_pem("alice"), lab.public_key_pem("gw"),
                              remote_ts=["203.0.113.0/24"])
    try:
        with lab.vici("alice") as s:
            s.load_conn(conn)
            ike.initiate(s, "smoke-gw", "smoke-gw")
        ping = lab.exec("alice", ["ping", "-c", "2", "-i", "0.2", "-W", "1", srv], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        with lab.vici("alice") as s:
            for _ in s.terminate({"ike": "smoke-gw", "force": "yes", "timeout": 2000}):
                pass
            s.unload_conn({"name": "smoke-gw"})


def test_down_leaves_nothing_then_up_again(lab: Lab) -> None:
    """`python -m lab down` from another process (as after a crash) removes every trace.

    Runs last in this file; it brings the session lab back up for later test files.
    """
    pids = lab.pids()
    assert len(pids) >= 10  # 4 named, unbound, 5 charon
    env_id = {"LAB_ID": lab.lab_id, "LAB_DIR": str(lab.state_dir)}
    try:
        subprocess.run([sys.executable, "-m", "lab", "down"], check=True, timeout=60,
                       env={**os.environ, **env_id}, cwd=Path(__file__).resolve().parents[2])
        assert [n for n in list_namespaces() if n.startswith(lab.prefix)] == []
        deadline = time.monotonic() + 5
        # Killed daemons may linger as zombies until their parent reaps them: not running.
        while any(not is_zombie(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in pids if not is_zombie(p)] == []
        if not other_instances_up(lab.switch_ns):
            assert blackholes_present() == []
        assert not lab.run_dir.exists()
        assert lab.private_key("alice").exists()  # the key cache survives
    finally:
        lab.up()
    assert dig(lab, "bob.example.test", "IPSECKEY").status == "NOERROR"

