"""The resolution core: cache -> upstream -> validator -> answer, and the plain query handler.

Theory of operation:

* `Resolution.resolve(qname, qtype, now)` is the one way the resolver learns anything. It
  returns a `ValidatedAnswer` from the answer cache (TTL aged), or joins an identical
  resolution already in flight, or starts one: fetch the question upstream (DO=1, CD=1), hand
  the response to the validator, log one line if the final verdict is a failure, and cache the
  result (positive: its TTL; negative: the RFC 2308 TTL from the SOA; bogus: `bogus_ttl`;
  indeterminate, i.e. an upstream failure, also of the question itself: `failure_ttl`, 5 s,
  as RFC 9520 asks). Rule: nothing but a verdict ever enters the answer cache.
* A BOGUS verdict is not believed at once (issue 10 item 9): one reply forged with the right
  port and ID, for the question or for a DNSKEY/DS the validator fetched, would otherwise
  take the name down for `bogus_ttl`. Before caching it, the resolution asks again, once:
  the raw responses it used are dropped, the validator forgets its cached bogus chain steps,
  and every fetch of the second pass goes to the upstream over TCP (next server first,
  Forwarder `recheck`), charged to the same query budget. Only a second BOGUS is cached as
  bogus; a second opinion that validates is served and cached instead (and logged).
* A positive answer to an RRSIG question is data, not validated (a signature has no signature
  of its own; Unbound does the same): served without AD, never used for any decision here.
  Negative answers to RRSIG questions are validated as any other.
* Each resolution runs with a fresh `QueryBudget` in a context variable, so the validator's own
  fetches (DNSKEY, DS, proofs, CNAME targets) count against the same per-client-query limit.
  Those fetches go through `Resolution.fetch`, which caches raw responses briefly: the validator
  re-checks them on every use, so this trusts nothing.
* `PlainHandler` is the QueryHandler the server calls: it maps a client's query onto
  `resolve()` (or, for CD=1 clients, onto an unvalidated fetch whose data goes to that client
  only and is never cached or acted on) and builds the reply with resolver.answer.

Any exception leaving `resolve` other than a cancellation is a bug: upstream failures become
INDETERMINATE verdicts with an EDE code, as the validator's failures are verdicts too.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rrset

from resolver import answer as replies
from resolver.cache import LruCache
from resolver.config import CacheConfig
from resolver.errors import UpstreamError
from resolver.logs.event import log_event
from resolver.upstream.forward import QueryBudget, current_budget
from resolver.validator.response import Security, ValidatedAnswer, Verdict

log = logging.getLogger(__name__)
trace = logging.getLogger("resolver.trace")

Fetch = Callable[[dns.name.Name, dns.rdatatype.RdataType], Awaitable[dns.message.Message]]
AnswerKey = tuple[bytes, int]  # (lowercased wire name, type): see answer_key
RAW_MAX_TTL: Final = 300  # raw responses for the validator: short, they are only a speed-up
_resolution_now: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "resolution_now", default=None)
# The raw keys a resolution used (so a bogus verdict's inputs can be dropped before the
# re-check), and whether its fetches are that re-check.
_resolution_used: contextvars.ContextVar[set[AnswerKey] | None] = contextvars.ContextVar(
    "resolution_used", default=None)
_rechecking: contextvars.ContextVar[bool] = contextvars.ContextVar("rechecking", default=False)


class Validating(Protocol):
    """What the core needs from resolver.validator.response.Validator."""

    async def validate(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
                       response: dns.message.Message, now: float) -> ValidatedAnswer: ...

    def forget_bogus(self) -> None:
        """Drop cached bogus results of its own (before a re-check with fresh data)."""


class Upstream(Protocol):
    """Where responses come from: upstream.Forwarder or iterate.Iterator (same contract).

    ``recheck=True`` asks for a second opinion that a forged reply cannot have answered (the
    forwarder: over TCP, next server first), before a bogus verdict is believed.
    """

    async def query(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, *,
                    cd: bool = True, recheck: bool = False) -> dns.message.Message: ...


class QueryHandler(Protocol):
    """Called by the server for every well-formed query (one question, opcode QUERY)."""

    async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message: ...


class Resolver(Protocol):
    """`Resolution` as its users see it (capture.py, the pinned endpoints); tests script it."""

    async def resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float,
                      *, fresh: bool = False) -> ValidatedAnswer: ...


def answer_key(qname: dns.name.Name, qtype: int) -> AnswerKey:
    """The cache and coalescing key of a question: the name's wire form lowercased.

    Not the canonicalized Name: building one validates every label, and hashing a Name
    (case-insensitive) runs a Python loop over every character, on every dict lookup.
    """
    wire = qname.to_wire()
    assert wire is not None  # bytes when no file is given; qnames are absolute
    return wire.lower(), int(qtype)


def _failed(security: Security, reason: str, ede: int) -> ValidatedAnswer:
    return ValidatedAnswer(verdict=Verdict(security, reason, ede), rcode=dns.rcode.SERVFAIL,
                           answer=[], authority=[], ttl=0)


def negative_ttl(authority: list[dns.rrset.RRset]) -> int | None:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM) of the SOA in a negative answer."""
    for rrset in authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
            soa = rrset[0]
            assert isinstance(soa, dns.rdtypes.ANY.SOA.SOA)
            return min(rrset.ttl, soa.minimum)
    return None


