"""Validator: one scenario per failure or attack, each ending in the right status within limits.

Scenarios (the upstream is honest except for the one mutation each test installs):
stripped RRSIGs; stripped NSEC/NSEC3 proofs; a signer from another zone; RRSIG labels below the
signer's (wildcard bypass); an NSEC whose next name leaves the zone; expired and not-yet-valid
signatures; a DS matching no key; KeyTrap (40 keys on one key tag, 40 bogus signatures); NSEC3
with 200 iterations; more than 8 NSEC3 records; a CNAME loop; a forged DNAME synthesis; an
upstream failure; budgets for NSEC3 hashing and upstream queries; bogus-result caching.
"""

from __future__ import annotations

import asyncio
import time

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from resolver.validator import sig as validate_sig
from resolver.validator.response import Limits, Security, ValidatedAnswer
from tests.dnssec_fixtures import (
    WHEN,
    N,
    Run,
    T,
    build_world,
    clear_authority,
    forge_nsec_next_outside_zone,
    only_owner,
    rcode,
    resign,
    rr,
    without,
)

EDE = dns.edns.EDECode
LIMITS = Limits()


def bogus(result: ValidatedAnswer, ede: int, text: str) -> None:
    assert result.verdict.security is Security.BOGUS, result.verdict
    assert result.verdict.ede == ede, result.verdict
    assert text in result.verdict.reason, result.verdict.reason
    assert result.ttl == LIMITS.bogus_ttl
    assert result.work.sig_checks <= LIMITS.max_sig_checks_per_query
    assert result.work.fetches <= LIMITS.max_fetches


def test_stripped_rrsigs() -> None:
    run = Run()
    run.on("www.example.test.", "A", without({T.RRSIG}, covers=False))
    bogus(run.ask("www.example.test."), EDE.RRSIGS_MISSING, "no RRSIG in secure zone")


@pytest.mark.parametrize("zone,denial", [("example.test.", T.NSEC), ("nsec3.test.", T.NSEC3)])
@pytest.mark.parametrize("name,rdtype", [("nope.{z}", "A"), ("www.{z}", "TXT")])
def test_stripped_denial(zone: str, denial: int, name: str, rdtype: str) -> None:
    run = Run()
    qname = name.format(z=zone)
    run.on(qname, rdtype, without({denial}, section="authority"))
    bogus(run.ask(qname, rdtype), EDE.NSEC_MISSING, "no NSEC/NSEC3 proof")


def test_stripped_denial_signatures() -> None:
    run = Run()

    def strip(msg: dns.message.Message) -> dns.message.Message:
        msg.authority = [r for r in msg.authority if r.rdtype != T.RRSIG]
        return msg

    run.on("nope.example.test.", "A", strip)
    bogus(run.ask("nope.example.test."), EDE.RRSIGS_MISSING, "no RRSIG in secure zone")


def test_stripped_whole_negative_answer() -> None:
    run = Run()
    run.on("www.example.test.", "TXT", clear_authority)
    bogus(run.ask("www.example.test.", "TXT"), EDE.NSEC_MISSING, "no NSEC/NSEC3 proof")


def test_signer_from_another_zone() -> None:
    world = build_world()
    run = Run()
    run.on("www.example.test.", "A", resign("www.example.test.", "A", world["nsec3.test."].zsk,
                                            "nsec3.test."))
    bogus(run.ask("www.example.test."), EDE.DNSSEC_BOGUS, "not an ancestor of the owner")


def test_signer_is_an_ancestor_but_not_the_zone() -> None:
    world = build_world()
    run = Run()
    assert run.ask("host.example.test.").verdict.security is Security.SECURE  # learns the cut
    run.on("www.example.test.", "A", resign("www.example.test.", "A", world["test."].zsk,
                                            "test."))
    bogus(run.ask("www.example.test."), EDE.DNSSEC_BOGUS, "zone cut at example.test.")


def test_rrsig_labels_below_signer_wildcard_bypass() -> None:
    world = build_world()
    run = Run()
    # A genuine example.test. key signs "*.test." data: valid crypto, labels 1 < signer's 2.
    run.on("www.example.test.", "A", resign("www.example.test.", "A", world["example.test."].zsk,
                                            "example.test.", sign_as="*.test."))
    bogus(run.ask("www.example.test."), EDE.DNSSEC_BOGUS, "wildcard bypass")


def test_wildcard_answer_without_proof() -> None:
    run = Run()
    run.on("x.wild.example.test.", "A", clear_authority)
    bogus(run.ask("x.wild.example.test."), EDE.NSEC_MISSING, "without NSEC/NSEC3 proof")


def test_nsec_next_name_outside_zone() -> None:
    world = build_world()
    zsk = world["example.test."].zsk
    run = Run()

    forge = forge_nsec_next_outside_zone(zsk)
    run.on("nope.example.test.", "A", forge)
    bogus(run.ask("nope.example.test."), EDE.DNSSEC_BOGUS, "outside zone")


