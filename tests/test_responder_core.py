"""resolver.responder.core and .charonlog, pure: [responder], the gate's bounds, the judgement of
the lookups, the conn payloads, and reading charon's log (including lines an attacker shaped).

The log lines are the ones measured from strongSwan 5.9.8 in the lab (lab-notes, "Measured
2026-12-03"), with attacker-chosen identities spliced in where charon prints IDi and IDr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.name
import dns.rcode
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.errors import ConfigError, UpstreamError
from resolver.ipseckey import IpsecKey
from resolver.responder.charonlog import (
    Failure,
    LogLine,
    Reason,
    Tracker,
    failure_reason,
    from_updown,
    identity_name,
)
from resolver.responder.core import (
    NEVER_GROUP,
    WILDCARD,
    Admit,
    Gate,
    NegativeCache,
    Refused,
    ResponderConfig,
    TokenBucket,
    conn_name,
    judge,
    responder_conn,
    same_admission,
    wildcard_conn,
)
from resolver.validator.response import Security, Verdict

ALICE = dns.name.from_text("alice.example.test.")
A4, A6 = IPv4Address("198.51.100.10"), IPv6Address("2001:db8:100::10")
ELSEWHERE = IPv4Address("203.0.113.99")
PRIV = ed25519.Ed25519PrivateKey.generate()
KEY = IpsecKey.from_public_key(ALICE, PRIV.public_key())
OTHER = IpsecKey.from_public_key(ALICE, ed25519.Ed25519PrivateKey.generate().public_key())
SECURE = Verdict(Security.SECURE)


@dataclass
class Ans:
    verdict: Verdict = SECURE
    rcode: int = dns.rcode.NOERROR
    answer: list[dns.rrset.RRset] = field(default_factory=list)


def keys(*ks: IpsecKey, verdict: Verdict = SECURE, owner: dns.name.Name = ALICE) -> Ans:
    texts = [k.to_rdata().to_text() for k in ks]
    return Ans(verdict, answer=[dns.rrset.from_text(owner, 60, "IN", "IPSECKEY", *texts)]
               if texts else [])


def addrs(rdtype: str, *texts: str, verdict: Verdict = SECURE) -> Ans:
    return Ans(verdict, answer=[dns.rrset.from_text(ALICE, 60, "IN", rdtype, *texts)]
               if texts else [])


A = addrs("A", str(A4))
AAAA = addrs("AAAA", str(A6))


# --- [responder] ----------------------------------------------------------------------------


def test_config_defaults_and_values() -> None:
    d = ResponderConfig.from_section({})
    assert d == ResponderConfig() and d.enabled and d.accept == (dns.name.root,)
    assert d.match_address and d.allow_keys == ()
    fp = KEY.fingerprint()
    c = ResponderConfig.from_section({"accept": ["example.test.", "corp.example"],
                                      "allow_keys": [fp], "match_address": False,
                                      "lookups_per_second": 5, "max_conns": 3})
    assert c.accept == (dns.name.from_text("example.test."), dns.name.from_text("corp.example."))
    assert c.allow_keys == (fp,) and not c.match_address and c.lookups_per_second == 5.0
    assert not ResponderConfig.from_section({"accept": "none"}).enabled
    assert ResponderConfig.from_section({"accept": []}).accept == ()


@pytest.mark.parametrize(("section", "message"), [
    ({"accept": "all"}, "key 'accept': must be one of any, none"),
    ({"accept": ["a..b"]}, "key 'accept': 'a..b' is not a name suffix"),
    ({"allow_keys": ["SHA256:abc"]}, "key 'allow_keys': 'SHA256:abc' is not a key fingerprint"),
    ({"allow_keys": "SHA256:x"}, "key 'allow_keys': expected a list of strings"),
    ({"match_address": "yes"}, "key 'match_address': expected true or false"),
    ({"max_lookups": 0}, "key 'max_lookups': must be between 1 and 4096"),
    ({"acept": "any"}, "key 'acept': unknown key \\(known keys: accept, allow_keys,"),
])
def test_config_errors(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^r.toml: \\[responder\\] {message}"):
        ResponderConfig.from_section(section, "r.toml")


# --- the gate -------------------------------------------------------------------------------


def test_token_bucket() -> None:
    b = TokenBucket(2.0, 4.0)
    assert [b.take(0.0) for _ in range(5)] == [True] * 4 + [False]
    assert b.take(0.5) and not b.take(0.5)  # one token back after 0.5 s at 2/s
    assert [b.take(100.0) for _ in range(5)] == [True] * 4 + [False]  # never above the burst


def test_negative_cache_expires_and_is_bounded() -> None:
    n = NegativeCache(ttl=30, size=3)
    n.put((ALICE, A4), "bogus", 0.0)
    assert n.get((ALICE, A4), 29.9) == "bogus" and n.get((ALICE, A6), 1.0) is None
    assert n.get((ALICE, A4), 30.0) is None and len(n) == 0
    for i in range(10):
        n.put((dns.name.from_text(f"n{i}.test."), A4), "x", 1.0)
    assert len(n) == 3  # a flood of names cannot grow it
    n.put((ALICE, A4), "x", 1.0)
    n.forget(ALICE)
    assert n.get((ALICE, A4), 2.0) is None


def gate(**kw: object) -> Gate:
    return Gate(ResponderConfig.from_section(kw))


def test_gate_refuses_without_a_lookup() -> None:
    g = gate(accept=["example.test."])
    args = {"in_flight": 0, "conns": 0, "evictable": False}
    assert "not a host name" in g.before_lookup(None, A4, 0.0, **args).reason  # type: ignore[union-attr]
    out = g.before_lookup(dns.name.from_text("x.other.test."), A4, 0.0, **args)
    assert isinstance(out, Refused) and "accept" in out.reason and not out.quiet
    assert g.before_lookup(ALICE, A4, 0.0, **args) is None  # looked up
    g.after_lookup(ALICE, A4, Refused("bogus", lookup=True), 0.0)
    out = g.before_lookup(ALICE, A4, 1.0, **args)
    assert isinstance(out, Refused) and out.quiet and "bogus" in out.reason  # negative cache
    assert g.before_lookup(ALICE, A6, 1.0, **args) is None  # another address: not locked out
    busy = g.before_lookup(ALICE, A4, 100.0, in_flight=16, conns=0, evictable=False)
    full = g.before_lookup(ALICE, A4, 100.0, in_flight=0, conns=256, evictable=False)
    assert isinstance(busy, Refused) and isinstance(full, Refused)
    assert g.before_lookup(ALICE, A4, 100.0, in_flight=0, conns=256, evictable=True) is None
    c = g.counters
    assert (c.not_a_name, c.not_accepted, c.negative_hits, c.busy, c.full, c.lookups) == \
        (1, 1, 1, 1, 1, 3)


def test_gate_rates_per_address_and_in_all() -> None:
    g = gate(lookups_per_second=5, peer_lookups_per_second=1)
    args = {"in_flight": 0, "conns": 0, "evictable": False}
    flood = [g.before_lookup(dns.name.from_text(f"r{i}.flood.test."), ELSEWHERE, 0.0, **args)
             for i in range(1000)]
    assert sum(r is None for r in flood) == 4  # one source: its burst (4 x 1/s)
    assert all(r.quiet for r in flood if r is not None)  # counted, not logged one by one
    # others still get through: the global bucket (burst 20) was barely touched
    assert g.before_lookup(ALICE, A4, 0.0, **args) is None
    others = [g.before_lookup(dns.name.from_text(f"h{i}.test."), IPv4Address(f"192.0.2.{i}"),
                              0.0, **args) for i in range(1, 40)]
    assert sum(r is None for r in others) == 20 - 5  # the global burst, less what was spent
    later = g.before_lookup(dns.name.from_text("r-late.flood.test."), ELSEWHERE, 3.0, **args)
    assert later is None  # the source's bucket refilled


# --- judging the lookups --------------------------------------------------------------------

CFG = ResponderConfig()


def test_admit_secure_key_from_one_of_its_addresses() -> None:
    out = judge(CFG, ALICE, A4, keys(KEY), A, AAAA)
    assert isinstance(out, Admit) and [k.public_key for k in out.keys] == [KEY.public_key]
    assert out.addresses == (A4, A6) and out.remote_addrs == (A4, A6)
    v6 = judge(CFG, ALICE, A6, keys(KEY), A, AAAA)  # IPv6 source, IPv6 address match
    assert isinstance(v6, Admit) and v6.addresses == (A4, A6)


@pytest.mark.parametrize(("ipseckey", "words"), [
    (keys(KEY, verdict=Verdict(Security.BOGUS, "signature expired", 7)), "bogus: signature"),
    (keys(KEY, verdict=Verdict(Security.INSECURE, "unsigned")), "unsigned zone (insecure)"),
    (keys(KEY, verdict=Verdict(Security.INDETERMINATE, "no proof")), "could not be validated"),
    (Ans(), "publishes no usable IPSECKEY"),
    (Ans(rcode=dns.rcode.NXDOMAIN), "does not exist (NXDOMAIN)"),
    (Ans(rcode=dns.rcode.SERVFAIL), "answered SERVFAIL"),
    (UpstreamError("all upstreams timed out"), "lookup of alice.example.test failed"),
    (keys(KEY, owner=dns.name.from_text("bob.example.test.")), "no usable IPSECKEY"),
    (keys(IpsecKey.from_public_key(ALICE, PRIV.public_key(), gateway=ELSEWHERE)),
     "no usable IPSECKEY of its own"),  # a gateway's key is the gateway's
])
def test_refuse_anything_but_a_secure_key(ipseckey: object, words: str) -> None:
    out = judge(CFG, ALICE, A4, ipseckey, A, AAAA)  # type: ignore[arg-type]
    assert isinstance(out, Refused) and out.lookup and words in out.reason, out


def test_match_address() -> None:
    out = judge(CFG, ALICE, ELSEWHERE, keys(KEY), A, AAAA)
    assert isinstance(out, Refused) and "203.0.113.99, which is not an address" in out.reason
    insecure = addrs("A", str(A4), verdict=Verdict(Security.INSECURE))
    out = judge(CFG, ALICE, A4, keys(KEY), insecure, Ans())
    assert isinstance(out, Refused)  # an insecure address vouches for nothing
    bogus = addrs("A", str(A4), verdict=Verdict(Security.BOGUS, "bad"))
    assert isinstance(judge(CFG, ALICE, A4, keys(KEY), bogus, AAAA), Refused)
    off = ResponderConfig.from_section({"match_address": False})
    out = judge(off, ALICE, ELSEWHERE, keys(KEY), A, AAAA)
    assert isinstance(out, Admit) and out.addresses == (A4, A6, ELSEWHERE)
    assert out.remote_addrs == ()  # IKE from anywhere; traffic only for what is vouched for
    out = judge(off, ALICE, ELSEWHERE, keys(KEY), bogus, UpstreamError("x"))
    assert isinstance(out, Admit) and out.addresses == (ELSEWHERE,)


def test_allow_keys() -> None:
    only = ResponderConfig.from_section({"allow_keys": [KEY.fingerprint()]})
    out = judge(only, ALICE, A4, keys(KEY, OTHER), A, AAAA)
    assert isinstance(out, Admit)
    assert [k.public_key for k in out.keys] == [KEY.public_key]  # narrowed to the allowed key
    out = judge(only, ALICE, A4, keys(OTHER), A, AAAA)
    assert isinstance(out, Refused) and "not in [responder] allow_keys" in out.reason
    assert OTHER.fingerprint() in out.reason


# --- conns ----------------------------------------------------------------------------------


def test_conn_payloads() -> None:
    admit = Admit(ALICE, (KEY, OTHER), (A4, A6), (A4, A6))
    name = conn_name(ALICE)
    assert name.startswith("iskr-alice-") and len(name) == len("iskr-alice-") + 10
    assert not name.startswith("isk-")  # the Provisioner's reconcile leaves it alone
    conn = responder_conn(admit, "bob.example.test", "SPKI", (IPv4Address("198.51.100.11"),),
                          5)
    c = conn[name]
    assert c["dpd_delay"] == "5s"
    assert c["remote"] == {"auth": "pubkey", "id": "alice.example.test",
                           "pubkeys": [KEY.spki_pem(), OTHER.spki_pem()]}
    assert c["remote_addrs"] == [str(A4), str(A6)]
    child = c["children"][name]
    assert child["remote_ts"] == ["198.51.100.10/32", "2001:db8:100::10/128"]
    assert child["local_ts"] == ["198.51.100.11/32"] and child["mode"] == "tunnel"
    assert "start_action" not in child  # a responder conn
    assert child["dpd_action"] == "clear"
    w = wildcard_conn("bob.example.test", "SPKI")[WILDCARD]
    assert w["remote"] == {"auth": "pubkey", "id": "%any", "groups": [NEVER_GROUP]}
    assert "children" not in w and "pubkeys" not in w["remote"]


def test_same_admission() -> None:
    a = Admit(ALICE, (KEY,), (A4,), (A4,))
    assert same_admission(a, Admit(ALICE, (KEY,), (A4,), (A4,)))
    assert not same_admission(a, Admit(ALICE, (OTHER,), (A4,), (A4,)))
    assert not same_admission(a, Admit(ALICE, (KEY,), (A4, A6), (A4, A6)))


# --- charon's log ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name"), [
    ("alice.example.test", "alice.example.test."),
    ("Alice.Example.TEST.", "alice.example.test."),
    ("198.51.100.10", None), ("2001:db8::1", None), ("alice@example.test", None),
    ("C=CH, O=strongSwan, CN=alice", None), ("%any", None), ("localhost", None),
    ("a" * 64 + ".test", None), ("-a.test", None), ("a.123", None), ("", None),
    ("alice.example.test]...198.51.100.10[alice.example.test", None),
    ("ällice.test", None), ("a b.test", None),
])
def test_identity_name(text: str, name: str | None) -> None:
    got = identity_name(text)
    assert (got.to_text() if got is not None else None) == name


def line(msg: str, uid: str = "7", name: str = "(unnamed)") -> LogLine:
    return LogLine.of({"ikesa-name": name, "ikesa-uniqueid": uid, "msg": msg})


LOOK = ("looking for peer configs matching 198.51.100.11[bob.example.test]...{addr}[{idi}]")


def test_tracker_pairs_the_lines_of_one_ike_sa() -> None:
    t = Tracker(WILDCARD)
    assert t.feed(line(LOOK.format(addr="198.51.100.10", idi="alice.example.test"))) is None
    dave = LOOK.format(addr="2001:db8:100::13", idi="dave.example.test")
    assert t.feed(line(dave, "8")) is None
    found = t.feed(line(f"selected peer config '{WILDCARD}'", name=WILDCARD))
    assert found is not None and found.identity == "alice.example.test"
    assert found.address == ip_address("198.51.100.10") and found.ike_id == "7"
    assert t.feed(line(f"selected peer config '{WILDCARD}'", name=WILDCARD)) is None  # once
    v6 = t.feed(line(f"switching to peer config '{WILDCARD}'", "8", name="iskr-dave-x"))
    assert v6 is not None and v6.address == ip_address("2001:db8:100::13")
    assert t.feed(line("selected peer config 'isk-bob-aa8231d363'", "9")) is None


def test_tracker_reads_attacker_shaped_identities_safely() -> None:
    """IDr and IDi are the initiator's to choose: a faked "]...ADDR[" ends up inside the
    identity, which is then no host name; the address is the real source."""
    t = Tracker(WILDCARD)
    fake = "x]...198.51.100.10[alice.example.test"
    t.feed(line(LOOK.format(addr="203.0.113.99", idi=fake)))
    found = t.feed(line(f"selected peer config '{WILDCARD}'", name=WILDCARD))
    assert found is not None and found.address == ip_address("203.0.113.99")
    assert identity_name(found.identity) is None
    t.feed(line("looking for peer configs matching 198.51.100.11[bob]...198.51.100.10"
                "[alice.example.test]...203.0.113.99[x]", "9"))
    found = t.feed(line(f"selected peer config '{WILDCARD}'", "9", name=WILDCARD))
    assert found is not None and identity_name(found.identity) is None  # "...]...[x" in IDi


def test_tracker_is_bounded() -> None:
    t = Tracker(WILDCARD, limit=10)
    for i in range(1000):
        t.feed(line(LOOK.format(addr="203.0.113.99", idi=f"r{i}.flood.test"), str(i)))
    assert len(t) == 10
    assert t.feed(line(f"selected peer config '{WILDCARD}'", "0", name=WILDCARD)) is None
    assert t.feed(line(f"selected peer config '{WILDCARD}'", "999", name=WILDCARD)) is not None


def test_from_updown() -> None:
    ike = {"uniqueid": "4", "state": "CONNECTING", "remote-host": "198.51.100.10",
           "remote-id": "alice.example.test"}
    found = from_updown(WILDCARD, ike, WILDCARD)
    assert found is not None and found.identity == "alice.example.test"
    assert from_updown("iskr-alice-x", ike, WILDCARD) is None
    assert from_updown(WILDCARD, ike | {"state": "ESTABLISHED"}, WILDCARD) is None
    assert from_updown(WILDCARD, ike | {"remote-host": "%any"}, WILDCARD) is None


@pytest.mark.parametrize(("msg", "failure", "retry"), [
    ("received AUTHENTICATION_FAILED notify error", Failure.AUTH_REFUSED, True),
    ("received NO_PROPOSAL_CHOSEN notify error", Failure.NO_PROPOSAL, False),
    ("received TS_UNACCEPTABLE notify, no CHILD_SA built", Failure.TS_UNACCEPTABLE, False),
    ("received INVALID_SYNTAX notify error", Failure.OTHER_NOTIFY, False),
    ("retransmit 2 of request with message ID 0", Failure.NO_RESPONSE, False),
    ("giving up after 2 retransmits", Failure.NO_RESPONSE, False),
    ("no trusted ED25519 public key found for 'bob.example.test'", Failure.PEER_UNPROVEN, False),
    ("signature validation failed, looking for another key", Failure.PEER_UNPROVEN, False),
])
def test_failure_reasons(msg: str, failure: Failure, retry: bool) -> None:
    reason = failure_reason(line(msg, name="isk-bob-aa8231d363"))
    assert reason is not None and reason.failure is failure and reason.retry is retry
    words = reason.words("bob.example.test (198.51.100.11)", "alice.example.test")
    assert "bob.example.test (198.51.100.11)" in words and "isk-" not in words
    assert failure_reason(line("sending packet: from 198.51.100.10[500]")) is None


def test_the_peers_answer_beats_retransmits() -> None:
    retransmits, refused = Reason(Failure.NO_RESPONSE), Reason(Failure.AUTH_REFUSED)
    assert retransmits.stronger(refused) is refused and refused.stronger(retransmits) is refused
    assert refused.stronger(None) is refused
    assert "AUTHENTICATION_FAILED" in refused.words("p", "us")
    assert "no response from p" in retransmits.words("p", "us")