def signatures_as_data(qname: dns.name.Name, response: dns.message.Message
                       ) -> ValidatedAnswer | None:
    """The answer to an RRSIG question when the upstream has signatures at qname, else None.

    Unbound's rule (validator.c, needs_validation: "cannot validate RRSIG, no sigs on sigs"):
    a positive RRSIG answer is passed on unchecked, without AD. We call it INSECURE (no AD, no
    EDE) and keep only the RRSIG RRsets owned by qname.
    """
    if response.rcode() != dns.rcode.NOERROR:
        return None
    sigs = [r for r in response.answer if r.rdtype == dns.rdatatype.RRSIG and r.name == qname]
    if not sigs:
        return None
    verdict = Verdict(Security.INSECURE, "RRSIG records served as data, not validated")
    return ValidatedAnswer(verdict=verdict, rcode=dns.rcode.NOERROR, answer=sigs, authority=[],
                           ttl=min(r.ttl for r in sigs))


def _log_failure(qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
                 ans: ValidatedAnswer) -> None:
    """The one operator-facing line for an answer that failed validation."""
    v = ans.verdict
    log_event(log, logging.WARNING, "validation-failed", name=qname,
              type=dns.rdatatype.to_text(qtype), security=v.security.value, reason=v.reason,
              ede=v.ede)


def _response_ttl(response: dns.message.Message) -> int:
    ttls = [r.ttl for section in (response.answer, response.authority) for r in section]
    return min([RAW_MAX_TTL, *ttls]) if ttls else 0


