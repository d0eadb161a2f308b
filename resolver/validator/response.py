"""Chain of trust -> Security: validate one upstream response for one client question.

Theory of operation
-------------------
``Validator.validate(qname, qtype, response, now)`` is the only entry point. The response came
from an upstream with DO=1 and CD=1, so nothing in it is trusted, not even its AD bit. One call
is one client query: it gets a fresh ``Budget`` (types.py) that every step charges.

1. Names at or below a negative trust anchor are INSECURE; nothing is checked.
2. The answer section is walked from ``qname``: the RRset asked for ends the walk; otherwise a
   DNAME above the current name (its synthesized CNAME must match, RFC 6672) or a CNAME at it
   moves to the next name. Each link is validated on its own, in its own zone, so a chain may
   cross zones and trust islands. A name seen twice is a loop (BOGUS), more than
   ``max_cname_chain`` links is BOGUS. If the chain ends without an answer or proof for its last
   name (a truncated chain), the rest is fetched with ``fetch``.
3. A positive RRset: its RRSIG's signer (an ancestor-or-self of the owner) names the zone;
   chain.py gives that zone's keys (or proves it INSECURE), sig.py checks the RRset. A
   wildcard expansion additionally needs the NSEC/NSEC3 proof of denial.py. Unsigned
   data is INSECURE only if the chain walk finds an insecure cut above it; otherwise the RRSIGs
   were stripped (BOGUS, EDE 10).
4. A negative end (NODATA or NXDOMAIN per the rcode) needs the signed SOA and the NSEC/NSEC3
   proof of the zone that signed them; a missing proof is BOGUS, never "no data".
5. The verdict of the whole answer is the worst of its parts. Work limits that run out raise
   ``BudgetExhausted`` anywhere below; it is caught here and becomes BOGUS with its reason.
   Upstream failures become INDETERMINATE. Nothing but a bug escapes as an exception.

The TTL returned is the smallest of the RRsets' capped TTLs (sig.py), the negative TTL
(RFC 9077: min of SOA TTL, SOA MINIMUM and the NSEC TTLs), and the time left until the earliest
signature expiry along the chain. BOGUS answers carry ``Limits.bogus_ttl``; INDETERMINATE 0.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.DNAME import DNAME
from dns.rdtypes.ANY.RRSIG import RRSIG
from dns.rdtypes.ANY.SOA import SOA

from resolver.validator.anchors import TrustAnchors
from resolver.validator.chain import Fetch, TrustChain
from resolver.validator.denial import (
    Section,
    collect,
    find,
    prove_negative,
    prove_wildcard,
    rrsig_rrset,
    rrsigs_for,
)
from resolver.validator.names import is_below, same_name
from resolver.validator.sig import ZoneKeys, verify_rrset
from resolver.validator.types import (
    SECURE,
    Budget,
    BudgetExhausted,
    CpuTurn,
    Limits,
    Security,
    Verdict,
    Work,
    bogus,
    insecure,
    type_text,
    worst,
)

__all__ = ["Fetch", "Limits", "Security", "ValidatedAnswer", "Validator", "Verdict", "Work"]

log = logging.getLogger("resolver.validator")
_EDE = dns.edns.EDECode
_MAX_TTL = 2**31 - 1


@dataclass(frozen=True)
class ValidatedAnswer:
    """What the resolution core serves and caches: the verdict and the validated sections."""

    verdict: Verdict  # overall status of the answer (worst of its parts)
    rcode: int  # NOERROR / NXDOMAIN as proven (SERVFAIL decisions are the core's)
    answer: list[dns.rrset.RRset]  # CNAME/DNAME chain + final RRset, each + its RRSIG RRset
    authority: list[dns.rrset.RRset]  # SOA/NSEC/NSEC3 + RRSIGs for negative answers
    ttl: int  # TTL to cache and to serve (already capped by signature validity)
    work: Work = field(default_factory=Work)  # work done (for tests, logs, metrics)


@dataclass(slots=True)
class _Part:
    """The outcome of one link or one negative end."""

    verdict: Verdict
    ttl: int
    authority: list[dns.rrset.RRset] = field(default_factory=list)
    rrsig: RRSIG | None = None  # the signature that verified a positive RRset


class Validator:
    """A forwarding DNSSEC validator with its own DS/DNSKEY cache."""

    def __init__(self, anchors: TrustAnchors, fetch: Fetch, limits: Limits | None = None) -> None:
        self.anchors = anchors
        self.fetch = fetch
        self.limits = limits if limits is not None else Limits()
        self.chain = TrustChain(anchors, fetch, self.limits)
        self._cpu = asyncio.Semaphore(max(1, self.limits.max_validating))

    def forget_bogus(self) -> None:
        """Forget cached BOGUS chain steps (see TrustChain.forget_bogus)."""
        self.chain.forget_bogus()

    async def validate(
        self,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
        response: dns.message.Message,
        now: float,
    ) -> ValidatedAnswer:
        """Validate ``response`` to (qname, qtype).

        Returns:
            The answer with its verdict. Any exception is a bug: every DNSSEC or upstream
            failure is a BOGUS or INDETERMINATE verdict with a reason and an EDE code.
        """
        turn = CpuTurn(self._cpu)
        budget = Budget(self.limits, turn=turn)
        await turn.acquire()
        try:
            result = await self._validate(qname, qtype, response, now, budget)
        except BudgetExhausted as e:
            result = self._failed(e.verdict, response, budget)
        except dns.exception.DNSException as e:  # e.g. NameTooLong from a DNAME substitution
            result = self._failed(bogus(f"malformed data: {e}", _EDE.INVALID_DATA), response,
                                  budget)
        finally:
            turn.release()
        # Debug only: the resolution core logs the one warning per failed answer, after it has
        # re-checked a bogus verdict (the first one may come from a forged reply).
        if log.isEnabledFor(logging.DEBUG):
            log.debug("validated %s/%s: %s %s (EDE %s)", qname, type_text(qtype),
                      result.verdict.security.value, result.verdict.reason, result.verdict.ede)
        return result

    def _failed(self, verdict: Verdict, response: dns.message.Message, budget: Budget
                ) -> ValidatedAnswer:
        ttl = self.limits.bogus_ttl if verdict.security is Security.BOGUS else 0
        return ValidatedAnswer(verdict, response.rcode(), [], [], ttl, budget.work)

    async def _validate(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
                        response: dns.message.Message, now: float, budget: Budget
                        ) -> ValidatedAnswer:
        nta = self.anchors.negative_for(qname)
        if nta is not None:
            ttl = min((rr.ttl for rr in [*response.answer, *response.authority]), default=0)
            return ValidatedAnswer(insecure(f"{qname} is below negative trust anchor {nta}"),
                                   response.rcode(), list(response.answer),
                                   list(response.authority), ttl, budget.work)
        if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            verdict = Verdict(Security.INDETERMINATE,
                              f"upstream answered {dns.rcode.to_text(response.rcode())}",
                              int(_EDE.NETWORK_ERROR))
            return self._failed(verdict, response, budget)
        return await self._walk(qname, qtype, response, now, budget)

    # -- the answer chain ------------------------------------------------------------------

    async def _walk(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
                    response: dns.message.Message, now: float, budget: Budget
                    ) -> ValidatedAnswer:
        verdict, ttl = SECURE, _MAX_TTL
        answer: list[dns.rrset.RRset] = []
        authority: list[dns.rrset.RRset] = []
        current, seen, links, fetched = qname, {qname}, 0, False
        rcode = response.rcode()

        def add(part: _Part) -> None:
            nonlocal verdict, ttl
            verdict, ttl = worst(verdict, part.verdict), min(ttl, part.ttl)
            authority.extend(part.authority)

        while True:
            section = response.answer
            final = find(section, current, qtype)
            if final is not None:
                part = await self._positive(final, response, now, budget)
                add(part)
                _append(answer, section, final, part.rrsig)
                rcode = dns.rcode.NOERROR  # what was proven, whatever the upstream said
                break
            link = self._next_link(section, current, qtype)
            if link is None:
                if current != qname and not fetched and not _has_denial(response, current):
                    log.debug("chain target %s not in reply: fetching it", current)
                    response = await self._fetch_rest(current, qtype, budget)
                    fetched = True
                    continue
                add(await self._negative(current, qtype, response, now, budget))
                rcode = response.rcode()
                break
            rrset, target, synthesized = link
            part = await self._positive(rrset, response, now, budget)
            add(part)
            _append(answer, section, rrset, part.rrsig)
            if synthesized is not None:
                answer.append(synthesized)
                verdict = worst(verdict, _check_synthesis(section, current, target))
            links += 1
            if verdict.security is Security.BOGUS:
                break
            if links > self.limits.max_cname_chain:
                verdict = worst(verdict, bogus(
                    f"CNAME/DNAME chain longer than {self.limits.max_cname_chain}"))
                break
            if target in seen:
                verdict = worst(verdict, bogus(f"CNAME/DNAME loop at {target}"))
                break
            seen.add(target)
            current, fetched = target, False
        return self._finish(verdict, ttl, rcode, answer, authority, now, budget)

    def _finish(self, verdict: Verdict, ttl: int, rcode: int, answer: list[dns.rrset.RRset],
                authority: list[dns.rrset.RRset], now: float, budget: Budget
                ) -> ValidatedAnswer:
        if verdict.security is Security.BOGUS:
            return ValidatedAnswer(verdict, rcode, answer, authority, self.limits.bogus_ttl,
                                   budget.work)
        if verdict.security is Security.INDETERMINATE:
            return ValidatedAnswer(verdict, rcode, answer, authority, 0, budget.work)
        if verdict.valid_until is not None:
            ttl = min(ttl, max(0, int(verdict.valid_until - now)))
        ttl = 0 if ttl == _MAX_TTL else ttl
        return ValidatedAnswer(verdict, rcode, answer, authority, ttl, budget.work)

    def _next_link(self, section: Section, current: dns.name.Name, qtype: int
                   ) -> tuple[dns.rrset.RRset, dns.name.Name, dns.rrset.RRset | None] | None:
        """The DNAME above, or the CNAME at, ``current``: (rrset, next name, synthesized)."""
        if qtype in (dns.rdatatype.CNAME, dns.rdatatype.DNAME):
            return None
        dnames = [rr for rr in section if rr.rdtype == dns.rdatatype.DNAME
                  and current.is_subdomain(rr.name) and current != rr.name]
        if dnames:
            dname = max(dnames, key=len)
            rd = next(iter(dname))
            assert isinstance(rd, DNAME)
            target = current.relativize(dname.name).concatenate(rd.target)
            cname = dns.rrset.from_text_list(current, dname.ttl, dns.rdataclass.IN,
                                             dns.rdatatype.CNAME, [target.to_text()])
            return dname, target, cname
        cname_rrset = find(section, current, dns.rdatatype.CNAME)
        if cname_rrset is None:
            return None
        rd = next(iter(cname_rrset))
        assert isinstance(rd, CNAME)
        return cname_rrset, rd.target, None

    async def _fetch_rest(self, name: dns.name.Name, qtype: dns.rdatatype.RdataType,
                          budget: Budget) -> dns.message.Message:
        reply = await self.chain.fetch_counted(name, qtype, budget)
        if isinstance(reply, Verdict):
            raise _Indeterminate(reply)
        return reply

    # -- one positive RRset ----------------------------------------------------------------

    async def _positive(self, rrset: dns.rrset.RRset, response: dns.message.Message,
                        now: float, budget: Budget) -> _Part:
        sigs = rrsigs_for(response.answer, rrset.name, rrset.rdtype)
        # Distinct signers above the owner, deepest first (a list, not a set of Names:
        # hashing a Name walks its every character in Python).
        signers: list[dns.name.Name] = []
        for s in sigs:
            if is_below(rrset.name, s.signer) and \
                    not any(same_name(s.signer, seen) for seen in signers):
                signers.append(s.signer)
        signers.sort(key=len, reverse=True)
        if not signers:
            return await self._unsigned(rrset.name, rrset.rdtype, rrset.ttl, _what(rrset),
                                        bool(sigs), now, budget)
        owner = rrset.name.parent() if rrset.rdtype == dns.rdatatype.DS else rrset.name
        cut = self.chain.known_cut_between(signers[0], owner, now)
        if cut is not None:
            return _Part(bogus(f"{_what(rrset)}: RRSIG signer {signers[0]} is not the zone "
                               f"(zone cut at {cut})"), 0)
        keys = await self.chain.keys_for(signers[0], now, budget)
        if isinstance(keys, Verdict):
            return _Part(_about(_what(rrset), keys), rrset.ttl)
        result = await verify_rrset(rrset, sigs, keys.zone, keys.keys, now, budget)
        verdict = worst(result.verdict, Verdict(Security.SECURE, valid_until=keys.valid_until))
        if result.verdict.security is not Security.SECURE:
            return _Part(_about(_what(rrset), result.verdict), 0)
        part = _Part(verdict, result.ttl, rrsig=result.rrsig)
        if result.next_closer is not None and result.wildcard_parent is not None:
            proofs = await collect(response.authority, keys, now, budget)
            proven = prove_wildcard(proofs, rrset.name, result.next_closer,
                                    result.wildcard_parent, budget)
            part.verdict = worst(part.verdict, _about(f"wildcard {_what(rrset)}", proven))
            part.ttl = min(part.ttl, proofs.ttl)
            part.authority = _with_sigs(response.authority, proofs.signed)
        return part

    async def _unsigned(self, name: dns.name.Name, rdtype: int, ttl: int, what: str,
                        had_sigs: bool, now: float, budget: Budget) -> _Part:
        """Unsigned data is fine only below an insecure cut; else its RRSIGs were stripped."""
        where = name.parent() if rdtype == dns.rdatatype.DS and len(name) > 1 else name
        state = await self.chain.zone_of(where, now, budget)
        if isinstance(state, Verdict):
            return _Part(_about(what, state), ttl)
        if had_sigs:
            return _Part(bogus(f"{what}: RRSIG signer is not an ancestor of the owner"), 0)
        return _Part(bogus(f"{what}: no RRSIG in secure zone {state.zone}",
                           _EDE.RRSIGS_MISSING), 0)

    # -- a negative end --------------------------------------------------------------------

    async def _negative(self, name: dns.name.Name, qtype: int, response: dns.message.Message,
                        now: float, budget: Budget) -> _Part:
        nxdomain = response.rcode() == dns.rcode.NXDOMAIN
        what = f"{'NXDOMAIN' if nxdomain else 'NODATA'} {name}/{type_text(qtype)}"
        section = response.authority
        covered = (dns.rdatatype.SOA, dns.rdatatype.NSEC, dns.rdatatype.NSEC3)
        signers = sorted({s.signer for rr in section if rr.rdtype == dns.rdatatype.RRSIG
                          for s in rrsigs_for(section, rr.name, rr.covers)
                          if rr.covers in covered and name.is_subdomain(s.signer)},
                         key=len, reverse=True)
        soa_ttl = _soa_ttl(section)
        if not signers:
            part = await self._unsigned(name, qtype, soa_ttl, what, False, now, budget)
            if part.verdict.security is Security.BOGUS and \
                    part.verdict.ede == _EDE.RRSIGS_MISSING and not _has_denial_records(section):
                part.verdict = bogus(f"{what}: no NSEC/NSEC3 proof in a secure zone",
                                     _EDE.NSEC_MISSING)
            part.authority = list(section) if part.verdict.security is Security.INSECURE else []
            return part
        keys = await self.chain.keys_for(signers[0], now, budget)
        if isinstance(keys, Verdict):
            return _Part(_about(what, keys), soa_ttl, list(section))
        verdict, ttl, kept = await self._check_soa(section, keys, now, budget)
        if verdict.security is not Security.SECURE:
            return _Part(_about(what, verdict), 0)
        proofs = await collect(section, keys, now, budget)
        denial = prove_negative(proofs, name, qtype, nxdomain, budget)
        verdict = worst(denial.verdict, Verdict(Security.SECURE, valid_until=_min_until(
            keys.valid_until, proofs.valid_until, verdict.valid_until)))
        return _Part(_about(what, verdict), min(ttl, proofs.ttl),
                     kept + _with_sigs(section, proofs.signed))

    async def _check_soa(self, section: Section, keys: ZoneKeys, now: float, budget: Budget
                         ) -> tuple[Verdict, int, list[dns.rrset.RRset]]:
        soa = find(section, keys.zone, dns.rdatatype.SOA)
        if soa is None:
            return SECURE, _MAX_TTL, []
        result = await verify_rrset(soa, rrsigs_for(section, soa.name, dns.rdatatype.SOA),
                                    keys.zone, keys.keys, now, budget)
        minimum = min((rd.minimum for rd in soa if isinstance(rd, SOA)), default=result.ttl)
        return result.verdict, min(result.ttl, minimum), _with_sigs(section, [(soa, result.rrsig)])


class _Indeterminate(BudgetExhausted):
    """An upstream failure while completing a chain; unwinds like a budget failure."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


