"""The chain of trust: from a trust anchor down to a zone's validated keys, with a cache.

Theory of operation
-------------------
A forwarding validator sees no referrals, so zone cuts are discovered by asking for the DS
RRset of every name between the closest trust anchor and the target, one label at a time, top
down:

* a DS RRset signed by the current zone: a secure cut. Fetch the child's DNSKEY RRset; keep at
  most ``max_ds`` DS records with a supported algorithm and digest (SHA-1 DS only when nothing
  better exists, RFC 4509 §3); if none is usable the child is INSECURE (RFC 4035 §5.2); match
  keys by tag, algorithm and digest (``make_ds(validating=True)``, at most ``max_keys_per_tag``
  keys per DS, digest mismatches budgeted); a matching key must sign the DNSKEY RRset; then the
  whole set is trusted for the child zone;
* a proven DS NODATA where the name is a delegation (NS bit, or an NSEC3 Opt-Out span): an
  insecure delegation, everything below is INSECURE;
* a proven DS NODATA at a name that is not a cut: keep walking with the same zone;
* a proven NXDOMAIN: nothing exists below, the current zone is the deepest one;
* anything else (missing or broken proof, bad signature, upstream failure): BOGUS or
  INDETERMINATE.

``keys_for(signer)`` walks to an RRSIG's signer and requires a zone apex there; ``zone_of(name)``
walks to a name whose data came unsigned, to learn whether an insecure cut explains that.

Every step's result is cached per name until the smallest TTL involved (capped by signature
validity); BOGUS steps for ``bogus_ttl`` (60 s, Unbound's val-bogus-ttl), so repeated queries do
not refetch or recheck; INDETERMINATE (upstream failure) is not cached. The cache is bounded
(oldest entries evicted first). Concurrent queries for the same zone may both fetch: the
resolution core coalesces identical client queries, which keeps that rare.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import dns.dnssec
import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from dns.dnssectypes import DSDigest
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS

from resolver.errors import ResolverError
from resolver.validator.anchors import Anchor, TrustAnchors
from resolver.validator.denial import collect, find, prove_negative, rrsigs_for
from resolver.validator.names import same_name
from resolver.validator.sig import ZoneKeys, algorithm_supported, index_keys, verify_rrset
from resolver.validator.types import Budget, Limits, Security, Verdict, bogus, insecure

log = logging.getLogger("resolver.validator")

Fetch = Callable[[dns.name.Name, dns.rdatatype.RdataType], Awaitable[dns.message.Message]]
_EDE = dns.edns.EDECode
_DIGESTS = (DSDigest.SHA1, DSDigest.SHA256, DSDigest.SHA384)


@dataclass(frozen=True, slots=True)
class _NotCut:
    """The DS walk proved that this name is not a zone cut."""


@dataclass(frozen=True, slots=True)
class _NoName:
    """The DS walk proved that this name does not exist (nothing below it either)."""


Step = ZoneKeys | Verdict | _NotCut | _NoName
NOT_CUT, NO_NAME = _NotCut(), _NoName()
Timed = tuple[Step, float]  # a step and how many seconds it may be cached


def _names_between(top: dns.name.Name, target: dns.name.Name) -> list[dns.name.Name]:
    """Names strictly below ``top`` down to ``target`` inclusive, top down."""
    return [target.split(n)[1] for n in range(len(top) + 1, len(target) + 1)]


class TrustChain:
    """Builds and caches the chain of trust (see the module comment)."""

    def __init__(self, anchors: TrustAnchors, fetch: Fetch, limits: Limits) -> None:
        self.anchors, self.fetch, self.limits = anchors, fetch, limits
        self._cache: dict[tuple[dns.name.Name, str], tuple[Step, float]] = {}
        self._bogus: set[tuple[dns.name.Name, str]] = set()  # keys cached BOGUS (forget_bogus)

    # -- public ----------------------------------------------------------------------------

    async def keys_for(self, signer: dns.name.Name, now: float, budget: Budget
                       ) -> ZoneKeys | Verdict:
        """The validated keys of zone ``signer``, or the verdict that replaces them."""
        state = await self._walk(signer, now, budget)
        if isinstance(state, ZoneKeys) and not same_name(state.zone, signer):
            return bogus(f"signer {signer} is not a zone apex (no DS at it)",
                         _EDE.DNSKEY_MISSING)
        return state

    async def zone_of(self, name: dns.name.Name, now: float, budget: Budget
                      ) -> ZoneKeys | Verdict:
        """The deepest secure zone holding ``name``, or INSECURE/BOGUS/INDETERMINATE."""
        return await self._walk(name, now, budget)

    def forget_bogus(self) -> None:
        """Drop every cached BOGUS step, so the next walk fetches and checks again.

        The resolution core calls this before it re-checks a bogus answer with fresh data: a
        BOGUS step may come from one forged reply (a DNSKEY or DS with the right port and ID),
        and must not outlive the re-check that refutes it. Cheap: only the bogus keys are
        touched, and bogus steps are rare outside attacks.
        """
        for key in self._bogus:
            hit = self._cache.get(key)
            if hit is not None and isinstance(hit[0], Verdict) \
                    and hit[0].security is Security.BOGUS:
                del self._cache[key]
        self._bogus.clear()

    def known_cut_between(self, signer: dns.name.Name, owner: dns.name.Name, now: float
                          ) -> dns.name.Name | None:
        """A zone cut already known (cached) strictly below ``signer`` at or above ``owner``.

        Used to reject data signed by an ancestor zone's key when the data's own zone is known:
        the signer must be *the* zone of the data (RFC 4035 §5.3.1). Only cached knowledge is
        used, so this costs no fetch; with a cold cache such data is accepted (a parent can
        re-delegate anyway, so it gains nothing it could not do through its DS records).
        """
        for name in _names_between(signer, owner):
            hit = self._cache.get((name, "ds"))
            if hit is None or hit[1] <= now:
                continue
            step = hit[0]
            if isinstance(step, ZoneKeys) or (
                    isinstance(step, Verdict) and step.security is Security.INSECURE):
                return name
        return None

    # -- the walk --------------------------------------------------------------------------

    async def _walk(self, target: dns.name.Name, now: float, budget: Budget
                    ) -> ZoneKeys | Verdict:
        anchor = self.anchors.closest(target)
        if anchor is None:
            return insecure(f"no trust anchor above {target}")
        state = await self._cached(anchor.name, "anchor", now,
                                   lambda: self._anchor_keys(anchor, now, budget))
        for name in _names_between(anchor.name, target):
            if not isinstance(state, ZoneKeys):
                break
            step = await self._cached(
                name, "ds", now, functools.partial(self._ds_step, state, name, now, budget))
            if isinstance(step, _NoName):
                break
            if not isinstance(step, _NotCut):
                state = step
        if isinstance(state, (_NotCut, _NoName)):  # pragma: no cover - anchors give keys
            return bogus("chain walk ended without keys")
        return state

    async def _cached(self, name: dns.name.Name, kind: str, now: float,
                      compute: Callable[[], Awaitable[Timed]]) -> Step:
        hit = self._cache.get((name, kind))
        if hit is not None and hit[1] > now:
            log.debug("chain cache hit %s %s", kind, name)
            return hit[0]
        step, ttl = await compute()
        if isinstance(step, Verdict) and step.security is Security.BOGUS:
            ttl = self.limits.bogus_ttl
        elif isinstance(step, Verdict) and step.security is Security.INDETERMINATE:
            ttl = 0
        if ttl > 0:
            if len(self._cache) >= self.limits.cache_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(name, kind)] = (step, now + ttl)
            if isinstance(step, Verdict) and step.security is Security.BOGUS:
                if len(self._bogus) >= self.limits.cache_entries:  # evicted ones linger here
                    self._bogus = {k for k in self._bogus if k in self._cache}
                self._bogus.add((name, kind))
        return step

    # -- one DS step -----------------------------------------------------------------------

    async def _ds_step(self, parent: ZoneKeys, name: dns.name.Name, now: float,
                       budget: Budget) -> Timed:
        reply = await self.fetch_counted(name, dns.rdatatype.DS, budget)
        if isinstance(reply, Verdict):
            return reply, 0
        rcode = reply.rcode()
        ds_rrset = find(reply.answer, name, dns.rdatatype.DS)
        if ds_rrset is not None:
            sigs = rrsigs_for(reply.answer, name, dns.rdatatype.DS)
            result = await verify_rrset(ds_rrset, sigs, parent.zone, parent.keys, now, budget)
            if result.verdict.security is not Security.SECURE:
                return _why(f"DS of {name}", result.verdict), 0
            log.debug("secure DS at %s, fetching its DNSKEY", name)
            ds = [rd for rd in ds_rrset if isinstance(rd, DS)]
            until = _min(parent.valid_until, result.verdict.valid_until)
            step, ttl = await self._child_keys(name, ds, None, until, now, budget)
            return step, min(ttl, result.ttl)
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or reply.answer:
            return Verdict(Security.BOGUS if reply.answer else Security.INDETERMINATE,
                           f"unexpected reply to DS query for {name} "
                           f"({dns.rcode.to_text(rcode)})",
                           int(_EDE.DNSSEC_BOGUS if reply.answer else _EDE.NETWORK_ERROR)), 0
        proofs = await collect(reply.authority, parent, now, budget)
        denial = prove_negative(proofs, name, dns.rdatatype.DS,
                                rcode == dns.rcode.NXDOMAIN, budget)
        verdict, ttl = denial.verdict, min(proofs.ttl, self.limits.max_chain_ttl)
        if verdict.security is Security.BOGUS:
            return _why(f"DS denial for {name}", verdict), 0
        if verdict.security is Security.INSECURE or denial.cut:
            log.debug("insecure delegation at %s", name)
            return insecure(verdict.reason or f"insecure delegation at {name} (DS absent)",
                            verdict.ede), ttl
        return (NO_NAME if rcode == dns.rcode.NXDOMAIN else NOT_CUT), ttl

    # -- DNSKEY sets -----------------------------------------------------------------------

    async def _anchor_keys(self, anchor: Anchor, now: float, budget: Budget) -> Timed:
        return await self._child_keys(anchor.name, list(anchor.ds), list(anchor.dnskey),
                                      None, now, budget)

    async def _child_keys(self, zone: dns.name.Name, ds: Sequence[DS],
                          anchor_keys: Sequence[DNSKEY] | None, until: float | None,
                          now: float, budget: Budget) -> Timed:
        usable = [d for d in ds[: self.limits.max_ds]
                  if algorithm_supported(d.algorithm) and d.digest_type in _DIGESTS]
        if any(d.digest_type != DSDigest.SHA1 for d in usable):
            usable = [d for d in usable if d.digest_type != DSDigest.SHA1]  # RFC 4509 §3
        trusted_anchor_keys = [k for k in anchor_keys or () if algorithm_supported(k.algorithm)]
        if not usable and not trusted_anchor_keys:
            ede = _EDE.UNSUPPORTED_DNSKEY_ALGORITHM
            if ds and all(algorithm_supported(d.algorithm) for d in ds[: self.limits.max_ds]):
                ede = _EDE.UNSUPPORTED_DS_DIGEST_TYPE
            return insecure(f"no DS/anchor of {zone} with a supported algorithm and digest",
                            ede), self.limits.max_chain_ttl
        reply = await self.fetch_counted(zone, dns.rdatatype.DNSKEY, budget)
        if isinstance(reply, Verdict):
            return reply, 0
        rrset = find(reply.answer, zone, dns.rdatatype.DNSKEY)
        if rrset is None:
            return bogus(f"no DNSKEY RRset for {zone}", _EDE.DNSKEY_MISSING), 0
        keys = [rd for rd in rrset if isinstance(rd, DNSKEY)]
        matched = self._match_ds(zone, usable, keys, budget)
        matched += [k for k in keys if k in trusted_anchor_keys]
        if not matched:
            return bogus(f"no DNSKEY of {zone} matches its DS", _EDE.DNSKEY_MISSING), 0
        sigs = rrsigs_for(reply.answer, zone, dns.rdatatype.DNSKEY)
        result = await verify_rrset(rrset, sigs, zone, index_keys(matched), now, budget)
        if result.verdict.security is not Security.SECURE:
            return _why(f"DNSKEY RRset of {zone}", result.verdict), 0
        log.debug("secure DNSKEY set for %s (%d keys)", zone, len(keys))
        ttl = min(result.ttl, self.limits.max_chain_ttl)
        return ZoneKeys(zone, index_keys(keys), _min(until, result.verdict.valid_until), ttl), ttl

    def _match_ds(self, zone: dns.name.Name, ds: Sequence[DS], keys: Sequence[DNSKEY],
                  budget: Budget) -> list[DNSKEY]:
        matched: list[DNSKEY] = []
        index = index_keys(keys)
        for d in ds:
            for key in index.get((int(d.algorithm), int(d.key_tag)), [])[
                    : self.limits.max_keys_per_tag]:
                budget.work.ds_digests += 1
                try:
                    made = dns.dnssec.make_ds(zone, key, d.digest_type, validating=True)
                except (dns.exception.DNSException, ValueError):
                    continue
                if made.digest == d.digest:
                    if key not in matched:
                        matched.append(key)
                else:
                    budget.charge_ds_mismatch()
        return matched

    async def fetch_counted(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                     budget: Budget) -> dns.message.Message | Verdict:
        budget.charge_fetch()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fetch %s/%s", name, dns.rdatatype.to_text(rdtype))
        try:
            async with budget.released():
                return await self.fetch(name, rdtype)
        except (ResolverError, OSError, TimeoutError, dns.exception.DNSException) as e:
            return Verdict(Security.INDETERMINATE,
                           f"upstream failed for {name}/{dns.rdatatype.to_text(rdtype)}: {e}",
                           int(_EDE.NETWORK_ERROR))


def _why(what: str, verdict: Verdict) -> Verdict:
    return Verdict(verdict.security, f"{what}: {verdict.reason}", verdict.ede,
                   verdict.valid_until)


def _min(a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None
