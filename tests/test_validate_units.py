"""Unit tests of the validator's pieces: NSEC/NSEC3 primitives, budget, skew, signed data."""

from __future__ import annotations

import base64

import dns.dnssec
import dns.edns
import dns.name
import dns.rdata
import dns.rdatatype
import pytest

from resolver.validator import nsec as validate_nsec
from resolver.validator.nsec3 import Nsec3Set, nsec3_digest
from resolver.validator.sig import signed_data, skew_for
from resolver.validator.types import Budget, BudgetExhausted, Limits, Security, Verdict, worst
from tests.dnssec_fixtures import new_key, rr, sign

N = dns.name.from_text
ZONE = N("example.")


def nsec(owner: str, text: str) -> tuple[dns.name.Name, dns.rdata.Rdata]:
    return N(owner), dns.rdata.from_text("IN", "NSEC", text)


def test_nsec3_hash_rfc5155_appendix_a_and_memo() -> None:
    budget = Budget(Limits())
    digest = nsec3_digest(N("example."), bytes.fromhex("aabbccdd"), 12, budget)
    assert base64.b32hexencode(digest).decode().lower() == "0p9mhaveqvm6t7vbl5lop2u3t2rp3tom"
    nsec3_digest(N("EXAMPLE."), bytes.fromhex("aabbccdd"), 12, budget)  # canonical: memo hit
    assert budget.work.nsec3_hashes == 1


def test_nsec3_hash_budget() -> None:
    budget = Budget(Limits(max_nsec3_hashes=2))
    for label in ("a", "b"):
        nsec3_digest(N(f"{label}.example."), b"", 0, budget)
    with pytest.raises(BudgetExhausted, match="NSEC3 hash budget"):
        nsec3_digest(N("c.example."), b"", 0, budget)


def test_has_type() -> None:
    _, rd = nsec("a.example.", "b.example. A NS SOA RRSIG NSEC TYPE1234")
    for present in (dns.rdatatype.A, dns.rdatatype.NS, dns.rdatatype.SOA, 1234):
        assert validate_nsec.has_type(rd.windows, present)
    for absent in (dns.rdatatype.AAAA, dns.rdatatype.DS, dns.rdatatype.CNAME, 1235):
        assert not validate_nsec.has_type(rd.windows, absent)


def test_nsec_nxdomain_with_wraparound_and_wildcard() -> None:
    nsecs = [nsec("example.", "a.example. SOA NS RRSIG NSEC"),
             nsec("m.example.", "example. A RRSIG NSEC")]
    assert validate_nsec.prove_nxdomain(N("z.example."), ZONE, nsecs).security is Security.SECURE
    assert validate_nsec.prove_nxdomain(N("b.example."), ZONE, nsecs).security is Security.BOGUS


def test_nsec_at_delegation_proves_nothing_below_it() -> None:
    nsecs = [nsec("example.", "sub.example. SOA NS RRSIG NSEC"),
             nsec("sub.example.", "example. NS RRSIG NSEC")]
    result = validate_nsec.prove_nxdomain(N("www.sub.example."), ZONE, nsecs)
    assert result.security is Security.BOGUS
    nodata = validate_nsec.prove_nodata(N("sub.example."), dns.rdatatype.A, ZONE, nsecs)
    assert nodata.verdict.security is Security.BOGUS  # parent side cannot deny child data
    ds = validate_nsec.prove_nodata(N("sub.example."), dns.rdatatype.DS, ZONE, nsecs)
    assert ds.verdict.security is Security.SECURE and ds.cut


def test_child_apex_nsec_cannot_deny_ds() -> None:
    nsecs = [nsec("sub.example.", "www.sub.example. SOA NS RRSIG NSEC DNSKEY")]
    ds = validate_nsec.prove_nodata(N("sub.example."), dns.rdatatype.DS, ZONE, nsecs)
    assert ds.verdict.security is Security.BOGUS


