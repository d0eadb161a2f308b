"""Property tests: damaged replies never come out SECURE, and nothing raises out of validate().

Over the signed world of tests/dnssec_fixtures.py (h11-style invariants, Hypothesis choosing
the damage):

1. Control: undamaged, every question validates as its zone is signed (SECURE, or INSECURE
   under unsigned.test.), so the properties below are able to fail.
2. Damaged signatures: flip bits in every RRSIG of one reply the validation reads (the answer
   itself, or a DS or DNSKEY reply of the chain) and the verdict is BOGUS. Not SECURE, and not
   INSECURE either: a broken proof that a zone is unsigned must not downgrade it.
3. Damaged signed data: flip a bit in one record of such a reply, signatures left alone, and a
   signed question's verdict is BOGUS (the fixture upstream sends only what the proof uses).
4. Any mutation (drop, duplicate or move RRsets, TTLs, rcodes, signature bytes, wire bytes):
   ``validate()`` raises nothing, stays within the work limits, and a SECURE verdict carries
   only what the undamaged reply proves: the same rcode and answer, authentic authority.
5. Any question: nothing raises, nothing is INDETERMINATE (this upstream always answers), and
   nothing in the unsigned zone is SECURE.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resolver.validator.response import Limits, Security
from tests.dnssec_fixtures import WHEN, N, Run, T

QUESTIONS = [
    ("www.example.test.", "A"), ("nope.example.test.", "A"), ("www.example.test.", "TXT"),
    ("x.wild.example.test.", "A"), ("b.nsec3.test.", "A"), ("nope.nsec3.test.", "A"),
    ("alias.example.test.", "A"), ("www.dn.example.test.", "A"), ("www.unsigned.test.", "A"),
    ("x.wild.nsec3.test.", "TXT"), ("ext.example.test.", "A"),
]
SIGNED = [q for q in QUESTIONS if not q[0].endswith("unsigned.test.")]
TARGETS = [None, ("example.test.", "DNSKEY"), ("example.test.", "DS"), (".", "DNSKEY"),
           ("nsec3.test.", "DS"), ("test.", "DNSKEY")]
SECTIONS = ("answer", "authority", "additional")

mutation = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(SECTIONS), st.integers(0, 20)),
    st.tuples(st.just("dup"), st.sampled_from(SECTIONS), st.integers(0, 20)),
    st.tuples(st.just("move"), st.sampled_from(SECTIONS), st.integers(0, 20)),
    st.tuples(st.just("ttl"), st.sampled_from(SECTIONS), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("rcode"), st.sampled_from([0, 2, 3, 5]), st.just(0)),
    st.tuples(st.just("sigbyte"), st.sampled_from(SECTIONS), st.integers(0, 10_000)),
    st.tuples(st.just("wire"), st.integers(12, 2000), st.integers(1, 255)),
)


def apply(msg: dns.message.Message, steps: list[tuple[str, object, int]]
          ) -> dns.message.Message:
    # Mutate a copy: the replies share RRset objects with the cached fixture world
    # (dnssec_fixtures.build_world), and an in-place TTL change would leak into later tests.
    msg = dns.message.from_wire(msg.to_wire())
    for kind, where, n in steps:
        if kind == "rcode":
            msg.set_rcode(int(where))  # type: ignore[call-overload]
            continue
        if kind == "wire":
            wire = bytearray(msg.to_wire())
            if int(where) < len(wire):  # type: ignore[call-overload]
                wire[int(where)] ^= n  # type: ignore[call-overload]
            try:
                msg = dns.message.from_wire(bytes(wire))
            except dns.exception.DNSException:
                pass  # the transport would have rejected it
            continue
        section: list[dns.rrset.RRset] = getattr(msg, str(where))
        if not section:
            continue
        i = n % len(section)
        if kind == "drop":
            del section[i]
        elif kind == "dup":
            section.append(section[i])
        elif kind == "move":
            rrset = section.pop(i)
            msg.answer.append(rrset) if where != "answer" else msg.authority.append(rrset)
        elif kind == "ttl":
            section[i].ttl = n
        elif kind == "sigbyte":
            sigs = [r for r in section if r.rdtype == T.RRSIG]
            if sigs:
                rrset = sigs[n % len(sigs)]
                rd = next(iter(rrset))
                sig = bytearray(rd.signature)
                sig[n % len(sig)] ^= 0xFF
                rrset.discard(rd)
                rrset.add(rd.replace(signature=bytes(sig)))
    return msg


Reply = tuple[str, str]  # the (name, type) a reply answers
Record = tuple[dns.name.Name, int, int, frozenset[dns.rdata.Rdata]]  # an RRset without its TTL


def records(rrsets: list[dns.rrset.RRset]) -> set[Record]:
    return {(r.name, r.rdtype, r.covers, frozenset(r)) for r in rrsets}


@functools.cache
def replies_read(question: Reply) -> tuple[Reply, ...]:
    """The replies validating `question` reads: its own, then each DS/DNSKEY reply fetched."""
    run = Run()
    run.ask(*question)
    return (question, *((n.to_text(), dns.rdatatype.to_text(t)) for n, t in run.upstream.calls))


@functools.cache
def undamaged(question: Reply) -> tuple[int, set[Record], set[Record]]:
    result = Run().ask(*question)
    return result.rcode, records(result.answer), records(result.authority)


def reply(target: Reply) -> dns.message.Message:
    """A fresh copy of the fixture upstream's reply (the world's RRsets are shared)."""
    msg = Run().upstream.resolve(N(target[0]), dns.rdatatype.from_text(target[1]))
    return dns.message.from_wire(msg.to_wire())


def serve(damaged: dns.message.Message) -> Callable[[dns.message.Message], dns.message.Message]:
    return lambda _: dns.message.from_wire(damaged.to_wire())


def ask_with(question: Reply, target: Reply, damaged: dns.message.Message) -> Security:
    run = Run()
    run.on(*target, serve(damaged))
    return run.ask(*question).verdict.security


@pytest.mark.parametrize("question", QUESTIONS)
def test_undamaged_replies_validate(question: Reply) -> None:
    expected = Security.SECURE if question in SIGNED else Security.INSECURE
    assert Run().ask(*question).verdict.security is expected


def signed_replies(question: Reply) -> list[Reply]:
    """The replies read for `question` that carry signatures (not an unsigned zone's answer)."""
    return [target for target in replies_read(question)
            if any(rrset.rdtype == T.RRSIG
                   for section in reply(target).sections[1:] for rrset in section)]


@settings(max_examples=120, deadline=None)
@given(data=st.data(), position=st.integers(0, 511), mask=st.integers(1, 255))
def test_damaged_signatures_never_come_out_secure(data: st.DataObject, position: int,
                                                  mask: int) -> None:
    question = data.draw(st.sampled_from(QUESTIONS))
    target = data.draw(st.sampled_from(signed_replies(question)))
    msg = reply(target)
    for section in msg.sections[1:]:
        for i, rrset in enumerate(section):
            if rrset.rdtype == T.RRSIG:
                section[i] = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, [
                    rd.replace(signature=flip(rd.signature, position, mask)) for rd in rrset])
    assert ask_with(question, target, msg) is Security.BOGUS


