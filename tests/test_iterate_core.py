"""The pure core of iterative mode: classification, glue, QNAME minimisation, chains, 0x20.

Each table row is one authoritative response, written as zone-file lines, and what it must mean
to a resolver that asked a server of ``zone``. The rows follow the cases a real hierarchy shows
(the lab has most of them: sibling glue for the broken zones, a lame NS answering REFUSED, a
lame NS referring sideways to the zone itself, an NXNS-style delegation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from resolver.iterate.core import (
    MAX_MINIMISE_COUNT,
    Answer,
    Failure,
    Negative,
    Referral,
    chain_next,
    classify,
    merge_chain,
    minimised_child,
    plan,
    randomise_case,
    referral_ds,
    usable_address,
)

N = dns.name.from_text
A, NS, DS, AAAA = dns.rdatatype.A, dns.rdatatype.NS, dns.rdatatype.DS, dns.rdatatype.AAAA


def response(qname: str, qtype: dns.rdatatype.RdataType, *, aa: bool = False,
             rcode: int = dns.rcode.NOERROR, answer: tuple[str, ...] = (),
             authority: tuple[str, ...] = (), additional: tuple[str, ...] = ()
             ) -> dns.message.Message:
    """A server's response, sections given as zone-file lines ("name ttl IN type rdata")."""
    q = dns.message.make_query(qname, qtype, want_dnssec=True)
    r = dns.message.make_response(q)
    r.flags = dns.flags.QR | (dns.flags.AA if aa else 0)
    r.set_rcode(rcode)
    for section, lines in ((r.answer, answer), (r.authority, authority),
                           (r.additional, additional)):
        for line in lines:
            rr = dns.rrset.from_text(*line.split(maxsplit=4))
            existing = next((x for x in section if x.name == rr.name
                             and x.rdtype == rr.rdtype), None)
            if existing is None:
                section.append(rr)
            else:
                existing.union_update(rr)
    return r


@dataclass(frozen=True)
class Case:
    what: str
    zone: str
    qname: str
    qtype: dns.rdatatype.RdataType
    reply: dns.message.Message
    kind: type
    cut: str | None = None
    glue: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lame: bool | None = None
    ns_kept: int | None = None


REFERRAL_NS = ("example.test. 60 IN NS ns.example.test.",
               "example.test. 60 IN NS ns-broken.test.",
               "example.test. 60 IN NS ns.other.example.")
GLUE = ("ns.example.test. 60 IN A 198.51.100.4",  # in-domain: under the delegated zone
        "ns-broken.test. 60 IN A 198.51.100.5",  # sibling: under the referring zone only
        "ns.other.example. 60 IN A 203.0.113.66",  # out of the referring zone's bailiwick
        "unrelated.test. 60 IN A 203.0.113.67")  # not an NS name of this delegation

