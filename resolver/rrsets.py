"""Reading a validated answer section: where a CNAME chain ends and which addresses it leads to.

Theory of operation: no I/O, no clock, no asyncio; answer sections in, names and addresses out.
Both places that act on addresses use these, so they agree on what an answer says:
capture.py (the answer to a client's A/AAAA query) and endpoints/ (a name pinned by `autosp
add`). Both need the *owner* of the addresses, the end of the CNAME chain, because the IPSECKEY
that counts is that owner's (DESIGN.md, "One query, step by step"): the address and the key are
then vouched for by the same signer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final

import dns.name
import dns.rdatatype
import dns.rrset

from resolver.validator.response import Security, ValidatedAnswer

Address = IPv4Address | IPv6Address

ADDRESS_TYPES: Final = (dns.rdatatype.A, dns.rdatatype.AAAA)


def chain_end(rrsets: Sequence[dns.rrset.RRset], qname: dns.name.Name) -> dns.name.Name:
    """The name a CNAME chain starting at qname ends at (qname itself without CNAMEs).

    The validator bounds the chain's length and rejects loops; this only has to stop: a chain
    cannot be longer than the number of CNAME RRsets without looping.
    """
    cnames = {r.name: r for r in rrsets if r.rdtype == dns.rdatatype.CNAME}
    name = qname
    for _ in range(len(cnames)):
        rrset = cnames.get(name)
        if rrset is None or len(rrset) == 0:
            return name
        name = next(iter(rrset)).target
    return name


def addresses_of(rrsets: Iterable[dns.rrset.RRset], owner: dns.name.Name,
                 rdtype: dns.rdatatype.RdataType) -> list[Address]:
    """The addresses of owner's A or AAAA RRset (`rdtype`), in record order.

    Only the owner's: an answer may carry other names' addresses (a CNAME's own, say), and
    those are not vouched for by the owner's key.
    """
    return [ip_address(rd.address) for r in rrsets if r.rdtype == rdtype and r.name == owner
            for rd in r]


def gateway_addresses(ans: ValidatedAnswer, name: dns.name.Name,
                      rdtype: dns.rdatatype.RdataType) -> list[Address]:
    """The addresses the A or AAAA answer `ans` gives for a gateway `name` (an IPSECKEY's
    gateway field), or none if the answer is bogus or indeterminate.

    A gateway's address needs no DNSSEC proof of its own: IKE authenticates the gateway by the
    secure key, so an insecure address is usable. Bogus data is never used.
    """
    if ans.verdict.security not in (Security.SECURE, Security.INSECURE):
        return []
    return addresses_of(ans.answer, chain_end(ans.answer, name), rdtype)


def only_addresses(ans: ValidatedAnswer, keep: Sequence[Address]) -> ValidatedAnswer:
    """`ans` with only the address records in `keep` (RRSIGs no longer match: dropped)."""
    wanted = set(keep)
    out: list[dns.rrset.RRset] = []
    for r in ans.answer:
        if r.rdtype in ADDRESS_TYPES:
            kept = dns.rrset.RRset(r.name, r.rdclass, r.rdtype)
            for rd in r:
                if ip_address(rd.address) in wanted:
                    kept.add(rd, r.ttl)
            out.append(kept)
        elif not (r.rdtype == dns.rdatatype.RRSIG and r.covers in ADDRESS_TYPES):
            out.append(r)
    return dataclasses.replace(ans, answer=out)