class Resolution:
    """One per resolver process: caches and in-flight resolutions shared by all clients.

    Args:
        forwarder: the upstream client (forwarder or iterator).
        make_validator: builds the validator given our fetch function (the validator's
            lookups must go through `fetch` for caching and budgeting).
        cache: sizes and TTL bounds.
        max_upstream_queries: per client query.
    """

    def __init__(self, forwarder: Upstream, make_validator: Callable[[Fetch], Validating], *,
                 cache: CacheConfig | None = None, max_upstream_queries: int = 64) -> None:
        self.forwarder = forwarder
        cache = cache if cache is not None else CacheConfig()
        self.config = cache
        self.max_upstream_queries = max_upstream_queries
        self.validator = make_validator(self.fetch)
        self.answers: LruCache[AnswerKey, tuple[float, ValidatedAnswer]] = LruCache(
            cache.max_entries)
        self.raw: LruCache[AnswerKey, dns.message.Message] = LruCache(cache.max_entries)
        self._inflight: dict[AnswerKey, asyncio.Task[ValidatedAnswer]] = {}
        self.validations = 0  # how many times the validator ran (tests, stats)
        self.rechecks = 0  # bogus verdicts asked again (tests, stats)
        self.refuted = 0  # ... of which the second opinion was not bogus
        # Called with every verdict kept (upstream/select.py: a bogus answer while forwarding
        # makes the forwarder a suspect, to be probed again).
        self.on_verdict: list[Callable[[Verdict], None]] = []

    def flush_failures(self) -> int:
        """Forget what a bad upstream may have caused; call it when the upstream changes.

        Bogus and failed (indeterminate) answers go, so do the validator's bogus DS/DNSKEY
        steps, and every raw response (a stripping forwarder's are raw responses too; the
        rest are cheap to fetch again). Secure and insecure answers stay: they were proven,
        whoever carried them. Returns how many answers were dropped.
        """
        dropped = self.answers.discard_if(
            lambda entry: entry[1].verdict.security in (Security.BOGUS, Security.INDETERMINATE))
        self.raw.clear()
        self.validator.forget_bogus()
        return dropped

    def cached(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float
               ) -> bool:
        """Whether `resolve` would answer (qname, qtype) from the answer cache right now (no
        upstream, no waiting: capture.py lets such lookups past its turns)."""
        return self.answers.get(answer_key(qname, qtype), now) is not None

    async def resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float,
                      *, fresh: bool = False) -> ValidatedAnswer:
        """The validated answer for (qname, qtype), TTL aged to now.

        Args:
            fresh: skip the answer and raw caches (autosp refresh): ask upstream again,
                validate, and replace the cached entry. Still coalesced.

        Never raises except for cancellation: failures are verdicts.
        """
        key = answer_key(qname, qtype)
        if fresh:
            self.raw.pop(key)
        cached = None if fresh else self.answers.get(key, now)
        if cached is not None:
            expires_at, ans = cached
            if trace.isEnabledFor(logging.DEBUG):
                trace.debug("%s %s: answer cache hit (%s)", qname,
                            dns.rdatatype.to_text(qtype), ans.verdict.security.value)
            return dataclasses.replace(ans, ttl=max(0, int(expires_at - now)))
        task = self._inflight.get(key)
        if task is None:
            # A fresh context: the budget belongs to this resolution, not to whichever client
            # query happened to start it.
            task = asyncio.get_running_loop().create_task(self._resolve(qname, qtype, now),
                                                          context=contextvars.Context())
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float
                       ) -> ValidatedAnswer:
        current_budget.set(QueryBudget(self.max_upstream_queries))
        _resolution_now.set(now)
        _resolution_used.set(set())
        ans = await self._attempt(qname, qtype, now)
        if ans.verdict.security is Security.BOGUS:
            ans = await self._recheck(qname, qtype, now, ans)
        return self._remember(qname, qtype, now, ans)

    async def _attempt(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float
                       ) -> ValidatedAnswer:
        """Fetch and validate once; upstream failures become INDETERMINATE verdicts."""
        try:
            response = await self.fetch(qname, qtype)
        except UpstreamError as e:
            log_event(log, logging.WARNING, "upstream-failed", name=qname,
                      type=dns.rdatatype.to_text(qtype), reason=str(e))
            return _failed(Security.INDETERMINATE, str(e),
                           dns.edns.EDECode.NO_REACHABLE_AUTHORITY)
        # Guarded: formatting names and types for a line nobody reads is a cost per lookup.
        debug = trace.isEnabledFor(logging.DEBUG)
        name = f"{qname} {dns.rdatatype.to_text(qtype)}" if debug else ""
        if debug:
            trace.debug("%s: upstream rcode %s, %d answer / %d authority RRsets", name,
                        dns.rcode.to_text(response.rcode()), len(response.answer),
                        len(response.authority))
        if qtype == dns.rdatatype.RRSIG:
            sigs = signatures_as_data(qname, response)
            if sigs is not None:
                return sigs
        self.validations += 1
        ans = await self.validator.validate(qname, qtype, response, now)
        if debug:
            trace.debug("%s: %s %s", name, ans.verdict.security.value, ans.verdict.reason)
        if ans.verdict.security is Security.INDETERMINATE:  # BOGUS: logged once re-checked
            _log_failure(qname, qtype, ans)
        return ans

    async def _recheck(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float,
                       first: ValidatedAnswer) -> ValidatedAnswer:
        """A second opinion before a bogus verdict is believed (see the module comment)."""
        used = _resolution_used.get() or set()
        for key in used:
            self.raw.pop(key)
        self.validator.forget_bogus()
        self.rechecks += 1
        token = _rechecking.set(True)
        try:
            second = await self._attempt(qname, qtype, now)
        finally:
            _rechecking.reset(token)
        name = f"{qname} {dns.rdatatype.to_text(qtype)}"
        if second.verdict.security is Security.BOGUS:
            trace.debug("%s: bogus confirmed over TCP", name)
            _log_failure(qname, qtype, second)
        else:
            self.refuted += 1
            # A forged or damaged reply: the second opinion (over TCP) disagrees.
            log_event(log, logging.WARNING, "bogus-not-confirmed", name=qname,
                      type=dns.rdatatype.to_text(qtype), first=first.verdict.reason,
                      second=second.verdict.security.value)
        return second

    def _remember(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, now: float,
                  ans: ValidatedAnswer) -> ValidatedAnswer:
        """Cache a verdict for as long as it holds; returns it with its TTL as served."""
        verdict = ans.verdict
        for hook in self.on_verdict:
            hook(verdict)
        if verdict.security is Security.BOGUS:
            # One "validation failed" line was logged (name, type, reason); the cache below
            # keeps it from being repeated for every client for bogus_ttl.
            ttl = self.config.bogus_ttl
        elif verdict.security is Security.INDETERMINATE:
            # An upstream failure (of the question, or inside validation: a DNSKEY or DS fetch
            # timed out) is not evidence against the data: remembered briefly, as RFC 9520
            # asks, so a dead upstream is not asked again for every retry of every client, and
            # recovery shows quickly.
            ttl = self.config.failure_ttl
        else:
            ttl = min(ans.ttl, self.config.max_ttl)
            if ans.rcode == dns.rcode.NXDOMAIN or not ans.answer:
                neg = negative_ttl(ans.authority)
                # No SOA: nothing tells us how long the denial holds; don't keep it.
                ttl = 0 if neg is None else min(ttl, neg, self.config.negative_max_ttl)
            ans = dataclasses.replace(ans, ttl=ttl)
        if ttl > 0:
            key = answer_key(qname, qtype)
            self.answers.put(key, (now + ttl, ans), now + ttl)
        return ans

    async def fetch(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
                    ) -> dns.message.Message:
        """One upstream question with DO=1 CD=1 (the validator's Fetch); raw responses cached.

        Raises:
            UpstreamError: no upstream answered, or the query budget is spent.
        """
        # Fetch takes no `now` (contract), so the resolution that runs us leaves its `now`
        # in a context variable; outside a resolution nothing is cached.
        now = _resolution_now.get()
        key = answer_key(qname, qtype)
        used = _resolution_used.get()
        if used is not None:
            used.add(key)
        recheck = _rechecking.get()
        if now is not None and not recheck:
            cached = self.raw.get(key, now)
            if cached is not None:
                return cached
        response = await self.forwarder.query(qname, qtype, cd=True, recheck=recheck)
        ttl = _response_ttl(response)
        if now is not None and ttl > 0 and response.rcode() in (dns.rcode.NOERROR,
                                                                dns.rcode.NXDOMAIN):
            self.raw.put(key, response, now + ttl)
        return response

    async def fetch_unvalidated(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
                                ) -> dns.message.Message:
        """For CD=1 clients only: the upstream's response, never cached here, never validated.

        Raises:
            UpstreamError: no upstream answered.
        """
        return await self.forwarder.query(qname, qtype, cd=True)


