"""resolver.rrsets: CNAME chain ends and the addresses of an owner, as capture and endpoints read
them."""

from __future__ import annotations

from ipaddress import ip_address

import dns.name
import dns.rdatatype
import dns.rrset

from resolver.rrsets import addresses_of, chain_end, gateway_addresses, only_addresses
from resolver.validator.response import Security, ValidatedAnswer, Verdict

A, AAAA = dns.rdatatype.A, dns.rdatatype.AAAA


def n(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def rrset(name: str, rdtype: str, *texts: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(n(name), 60, "IN", rdtype, *texts)


WWW_CNAME = rrset("www.example.test.", "CNAME", "bob.example.test.")
WWW_A = rrset("www.example.test.", "A", "203.0.113.9")  # not vouched for by bob's key
BOB_A = rrset("bob.example.test.", "A", "198.51.100.11", "198.51.100.12")
BOB_AAAA = rrset("bob.example.test.", "AAAA", "2001:db8::11")


def test_chain_end() -> None:
    loop = [rrset("a.test.", "CNAME", "b.test."), rrset("b.test.", "CNAME", "a.test.")]
    assert chain_end(loop, n("a.test.")) in (n("a.test."), n("b.test."))  # terminates
    assert chain_end([WWW_CNAME, BOB_A], n("www.example.test.")) == n("bob.example.test.")
    assert chain_end([BOB_A], n("bob.example.test.")) == n("bob.example.test.")


def test_addresses_of_the_owner_and_type_only() -> None:
    section = [WWW_CNAME, WWW_A, BOB_A, BOB_AAAA]
    owner = chain_end(section, n("www.example.test."))
    assert addresses_of(section, owner, A) == [ip_address("198.51.100.11"),
                                               ip_address("198.51.100.12")]
    assert addresses_of(section, owner, AAAA) == [ip_address("2001:db8::11")]
    assert addresses_of(section, n("www.example.test."), A) == [ip_address("203.0.113.9")]


def test_only_addresses_keeps_the_rest_and_drops_stale_signatures() -> None:
    sig = rrset("bob.example.test.", "RRSIG",
                "A 15 3 60 20300101000000 20200101000000 1 example.test. AAAA")
    ans = ValidatedAnswer(verdict=Verdict(Security.SECURE), rcode=0,
                          answer=[WWW_CNAME, BOB_A, sig], authority=[], ttl=60)
    kept = only_addresses(ans, [ip_address("198.51.100.12")])
    assert kept.answer[0] == WWW_CNAME
    assert [str(rd) for rd in kept.answer[1]] == ["198.51.100.12"]
    assert len(kept.answer) == 2  # the RRSIG over both addresses no longer matches


def test_gateway_addresses_insecure_yes_bogus_never() -> None:
    gw = n("gw.example.test.")
    section = [rrset("gw.example.test.", "A", "198.51.100.20")]

    def ans(security: Security) -> ValidatedAnswer:
        return ValidatedAnswer(verdict=Verdict(security), rcode=0, answer=section, authority=[],
                               ttl=60)

    assert gateway_addresses(ans(Security.SECURE), gw, A) == [ip_address("198.51.100.20")]
    assert gateway_addresses(ans(Security.INSECURE), gw, A) == [ip_address("198.51.100.20")]
    assert gateway_addresses(ans(Security.BOGUS), gw, A) == []
    assert gateway_addresses(ans(Security.INDETERMINATE), gw, A) == []