def test_nodata_needs_cname_absent() -> None:
    nsecs = [nsec("a.example.", "b.example. CNAME RRSIG NSEC")]
    res = validate_nsec.prove_nodata(N("a.example."), dns.rdatatype.A, ZONE, nsecs)
    assert res.verdict.security is Security.BOGUS and "CNAME" in res.verdict.reason


def test_nsec_next_outside_zone() -> None:
    verdict = validate_nsec.check_zone([nsec("a.example.", "b.other. A")], ZONE)
    assert verdict is not None and "outside zone" in verdict.reason


def _nsec3(zone: dns.name.Name, names: dict[str, str]) -> Nsec3Set:
    hashed = sorted((dns.dnssec.nsec3_hash(N(n), b"", 0, 1), types) for n, types in
                    names.items())
    records = []
    for i, (h, types) in enumerate(hashed):
        nxt = hashed[(i + 1) % len(hashed)][0]
        records.append((dns.name.Name((h.lower(), *zone.labels)),
                        dns.rdata.from_text("IN", "NSEC3", f"1 0 0 - {nxt} {types}")))
    return Nsec3Set.build(zone, records)


def test_nsec3_delegation_is_not_a_closest_encloser() -> None:
    n3 = _nsec3(ZONE, {"example.": "SOA NS RRSIG", "sub.example.": "NS"})
    verdict = n3.prove_nxdomain(N("www.sub.example."), Budget(Limits()))
    assert verdict.security is Security.BOGUS and "delegation" in verdict.reason


def test_nsec3_owner_must_be_hash_under_zone() -> None:
    rd = dns.rdata.from_text("IN", "NSEC3", "1 0 0 - 0p9mhaveqvm6t7vbl5lop2u3t2rp3tom A")
    assert not Nsec3Set.build(ZONE, [(N("notahash.example."), rd)]).recs
    assert not Nsec3Set.build(ZONE, [(N("0p9mhaveqvm6t7vbl5lop2u3t2rp3tom.other."), rd)]).recs
    flagged = dns.rdata.from_text("IN", "NSEC3", "1 2 0 - 0p9mhaveqvm6t7vbl5lop2u3t2rp3tom A")
    assert not Nsec3Set.build(ZONE, [(N("0p9mhaveqvm6t7vbl5lop2u3t2rp3tom.example."),
                                      flagged)]).recs


def test_skew_is_ten_percent_clamped() -> None:
    sig = sign(rr("a.example.", "A", "192.0.2.1"), new_key(), ZONE, inception=0,
               expiration=1000)[0]
    assert skew_for(sig, 0.1, 60, 86400) == 100
    long = sig.replace(expiration=10**8)
    assert skew_for(long, 0.1, 60, 86400) == 86400
    assert skew_for(sig.replace(expiration=100), 0.1, 60, 86400) == 60


def test_signed_data_matches_dnspython_for_a_wildcard_expansion() -> None:
    key = new_key()
    data = rr("*.example.", "A", "192.0.2.1")
    sig = sign(data, key, ZONE)[0]
    expanded = rr("x.y.example.", "A", "192.0.2.1")
    assert sig.labels == 1
    public = key.private.public_key()
    public.verify(sig.signature, signed_data(expanded, sig))  # raises if different


def test_failure_budget() -> None:
    budget = Budget(Limits(max_sig_failures_per_query=1))
    budget.note_sig_failure()
    with pytest.raises(BudgetExhausted) as err:
        budget.note_sig_failure()
    assert err.value.verdict.ede == dns.edns.EDECode.DNSSEC_BOGUS


def test_worst_keeps_the_weaker_status_and_the_edes() -> None:
    plain = Verdict(Security.INSECURE, "unsigned", None, 100.0)
    iterations = Verdict(Security.INSECURE, "NSEC3 iterations", 27, 50.0)
    assert worst(plain, iterations).ede == 27
    assert worst(iterations, plain).ede == 27
    assert worst(plain, iterations).valid_until == 50.0
    assert worst(Verdict(Security.SECURE), plain).security is Security.INSECURE
    assert worst(Verdict(Security.BOGUS, "x", 6), plain).security is Security.BOGUS