def _what(rrset: dns.rrset.RRset) -> str:
    # Only for reasons: built when something failed (formatting a name is not free).
    return f"{rrset.name}/{type_text(rrset.rdtype)}"


def _about(what: str, verdict: Verdict) -> Verdict:
    if verdict.security is Security.SECURE or not verdict.reason or what in verdict.reason:
        return verdict
    return Verdict(verdict.security, f"{what}: {verdict.reason}", verdict.ede,
                   verdict.valid_until)


def _append(out: list[dns.rrset.RRset], section: Section, rrset: dns.rrset.RRset,
            verified: RRSIG | None) -> None:
    """Copy an RRset into the client's answer with its signature.

    A verified RRset carries only the signature that verified it: whatever else came with it
    (a second algorithm, a damaged copy, a forged extra) was never checked, and a SECURE
    answer passes on nothing unchecked. Data not verified (insecure) goes as received.
    """
    out.append(rrset)
    sigs = rrsig_rrset(section, rrset.name, rrset.rdtype)
    if sigs is None:
        return
    # The verified rdata is one of the section's own objects: `is`, not a wire comparison.
    if verified is None or (len(sigs) == 1 and next(iter(sigs)) is verified):
        out.append(sigs)
    else:
        out.append(dns.rrset.from_rdata_list(sigs.name, sigs.ttl, [verified]))


