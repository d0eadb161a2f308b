"""Shared value types of the validator: statuses, verdicts, work limits and the per-query budget.

Theory of operation
-------------------
Every part of the validator (signatures, NSEC, NSEC3, the chain of trust) returns values, never
raises for a DNSSEC outcome. The one exception is ``BudgetExceeded``: a work limit that runs out
deep inside a loop unwinds to ``Validator.validate``, which turns it into a BOGUS verdict with the
reason and EDE carried by the exception. ``Budget`` is created once per client query (one call of
``Validator.validate``) and threaded through every step, so all limits of DESIGN.md are counted
in one place and tests can read the counters afterwards (``Work``).

These types live here rather than in response.py so that chain, sig, nsec, nsec3 and denial can
import them without an import cycle; response.py re-exports the ones its callers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import dns.edns
import dns.rdatatype

from resolver.errors import BudgetExceeded


class Security(enum.Enum):
    """Vocabulary taken from Unbound's sec_status."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    INDETERMINATE = "indeterminate"


# Worst-of order used when several parts of an answer are combined (Unbound: the weakest link).
_RANK = {Security.SECURE: 0, Security.INSECURE: 1, Security.INDETERMINATE: 2, Security.BOGUS: 3}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The security status of one RRset or one whole answer, with why."""

    security: Security
    reason: str = ""
    ede: int | None = None  # a dns.edns.EDECode value for SERVFAIL answers
    valid_until: float | None = None  # earliest RRSIG expiration used (POSIX seconds)


SECURE = Verdict(Security.SECURE)


def type_text(rdtype: int) -> str:
    """Mnemonic of an RR type number, for reasons and logs."""
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))


def bogus(reason: str, ede: int = dns.edns.EDECode.DNSSEC_BOGUS) -> Verdict:
    """A BOGUS verdict; the EDE defaults to the generic "DNSSEC Bogus"."""
    return Verdict(Security.BOGUS, reason, int(ede))


def insecure(reason: str, ede: int | None = None) -> Verdict:
    """An INSECURE verdict (provably unsigned, or deliberately not validated)."""
    return Verdict(Security.INSECURE, reason, None if ede is None else int(ede))


def worst(a: Verdict, b: Verdict) -> Verdict:
    """Combine two verdicts: the weaker status wins, and the earlier expiry is kept.

    On equal status the one carrying an EDE wins: an INSECURE that is INSECURE only because of
    NSEC3 iterations (EDE 27) must not be hidden behind a plain insecure link, since policy
    fails closed on it (RFC 9276: such a denial is not an authenticated absence).
    """
    if _RANK[b.security] > _RANK[a.security]:
        chosen = b
    elif _RANK[b.security] < _RANK[a.security]:
        chosen = a
    else:
        chosen = b if a.ede is None and b.ede is not None else a
    until = [v for v in (a.valid_until, b.valid_until) if v is not None]
    return Verdict(chosen.security, chosen.reason, chosen.ede, min(until) if until else None)


@dataclass(frozen=True, slots=True)
class Limits:
    """Every work limit of DESIGN.md ("Limits that keep the resolver alive under attack").

    [limits] in the configuration sets most of them (config.LIMIT_KEYS), [cache] two more.
    """

    max_keys_per_tag: int = 2  # DNSKEYs tried per (key tag, algorithm) of one RRSIG
    max_sig_checks_per_rrset: int = 4
    max_sig_checks_per_query: int = 32
    max_sig_failures_per_query: int = 2
    max_ds: int = 8  # DS records considered per zone
    max_ds_mismatches: int = 4  # digest computations that do not match (HashTrap)
    max_nsec3_records: int = 8  # NSEC3 RRs per response
    max_nsec3_iterations: int = 50  # above: INSECURE with EDE 27 (RFC 9276)
    max_nsec3_salt: int = 64  # bytes; above: treated like too many iterations
    max_nsec3_hashes: int = 150  # hash computations per client query
    max_cname_chain: int = 12
    max_fetches: int = 64  # upstream queries per client query
    bogus_ttl: int = 60  # seconds a bogus key/DS result is remembered
    yield_every: int = 4  # signature checks between yields to the event loop
    max_validating: int = 4  # validations doing CPU work at once (see CpuTurn)
    # Clock skew: 10% of the signature validity period, clamped to [min, max] (Unbound-like;
    # Unbound's minimum is 3600 s, we take PowerDNS' 60 s so an expired test signature is not
    # accepted for an hour).
    skew_fraction: float = 0.1
    skew_min: int = 60
    skew_max: int = 86400
    cache_entries: int = 10000  # DS/DNSKEY cache entries kept by one Validator
    max_chain_ttl: int = 86400  # longest time a DS/DNSKEY result is cached
    # Iterative mode (resolver/iterate/iterator.py), per client query, all its fetches together; the
    # queries it sends count against max_fetches (QueryBudget). Against NXNSAttack and
    # referral loops: PowerDNS takes 13 NS names per delegation and resolves at most 10.
    max_referrals: int = 32  # referrals followed
    max_ns_lookups: int = 10  # NS names without usable glue resolved to addresses
    max_ns_per_referral: int = 13  # NS names taken from one referral (the root has 13)
    max_iteration_depth: int = 4  # NS-name resolutions nested inside one another


class CpuTurn:
    """One validation's turn at the CPU, shared with at most ``max_validating - 1`` others.

    Why: validation is CPU work on the event loop. With hundreds of cold queries in flight
    (a burst of new peers), every one of them sits in asyncio's ready queue, and a datagram for
    a cached answer waits until all of them have run their next slice. Measured: p99 of cached
    answers 17 ms, max 290 ms during a 200-peer burst. So, as Unbound limits validations at once
    (MAX_VALIDATE_AT_ONCE), a validation holds a turn while it computes, gives it back while it
    waits for the network (``released``), and between slices (``pause``); the others wait
    parked, out of the ready queue. The turn is re-taken in FIFO order.
    """

    __slots__ = ("_held", "_sem")

    def __init__(self, sem: asyncio.Semaphore) -> None:
        self._sem = sem
        self._held = False

    async def acquire(self) -> None:
        """Take the turn (waits behind the validations that asked first)."""
        await self._sem.acquire()
        self._held = True

    def release(self) -> None:
        """Give the turn back; harmless if not held (e.g. cancelled while re-acquiring)."""
        if self._held:
            self._held = False
            self._sem.release()

    async def pause(self) -> None:
        """Let the event loop and the waiting validations run, then continue."""
        self.release()
        await asyncio.sleep(0)
        await self.acquire()

    @contextlib.asynccontextmanager
    async def released(self) -> AsyncIterator[None]:
        """Without the turn for the block (an upstream fetch): others compute meanwhile."""
        self.release()
        try:
            yield
        finally:
            await self.acquire()


@dataclass(slots=True)
class Work:
    """Counters of the work done for one client query (exposed for tests and logs)."""

    sig_checks: int = 0  # every attempt: crypto, invalid key, time-invalid RRSIG
    sig_failures: int = 0
    nsec3_hashes: int = 0
    fetches: int = 0
    ds_digests: int = 0
    ds_mismatches: int = 0


@dataclass(slots=True)
class Budget:
    """The per-query budget. ``charge_*`` raise ``BudgetExhausted`` when a limit is passed."""

    limits: Limits
    work: Work = field(default_factory=Work)
    nsec3_memo: dict[tuple[bytes, bytes, int], bytes] = field(default_factory=dict)
    turn: CpuTurn | None = None  # None: no sharing (unit tests calling parts directly)

    async def pause(self) -> None:
        """Yield to the event loop between slices of CPU work."""
        if self.turn is not None:
            await self.turn.pause()
        else:
            await asyncio.sleep(0)

    def released(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The CPU turn given back around a wait for the network."""
        if self.turn is not None:
            return self.turn.released()
        return contextlib.nullcontext()

    def charge_sig_check(self) -> None:
        """Count one signature-check attempt before doing it."""
        if self.work.sig_checks >= self.limits.max_sig_checks_per_query:
            raise BudgetExhausted(
                f"signature check budget exhausted ({self.limits.max_sig_checks_per_query} "
                "per query)"
            )
        self.work.sig_checks += 1

    def note_sig_failure(self) -> None:
        """Count one failed attempt; more than the allowed failures ends the query."""
        self.work.sig_failures += 1
        if self.work.sig_failures > self.limits.max_sig_failures_per_query:
            raise BudgetExhausted(
                f"signature failure budget exhausted ({self.limits.max_sig_failures_per_query} "
                "failures per query)"
            )

    def charge_nsec3_hash(self) -> None:
        """Count one NSEC3 hash computation (memoized ones are free)."""
        if self.work.nsec3_hashes >= self.limits.max_nsec3_hashes:
            raise BudgetExhausted(
                f"NSEC3 hash budget exhausted ({self.limits.max_nsec3_hashes} per query)"
            )
        self.work.nsec3_hashes += 1

    def charge_fetch(self) -> None:
        """Count one upstream query made by the validator."""
        if self.work.fetches >= self.limits.max_fetches:
            raise BudgetExhausted(f"upstream query budget exhausted ({self.limits.max_fetches})")
        self.work.fetches += 1

    def charge_ds_mismatch(self) -> None:
        """Count a DS digest that matched no key (HashTrap)."""
        self.work.ds_mismatches += 1
        if self.work.ds_mismatches > self.limits.max_ds_mismatches:
            raise BudgetExhausted(
                f"DS digest mismatch budget exhausted ({self.limits.max_ds_mismatches})"
            )


class BudgetExhausted(BudgetExceeded):
    """A work limit ran out; carries the BOGUS verdict the query ends with."""

    def __init__(self, reason: str, ede: int = dns.edns.EDECode.DNSSEC_BOGUS) -> None:
        super().__init__(reason)
        self.verdict = bogus(reason, ede)


@dataclass(frozen=True, slots=True)
class Denial:
    """Outcome of an NSEC or NSEC3 proof.

    ``verdict`` is SECURE when the denial is proven, INSECURE when it holds only through an
    Opt-Out span or unsupported NSEC3 parameters, BOGUS when the proof is missing or wrong.
    ``cut`` is set by DS proofs when the name is a delegation without DS (an insecure child).
    """

    verdict: Verdict
    cut: bool = False
