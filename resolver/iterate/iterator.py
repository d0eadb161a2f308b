"""Iterative resolution from the root: the asyncio driver around resolver/iterate/core.py.

Theory of operation
-------------------
``Iterator.query(qname, qtype)`` has the contract of ``Forwarder.query``: it returns one
response to (qname, qtype) with DO=1 data (RRSIGs, NSEC/NSEC3) or raises ``UpstreamError``,
so resolve.py and the validator use it unchanged and validate its answers exactly as they
validate forwarded ones. Nothing the authoritative servers say is trusted before that.

1. **Start.** The deepest cached zone cut at or above qname (for a DS question: strictly
   above, so the parent side of the cut answers, RFC 4035 section 3.1.4.1), else the root.
   The root delegation comes from priming (". NS" to a hint, its answer and glue cached for
   the NS TTL); the hints are the IANA root servers or ``[upstream] root_hints``.
2. **Walk down** (``_iterate``). With QNAME minimisation (``iterate_core.plan``) the servers
   of each zone see one more label of qname, asked with QTYPE A, until a referral moves the
   walk one zone down or the full question is asked. A referral is charged to the client
   query's ``QueryBudget`` (``max_referrals``) and cached (cut -> NS names + glue, NS TTL);
   the DS RRset a signed parent sends with it is kept and answers a later DS question (the
   validator's), which it checks as if it had been fetched.
3. **Pick a server** (``_ask``). Candidates are the glue and resolved addresses of the zone's
   NS names, best first by smoothed RTT, parked (timed out) and lame ones last
   (``iterate_infra.ServerTable``). When no known address is left (or only parked/lame ones),
   the next NS name is resolved by a nested, unminimised walk (``max_ns_lookups`` per client
   query, ``max_iteration_depth`` nesting, never a name that is being resolved already:
   glueless cycles end there). An error, a timeout or a lame answer moves on to the next
   server; a second round retries the servers that timed out.
4. **One exchange** (``_exchange``, the sockets in ``iterate_net``). A fresh UDP socket
   (random source port), a random ID, RD=0, EDNS0 with DO=1 and payload 1232, and 0x20: the
   letters of the question name in random case. A reply counts only from the address and
   port asked, with our ID, QR=1 and the question echoed byte for byte (case included);
   everything else is ignored. A server that does not echo the case is asked again over TCP
   (where forging needs the TCP handshake) and not sent 0x20 again; TC=1 is asked again over
   TCP too. Every datagram sent is charged to the QueryBudget (``max_upstream_queries``, 64
   by default, shared with the validator's own fetches). The reply's question name gets the
   caller's case back, so the answer looks as if 0x20 never happened.
5. **CNAME/DNAME** chains that leave a server's zone are followed (up to
   ``max_cname_chain``) and merged into one response, as a recursive server's would be.

Identical questions in flight share one walk (coalescing), as in the forwarder. NS-name
lookups inside a walk are never coalesced, so glueless cycles cannot make a walk wait on
itself. Budget and limit exhaustion raise ``IterationLimitReached`` (an ``UpstreamError``):
the resolution core answers SERVFAIL with EDE 22, and caches that for ``failure_ttl``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
from dns.rdtypes.ANY.NS import NS

from resolver.cache import LruCache
from resolver.errors import UpstreamError
from resolver.iterate.core import (
    Answer,
    Failure,
    Negative,
    Outcome,
    Referral,
    Step,
    addresses_of,
    chain_next,
    classify,
    merge_chain,
    plan,
    randomise_case,
    referral_ds,
    referral_glue,
)
from resolver.iterate.hints import builtin_root, configured_root
from resolver.iterate.infra import Address, Delegation, DelegationCache, ServerTable
from resolver.iterate.net import CaseMismatch, IterStats, Unreachable, tcp_exchange, udp_exchange
from resolver.upstream.forward import EDNS_PAYLOAD, QueryBudget, current_budget
from resolver.validator.types import Limits

log = logging.getLogger(__name__)
trace = logging.getLogger("resolver.trace")

DNS_PORT: Final = 53
_ADDRESS_TYPES: Final = (dns.rdatatype.A, dns.rdatatype.AAAA)


class AddressAndPort(Protocol):
    """An address and port (config.py's listen/upstream endpoint type)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class IterationLimitReached(UpstreamError):
    """A per-client-query limit of iterative mode ran out (queries, referrals, NS lookups)."""


@dataclass(frozen=True, slots=True)
class _Walk:
    """Per client query: its budget, how deep NS-name lookups are nested, and which run."""

    budget: QueryBudget
    depth: int = 0
    resolving: frozenset[dns.name.Name] = frozenset()

    def nested(self, name: dns.name.Name) -> _Walk:
        return _Walk(self.budget, self.depth + 1, self.resolving | {name})


def _address(text: str, port: int) -> Address:
    return (str(ipaddress.ip_address(text)), port)


class Iterator:
    """Resolves from the root (see the module docstring); a drop-in for ``Forwarder``.

    Args:
        root_hints: root server addresses; empty: the built-in IANA root servers.
        limits: the per-client-query limits (``max_referrals``, ``max_ns_lookups``,
            ``max_ns_per_referral``, ``max_iteration_depth``, ``max_cname_chain``,
            ``max_fetches`` when no QueryBudget is set).
        timeout: the longest wait for one UDP reply (the RTO's ceiling).
        attempts: rounds over a zone's servers (the second retries those that timed out).
        tcp_timeout: for one TCP exchange.
        payload: our EDNS UDP payload size.
        port: the port of every server learnt from DNS (tests run servers elsewhere).
        allow_loopback: accept loopback addresses in glue and NS answers (tests only; in
            production a zone must not make us query ourselves).
        minimise: QNAME minimisation (RFC 9156, relaxed).
        use_0x20: random letter case in questions.
        rng: randomness for server tie-breaking and 0x20 (default: the OS's).
        clock: monotonic seconds, for cache expiry and RTTs.
    """

    def __init__(self, root_hints: Sequence[AddressAndPort] = (), *, limits: Limits | None = None,
                 timeout: float = 1.5, attempts: int = 2, tcp_timeout: float = 3.0,
                 payload: int = EDNS_PAYLOAD, port: int = DNS_PORT,
                 allow_loopback: bool = False, minimise: bool = True, use_0x20: bool = True,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits if limits is not None else Limits()
        self.hints = (configured_root(tuple(_address(h.host, h.port) for h in root_hints))
                      if root_hints else builtin_root())
        self.attempts, self.tcp_timeout, self.payload = attempts, tcp_timeout, payload
        self.port, self.allow_loopback = port, allow_loopback
        self.minimise, self.use_0x20 = minimise, use_0x20
        self.rng = rng if rng is not None else random.SystemRandom()
        self.clock = clock
        self.cache = DelegationCache(self.limits.cache_entries)
        self.servers = ServerTable(max_rto=timeout, max_entries=self.limits.cache_entries)
        self.stats = IterStats()
        self._no_0x20: LruCache[Address, bool] = LruCache(1000)
        self._referral_ds: LruCache[dns.name.Name, dns.message.Message] = LruCache(
            self.limits.cache_entries)
        self._inflight: dict[tuple[dns.name.Name, int], asyncio.Task[dns.message.Message]]
        self._inflight = {}
        self._priming: asyncio.Task[Delegation] | None = None

    # -- the Forwarder interface ----------------------------------------------------------

    async def query(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, *,
                    cd: bool = True, recheck: bool = False) -> dns.message.Message:
        """Resolve (qname, qtype) from the root; the response carries DNSSEC records.

        ``cd`` is accepted for the Forwarder contract; authoritative servers ignore it.
        ``recheck`` is the resolution core's second opinion before it believes a bogus verdict
        (resolve.py): the DS remembered from a referral is not used and no resolution in
        flight is joined, so the question is asked again with fresh IDs, ports and 0x20 case.
        Unlike the forwarder's re-check it does not force TCP, and the delegation cache stays.

        Raises:
            UpstreamError: no server gave an answer, or a limit ran out
                (``IterationLimitReached``).
        """
        key = (qname.canonicalize(), int(qtype))
        if qtype == dns.rdatatype.DS and not recheck:
            ds = self._referral_ds.get(key[0], self.clock())
            if ds is not None:  # came with a referral (validated all the same)
                return merge_chain(qname, qtype, [ds], self.payload)
        budget = current_budget.get()
        if budget is None:  # e.g. a CD=1 client's query: still bounded
            budget = QueryBudget(self.limits.max_fetches)
        if recheck:
            return await self._resolve(qname, qtype, _Walk(budget))
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._resolve(qname, qtype, _Walk(budget)))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        else:
            self.stats.coalesced += 1
        return await asyncio.shield(task)

    # -- chains and walks -----------------------------------------------------------------

    async def _resolve(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
                       walk: _Walk) -> dns.message.Message:
        parts: list[dns.message.Message] = []
        name, seen = qname, {qname}
        for _ in range(self.limits.max_cname_chain + 1):
            response = await self._iterate(name, qtype, walk)
            parts.append(response)
            end = chain_next(response, name, qtype, self.limits.max_cname_chain)
            if end.follow is None or end.follow in seen:
                break
            trace.debug("iterate: %s %s continues at %s", name, dns.rdatatype.to_text(qtype),
                        end.follow)
            seen.update(end.names)
            name = end.follow
        return merge_chain(qname, qtype, parts, self.payload)

    async def _iterate(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
                       walk: _Walk, *, minimise: bool = True) -> dns.message.Message:
        """Walk down to the servers of qname's zone; their answer or denial, scrubbed."""
        above = qtype == dns.rdatatype.DS and len(qname) > 1
        deleg = self.cache.closest(qname, self.clock(), above=above)
        if deleg is None:
            deleg = await self._root(walk)
        child, count, minimise = deleg.zone, 0, minimise and self.minimise
        while True:
            step = plan(child, qname, qtype, count, minimise=minimise)
            try:
                outcome, raw = await self._ask(deleg, step, walk)
            except _NoServer as e:
                if step.minimised and e.responded:
                    minimise = False  # relaxed mode: some servers fail on minimised names
                    continue
                raise UpstreamError(str(e)) from None
            if isinstance(outcome, Referral):
                deleg = self._follow(outcome, raw, walk)
                child = child if child.is_subdomain(outcome.cut) else outcome.cut
                continue
            if step.minimised:
                if isinstance(outcome, Negative) and outcome.nxdomain:
                    minimise = False  # relaxed: the full name may still exist (broken ENT)
                else:
                    child, count = step.name, count + 1  # no cut here: one label further
                continue
            assert isinstance(outcome, Answer | Negative)
            return outcome.response

    def _follow(self, referral: Referral, raw: dns.message.Message, walk: _Walk
                ) -> Delegation:
        walk.budget.referrals += 1
        self.stats.referrals += 1
        if walk.budget.referrals > self.limits.max_referrals:
            raise IterationLimitReached(
                f"more than {self.limits.max_referrals} referrals for one client query "
                f"(at {referral.cut})")
        if referral.dropped_ns:
            log.info("referral to %s lists %d NS names; using the first %d", referral.cut,
                     len(referral.ns) + referral.dropped_ns, len(referral.ns))
        deleg = Delegation(referral.cut, referral.ns, referral.glue)
        now = self.clock()
        self.cache.put(deleg, referral.ttl, now)
        ds = referral_ds(raw, referral.cut)
        if ds is not None:
            self._referral_ds.put(referral.cut.canonicalize(), ds[0], now + min(ds[1], 86400))
        return deleg

    async def _root(self, walk: _Walk) -> Delegation:
        cached = self.cache.get(dns.name.root, self.clock())
        if cached is not None:
            return cached
        if self._priming is None or self._priming.done():
            self._priming = asyncio.get_running_loop().create_task(self._prime(walk))
        return await asyncio.shield(self._priming)

    async def _prime(self, walk: _Walk) -> Delegation:
        """Ask a hint for the root NS RRset (RFC 8109); the hints themselves if none answers."""
        step = Step(dns.name.root, dns.rdatatype.NS, False)
        try:
            outcome, raw = await self._ask(self.hints, step, walk)
        except _NoServer as e:
            log.warning("priming failed, using the root hints as they are: %s", e)
            return self.hints
        ns_rrset = next((rr for rr in raw.answer if rr.name == dns.name.root
                         and rr.rdtype == dns.rdatatype.NS), None)
        if not isinstance(outcome, Answer) or ns_rrset is None:
            log.warning("priming: no root NS RRset in the answer; using the root hints")
            return self.hints
        names = tuple(dict.fromkeys(rd.target for rd in ns_rrset if isinstance(rd, NS)))
        names = names[: self.limits.max_ns_per_referral]
        glue = referral_glue(raw.additional, names, dns.name.root,
                             allow_loopback=self.allow_loopback)
        # Without addresses in the priming answer the hints stay usable: the root's own
        # names can only be resolved by asking the root.
        deleg = Delegation(dns.name.root, names, {**self.hints.glue, **glue},
                           () if glue else self.hints.hints)
        self.cache.put(deleg, ns_rrset.ttl, self.clock())
        self.stats.primed += 1
        log.info("primed the root: %d servers, %d with addresses", len(names), len(glue))
        return deleg

    # -- server selection -----------------------------------------------------------------

    async def _ask(self, deleg: Delegation, step: Step, walk: _Walk
                   ) -> tuple[Outcome, dns.message.Message]:
        """The first usable outcome from the zone's servers.

        Raises:
            _NoServer: every server failed (the reasons are in the message).
            IterationLimitReached: a limit ran out meanwhile.
        """
        problems: list[str] = []
        responded = False
        tried: set[Address] = set()
        attempted: set[dns.name.Name] = set()
        timed_out: list[Address] = []
        for round_ in range(self.attempts):
            if round_ > 0:
                if not timed_out:
                    break
                tried.difference_update(timed_out)
                timed_out = []
            while True:
                addr = await self._next_server(deleg, tried, attempted, walk,
                                               retry=round_ > 0)
                if addr is None:
                    break
                tried.add(addr)
                try:
                    raw = await self._exchange(addr, step.name, step.rdtype, walk)
                except Unreachable as e:
                    problems.append(str(e))
                    timed_out.append(addr)
                    continue
                outcome = classify(raw, step.name, step.rdtype, deleg.zone,
                                   max_ns=self.limits.max_ns_per_referral,
                                   allow_loopback=self.allow_loopback)
                trace.debug("iterate: %s %s @%s (%s): %s", step.name,
                            dns.rdatatype.to_text(step.rdtype), addr[0], deleg.zone,
                            _describe(outcome))
                responded = True
                if isinstance(outcome, Failure):
                    problems.append(f"{addr[0]}: {outcome.reason}")
                    if outcome.lame:
                        self.stats.lame += 1
                        self.servers.record_lame(deleg.zone, addr, self.clock())
                    continue
                return outcome, raw
        raise _NoServer(f"no server of {deleg.zone} answered {step.name} "
                        f"{dns.rdatatype.to_text(step.rdtype)}: "
                        + ("; ".join(problems[-4:]) or "no server address known"),
                        responded=responded)

    async def _next_server(self, deleg: Delegation, tried: set[Address],
                           attempted: set[dns.name.Name], walk: _Walk, *, retry: bool
                           ) -> Address | None:
        while True:
            now = self.clock()
            candidates = [a for a in self._known(deleg, now) if a not in tried]
            best = (self.servers.order(candidates, deleg.zone, now, self.rng)[0]
                    if candidates else None)
            healthy = best is not None and not self.servers.is_parked(best, now) \
                and not self.servers.is_lame(deleg.zone, best, now)
            if healthy or retry:
                return best
            name = self._unresolved(deleg, now, attempted, walk)
            if name is None:
                return best
            attempted.add(name)
            await self._resolve_ns(name, walk)

    def _known(self, deleg: Delegation, now: float) -> list[Address]:
        out = list(deleg.hints)
        for name in deleg.ns:
            addrs = deleg.glue.get(name) or self.cache.addresses(name, now) or ()
            out.extend((a, self.port) for a in addrs)
        return out

    def _unresolved(self, deleg: Delegation, now: float, attempted: set[dns.name.Name],
                    walk: _Walk) -> dns.name.Name | None:
        """The next NS name worth resolving, or None."""
        names = [n for n in deleg.ns if n not in attempted and n not in walk.resolving
                 and n not in deleg.glue and self.cache.addresses(n, now) is None
                 # an in-zone name without glue could only be asked of the zone itself
                 and not n.is_subdomain(deleg.zone)]
        return self.rng.choice(names) if names else None

    async def _resolve_ns(self, name: dns.name.Name, walk: _Walk) -> None:
        """Resolve an NS name to addresses (A, then AAAA if there is no A) and cache them."""
        if walk.depth >= self.limits.max_iteration_depth:
            trace.debug("iterate: not resolving %s: NS lookups nested %d deep", name,
                        walk.depth)
            return
        walk.budget.ns_lookups += 1
        self.stats.ns_lookups += 1
        if walk.budget.ns_lookups > self.limits.max_ns_lookups:
            raise IterationLimitReached(
                f"more than {self.limits.max_ns_lookups} NS names to resolve for one client "
                f"query (at {name})")
        inner = walk.nested(name)
        addrs: tuple[str, ...] = ()
        ttl = 0
        for rdtype in _ADDRESS_TYPES:
            try:
                # Not minimised: an NS name is published in referrals anyway, and asking it
                # in full costs the (perhaps NXNS victim) zone one query per name, not two.
                response = await self._iterate(name, rdtype, inner, minimise=False)
            except IterationLimitReached:
                raise
            except UpstreamError as e:
                trace.debug("iterate: NS name %s did not resolve: %s", name, e)
                break
            addrs, ttl = addresses_of(response.answer, name, allow_loopback=self.allow_loopback)
            if addrs or response.rcode() == dns.rcode.NXDOMAIN:
                break
        self.cache.put_addresses(name, addrs, ttl, self.clock())

    # -- one exchange ---------------------------------------------------------------------

    def _charge(self, walk: _Walk, name: dns.name.Name, rdtype: int) -> None:
        try:
            walk.budget.charge(name, dns.rdatatype.RdataType.make(rdtype))
        except UpstreamError as e:
            raise IterationLimitReached(str(e)) from None

    async def _exchange(self, addr: Address, name: dns.name.Name,
                        rdtype: dns.rdatatype.RdataType, walk: _Walk) -> dns.message.Message:
        """One question to one server: UDP with 0x20, TCP when needed.

        Raises:
            Unreachable: timeout or network error (recorded in the server table).
            IterationLimitReached: the client query's budget is spent.
        """
        self._charge(walk, name, rdtype)
        start = self.clock()
        case = self.use_0x20 and self._no_0x20.get(addr, start) is None
        sent = randomise_case(name, self.rng.getrandbits(64)) if case else name
        try:
            reply = await udp_exchange(addr, name, sent, rdtype, self.servers.rto(addr, start),
                                       self.payload, self.stats)
        except CaseMismatch:
            self.stats.case_mismatch += 1
            self._no_0x20.put(addr, True, start + 3600)
            log.info("%s does not echo the question's letter case; asking it over TCP", addr[0])
            reply = None
        except Unreachable:
            self.stats.timeouts += 1
            self.servers.record_timeout(addr, self.clock())
            raise
        if reply is not None:
            self.servers.record_rtt(addr, self.clock() - start, self.clock())
        if reply is None or reply.flags & dns.flags.TC:
            self._charge(walk, name, rdtype)
            reply = await tcp_exchange(addr, name, rdtype, self.tcp_timeout, self.payload,
                                       self.stats)
        return reply

class _NoServer(Exception):
    """No server of a zone gave a usable answer to one step."""

    def __init__(self, message: str, *, responded: bool) -> None:
        super().__init__(message)
        self.responded = responded  # some server answered, if only with an error


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, Referral):
        return (f"referral to {outcome.cut} ({len(outcome.ns)} NS, "
                f"{len(outcome.glue)} with glue)")
    if isinstance(outcome, Negative):
        return "NXDOMAIN" if outcome.nxdomain else "NODATA"
    if isinstance(outcome, Failure):
        return f"{'lame' if outcome.lame else 'failed'}: {outcome.reason}"
    return "answer"
