"""Signature checks for one RRset, with every attempt counted against the query's budget.

Theory of operation
-------------------
``dns.dnssec.validate`` tries every RRSIG against every candidate key, silently skips invalid
public keys and does not check the signer against the zone (RFC 4035 §5.3.1), so we do not
call it.
``verify_rrset`` walks the RRSIGs itself and, for each one, in this order:

1. cheap structural checks that cost no crypto and are *not* counted: type covered, signer equals
   the zone whose keys we hold and is an ancestor-or-self of the owner, labels not above the
   owner's and not below the signer's (the 2026 wildcard-bypass class), a supported algorithm
   allowed by RFC 8624, and at least one trusted key with that (algorithm, key tag) - RFC 6840
   §5.12 says signatures by unknown keys are ignored, not fatal;
2. the time window with clock skew: a time-invalid RRSIG *is* counted as an attempt and a failure
   (BIND GL #5760), but no crypto is spent on it;
3. at most ``max_keys_per_tag`` candidate keys, each one attempt; an invalid public key is a
   failed attempt (BIND CVE-2025-8677).

Each attempt goes through ``Budget.charge_sig_check`` (per query) and a per-RRset counter, each
failure through ``Budget.note_sig_failure``; running out raises ``BudgetExhausted``, which the
validator turns into BOGUS. Every ``yield_every`` attempts we yield (``Budget.pause``) so that
cached answers are served in between (the "suspension" idea of Unbound and BIND).

Skew: a signature is accepted from ``inception - skew`` to ``expiration + skew`` where skew is
10 % of its validity period clamped to [60 s, 1 day] (Unbound takes 10 % clamped to [1 h, 1 d];
we take PowerDNS' 60 s floor so a freshly expired signature does not live on for an hour).
RRSIG times are compared as plain POSIX seconds: serial arithmetic (RFC 4034 §3.1.5) only matters
after 2106.

A secure result carries the capped TTL (min of RRset TTL, original TTL, RRSIG TTL and the time
left until expiration) and, for a wildcard expansion (RRSIG labels < owner labels), the
"next closer" name whose non-existence the caller must still prove with NSEC or NSEC3.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.dnssec
import dns.dnssecalgs
import dns.edns
import dns.exception
import dns.name
import dns.rdatatype
import dns.rrset
from cryptography.exceptions import InvalidSignature
from dns.dnssecalgs.base import GenericPublicKey
from dns.dnssectypes import Algorithm
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.RRSIG import RRSIG
from dns.rdtypes.dnskeybase import Flag

from resolver.validator.names import is_below, same_name
from resolver.validator.types import Budget, BudgetExhausted, Security, Verdict, bogus

log = logging.getLogger("resolver.validator")

# RFC 8624 §3.1 "MUST NOT validate" (dns.dnssec.rfc_8624_policy.deny_validate).
_DENIED_ALGORITHMS = frozenset({Algorithm.RSAMD5, Algorithm.DSA, Algorithm.DSANSEC3SHA1})

KeyIndex = dict[tuple[int, int], list[DNSKEY]]


def algorithm_supported(algorithm: int) -> bool:
    """True if we can and may validate signatures of this DNSKEY algorithm (RFC 8624)."""
    if algorithm in _DENIED_ALGORITHMS:
        return False
    try:
        dns.dnssecalgs.get_algorithm_cls(algorithm)
    except dns.exception.UnsupportedAlgorithm:
        return False
    return True


def usable_zone_key(key: DNSKEY) -> bool:
    """RFC 4034 §2.1: ZONE flag, protocol 3; revoked keys (RFC 5011) are never trusted.

    The SEP flag is deliberately ignored: RFC 4034 §2.1.1 says validators must not change their
    behaviour because of it.
    """
    return bool(key.flags & Flag.ZONE) and key.protocol == 3 and not key.flags & Flag.REVOKE


def index_keys(keys: Iterable[DNSKEY]) -> KeyIndex:
    """Group usable keys by (algorithm, key tag), keeping their order. Computed once per zone."""
    index: KeyIndex = {}
    for key in keys:
        if usable_zone_key(key):
            index.setdefault((int(key.algorithm), dns.dnssec.key_id(key)), []).append(key)
    return index


@dataclass(frozen=True, slots=True)
class SigResult:
    """Outcome of ``verify_rrset``."""

    verdict: Verdict
    ttl: int = 0  # capped TTL when secure
    next_closer: dns.name.Name | None = None  # wildcard expansion: must be proven absent
    wildcard_parent: dns.name.Name | None = None  # the closest encloser of that expansion


def owner_labels(name: dns.name.Name) -> int:
    """Label count as RRSIG.labels counts it: no root label, no leading '*'."""
    n = len(name) - 1
    return n - 1 if name.is_wild() else n


def skew_for(rrsig: RRSIG, fraction: float, low: int, high: int) -> int:
    """Allowed clock skew for one signature (see the module comment)."""
    period = max(0, int(rrsig.expiration) - int(rrsig.inception))
    return int(min(max(period * fraction, low), high))


def signed_data(rrset: dns.rrset.RRset, rrsig: RRSIG) -> bytes:
    """RFC 4034 §3.1.8.1 signature input, with the owner reduced to the wildcard if expanded.

    Written out (rather than calling dnspython's private helper) so that the wildcard owner is
    derived from the RRSIG labels we already checked.
    """
    head = struct.pack(
        "!HBBIIIH",
        rrsig.type_covered,
        rrsig.algorithm,
        rrsig.labels,
        rrsig.original_ttl,
        rrsig.expiration,
        rrsig.inception,
        rrsig.key_tag,
    )
    owner = rrset.name
    if rrsig.labels < owner_labels(owner):
        owner = dns.name.Name(("*", *owner.labels[-(rrsig.labels + 1):]))
    name = owner.to_digestable()
    fixed = struct.pack("!HHI", rrset.rdtype, rrset.rdclass, rrsig.original_ttl)
    parts = [head, rrsig.signer.to_digestable()]
    for rdata in sorted({rd.to_digestable() for rd in rrset}):
        parts += [name, fixed, struct.pack("!H", len(rdata)), rdata]
    return b"".join(parts)


_PublicKey = GenericPublicKey
# Public keys loaded from DNSKEY rdata, by (algorithm, key bytes): loading one (DER or point
# decoding in `cryptography`) costs about a sixth of an ECDSA P-256 verification, and the
# same few zone keys sign almost everything. An invalid key is remembered as None, so it
# fails again at the same price. Keyed on the key's own bytes, so a cached entry can never
# stand for another key; bounded, oldest first out.
_KEY_CACHE_MAX = 1024
_keys: dict[tuple[int, bytes], _PublicKey | None] = {}


def _public_key(key: DNSKEY) -> _PublicKey | None:
    ident = (int(key.algorithm), key.key)
    try:
        return _keys[ident]
    except KeyError:
        pass
    public: _PublicKey | None
    try:
        public = dns.dnssecalgs.get_algorithm_cls_from_dnskey(key).public_cls.from_dnskey(key)
    except (ValueError, TypeError, dns.exception.DNSException):
        public = None
    if len(_keys) >= _KEY_CACHE_MAX:
        del _keys[next(iter(_keys))]
    _keys[ident] = public
    return public


def crypto_verify(key: DNSKEY, signature: bytes, data: bytes) -> bool:
    """One public-key operation. Tests count calls to this function."""
    public = _public_key(key)
    if public is None:
        return False  # an invalid public key encoding: counted as a failed attempt
    try:
        public.verify(signature, data)
    except (InvalidSignature, ValueError, TypeError, dns.exception.DNSException):
        return False
    return True


# Why no RRSIG validated, most telling first: the first reason found in this order wins.
_REASON_ORDER = ("expired", "not-yet-valid", "crypto", "labels", "signer", "nokey", "algorithm")
_REASON_EDE = {
    "expired": dns.edns.EDECode.SIGNATURE_EXPIRED,
    "not-yet-valid": dns.edns.EDECode.SIGNATURE_NOT_YET_VALID,
    "crypto": dns.edns.EDECode.DNSSEC_BOGUS,
    "labels": dns.edns.EDECode.DNSSEC_BOGUS,
    "signer": dns.edns.EDECode.DNSSEC_BOGUS,
    "nokey": dns.edns.EDECode.DNSKEY_MISSING,
    "algorithm": dns.edns.EDECode.UNSUPPORTED_DNSKEY_ALGORITHM,
}


def _precheck(rrset: dns.rrset.RRset, rrsig: RRSIG, zone: dns.name.Name) -> tuple[str, str]:
    """Structural checks that cost nothing. Returns (kind, text) of the problem or ("", "")."""
    owner = rrset.name
    if rrsig.type_covered != rrset.rdtype or rrsig.rdclass != rrset.rdclass:
        return "signer", "RRSIG does not cover the RRset type"
    if not same_name(rrsig.signer, zone):
        return "signer", f"RRSIG signer {rrsig.signer} is not the zone {zone}"
    if not is_below(owner, rrsig.signer):
        return "signer", f"RRSIG signer {rrsig.signer} is not an ancestor of {owner}"
    if rrsig.labels > owner_labels(owner):
        return "labels", f"RRSIG labels {rrsig.labels} exceed the owner's"
    if rrsig.labels < len(rrsig.signer) - 1:
        return "labels", (
            f"RRSIG labels {rrsig.labels} below the signer {rrsig.signer}'s "
            f"{len(rrsig.signer) - 1} (wildcard bypass)"
        )
    if not algorithm_supported(rrsig.algorithm):
        return "algorithm", f"unsupported algorithm {rrsig.algorithm}"
    return "", ""


async def verify_rrset(
    rrset: dns.rrset.RRset,
    rrsigs: Sequence[RRSIG],
    zone: dns.name.Name,
    keys: KeyIndex,
    now: float,
    budget: Budget,
) -> SigResult:
    """Check the RRSIGs of one RRset against the trusted keys of ``zone``.

    Args:
        rrset: the data.
        rrsigs: its RRSIG rdatas (possibly empty).
        zone: the zone whose keys are in ``keys``; every RRSIG must be signed by it.
        keys: trusted keys of the zone, from ``index_keys``.
        now: POSIX time.
        budget: the query's budget.

    Returns:
        SECURE with the capped TTL, or BOGUS with the most telling reason and EDE.

    Raises:
        BudgetExhausted: a per-RRset or per-query limit ran out.
    """
    limits = budget.limits
    if not rrsigs:
        return SigResult(bogus(f"no RRSIG for {_where(rrset)}", dns.edns.EDECode.RRSIGS_MISSING))
    problems: dict[str, str] = {}
    checks = 0
    for rrsig in rrsigs:
        kind, text = _precheck(rrset, rrsig, zone)
        candidates = keys.get((int(rrsig.algorithm), int(rrsig.key_tag)), [])
        if not kind and not candidates:
            kind, text = "nokey", f"no trusted DNSKEY {rrsig.key_tag}/{rrsig.algorithm} in {zone}"
        if kind:
            problems.setdefault(kind, text)
            continue
        skew = skew_for(rrsig, limits.skew_fraction, limits.skew_min, limits.skew_max)
        time_problem = ""
        if now > rrsig.expiration + skew:
            time_problem = "expired"
        elif now < rrsig.inception - skew:
            time_problem = "not-yet-valid"
        data = b"" if time_problem else signed_data(rrset, rrsig)
        for key in candidates[: limits.max_keys_per_tag]:
            if checks >= limits.max_sig_checks_per_rrset:
                raise BudgetExhausted(
                    f"signature check limit per RRset ({limits.max_sig_checks_per_rrset}) "
                    f"reached for {_where(rrset)}"
                )
            checks += 1
            budget.charge_sig_check()
            if checks % limits.yield_every == 0:
                await budget.pause()
            if time_problem:
                problems.setdefault(time_problem, f"RRSIG {time_problem} for {_where(rrset)}")
                budget.note_sig_failure()
                break  # the other keys would fail the same way
            if crypto_verify(key, rrsig.signature, data):
                log.debug("validated %s/%s with key %d of %s", rrset.name, rrset.rdtype,
                          rrsig.key_tag, zone)
                return _secure(rrset, rrsig, now)
            problems.setdefault("crypto", f"signature verification failed for {_where(rrset)}")
            budget.note_sig_failure()
    for kind in _REASON_ORDER:
        if kind in problems:
            return SigResult(bogus(problems[kind], _REASON_EDE[kind]))
    return SigResult(bogus(f"no usable RRSIG for {_where(rrset)}"))  # pragma: no cover


def _where(rrset: dns.rrset.RRset) -> str:
    # Only for reasons: formatting a name costs more than a cheap check, so not up front.
    return f"{rrset.name}/{dns.rdatatype.to_text(rrset.rdtype)}"


def _secure(rrset: dns.rrset.RRset, rrsig: RRSIG, now: float) -> SigResult:
    ttl = max(0, min(rrset.ttl, rrsig.original_ttl, int(rrsig.expiration - now)))
    next_closer = parent = None
    if rrsig.labels < owner_labels(rrset.name):
        _, next_closer = rrset.name.split(rrsig.labels + 2)
        _, parent = rrset.name.split(rrsig.labels + 1)
    verdict = Verdict(Security.SECURE, valid_until=float(rrsig.expiration))
    return SigResult(verdict, ttl, next_closer, parent)



@dataclass(frozen=True, slots=True)
class ZoneKeys:
    """The validated DNSKEYs of one secure zone (from the chain of trust)."""

    zone: dns.name.Name
    keys: KeyIndex
    valid_until: float | None = None  # earliest RRSIG expiration along the chain
    ttl: int = 0  # how long the chain cache may keep this (capped TTL of DS and DNSKEY)