@pytest.mark.parametrize("times,ede,text", [
    ({"inception": WHEN - 40 * 86400, "expiration": WHEN - 3 * 86400}, EDE.SIGNATURE_EXPIRED,
     "expired"),
    ({"inception": WHEN + 3 * 86400, "expiration": WHEN + 40 * 86400},
     EDE.SIGNATURE_NOT_YET_VALID, "not-yet-valid"),
])
def test_signature_times(times: dict[str, float], ede: int, text: str) -> None:
    world = build_world()
    run = Run()
    run.on("www.example.test.", "A", resign("www.example.test.", "A", world["example.test."].zsk,
                                            "example.test.", **times))
    result = run.ask("www.example.test.")
    bogus(result, ede, text)
    assert result.work.sig_failures == 1  # a time-invalid RRSIG counts as a failed attempt


def test_expired_within_skew_is_accepted() -> None:
    world = build_world()
    run = Run()
    run.on("www.example.test.", "A", resign("www.example.test.", "A", world["example.test."].zsk,
                                            "example.test.", expiration=WHEN - 30))
    result = run.ask("www.example.test.")
    assert result.verdict.security is Security.SECURE
    assert result.ttl == 0  # nothing to cache past the expiry


def test_bad_signature_bytes() -> None:
    run = Run()

    def corrupt(msg: dns.message.Message) -> dns.message.Message:
        sig = next(r for r in msg.answer if r.rdtype == T.RRSIG)
        rd = sig[0]
        fixed = dns.rrset.RRset(sig.name, sig.rdclass, T.RRSIG, sig.covers)
        fixed.update_ttl(sig.ttl)
        fixed.add(rd.replace(signature=bytes(64)))
        msg.answer = [r for r in msg.answer if r.rdtype != T.RRSIG] + [fixed]
        return msg

    run.on("www.example.test.", "A", corrupt)
    bogus(run.ask("www.example.test."), EDE.DNSSEC_BOGUS, "signature verification failed")


def test_ds_matching_no_key() -> None:
    bogus(Run().ask("www.wrongds.test."), EDE.DNSKEY_MISSING, "matches its DS")


def test_keytrap_stays_within_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run()
    run.ask("www.example.test.")  # warm the root and test. keys
    calls = []
    real = validate_sig.crypto_verify

    def counting(*args: object) -> bool:
        calls.append(args)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(validate_sig, "crypto_verify", counting)
    started = time.process_time()
    result = run.ask("www.keytrap.test.")
    cpu = time.process_time() - started
    bogus(result, EDE.DNSSEC_BOGUS, "budget exhausted")
    # DS + DNSKEY checks, then at most 2 keys x 2 failures before the failure budget ends it.
    assert len(calls) <= LIMITS.max_sig_checks_per_rrset + 2
    assert result.work.sig_checks == len(calls)
    assert cpu < 0.25, cpu


def test_keytrap_with_loose_limits_hits_the_per_rrset_cap() -> None:
    limits = Limits(max_sig_failures_per_query=100, max_keys_per_tag=40)
    run = Run(limits)
    run.ask("keytrap.test.", "DNSKEY")  # warm the chain: only the attack is counted below
    result = run.ask("www.keytrap.test.")
    assert result.verdict.security is Security.BOGUS
    assert "per RRset (4) reached" in result.verdict.reason
    assert result.work.sig_checks == limits.max_sig_checks_per_rrset


def test_keytrap_yields_to_the_event_loop() -> None:
    limits = Limits(max_sig_failures_per_query=100, max_sig_checks_per_rrset=64,
                    max_sig_checks_per_query=100, max_keys_per_tag=40, yield_every=2)
    run = Run(limits)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def both() -> ValidatedAnswer:
        task = asyncio.create_task(ticker())
        result = await run.ask_async("www.keytrap.test.")
        task.cancel()
        return result

    result = asyncio.run(both())
    assert result.verdict.security is Security.BOGUS
    assert result.work.sig_checks > 20
    assert ticks >= result.work.sig_checks // 2 - 2  # other tasks ran between the checks


def test_nsec3_too_many_iterations_is_insecure() -> None:
    result = Run().ask("nope.iter.test.")
    assert result.verdict.security is Security.INSECURE
    assert result.verdict.ede == EDE.UNSUPPORTED_NSEC3_ITERATIONS_VALUE
    assert "iterations 200" in result.verdict.reason
    assert result.work.nsec3_hashes == 0  # no hashing at 200 iterations


def test_iterations_insecurity_survives_a_cname_chain() -> None:
    result = Run().ask("toiter.example.test.")  # secure CNAME, then NXDOMAIN at 200 iterations
    assert result.verdict.security is Security.INSECURE
    assert result.verdict.ede == EDE.UNSUPPORTED_NSEC3_ITERATIONS_VALUE
    assert result.rcode == dns.rcode.NXDOMAIN