class PlainHandler:
    """The QueryHandler of a validating resolver without IPsec: resolve, then reply.

    Args:
        resolution: the shared core.
        max_ttl: cap on every TTL we hand out.
        payload: our EDNS UDP payload size.
    """

    def __init__(self, resolution: Resolution, *, max_ttl: int = 86400, payload: int = 1232
                 ) -> None:
        self.resolution = resolution
        self.max_ttl = max_ttl
        self.payload = payload

    async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message:
        """Answer one query (already checked: opcode QUERY, one question)."""
        q = query.question[0]
        qtype = dns.rdatatype.RdataType(q.rdtype)
        if q.rdclass != dns.rdataclass.IN:
            return replies.error_reply(query, dns.rcode.REFUSED, self.payload)
        # Meta-types, qtype 0 and ANY never get here: the server answers them itself
        # (answer.local_reply), before any handler.
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("query %s %s id %d flags %s", q.name, dns.rdatatype.to_text(qtype),
                        query.id, dns.flags.to_text(query.flags))
        if query.flags & dns.flags.CD:
            try:
                upstream = await self.resolution.fetch_unvalidated(q.name, qtype)
            except UpstreamError as e:
                verdict = Verdict(Security.INDETERMINATE, str(e),
                                  dns.edns.EDECode.NO_REACHABLE_AUTHORITY)
                return replies.servfail(query, verdict, self.payload)
            return replies.unvalidated_reply(query, upstream, max_ttl=self.max_ttl,
                                             payload=self.payload)
        ans = await self.resolution.resolve(q.name, qtype, now)
        return replies.build_reply(query, ans, max_ttl=self.max_ttl, payload=self.payload)
