"""Authenticated denial of existence with NSEC3 (RFC 5155 §8, RFC 9276), with a hash budget.

Theory of operation
-------------------
``Nsec3Set.build`` takes the NSEC3 records of one reply whose RRSIGs the caller has verified and
keeps the usable ones: SHA-1, no flags but Opt-Out, owner exactly ``<base32hex>.<zone>``, and one
parameter set (the first one seen; RFC 5155 §8.2 says to use parameters consistently). Before any
crypto the caller enforces the record-count limit (``too_many``); after it, parameters above the
iteration or salt limit make the whole denial INSECURE with EDE 27 (RFC 9276 §3.2: verify the
RRSIG first, then downgrade).

Hashes are computed here (SHA-1 over the canonical wire name and salt, RFC 5155 §5), memoized per
query in ``Budget.nsec3_memo`` and charged to ``Budget.charge_nsec3_hash``: the closest-encloser
walk over a long qname is exactly the CVE-2023-50868 cost.

Proofs (RFC 5155 section): closest encloser §8.3 (match at CE, cover of the next closer; a CE
match with DNAME, or NS without SOA, is not a valid encloser), NXDOMAIN §8.4 (+ cover of
``*.CE``), NODATA §8.5, DS NODATA §8.6 (match without DS; NS set means an insecure delegation;
or an Opt-Out cover of the next closer, also insecure), wildcard NODATA §8.7, wildcard answer
§8.8, and §9.2: a result that depends on an Opt-Out span is INSECURE, never SECURE.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import dns.edns
import dns.name
import dns.rdatatype
from dns.rdtypes.ANY.NSEC3 import NSEC3

from resolver.validator.nsec import has_type, nodata_from_bitmap
from resolver.validator.types import SECURE, Budget, Denial, Verdict, bogus, insecure, type_text

_MISSING = dns.edns.EDECode.NSEC_MISSING
_ITER = dns.edns.EDECode.UNSUPPORTED_NSEC3_ITERATIONS_VALUE
_OPTOUT = 1


@dataclass(frozen=True, slots=True)
class _Rec:
    hashed: bytes
    rdata: NSEC3


def too_many(count: int, budget: Budget) -> Verdict | None:
    """Bogus if a reply carries more NSEC3 records than allowed (Knot: "too many NSEC3")."""
    if count > budget.limits.max_nsec3_records:
        return bogus(f"too many NSEC3 records ({count} > {budget.limits.max_nsec3_records})")
    return None


def nsec3_digest(name: dns.name.Name, salt: bytes, iterations: int, budget: Budget) -> bytes:
    """RFC 5155 §5 hash of ``name``, memoized per query and charged to the budget."""
    wire = name.canonicalize().to_wire()
    assert wire is not None  # absolute names always have a wire form
    key = (wire, salt, iterations)
    cached = budget.nsec3_memo.get(key)
    if cached is not None:
        return cached
    budget.charge_nsec3_hash()
    digest = hashlib.sha1(wire + salt).digest()  # noqa: S324 - SHA-1 is what RFC 5155 defines
    for _ in range(iterations):
        digest = hashlib.sha1(digest + salt).digest()  # noqa: S324
    budget.nsec3_memo[key] = digest
    return digest


class Nsec3Set:
    """The usable NSEC3 records of one reply for one zone, with one parameter set."""

    def __init__(self, zone: dns.name.Name, recs: list[_Rec], salt: bytes, iterations: int):
        self.zone, self.recs, self.salt, self.iterations = zone, recs, salt, iterations

    @classmethod
    def build(
        cls, zone: dns.name.Name, records: Iterable[tuple[dns.name.Name, NSEC3]]
    ) -> Nsec3Set:
        """Keep usable records (see the module comment); unusable ones are ignored."""
        recs: list[_Rec] = []
        params: tuple[bytes, int] | None = None
        for owner, rd in records:
            if rd.algorithm != 1 or rd.flags & ~_OPTOUT or len(rd.next) != 20:
                continue
            if len(owner) < 2 or owner.parent() != zone:
                continue
            try:
                hashed = base64.b32hexdecode(owner.labels[0].upper())
            except (binascii.Error, ValueError):
                continue
            if len(hashed) != 20:
                continue
            if params is None:
                params = (rd.salt, rd.iterations)
            if (rd.salt, rd.iterations) == params:
                recs.append(_Rec(hashed, rd))
        salt, iterations = params if params is not None else (b"", 0)
        return cls(zone, recs, salt, iterations)

    def parameters_verdict(self, budget: Budget) -> Verdict | None:
        """INSECURE (EDE 27) if the parameters exceed our limits, else None."""
        limits = budget.limits
        if self.iterations > limits.max_nsec3_iterations:
            return insecure(
                f"NSEC3 iterations {self.iterations} above {limits.max_nsec3_iterations} "
                f"in {self.zone}",
                _ITER,
            )
        if len(self.salt) > limits.max_nsec3_salt:
            return insecure(f"NSEC3 salt longer than {limits.max_nsec3_salt} bytes", _ITER)
        return None

    # -- primitives ------------------------------------------------------------------------

    def _hash(self, name: dns.name.Name, budget: Budget) -> bytes:
        return nsec3_digest(name, self.salt, self.iterations, budget)

    def _match(self, hashed: bytes) -> NSEC3 | None:
        for rec in self.recs:
            if rec.hashed == hashed:
                return rec.rdata
        return None

    def _cover(self, hashed: bytes) -> NSEC3 | None:
        for rec in self.recs:
            start, end = rec.hashed, rec.rdata.next
            if (start < hashed < end) if start < end else (hashed > start or hashed < end):
                return rec.rdata
        return None

    def closest_encloser(
        self, name: dns.name.Name, budget: Budget
    ) -> tuple[dns.name.Name, NSEC3] | Verdict:
        """RFC 5155 §8.3: returns (closest encloser, NSEC3 covering the next closer)."""
        candidate = name
        while len(candidate) > len(self.zone):
            candidate = candidate.parent()
            match = self._match(self._hash(candidate, budget))
            if match is None:
                continue
            if has_type(match.windows, dns.rdatatype.DNAME) or (
                has_type(match.windows, dns.rdatatype.NS)
                and not has_type(match.windows, dns.rdatatype.SOA)
            ):
                return bogus(f"NSEC3 closest encloser {candidate} is a delegation or DNAME")
            next_closer = name.split(len(candidate) + 1)[1]
            cover = self._cover(self._hash(next_closer, budget))
            if cover is None:
                return bogus(f"no NSEC3 covers the next closer name {next_closer}", _MISSING)
            return candidate, cover
        return bogus(f"no NSEC3 proves a closest encloser of {name}", _MISSING)

    # -- proofs ----------------------------------------------------------------------------

    def prove_nxdomain(self, name: dns.name.Name, budget: Budget) -> Verdict:
        """§8.4: closest-encloser proof plus a cover of the wildcard at the encloser."""
        if self._match(self._hash(name, budget)) is not None:
            return bogus(f"NSEC3 shows {name} exists, yet NXDOMAIN")
        found = self.closest_encloser(name, budget)
        if isinstance(found, Verdict):
            return found
        encloser, nc_cover = found
        wildcard = dns.name.Name(("*", *encloser.labels))
        if self._cover(self._hash(wildcard, budget)) is None:
            return bogus(f"no NSEC3 proves that wildcard {wildcard} does not exist", _MISSING)
        if nc_cover.flags & _OPTOUT:
            return insecure(f"NXDOMAIN for {name} rests on an NSEC3 Opt-Out span")
        return SECURE

    def prove_nodata(self, name: dns.name.Name, rdtype: int, budget: Budget) -> Denial:
        """§8.5 - §8.7: NODATA, DS NODATA (with Opt-Out), and wildcard NODATA."""
        what = f"{name}/{type_text(rdtype)}"
        match = self._match(self._hash(name, budget))
        if match is not None:
            return nodata_from_bitmap("NSEC3", match.windows, name, rdtype, self.zone)
        found = self.closest_encloser(name, budget)
        if isinstance(found, Verdict):
            return Denial(found)
        encloser, nc_cover = found
        if rdtype == dns.rdatatype.DS:
            if nc_cover.flags & _OPTOUT:
                return Denial(insecure(f"DS for {name} denied by an NSEC3 Opt-Out span"), cut=True)
            return Denial(bogus(f"no NSEC3 matches {name} for the DS denial", _MISSING))
        wildcard = dns.name.Name(("*", *encloser.labels))
        wild = self._match(self._hash(wildcard, budget))
        if wild is None:
            return Denial(bogus(f"no NSEC3 proves NODATA for {what}", _MISSING))
        return nodata_from_bitmap("NSEC3", wild.windows, wildcard, rdtype, self.zone)

    def prove_wildcard(self, next_closer: dns.name.Name, budget: Budget) -> Verdict:
        """§8.8: a wildcard answer needs the next closer name covered."""
        if self._cover(self._hash(next_closer, budget)) is None:
            return bogus(f"no NSEC3 proves that {next_closer} does not exist", _MISSING)
        return SECURE