def test_too_many_nsec3_records() -> None:
    world = build_world()
    zone = world["nsec3.test."]
    run = Run()

    def stuff(msg: dns.message.Message) -> dns.message.Message:
        for _, n3 in zone.nsec3[:9]:
            if n3 not in msg.authority:
                msg.authority += [n3, zone.sigs[(n3.name, T.NSEC3)]]
        return msg

    run.ask("www.nsec3.test.")  # warm the chain
    run.on("nope.nsec3.test.", "A", stuff)
    result = run.ask("nope.nsec3.test.")
    bogus(result, EDE.DNSSEC_BOGUS, "too many NSEC3 records")
    assert result.work.sig_checks == 1  # the SOA only: refused before any NSEC3 signature


def test_nsec3_hash_budget() -> None:
    result = Run(Limits(max_nsec3_hashes=3)).ask("a.b.c.d.e.nope.nsec3.test.")
    bogus(result, EDE.DNSSEC_BOGUS, "NSEC3 hash budget exhausted")
    assert result.work.nsec3_hashes == 3


def test_cname_loop() -> None:
    result = Run().ask("loop1.example.test.")
    bogus(result, EDE.DNSSEC_BOGUS, "loop at loop1.example.test.")


def test_cname_chain_too_long() -> None:
    result = Run(Limits(max_cname_chain=0)).ask("x.wc.example.test.")
    assert result.verdict.security is Security.BOGUS
    assert "longer than 0" in result.verdict.reason


def test_dname_with_forged_synthesis() -> None:
    run = Run()

    def forge(msg: dns.message.Message) -> dns.message.Message:
        msg.answer = [rr(r.name, "CNAME", "www.nsec3.test.") if r.rdtype == T.CNAME else r
                      for r in msg.answer]
        return msg

    run.on("www.dn.example.test.", "A", forge)
    bogus(run.ask("www.dn.example.test."), EDE.DNSSEC_BOGUS, "does not match the DNAME")


def test_upstream_failure_is_indeterminate() -> None:
    run = Run()
    run.upstream.fail.add((N("example.test."), T.DNSKEY))
    result = run.ask("www.example.test.")
    assert result.verdict.security is Security.INDETERMINATE
    assert result.verdict.ede == EDE.NETWORK_ERROR
    assert "timeout" in result.verdict.reason
    run.upstream.fail.clear()  # not cached: the next query retries and succeeds
    assert run.ask("www.example.test.").verdict.security is Security.SECURE


def test_upstream_servfail_is_indeterminate() -> None:
    run = Run()
    run.on("www.example.test.", "A", rcode(dns.rcode.SERVFAIL))
    result = run.ask("www.example.test.")
    assert result.verdict.security is Security.INDETERMINATE
    assert "SERVFAIL" in result.verdict.reason


def test_fetch_budget() -> None:
    result = Run(Limits(max_fetches=2)).ask("www.example.test.")
    bogus(result, EDE.DNSSEC_BOGUS, "upstream query budget exhausted")
    assert result.work.fetches == 2


def test_bogus_chain_result_cached_for_bogus_ttl() -> None:
    run = Run()
    run.ask("www.wrongds.test.")
    again = run.ask("www.wrongds.test.", now=WHEN + 30)
    assert again.verdict.security is Security.BOGUS and again.work.fetches == 0
    later = run.ask("www.wrongds.test.", now=WHEN + LIMITS.bogus_ttl + 1)
    assert later.verdict.security is Security.BOGUS and later.work.fetches > 0


def test_failed_validation_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # At debug: the one warning per failed answer is the resolution core's, after its re-check
    # of a bogus verdict (test_resolve.py::test_bogus_is_rechecked_once_over_tcp_then_...).
    with caplog.at_level("DEBUG", logger="resolver.validator"):
        Run().ask("www.wrongds.test.")
    assert any("www.wrongds.test./A" in r.message and "matches its DS" in r.message
               for r in caplog.records)



def test_upstream_failure_while_completing_a_chain() -> None:
    run = Run()
    run.on("alias.example.test.", "A", only_owner("alias.example.test."))
    run.upstream.fail.add((N("www.example.test."), T.A))
    result = run.ask("alias.example.test.")
    assert result.verdict.security is Security.INDETERMINATE
    assert result.verdict.ede == EDE.NETWORK_ERROR and result.ttl == 0


def test_debug_log_traces_the_chain(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG", logger="resolver.validator"):
        Run().ask("www.example.test.")
    text = "\n".join(r.getMessage() for r in caplog.records)
    for step in ("fetch ./DNSKEY", "secure DS at example.test.", "secure DNSKEY set for test.",
                 "validated www.example.test./A"):
        assert step in text, step