CASES = [
    Case("referral: in-domain and sibling glue used, out-of-bailiwick glue dropped",
         "test.", "www.example.test.", A,
         response("www.example.test.", A, authority=REFERRAL_NS, additional=GLUE),
         Referral, cut="example.test.",
         glue={"ns.example.test.": ("198.51.100.4",), "ns-broken.test.": ("198.51.100.5",)}),
    Case("referral from the root: every name is in its bailiwick", ".", "www.example.test.", A,
         response("www.example.test.", A, authority=("test. 60 IN NS ns1.test.",),
                  additional=("ns1.test. 60 IN A 198.51.100.3",
                              "ns1.test. 60 IN AAAA 2001:db8:100::3")),
         Referral, cut="test.", glue={"ns1.test.": ("198.51.100.3", "2001:db8:100::3")}),
    Case("glue pointing at loopback or a multicast group is never used", "test.",
         "www.example.test.", A,
         response("www.example.test.", A, authority=("example.test. 60 IN NS ns.example.test.",
                                                       "example.test. 60 IN NS ns2.example.test."),
                  additional=("ns.example.test. 60 IN A 127.0.0.1",
                              "ns2.example.test. 60 IN A 224.0.0.1",
                              "ns2.example.test. 60 IN AAAA ::ffff:127.0.0.1")),
         Referral, cut="example.test.", glue={}),
    Case("NXNS: a referral with 30 NS names keeps the first 13", "test.", "x.nxns.test.", A,
         response("x.nxns.test.", A, authority=tuple(
             f"nxns.test. 60 IN NS n{i}.victim.example." for i in range(30))),
         Referral, cut="nxns.test.", glue={}, ns_kept=13),
    Case("authoritative answer", "example.test.", "bob.example.test.", A,
         response("bob.example.test.", A, aa=True,
                  answer=("bob.example.test. 60 IN A 198.51.100.11",)), Answer),
    Case("authoritative CNAME at the name asked", "example.test.", "www.example.test.", A,
         response("www.example.test.", A, aa=True,
                  answer=("www.example.test. 60 IN CNAME bob.example.test.",)), Answer),
    Case("answer without AA: a lame (caching or misconfigured) server", "example.test.",
         "bob.example.test.", A,
         response("bob.example.test.", A, answer=("bob.example.test. 60 IN A 198.51.100.11",)),
         Failure, lame=True),
    Case("out-of-bailiwick answer: not an answer for this zone", "example.test.",
         "bob.example.test.", A,
         response("bob.example.test.", A, aa=True,
                  answer=("bob.example.test.evil. 60 IN A 203.0.113.66",)),
         Negative),
    Case("authoritative NXDOMAIN", "example.test.", "nope.example.test.", A,
         response("nope.example.test.", A, aa=True, rcode=dns.rcode.NXDOMAIN,
                  authority=("example.test. 5 IN SOA ns.example.test. h.example.test. "
                             "1 3600 600 86400 5",)), Negative),
    Case("authoritative NODATA (also what an empty non-terminal looks like)", "test.",
         "example.test.", A,
         response("example.test.", A, aa=True,
                  authority=("test. 5 IN SOA ns1.test. h.test. 1 3600 600 86400 5",)),
         Negative),
    Case("NXDOMAIN without AA", "example.test.", "nope.example.test.", A,
         response("nope.example.test.", A, rcode=dns.rcode.NXDOMAIN), Failure, lame=True),
    Case("REFUSED: lame (the server does not serve the zone)", "lame-ns.test.",
         "host.lame-ns.test.", A,
         response("host.lame-ns.test.", A, rcode=dns.rcode.REFUSED), Failure, lame=True),
    Case("SERVFAIL: a bad moment, not lameness", "example.test.", "bob.example.test.", A,
         response("bob.example.test.", A, rcode=dns.rcode.SERVFAIL), Failure, lame=False),
    Case("referral sideways to the zone itself (a referral loop)", "lame-ns.test.",
         "host.lame-ns.test.", A,
         response("host.lame-ns.test.", A,
                  authority=("lame-ns.test. 60 IN NS ns-loop.lame-ns.test.",),
                  additional=("ns-loop.lame-ns.test. 60 IN A 198.51.100.3",)),
         Failure, lame=True),
    Case("upward referral to the root", "example.test.", "bob.example.test.", A,
         response("bob.example.test.", A, authority=(". 60 IN NS a.root-servers.net.",)),
         Failure, lame=True),
    Case("referral to a zone not on the way to the name asked", "test.", "www.example.test.", A,
         response("www.example.test.", A, authority=("evil.test. 60 IN NS ns.evil.test.",)),
         Failure, lame=True),
    Case("DS is answered by the parent: a referral to the child itself is lame", "test.",
         "example.test.", DS,
         response("example.test.", DS, authority=REFERRAL_NS), Failure, lame=True),
    Case("neither answer nor referral nor AA", "example.test.", "bob.example.test.", A,
         response("bob.example.test.", A), Failure, lame=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_classify(case: Case) -> None:
    out = classify(case.reply, N(case.qname), case.qtype, N(case.zone))
    assert isinstance(out, case.kind), out
    if isinstance(out, Referral):
        assert out.cut == N(case.cut or "")
        assert {str(k): v for k, v in out.glue.items()} == case.glue
        if case.ns_kept is not None:
            assert len(out.ns) == case.ns_kept and out.dropped_ns == 30 - case.ns_kept
    if isinstance(out, Failure):
        assert out.lame is case.lame, out.reason


def test_answers_are_scrubbed_to_the_zone() -> None:
    reply = response("bob.example.test.", A, aa=True,
                     answer=("bob.example.test. 60 IN A 198.51.100.11",
                             "www.bank.example. 60 IN A 203.0.113.66"),
                     authority=("example.test. 60 IN NS ns.example.test.",
                                "bank.example. 60 IN NS ns.evil.example."),
                     additional=("ns.example.test. 60 IN A 198.51.100.4",))
    out = classify(reply, N("bob.example.test."), A, N("example.test."))
    assert isinstance(out, Answer)
    assert [str(rr.name) for rr in out.response.answer] == ["bob.example.test."]
    assert [str(rr.name) for rr in out.response.authority] == ["example.test."]
    assert out.response.additional == []


@pytest.mark.parametrize(("text", "loopback_ok", "usable"), [
    ("198.51.100.4", False, True), ("2001:db8:100::4", False, True),
    ("127.0.0.1", False, False), ("127.0.0.1", True, True), ("::1", False, False),
    ("0.0.0.0", True, False), ("::", True, False), ("224.0.0.251", False, False),
    ("ff02::fb", False, False), ("::ffff:127.0.0.1", True, False), ("not-an-ip", False, False),
])
def test_usable_address(text: str, loopback_ok: bool, usable: bool) -> None:
    assert usable_address(text, allow_loopback=loopback_ok) is usable


def test_referral_ds_becomes_the_answer_to_the_ds_question() -> None:
    sig = ("example.test. 30 IN RRSIG DS 13 2 60 20270101000000 20261201000000 4711 test. "
           + "AAAA" * 16)
    reply = response("www.example.test.", A, authority=(
        *REFERRAL_NS, "example.test. 60 IN DS 12345 13 2 " + "ab" * 32, sig,
        "other.test. 60 IN DS 999 13 2 " + "cd" * 32), additional=GLUE)
    got = referral_ds(reply, N("example.test."))
    assert got is not None
    msg, ttl = got
    assert ttl == 30
    assert (msg.question[0].name, msg.question[0].rdtype) == (N("example.test."), DS)
    assert [(rr.rdtype, rr.covers) for rr in msg.answer] == [
        (DS, dns.rdatatype.NONE), (dns.rdatatype.RRSIG, DS)]
    assert msg.flags & dns.flags.AA and msg.ednsflags & dns.flags.DO
    assert referral_ds(response("www.example.test.", A, authority=REFERRAL_NS),
                       N("example.test.")) is None  # unsigned delegation: asked for real


# -- QNAME minimisation -----------------------------------------------------------------------

PLANS = [
    # (child: deepest name known to be in the current zone, qname, qtype, count) -> question
    ((".", "bob.example.test.", A, 0), ("test.", A, True)),
    (("test.", "bob.example.test.", dns.rdatatype.IPSECKEY, 1), ("example.test.", A, True)),
    (("example.test.", "bob.example.test.", dns.rdatatype.IPSECKEY, 2),
     ("bob.example.test.", dns.rdatatype.IPSECKEY, False)),
    (("example.test.", "example.test.", dns.rdatatype.DNSKEY, 0),
     ("example.test.", dns.rdatatype.DNSKEY, False)),
    ((".", "example.test.", DS, 0), ("test.", A, True)),  # towards the parent of the cut
    (("test.", "example.test.", DS, 1), ("example.test.", DS, False)),  # asked of test.
    (("example.", "_25._tcp.mail.example.", dns.rdatatype.TLSA, 0), ("mail.example.", A, True)),
    (("mail.example.", "_25._tcp.mail.example.", dns.rdatatype.TLSA, 1),
     ("_25._tcp.mail.example.", dns.rdatatype.TLSA, False)),  # underscore: ask in full
]


@pytest.mark.parametrize(("given", "expected"), PLANS)
def test_plan(given: tuple[str, str, dns.rdatatype.RdataType, int],
              expected: tuple[str, dns.rdatatype.RdataType, bool]) -> None:
    child, qname, qtype, count = given
    step = plan(N(child), N(qname), qtype, count)
    assert (step.name, step.rdtype, step.minimised) == (N(expected[0]), *expected[1:])


def test_plan_without_minimisation_asks_the_full_question() -> None:
    step = plan(dns.name.root, N("bob.example.test."), A, 0, minimise=False)
    assert (step.name, step.rdtype, step.minimised) == (N("bob.example.test."), A, False)


@pytest.mark.parametrize("labels", [1, 3, 4, 5, 9, 10, 11, 20, 40])
def test_minimisation_ends_within_max_minimise_count(labels: int) -> None:
    """Walking a name with no zone cuts: one label at a time first, then bigger steps; never
    more than MAX_MINIMISE_COUNT minimised questions before the full one (RFC 9156)."""
    qname = dns.name.from_text(".".join(f"l{i}" for i in range(labels)) + ".")
    child, count, names = dns.name.root, 0, []
    while True:
        step = plan(child, qname, A, count)
        if not step.minimised:
            break
        assert step.name.is_subdomain(child) and step.name != child
        names.append(step.name)
        child, count = step.name, count + 1
    assert len(names) <= MAX_MINIMISE_COUNT
    assert [len(n) - 1 for n in names[:4]] == list(range(1, min(labels, 5)))[:4]
    assert step.name == qname


def test_minimised_child_steps() -> None:
    qname = N(".".join(f"l{i}" for i in range(30)) + ".")  # 30 labels below the root
    child = N(".".join(f"l{i}" for i in range(26, 30)) + ".")  # 4 labels known
    assert len(minimised_child(child, qname, 3)) - len(child) == 1
    # After MINIMISE_ONE_LAB steps: remaining 26 labels over 10 - 4 = 6 steps -> 4 at once.
    assert len(minimised_child(child, qname, 4)) - len(child) == 26 // 6
    assert minimised_child(child, qname, MAX_MINIMISE_COUNT) == qname


# -- CNAME/DNAME chains -------------------------------------------------------------------------

SOA_OTHER = "other.test. 5 IN SOA ns.other.test. h.other.test. 1 3600 600 86400 5"
CHAINS = [
    ("target in the same response", response(
        "www.example.test.", A, aa=True,
        answer=("www.example.test. 60 IN CNAME bob.example.test.",
                "bob.example.test. 60 IN A 198.51.100.11")), None),
    ("target in another zone: follow it", response(
        "www.example.test.", A, aa=True,
        answer=("www.example.test. 60 IN CNAME www.other.test.",)), "www.other.test."),
    ("two links, the second leaves the zone", response(
        "a.example.test.", A, aa=True,
        answer=("a.example.test. 60 IN CNAME b.example.test.",
                "b.example.test. 60 IN CNAME c.other.test.")), "c.other.test."),
    ("target denied by the same server (NXDOMAIN)", response(
        "www.other.test.", A, aa=True, rcode=dns.rcode.NXDOMAIN,
        answer=("www.other.test. 60 IN CNAME gone.other.test.",),
        authority=(SOA_OTHER,)), None),
    ("target without the type (NODATA, SOA of its zone)", response(
        "www.other.test.", A, aa=True,
        answer=("www.other.test. 60 IN CNAME v6only.other.test.",),
        authority=(SOA_OTHER,)), None),
    ("a loop ends the chain", response(
        "a.example.test.", A, aa=True,
        answer=("a.example.test. 60 IN CNAME b.example.test.",
                "b.example.test. 60 IN CNAME a.example.test.")), None),
    ("DNAME: the substituted name is followed", response(
        "x.dn.example.test.", A, aa=True,
        answer=("dn.example.test. 60 IN DNAME other.test.",)), "x.other.test."),
    ("no chain at all", response(
        "bob.example.test.", A, aa=True,
        answer=("bob.example.test. 60 IN A 198.51.100.11",)), None),
]


@pytest.mark.parametrize(("what", "reply", "follow"), CHAINS, ids=[c[0] for c in CHAINS])
def test_chain_next(what: str, reply: dns.message.Message, follow: str | None) -> None:
    end = chain_next(reply, reply.question[0].name, reply.question[0].rdtype, 12)
    assert end.follow == (None if follow is None else N(follow)), what


def test_merge_chain_concatenates_answers_and_keeps_the_last_authority() -> None:
    first = response("www.example.test.", A, aa=True,
                     answer=("www.example.test. 60 IN CNAME www.other.test.",))
    second = response("www.other.test.", A, aa=True, rcode=dns.rcode.NXDOMAIN,
                      authority=(SOA_OTHER,))
    merged = merge_chain(N("www.example.test."), A, [first, second], 1232)
    assert merged.question[0].name == N("www.example.test.")
    assert [rr.rdtype for rr in merged.answer] == [dns.rdatatype.CNAME]
    assert merged.rcode() == dns.rcode.NXDOMAIN
    assert [rr.rdtype for rr in merged.authority] == [dns.rdatatype.SOA]
    assert merged.ednsflags & dns.flags.DO


# -- 0x20 ---------------------------------------------------------------------------------------


def test_randomise_case() -> None:
    name = N("Bob-1.Example.test.")
    lower = randomise_case(name, -1 & (2**64 - 1))
    upper = randomise_case(name, 0)
    assert lower.to_text() == "bob-1.example.test." and upper.to_text() == "BOB-1.EXAMPLE.TEST."
    mixed = randomise_case(name, 0b1010101)
    assert mixed == name and mixed.labels != name.labels  # equal as names, not as bytes
    # Each letter takes one bit: 14 letters give 2**14 patterns; different bits differ.
    patterns = {randomise_case(name, bits).labels for bits in range(64)}
    assert len(patterns) == 64
