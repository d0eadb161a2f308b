"""Property tests: random damage to signed replies never raises out of ``validate()``.

The invariant (h11-style): whatever the upstream sends, for the answer itself and for the DS and
DNSKEY replies of the chain, ``Validator.validate`` returns a verdict within the work limits and
raises nothing. Structural mutations (drop, duplicate, move RRsets, TTLs, rcodes, signature
bytes) and wire-level byte flips are both tried.
"""

from __future__ import annotations

import asyncio

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.validator.response import Limits, Security
from tests.dnssec_fixtures import WHEN, N, Run, T

QUESTIONS = [
    ("www.example.test.", "A"), ("nope.example.test.", "A"), ("www.example.test.", "TXT"),
    ("x.wild.example.test.", "A"), ("b.nsec3.test.", "A"), ("nope.nsec3.test.", "A"),
    ("alias.example.test.", "A"), ("www.dn.example.test.", "A"), ("www.unsigned.test.", "A"),
    ("x.wild.nsec3.test.", "TXT"), ("ext.example.test.", "A"),
]
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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(question=st.sampled_from(QUESTIONS), target=st.sampled_from(TARGETS),
       steps=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_replies_never_raise(question: tuple[str, str], target: tuple[str, str] | None,
                                     steps: list[tuple[str, object, int]]) -> None:
    run = Run()
    name, rdtype = target or question
    run.on(name, rdtype, lambda m: apply(m, steps))
    result = run.ask(*question)
    assert isinstance(result.verdict.security, Security)
    limits = Limits()
    assert result.work.sig_checks <= limits.max_sig_checks_per_query
    assert result.work.fetches <= limits.max_fetches
    if result.verdict.security is not Security.SECURE:
        assert result.verdict.reason


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.from_regex(r"[a-z0-9*-]{1,10}", fullmatch=True), min_size=0,
                       max_size=8),
       zone=st.sampled_from(["example.test.", "nsec3.test.", "iter.test.", "unsigned.test."]),
       rdtype=st.sampled_from(["A", "TXT", "DS", "CNAME", "DNAME", "NSEC3"]))
def test_arbitrary_questions_never_raise(labels: list[str], zone: str, rdtype: str) -> None:
    name = ".".join([*labels, zone])
    run = Run()
    result = run.ask(name, rdtype)
    assert isinstance(result.verdict.security, Security)
    assert result.work.nsec3_hashes <= Limits().max_nsec3_hashes


def test_reply_for_another_question_is_not_secure() -> None:
    run = Run()

    async def go() -> Security:
        reply = await run.upstream.fetch(N("www.example.test."), dns.rdatatype.A)
        result = await run.validator.validate(N("host.example.test."), dns.rdatatype.A,
                                              reply, WHEN)
        return result.verdict.security

    assert asyncio.run(go()) is Security.BOGUS