def _with_sigs(section: Section, signed: list[tuple[dns.rrset.RRset, RRSIG | None]]
               ) -> list[dns.rrset.RRset]:
    out: list[dns.rrset.RRset] = []
    for rrset, verified in signed:
        _append(out, section, rrset, verified)
    return out


def _check_synthesis(section: Section, name: dns.name.Name, target: dns.name.Name) -> Verdict:
    """RFC 6672: a CNAME sent with a DNAME must be exactly the DNAME substitution."""
    cname = find(section, name, dns.rdatatype.CNAME)
    if cname is None:
        return SECURE
    rd = next(iter(cname))
    if not isinstance(rd, CNAME) or rd.target != target:
        return bogus(f"CNAME at {name} does not match the DNAME substitution {target}")
    return SECURE


def _has_denial_records(section: Section) -> bool:
    return any(rr.rdtype in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3) for rr in section)


def _has_denial(response: dns.message.Message, name: dns.name.Name) -> bool:
    """Whether the reply carries an end for ``name``: its zone's SOA or denial records."""
    for rr in response.authority:
        if rr.rdtype == dns.rdatatype.SOA and name.is_subdomain(rr.name):
            return True
    return _has_denial_records(response.authority)


def _soa_ttl(section: Section) -> int:
    for rr in section:
        if rr.rdtype == dns.rdatatype.SOA:
            minimum = min((rd.minimum for rd in rr if isinstance(rd, SOA)), default=rr.ttl)
            return min(rr.ttl, minimum)
    return 0


def _min_until(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None