def flip(data: bytes, position: int, mask: int) -> bytes:
    out = bytearray(data)
    out[position % len(out)] ^= mask
    return bytes(out)


def damaged_rdata(rd: dns.rdata.Rdata, position: int) -> dns.rdata.Rdata | None:
    """`rd` with one bit flipped, at the first place from `position` where it still parses."""
    wire = rd.to_wire()
    for k in range(len(wire)):
        bad = flip(wire, position + k, 1 << (position % 8))
        try:
            new = dns.rdata.from_wire(rd.rdclass, rd.rdtype, bad, 0, len(bad))
        except (dns.exception.DNSException, ValueError):
            continue
        if new != rd:
            return new
    return None


@settings(max_examples=120, deadline=None)
@given(data=st.data(), position=st.integers(0, 511))
def test_damaged_signed_data_never_comes_out_secure(data: st.DataObject, position: int) -> None:
    question = data.draw(st.sampled_from(SIGNED))
    target = data.draw(st.sampled_from(replies_read(question)))
    msg = reply(target)
    places = [(s, i) for s, section in enumerate(msg.sections[1:], 1)
              for i, r in enumerate(section) if r.rdtype != T.RRSIG]
    s, i = data.draw(st.sampled_from(places))
    rrset = msg.sections[s][i]
    rds = sorted(rrset, key=lambda rd: rd.to_wire())
    victim = data.draw(st.sampled_from(rds))
    new = damaged_rdata(victim, position)
    assume(new is not None and new not in rds)
    msg.sections[s][i] = dns.rrset.from_rdata_list(
        rrset.name, rrset.ttl, [new if rd is victim else rd for rd in rds])
    assert ask_with(question, target, msg) is Security.BOGUS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(question=st.sampled_from(QUESTIONS), target=st.sampled_from(TARGETS),
       steps=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_replies_never_raise_and_never_forge(
        question: Reply, target: Reply | None, steps: list[tuple[str, object, int]]) -> None:
    run = Run()
    name, rdtype = target or question
    run.on(name, rdtype, lambda m: apply(m, steps))
    result = run.ask(*question)
    limits = Limits()
    assert result.work.sig_checks <= limits.max_sig_checks_per_query
    assert result.work.fetches <= limits.max_fetches
    if result.verdict.security is not Security.SECURE:
        assert result.verdict.reason
        return
    rcode, answer, authority = undamaged(question)
    assert result.rcode == rcode
    assert records(result.answer) == answer
    # Authority may lose what the proof does not need (an SOA), but gains nothing unproven.
    assert records(result.authority) <= authority


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.from_regex(r"[a-z0-9*-]{1,10}", fullmatch=True), min_size=0,
                       max_size=8),
       zone=st.sampled_from(["example.test.", "nsec3.test.", "iter.test.", "unsigned.test."]),
       rdtype=st.sampled_from(["A", "TXT", "DS", "CNAME", "DNAME", "NSEC3"]))
