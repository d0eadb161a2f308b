"""Validator: secure, insecure and proven-negative answers over zones signed at test time.

Each scenario is one question to a fresh Validator over the world of dnssec_fixtures
(root -> test. -> example.test. NSEC / nsec3.test. NSEC3 / unsigned and Opt-Out children), at
the pinned clock WHEN. Every test checks the status, the reason or EDE where there is one, and
that the work stayed within the limits.
"""

from __future__ import annotations

import asyncio

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from resolver.validator.anchors import TrustAnchors
from resolver.validator.response import Limits, Security, ValidatedAnswer, Validator
from tests.dnssec_fixtures import EXPIRATION, WHEN, N, Run, T, build_world, only_owner, resign

LIMITS = Limits()


def within_limits(result: ValidatedAnswer) -> None:
    work = result.work
    assert work.sig_checks <= LIMITS.max_sig_checks_per_query
    assert work.sig_failures <= LIMITS.max_sig_failures_per_query
    assert work.nsec3_hashes <= LIMITS.max_nsec3_hashes
    assert work.fetches <= LIMITS.max_fetches


def types(rrsets: list[dns.rrset.RRset]) -> list[str]:
    return [dns.rdatatype.to_text(r.rdtype) for r in rrsets]


def test_secure_positive_cold_then_cached() -> None:
    run = Run()
    first = run.ask("www.example.test.")
    assert first.verdict.security is Security.SECURE
    assert first.rcode == dns.rcode.NOERROR
    assert types(first.answer) == ["A", "RRSIG"]
    assert first.ttl == 3600
    assert first.verdict.valid_until == EXPIRATION
    # DNSKEY ., DS test., DNSKEY test., DS example.test., DNSKEY example.test.
    assert first.work.fetches == 5
    assert first.work.sig_checks == 6
    within_limits(first)
    second = run.ask("host.example.test.")
    assert second.verdict.security is Security.SECURE
    assert second.work.fetches == 0 and second.work.sig_checks == 1
    assert run.upstream.calls == []


def test_ttl_capped_by_signature_expiry_and_original_ttl() -> None:
    world = build_world()
    run = Run()
    run.on("www.example.test.", "A", resign("www.example.test.", "A", world["example.test."].zsk,
                                            "example.test.", expiration=WHEN + 100))
    assert run.ask("www.example.test.").ttl == 100

    def inflate(msg: dns.message.Message) -> dns.message.Message:
        for r in msg.answer:
            r.ttl = 999999
        return msg

    run2 = Run()
    run2.on("www.example.test.", "A", inflate)
    result = run2.ask("www.example.test.")
    assert result.verdict.security is Security.SECURE and result.ttl == 3600


def test_clock_skew_accepts_inception_slightly_ahead() -> None:
    world = build_world()
    run = Run()
    run.on("www.example.test.", "A", resign("www.example.test.", "A", world["example.test."].zsk,
                                            "example.test.", inception=WHEN + 30))
    assert run.ask("www.example.test.").verdict.security is Security.SECURE


PROOFS = [
    # (question, type, rcode, denial record type expected in authority)
    ("nope.{z}", "A", dns.rcode.NXDOMAIN),  # NXDOMAIN: name + wildcard covered
    ("www.{z}", "TXT", dns.rcode.NOERROR),  # NODATA
    ("b.{z}", "A", dns.rcode.NOERROR),  # NODATA at an empty non-terminal
    ("x.wild.{z}", "TXT", dns.rcode.NOERROR),  # wildcard NODATA
    ("deep.nope.{z}", "A", dns.rcode.NXDOMAIN),  # NXDOMAIN two labels below the encloser
]


@pytest.mark.parametrize("zone,denial", [("example.test.", "NSEC"), ("nsec3.test.", "NSEC3")])
@pytest.mark.parametrize("question,rdtype,rcode", PROOFS)
def test_negative_proofs(zone: str, denial: str, question: str, rdtype: str, rcode: int) -> None:
    result = Run().ask(question.format(z=zone), rdtype)
    assert result.verdict.security is Security.SECURE, result.verdict
    assert result.rcode == rcode
    assert result.answer == []
    assert "SOA" in types(result.authority) and denial in types(result.authority)
    assert result.ttl == 300  # RFC 9077: min(SOA TTL, SOA MINIMUM, NSEC TTL)
    within_limits(result)


@pytest.mark.parametrize("zone", ["example.test.", "nsec3.test."])
def test_wildcard_answer_with_proof(zone: str) -> None:
    result = Run().ask(f"x.wild.{zone}")
    assert result.verdict.security is Security.SECURE, result.verdict
    assert result.answer[0].name == N(f"x.wild.{zone}")
    assert {"NSEC", "NSEC3"} & set(types(result.authority))  # the proof is kept for DO clients
    within_limits(result)


@pytest.mark.parametrize("name,reason", [
    ("www.unsigned.test.", "insecure delegation at unsigned.test."),  # NSEC: NS, no DS
    ("www.unsig.nsec3.test.", "insecure delegation at unsig.nsec3.test."),  # NSEC3 match
    ("www.unsig.optout.test.", "Opt-Out"),  # NSEC3 Opt-Out span covers the delegation
])
def test_insecure_delegations(name: str, reason: str) -> None:
    result = Run().ask(name)
    assert result.verdict.security is Security.INSECURE
    assert reason in result.verdict.reason
    assert types(result.answer) == ["A"]
    within_limits(result)


