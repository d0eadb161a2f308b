"""Denial-of-existence glue: verify a reply's NSEC/NSEC3 records, then run the right proof.

Theory of operation
-------------------
A negative answer (or a wildcard expansion, or a DS denial met while walking the chain) carries
NSEC or NSEC3 records in its authority section. ``collect`` keeps those that belong to one
secure zone (owner under the zone, an RRSIG by the zone), checks the NSEC3 count *before* any
crypto, verifies each RRset with the zone's keys (budgeted in sig.py), and hands the
verified records to nsec.py / nsec3.py. Records signed by another zone are left for
that zone's own step; records without any RRSIG make a missing proof "RRSIGs missing" rather
than "NSEC missing", which is the more useful EDE for a stripping middlebox.

A missing or broken proof is always BOGUS: "no data" is never assumed (DESIGN.md, security
requirement 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.edns
import dns.name
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.NSEC3 import NSEC3
from dns.rdtypes.ANY.RRSIG import RRSIG

from resolver.validator import nsec
from resolver.validator.names import same_name
from resolver.validator.nsec3 import Nsec3Set, too_many
from resolver.validator.sig import ZoneKeys, verify_rrset
from resolver.validator.types import Budget, Denial, Security, Verdict, bogus, type_text

Section = Sequence[dns.rrset.RRset]


def find(section: Section, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
    """The RRset of (name, type) in a section, if any."""
    for rrset in section:
        if rrset.rdtype == rdtype and same_name(rrset.name, name):
            return rrset
    return None


def rrsigs_for(section: Section, name: dns.name.Name, rdtype: int) -> list[RRSIG]:
    """All RRSIG rdatas covering (name, type) in a section."""
    out: list[RRSIG] = []
    for rrset in section:
        if rrset.rdtype == dns.rdatatype.RRSIG and same_name(rrset.name, name):
            out += [rd for rd in rrset if isinstance(rd, RRSIG) and rd.type_covered == rdtype]
    return out


def rrsig_rrset(section: Section, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
    """The RRSIG RRset covering (name, type), for copying into an answer."""
    for rrset in section:
        if rrset.rdtype == dns.rdatatype.RRSIG and rrset.covers == rdtype \
                and same_name(rrset.name, name):
            return rrset
    return None


@dataclass(slots=True)
class Proofs:
    """The verified NSEC or NSEC3 records of one zone in one reply."""

    zone: dns.name.Name
    nsecs: list[tuple[dns.name.Name, NSEC]] = field(default_factory=list)
    nsec3: Nsec3Set | None = None
    verdict: Verdict | None = None  # set when collecting already decided the outcome
    ttl: int = 2**31 - 1
    valid_until: float | None = None
    rrsets: list[dns.rrset.RRset] = field(default_factory=list)  # for the client's answer


async def collect(section: Section, zone: ZoneKeys, now: float, budget: Budget) -> Proofs:
    """Verify the NSEC/NSEC3 RRsets of ``zone`` in an authority section (see module comment)."""
    proofs = Proofs(zone.zone)
    mine = [rr for rr in section
            if rr.rdtype in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3)
            and rr.name.is_subdomain(zone.zone)]
    problem = too_many(sum(len(rr) for rr in mine if rr.rdtype == dns.rdatatype.NSEC3), budget)
    if problem is not None:
        proofs.verdict = problem
        return proofs
    unsigned = False
    nsec3_records: list[tuple[dns.name.Name, NSEC3]] = []
    for rr in mine:
        sigs = [s for s in rrsigs_for(section, rr.name, rr.rdtype)
                if same_name(s.signer, zone.zone)]
        if not sigs:
            unsigned = unsigned or not rrsigs_for(section, rr.name, rr.rdtype)
            continue
        result = await verify_rrset(rr, sigs, zone.zone, zone.keys, now, budget)
        if result.verdict.security is not Security.SECURE:
            proofs.verdict = result.verdict
            return proofs
        proofs.ttl = min(proofs.ttl, result.ttl)
        until = [u for u in (proofs.valid_until, result.verdict.valid_until) if u is not None]
        proofs.valid_until = min(until) if until else None
        proofs.rrsets.append(rr)
        for rd in rr:
            if isinstance(rd, NSEC):
                proofs.nsecs.append((rr.name, rd))
            elif isinstance(rd, NSEC3):
                nsec3_records.append((rr.name, rd))
    proofs.verdict = nsec.check_zone(proofs.nsecs, zone.zone)
    if nsec3_records and proofs.verdict is None:
        proofs.nsec3 = Nsec3Set.build(zone.zone, nsec3_records)
        proofs.verdict = proofs.nsec3.parameters_verdict(budget)
    if proofs.verdict is None and not proofs.nsecs and not nsec3_records and unsigned:
        proofs.verdict = bogus(
            f"NSEC/NSEC3 records of {zone.zone} without RRSIG", dns.edns.EDECode.RRSIGS_MISSING
        )
    return proofs


def prove_negative(
    proofs: Proofs, name: dns.name.Name, rdtype: int, nxdomain: bool, budget: Budget
) -> Denial:
    """NXDOMAIN or NODATA for (name, type) from collected proofs."""
    if proofs.verdict is not None:
        return Denial(proofs.verdict)
    if proofs.nsecs:
        if nxdomain:
            return Denial(nsec.prove_nxdomain(name, proofs.zone, proofs.nsecs))
        return nsec.prove_nodata(name, rdtype, proofs.zone, proofs.nsecs)
    if proofs.nsec3 is not None and proofs.nsec3.recs:
        if nxdomain:
            return Denial(proofs.nsec3.prove_nxdomain(name, budget))
        return proofs.nsec3.prove_nodata(name, rdtype, budget)
    what = "NXDOMAIN" if nxdomain else "NODATA"
    return Denial(bogus(f"no NSEC/NSEC3 proof for {what} {name}/"
                        f"{type_text(rdtype)}", dns.edns.EDECode.NSEC_MISSING))


def prove_wildcard(
    proofs: Proofs,
    name: dns.name.Name,
    next_closer: dns.name.Name,
    parent: dns.name.Name,
    budget: Budget,
) -> Verdict:
    """A wildcard expansion must come with proof that the next closer name does not exist."""
    if proofs.verdict is not None:
        return proofs.verdict
    if proofs.nsecs:
        return nsec.prove_wildcard(name, parent, proofs.zone, proofs.nsecs)
    if proofs.nsec3 is not None and proofs.nsec3.recs:
        return proofs.nsec3.prove_wildcard(next_closer, budget)
    return bogus(f"wildcard expansion of {name} without NSEC/NSEC3 proof",
                 dns.edns.EDECode.NSEC_MISSING)