def test_arbitrary_questions_never_raise(labels: list[str], zone: str, rdtype: str) -> None:
    name = ".".join([*labels, zone])
    run = Run()
    result = run.ask(name, rdtype)
    assert result.work.nsec3_hashes <= Limits().max_nsec3_hashes
    assert result.verdict.security is not Security.INDETERMINATE, result.verdict
    if zone == "unsigned.test." and (labels or rdtype != "DS"):  # its DS is the parent's
        assert result.verdict.security is not Security.SECURE, result.verdict


def test_reply_for_another_question_is_not_secure() -> None:
    run = Run()

    async def go() -> Security:
        reply = await run.upstream.fetch(N("www.example.test."), dns.rdatatype.A)
        result = await run.validator.validate(N("host.example.test."), dns.rdatatype.A,
                                              reply, WHEN)
        return result.verdict.security

    assert asyncio.run(go()) is Security.BOGUS


def with_extra_signature(msg: dns.message.Message) -> dns.message.Message:
    """Every RRSIG RRset gets a second, unverifiable signature: a copy of its first with the
    algorithm changed to one the zone has no key for (a reply as a fuzz run found it)."""
    msg = dns.message.from_wire(msg.to_wire())
    for section in (msg.answer, msg.authority):
        for rrset in section:
            if rrset.rdtype == T.RRSIG:
                rd = next(iter(rrset))
                rrset.add(rd.replace(algorithm=14 if rd.algorithm != 14 else 13))
    return msg


@pytest.mark.parametrize("question", [("www.example.test.", "A"), ("nope.example.test.", "A"),
                                      ("b.nsec3.test.", "A"), ("x.wild.example.test.", "A")])
def test_a_secure_answer_carries_only_the_signatures_that_verified(question: Reply) -> None:
    """A SECURE answer and its proofs pass on the signature each RRset was verified with, and
    no other: an extra RRSIG nobody checked (here one per RRset, for an algorithm without a
    key) is dropped, in the answer and in the authority section alike."""
    run = Run()
    run.on(*question, lambda m: with_extra_signature(m))
    result = run.ask(*question)
    assert result.verdict.security is Security.SECURE, result.verdict
    rcode, answer, authority = undamaged(question)
    assert result.rcode == rcode
    assert records(result.answer) == answer
    assert records(result.authority) <= authority
    sigs = [rr for rr in [*result.answer, *result.authority] if rr.rdtype == T.RRSIG]
    assert sigs and all(len(rr) == 1 for rr in sigs)