def test_optout_nxdomain_is_not_secure() -> None:
    result = Run().ask("nope.optout.test.")
    assert result.verdict.security is Security.INSECURE  # RFC 5155 §9.2: no AD
    assert "Opt-Out" in result.verdict.reason
    assert result.rcode == dns.rcode.NXDOMAIN


def test_optout_nsec3_does_not_hide_signed_names() -> None:
    result = Run().ask("www.optout.test.")
    assert result.verdict.security is Security.SECURE


def test_unsupported_ds_algorithm_is_insecure() -> None:
    result = Run().ask("www.algo.test.")
    assert result.verdict.security is Security.INSECURE
    assert result.verdict.ede == dns.edns.EDECode.UNSUPPORTED_DNSKEY_ALGORITHM


def test_cname_chain_within_and_across_zones() -> None:
    result = Run().ask("alias.example.test.")
    assert result.verdict.security is Security.SECURE
    assert types(result.answer) == ["CNAME", "RRSIG", "A", "RRSIG"]
    across = Run().ask("ext.example.test.")  # CNAME into the NSEC3 zone
    assert across.verdict.security is Security.SECURE
    assert [r.name for r in across.answer][-2] == N("www.nsec3.test.")
    within_limits(across)


def test_cname_into_insecure_zone_is_insecure() -> None:
    result = Run().ask("far.example.test.")
    assert result.verdict.security is Security.INSECURE
    assert "unsigned.test." in result.verdict.reason


def test_cname_to_nxdomain_target_is_proven_for_the_target() -> None:
    run = Run()
    result = run.ask("alias.example.test.", "TXT")  # www has no TXT: NODATA at the target
    assert result.verdict.security is Security.SECURE
    assert types(result.answer) == ["CNAME", "RRSIG"]
    assert "NSEC" in types(result.authority)


def test_wildcard_cname() -> None:
    result = Run().ask("x.wc.example.test.")
    assert result.verdict.security is Security.SECURE, result.verdict
    assert types(result.answer) == ["CNAME", "RRSIG", "A", "RRSIG"]


def test_dname_with_synthesized_cname() -> None:
    result = Run().ask("www.dn.example.test.")
    assert result.verdict.security is Security.SECURE
    assert types(result.answer) == ["DNAME", "RRSIG", "CNAME", "A", "RRSIG"]
    assert result.answer[2][0].target == N("www.example.test.")


def test_truncated_chain_is_completed_with_a_fetch() -> None:
    run = Run()
    run.on("alias.example.test.", "A", only_owner("alias.example.test."))
    result = run.ask("alias.example.test.")
    assert result.verdict.security is Security.SECURE
    assert (N("www.example.test."), T.A) in run.upstream.calls
    assert types(result.answer) == ["CNAME", "RRSIG", "A", "RRSIG"]


@pytest.mark.parametrize("name,rdtype", [("example.test.", "DNSKEY"), ("example.test.", "DS"),
                                         ("test.", "SOA"), (".", "DNSKEY")])
def test_infrastructure_types(name: str, rdtype: str) -> None:
    result = Run().ask(name, rdtype)
    assert result.verdict.security is Security.SECURE
    assert types(result.answer)[0] == rdtype


def test_negative_trust_anchor() -> None:
    world = build_world()
    run = Run()
    run.validator = Validator(world.anchors.with_negative(["example.test."]), run.upstream.fetch)
    result = run.ask("www.example.test.")
    assert result.verdict.security is Security.INSECURE
    assert "negative trust anchor" in result.verdict.reason
    assert result.work.fetches == 0 and result.work.sig_checks == 0


def test_no_trust_anchor_is_insecure() -> None:
    world = build_world()
    anchors = TrustAnchors.from_records([
        (N("other."), next(iter(world.anchors.anchors.values())).ds[0])])
    run = Run()
    run.validator = Validator(anchors, run.upstream.fetch)
    result = run.ask("www.example.test.")
    assert result.verdict.security is Security.INSECURE
    assert "no trust anchor" in result.verdict.reason


def test_builtin_anchors_reject_the_test_root() -> None:
    run = Run()
    run.validator = Validator(TrustAnchors.builtin(), run.upstream.fetch)
    result = run.ask("www.example.test.")
    assert result.verdict.security is Security.BOGUS
    assert result.verdict.ede == dns.edns.EDECode.DNSKEY_MISSING


def test_concurrent_queries_share_the_cache() -> None:
    run = Run()

    async def both() -> list[ValidatedAnswer]:
        await run.ask_async("www.example.test.")
        return list(await asyncio.gather(*(run.ask_async(n) for n in (
            "host.example.test.", "alias.example.test.", "x.wild.example.test."))))

    results = asyncio.run(both())
    assert all(r.verdict.security is Security.SECURE for r in results)
    assert all(r.work.fetches == 0 for r in results)

