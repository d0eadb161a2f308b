"""resolver.policy: groups from config, and every cell of DESIGN.md's decision table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

import dns.edns
import dns.name
import dns.rcode
import dns.rrset
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.errors import ConfigError
from resolver.ipseckey import IpsecKey
from resolver.policy import (
    EDE_BLOCKED,
    EDE_DAEMON,
    EDE_NO_KEY,
    EDE_TUNNEL,
    AnswerClear,
    Group,
    KeyEvidence,
    KeyStatus,
    Policy,
    PolicyConfig,
    Refuse,
    SetupFailure,
    Tunnel,
    key_evidence,
)
from resolver.validator.response import Security, Verdict

NAME = dns.name.from_text("bob.example.test.")
BOB = IPv4Address("198.51.100.11")
KEY = IpsecKey.from_public_key(NAME, ed25519.Ed25519PrivateKey.generate().public_key(), ttl=60)
SECURE = Verdict(Security.SECURE)

EVIDENCE = {
    KeyStatus.FOUND: KeyEvidence(KeyStatus.FOUND, keys=(KEY,)),
    KeyStatus.ABSENT: KeyEvidence(KeyStatus.ABSENT, reason="no IPSECKEY (proven)"),
    KeyStatus.UNUSABLE: KeyEvidence(KeyStatus.UNUSABLE, reason="no usable IPSECKEY record"),
    KeyStatus.BOGUS: KeyEvidence(KeyStatus.BOGUS, reason="IPSECKEY bogus: sig", ede=6),
    KeyStatus.UNPROVABLE: KeyEvidence(KeyStatus.UNPROVABLE, reason="timeout", ede=22),
}

# The decision table, spelled out as data. Values: what decide() returns ("tunnel", "clear",
# ("servfail", ede, drop?)) and what a failed tunnel becomes (None when no tunnel is made).
T, C = "tunnel", "clear"
SF_NOKEY_DROP = ("servfail", EDE_NO_KEY, True)
SF_BOGUS = ("servfail", 6, False)
SF_UNPROV = ("servfail", 22, False)
SF_BLOCK = ("servfail", EDE_BLOCKED, True)
FAIL_DROP = ("servfail", EDE_TUNNEL, True)
FAIL_NODROP = ("servfail", EDE_TUNNEL, False)

TABLE: dict[tuple[Group, bool], dict[KeyStatus, tuple[object, object]]] = {
    (Group.PRIVATE, False): {
        KeyStatus.FOUND: (T, FAIL_DROP),
        KeyStatus.ABSENT: (SF_NOKEY_DROP, None),
        KeyStatus.UNUSABLE: (SF_NOKEY_DROP, None),
        KeyStatus.BOGUS: (SF_BOGUS, None),
        KeyStatus.UNPROVABLE: (SF_UNPROV, None),
    },
    (Group.PRIVATE_OR_CLEAR, False): {
        KeyStatus.FOUND: (T, C),
        KeyStatus.ABSENT: (C, None),
        KeyStatus.UNUSABLE: (C, None),
        KeyStatus.BOGUS: (SF_BOGUS, None),
        KeyStatus.UNPROVABLE: (SF_UNPROV, None),
    },
    (Group.PRIVATE_OR_CLEAR, True): {  # strict
        KeyStatus.FOUND: (T, FAIL_NODROP),
        KeyStatus.ABSENT: (C, None),
        KeyStatus.UNUSABLE: (C, None),
        KeyStatus.BOGUS: (SF_BOGUS, None),
        KeyStatus.UNPROVABLE: (SF_UNPROV, None),
    },
    (Group.CLEAR_OR_PRIVATE, False): {
        KeyStatus.FOUND: (C, None),
        KeyStatus.ABSENT: (C, None),
        KeyStatus.UNUSABLE: (C, None),
        KeyStatus.BOGUS: (SF_BOGUS, None),
        KeyStatus.UNPROVABLE: (SF_UNPROV, None),
    },
    (Group.CLEAR, False): dict.fromkeys(KeyStatus, (C, None)),
    (Group.BLOCK, False): dict.fromkeys(KeyStatus, (SF_BLOCK, None)),
}
# strict only changes private-or-clear; the other groups behave the same either way
for _g in (Group.PRIVATE, Group.CLEAR_OR_PRIVATE, Group.CLEAR, Group.BLOCK):
    TABLE[(_g, True)] = TABLE[(_g, False)]


def shape(d: object) -> object:
    if isinstance(d, Tunnel):
        return T
    if isinstance(d, AnswerClear):
        return C
    assert isinstance(d, Refuse)
    return ("servfail", d.ede, bool(d.drop))


# strict: None is the configuration that does not mention it (the default, which must be the
# strict row: a destination with a secure key is never answered in clear after a failed setup).
CELLS = list(itertools.product(Group, (False, True, None), KeyStatus))
_STRICT_IDS = {False: "opt-in-clear", True: "strict", None: "default"}


@pytest.mark.parametrize(("group", "strict", "status"), CELLS,
                         ids=[f"{g.value}-{_STRICT_IDS[s]}-{k.value}" for g, s, k in CELLS])
def test_decision_table(group: Group, strict: bool | None, status: KeyStatus) -> None:
    section: dict[str, object] = {"default": group.value}
    if strict is not None:
        section["strict"] = strict
    policy = Policy(PolicyConfig.from_section(section))
    want_decision, want_failure = TABLE[(group, strict is not False)][status]
    d = policy.decide(NAME, [BOB], SECURE, EVIDENCE[status])
    assert shape(d) == want_decision
    assert d.group is group
    if isinstance(d, Tunnel):
        assert d.destinations == (BOB,) and d.keys == (KEY,)
        assert d.drop_while_negotiating is (group is Group.PRIVATE)
        f = policy.after_setup_failure(d, SetupFailure.TIMEOUT, "3.0 s")
        assert shape(f) == want_failure
        if isinstance(f, Refuse):
            assert "timed out" in f.reason and "3.0 s" in f.reason
            assert f.drop == ((BOB,) if group is Group.PRIVATE else ())
        else:  # only the explicit opt-in answers in clear, and says so
            assert isinstance(f, AnswerClear) and f.after_failure and strict is False
            assert "strict = false" in f.reason
    else:
        assert want_failure is None
    if isinstance(d, Refuse) and d.drop:
        assert d.drop == (BOB,)


def test_answering_in_clear_after_a_failure_is_warned_about() -> None:
    assert Policy(PolicyConfig.from_section({})).warnings() == []
    assert Policy(PolicyConfig.from_section({"strict": True})).warnings() == []
    (warning,) = Policy(PolicyConfig.from_section({"strict": False})).warnings()
    assert "strict = false" in warning and "in clear" in warning


@pytest.mark.parametrize("group", list(Group))
@pytest.mark.parametrize("security", [Security.BOGUS, Security.INDETERMINATE])
def test_bogus_address_is_servfail_in_every_group(group: Group, security: Security) -> None:
    policy = Policy(PolicyConfig(default=group))
    d = policy.decide(NAME, [BOB], Verdict(security, "bad sig", ede=7), EVIDENCE[KeyStatus.FOUND])
    assert isinstance(d, Refuse) and d.ede == 7 and d.group is None and not d.drop
    d = policy.decide(NAME, [BOB], Verdict(security, "x"), EVIDENCE[KeyStatus.FOUND])
    assert isinstance(d, Refuse) and d.ede in (6, 5)


@pytest.mark.parametrize("group", list(Group))
@pytest.mark.parametrize("addr", ["127.0.0.1", "::1", "192.0.2.77", "0.0.0.0"])
def test_own_and_loopback_never_tunnelled(group: Group, addr: str) -> None:
    policy = Policy(PolicyConfig(default=group), own_addresses=[IPv4Address("192.0.2.77")])
    d = policy.decide(NAME, [ip_address(addr)], SECURE, EVIDENCE[KeyStatus.FOUND])
    assert isinstance(d, AnswerClear) and "never tunnelled" in d.reason


def test_own_address_excluded_from_tunnel_destinations() -> None:
    policy = Policy(PolicyConfig(default=Group.PRIVATE), own_addresses=[IPv4Address("192.0.2.77")])
    d = policy.decide(NAME, [IPv4Address("192.0.2.77"), BOB], SECURE, EVIDENCE[KeyStatus.FOUND])
    assert isinstance(d, Tunnel) and d.destinations == (BOB,)


def test_keys_not_waited_for_count_as_unprovable() -> None:
    d = Policy(PolicyConfig(default=Group.PRIVATE)).decide(NAME, [BOB], SECURE, None)
    assert isinstance(d, Refuse) and d.ede == 5
    d = Policy(PolicyConfig(default=Group.CLEAR)).decide(NAME, [BOB], SECURE, None)
    assert isinstance(d, AnswerClear)


def test_negative_answers_pass_through() -> None:
    d = Policy(PolicyConfig(default=Group.PRIVATE)).decide(NAME, [], SECURE, None)
    assert isinstance(d, AnswerClear)
    blocking = Policy(PolicyConfig.from_section({"block": ["example.test"]}))
    d = blocking.decide(NAME, [], SECURE, None)
    assert isinstance(d, Refuse) and d.ede == EDE_BLOCKED and d.drop == ()


@pytest.mark.parametrize(("failure", "ede", "text"), [
    (SetupFailure.TIMEOUT, EDE_TUNNEL, "timed out"),
    (SetupFailure.REJECTED, EDE_TUNNEL, "failed"),
    (SetupFailure.DAEMON_UNREACHABLE, EDE_DAEMON, "IKE daemon unreachable"),
])
def test_failure_texts(failure: SetupFailure, ede: int, text: str) -> None:
    policy = Policy(PolicyConfig(default=Group.PRIVATE))
    d = policy.decide(NAME, [BOB], SECURE, EVIDENCE[KeyStatus.FOUND])
    assert isinstance(d, Tunnel)
    f = policy.after_setup_failure(d, failure, "")
    assert isinstance(f, Refuse) and f.ede == ede and text in f.reason


# --- groups from config ----------------------------------------------------------------

CONF = {
    "default": "private-or-clear",
    "strict": True,
    "max_ttl": 120,
    "private": ["198.51.100.0/24", "corp.example."],
    "clear": ["198.51.100.128/25", "2001:db8:113::/64", "pub.corp.example"],
    "block": ["ads.example.", "198.51.100.66/32"],
    "clear-or-private": [],
}


@pytest.mark.parametrize(("name", "addr", "group"), [
    ("x.test.", "198.51.100.11", Group.PRIVATE),  # CIDR
    ("x.test.", "198.51.100.200", Group.CLEAR),  # longer CIDR wins
    ("x.test.", "198.51.100.66", Group.BLOCK),  # /32
    ("x.test.", "192.0.2.1", Group.PRIVATE_OR_CLEAR),  # default
    ("a.corp.example.", "192.0.2.1", Group.PRIVATE),  # name suffix
    ("a.pub.corp.example.", "192.0.2.1", Group.CLEAR),  # longer suffix wins
    ("pub.corp.example.", "192.0.2.1", Group.CLEAR),  # suffix matches itself
    ("xcorp.example.", "192.0.2.1", Group.PRIVATE_OR_CLEAR),  # label boundary
    ("a.pub.corp.example.", "198.51.100.11", Group.PRIVATE),  # CIDR beats name
    ("a.corp.example.", "198.51.100.200", Group.CLEAR),  # CIDR beats name, even to relax
    ("x.test.", "2001:db8:113::21", Group.CLEAR),
    ("x.test.", "2001:db8:100::11", Group.PRIVATE_OR_CLEAR),
])
def test_groups(name: str, addr: str, group: Group) -> None:
    policy = Policy(PolicyConfig.from_section(CONF))
    assert policy.group_for(dns.name.from_text(name), [ip_address(addr)]) is group


def test_strictest_address_wins() -> None:
    policy = Policy(PolicyConfig.from_section(CONF))
    addrs = [IPv4Address("198.51.100.200"), IPv4Address("198.51.100.11")]
    assert policy.group_for(NAME, addrs) is Group.PRIVATE
    assert policy.group_for(NAME, [*addrs, IPv4Address("198.51.100.66")]) is Group.BLOCK
    assert policy.group_for(dns.name.from_text("a.ads.example."), []) is Group.BLOCK
    assert policy.group_for(NAME, []) is Group.PRIVATE_OR_CLEAR


def test_config_values() -> None:
    c = PolicyConfig.from_section(CONF)
    assert c.strict is True and c.max_ttl == 120 and c.default is Group.PRIVATE_OR_CLEAR
    assert PolicyConfig.from_section({}) == PolicyConfig()


@pytest.mark.parametrize(("section", "message"), [
    ({"default": "secret"}, "key 'default': must be one of block, private, private-or-clear,"),
    ({"strict": "yes"}, "key 'strict': expected true or false, got a string"),
    ({"max_ttl": 0}, "key 'max_ttl'"),
    ({"max_ttl": True}, "key 'max_ttl'"),
    ({"private": "10.0.0.0/8"}, "key 'private': expected a list of strings"),
    ({"private": ["10.0.0.1/8"]}, "key 'private': '10.0.0.1/8' is not a CIDR"),
    ({"clear": ["10.0.0.0/33"]}, "key 'clear': '10.0.0.0/33' is not a CIDR"),
    ({"clear": ["a..b"]}, "key 'clear': 'a..b' is not a name suffix"),
    ({"private": ["10.0.0.0/8"], "clear": ["10.0.0.0/8"]},
     "key 'clear': '10.0.0.0/8' is also in group 'private'"),
    ({"privat": []}, "key 'privat': unknown key \\(known keys: default, strict, max_ttl, block,"),
])
def test_config_errors(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^my.toml: \\[policy\\] {message}"):
        PolicyConfig.from_section(section, "my.toml")


# --- evidence from validated answers -----------------------------------------------------


@dataclass
class FakeAnswer:
    verdict: Verdict
    rcode: int = dns.rcode.NOERROR
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    ttl: int = 60


def ipseckey_rrset(*texts: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(NAME, 60, "IN", "IPSECKEY", *texts)


GOOD = KEY.to_rdata().to_text()
NSEC3_ITER = int(dns.edns.EDECode.UNSUPPORTED_NSEC3_ITERATIONS_VALUE)


@pytest.mark.parametrize(("answer", "addr_sec", "status"), [
    (FakeAnswer(SECURE, answer=[ipseckey_rrset(GOOD)]), Security.SECURE, KeyStatus.FOUND),
    (FakeAnswer(SECURE, answer=[ipseckey_rrset("10 0 9 . AAAA")]), Security.SECURE,
     KeyStatus.UNUSABLE),
    (FakeAnswer(SECURE), Security.SECURE, KeyStatus.ABSENT),  # NODATA, proven
    (FakeAnswer(SECURE, rcode=dns.rcode.NXDOMAIN), Security.SECURE, KeyStatus.ABSENT),
    (FakeAnswer(Verdict(Security.INSECURE), answer=[ipseckey_rrset(GOOD)]), Security.INSECURE,
     KeyStatus.ABSENT),  # the unsigned zone's key never authenticates
    (FakeAnswer(Verdict(Security.INSECURE)), Security.SECURE, KeyStatus.UNPROVABLE),
    (FakeAnswer(Verdict(Security.INSECURE, "iterations", ede=NSEC3_ITER)), Security.INSECURE,
     KeyStatus.UNPROVABLE),
    (FakeAnswer(Verdict(Security.BOGUS, "bad sig", ede=6), answer=[ipseckey_rrset(GOOD)]),
     Security.SECURE, KeyStatus.BOGUS),
    (FakeAnswer(Verdict(Security.INDETERMINATE, "no proof")), Security.SECURE,
     KeyStatus.UNPROVABLE),
    (FakeAnswer(SECURE, rcode=dns.rcode.SERVFAIL), Security.SECURE, KeyStatus.UNPROVABLE),
    (None, Security.SECURE, KeyStatus.UNPROVABLE),
])
def test_key_evidence(answer: FakeAnswer | None, addr_sec: Security, status: KeyStatus) -> None:
    ev = key_evidence(answer, addr_sec, failure="timeout")
    assert ev.status is status
    if status is KeyStatus.FOUND:
        assert ev.keys == (KEY,)
    else:
        assert ev.keys == ()
    if status in (KeyStatus.BOGUS, KeyStatus.UNPROVABLE):
        assert ev.ede is not None and ev.reason


def test_ipv6_destination_tunnels() -> None:
    v6 = IPv6Address("2001:db8:100::11")
    d = Policy(PolicyConfig(default=Group.PRIVATE)).decide(NAME, [v6], SECURE,
                                                           EVIDENCE[KeyStatus.FOUND])
    assert isinstance(d, Tunnel) and d.destinations == (v6,)
