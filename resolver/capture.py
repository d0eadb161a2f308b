"""The capturing QueryHandler: an A/AAAA answer only after the tunnel to it is up.

Theory of operation (DESIGN.md steps 3, 6, 7 and 8 for address queries; everything else goes
to the plain handler unchanged):

  1. The address RRset and the IPSECKEY RRset of the query name are resolved in parallel
     (`Resolution.resolve`, cached and coalesced, so the IPSECKEY costs no extra latency).
  2. CNAMEs: the key that counts is the IPSECKEY of the *final* name, the owner of the
     addresses. The address and the key then come from the same owner and are vouched for by
     the same signer; an alias's zone cannot bind a key to an address it does not hold. The
     parallel IPSECKEY query of the alias follows the same chain upstream, so its answer already
     holds the final name's IPSECKEY; only if the two chains end at different names (a chain
     changed between the lookups) is the final name's IPSECKEY looked up once more.
  3. `policy.decide` (groups, decision table). Groups that ignore keys (clear, block) and failed
     address lookups do not wait for the IPSECKEY at all.
  4. A `Tunnel` decision goes to the `Provisioner`, one `ensure` per destination address, in
     parallel; a failure becomes what `policy.after_setup_failure` says. In fail-closed groups an
     answer with several addresses keeps only the addresses whose tunnel is up.
  5. The reply's TTL is min(address TTL (already capped by signature validity), IPSECKEY TTL,
     max_ttl, lease left), so clients ask again (and extend the lease) before it ends.
     SERVFAILs carry an Extended DNS Error saying what failed.

Queries with CD=1 are still decided on validated data: a client's wish to validate for itself
cannot switch off our policy (the plain handler would hand it unvalidated addresses).
Any exception other than cancellation leaving `handle` is a bug.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

from resolver import answer as replies
from resolver.errors import ProvisioningError, TunnelRejected
from resolver.logs.event import log_event
from resolver.policy import (
    AnswerClear,
    Decision,
    KeyEvidence,
    Policy,
    Refuse,
    Tunnel,
    classify,
    key_evidence,
)
from resolver.provision import Provisioner
from resolver.resolve import QueryHandler, Resolver
from resolver.rrsets import (
    ADDRESS_TYPES,
    Address,
    addresses_of,
    chain_end,
    gateway_addresses,
    only_addresses,
)
from resolver.tunnels.intents import TunnelSpec, tunnel_spec
from resolver.validator.response import Security, ValidatedAnswer, Verdict

log = logging.getLogger(__name__)

# A/AAAA lookups of names not seen lately (no address in the cache) resolving (address +
# IPSECKEY, validated) at once; the rest wait their turn, parked. Why: a burst of new peers
# (200 at once) started 400 resolutions in the same turns of the event loop; measured, eight
# turns in a row of 20-37 ms of CPU each (657-911 callbacks), and every cached answer waited
# for them. In turns, each carries a few lookups' work, cached answers are sent between
# them, and the first peers resolved go to charon first (the setups then overlap the later
# lookups instead of all starting at the end).
LOOKUPS_AT_ONCE: Final = 8


@dataclass(slots=True)
class CaptureCounters:
    """What happened to captured queries (for status and tests)."""

    queries: int = 0
    tunnelled: int = 0
    clear: int = 0
    refused: int = 0


class CaptureHandler:
    """QueryHandler for A/AAAA that provisions before it answers; wraps the plain handler."""

    def __init__(self, plain: QueryHandler, resolution: Resolver, policy: Policy,
                 provisioner: Provisioner, *, payload: int = 1232) -> None:
        self.plain = plain
        self.resolution = resolution
        self.policy = policy
        self.provisioner = provisioner
        self.payload = payload
        self.counters = CaptureCounters()
        self._turns = asyncio.Semaphore(LOOKUPS_AT_ONCE)

    async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message:
        """Answer one query (already checked by the server: opcode QUERY, one question)."""
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN or q.rdtype not in ADDRESS_TYPES:
            return await self.plain.handle(query, now)
        self.counters.queries += 1
        if self._known(q.name, q.rdtype, now):  # not a newcomer: no turn needed
            addr, decision, evidence = await self._lookup(q.name, q.rdtype, now)
        else:
            async with self._turns:  # the lookup's turn; provisioning (long waits) is outside
                addr, decision, evidence = await self._lookup(q.name, q.rdtype, now)
        return await self._act(query, addr, decision, evidence, now)

    def _known(self, name: dns.name.Name, rdtype: int, now: float) -> bool:
        """A name whose address answer is in the resolution's cache is no newcomer: at most
        its IPSECKEY is fetched again, and that must not queue behind a burst of new peers.
        Measured: an unrelated name's cached reply expires with its IPSECKEY's negative TTL,
        and its next lookup waited 0.3-0.75 s for a turn behind 200 new peers."""
        cached = getattr(self.resolution, "cached", None)
        return cached is not None and bool(cached(name, dns.rdatatype.RdataType(rdtype), now))

    async def _lookup(self, name: dns.name.Name, rdtype: int, now: float
                      ) -> tuple[ValidatedAnswer, Decision, KeyEvidence | None]:
        """The address and the IPSECKEY of `name` (in parallel), and the policy's decision."""
        q_name = name
        qtype = dns.rdatatype.RdataType(rdtype)
        addr_task = asyncio.create_task(self.resolution.resolve(q_name, qtype, now))
        key_task = asyncio.create_task(
            self.resolution.resolve(q_name, dns.rdatatype.IPSECKEY, now))
        try:
            addr = await addr_task
        except BaseException:
            key_task.cancel()
            raise
        owner = chain_end(addr.answer, q_name)
        addresses = addresses_of(addr.answer, owner, qtype)
        group = self.policy.group_for(owner, addresses)
        evidence: KeyEvidence | None = None
        if (addr.verdict.security in (Security.SECURE, Security.INSECURE) and addresses
                and group.wants_keys):
            keys = await key_task
            if chain_end(keys.answer, q_name) != owner:
                keys = await self.resolution.resolve(owner, dns.rdatatype.IPSECKEY, now)
            evidence = key_evidence(keys, addr.verdict.security, owner=owner)
        else:
            key_task.add_done_callback(_ignore_result)  # fills the cache; nobody waits for it
        decision = self.policy.decide(owner, addresses, addr.verdict, evidence)
        log.debug("%s %s -> %s", q_name, dns.rdatatype.to_text(qtype), decision)
        return addr, decision, evidence

    async def _act(self, query: dns.message.Message, addr: ValidatedAnswer, decision: Decision,
                   evidence: KeyEvidence | None, now: float) -> dns.message.Message:
        if isinstance(decision, Refuse):
            return await self._refuse(query, decision, now)
        cap = self.policy.config.max_ttl
        if evidence is not None and evidence.ttl is not None:
            cap = min(cap, evidence.ttl)
        if isinstance(decision, AnswerClear):
            self.counters.clear += 1
            if decision.after_failure:
                # `strict = false` asked for this; it is still worth a line every time.
                log.warning("%s answered in clear after its tunnel failed: %s",
                            query.question[0].name, decision.reason)
            return replies.build_reply(query, addr, max_ttl=cap, payload=self.payload)
        return await self._tunnel(query, addr, decision, evidence, cap, now)

    async def _tunnel(self, query: dns.message.Message, addr: ValidatedAnswer, decision: Tunnel,
                      evidence: KeyEvidence | None, cap: int, now: float) -> dns.message.Message:
        try:
            specs = await self._specs(decision, now)
        except ProvisioningError as exc:
            failed = self.policy.after_setup_failure(decision, classify(exc), str(exc))
            return await self._act(query, addr, failed, evidence, now)
        results = await asyncio.gather(
            *(self.provisioner.ensure(s, now, shunt=decision.drop_while_negotiating)
              for s in specs), return_exceptions=True)
        up: list[Address] = []
        leases: list[float] = []
        errors: list[ProvisioningError] = []
        for spec, res in zip(specs, results, strict=True):
            if isinstance(res, ProvisioningError):
                errors.append(res)
            elif isinstance(res, BaseException):
                raise res  # a bug (or cancellation): never turned into an answer
            else:
                up.append(spec.destination)
                leases.append(res)
        if errors and (not up or not decision.fail_closed):
            failed = self.policy.after_setup_failure(decision, classify(errors[0]),
                                                     str(errors[0]))
            return await self._act(query, addr, failed, evidence, now)
        self.counters.tunnelled += 1
        if errors:  # fail closed, some up: answer with the protected addresses only
            addr = only_addresses(addr, up)
        lease_left = int(min(leases) - now)
        return replies.build_reply(query, addr, max_ttl=max(0, min(cap, lease_left)),
                                   payload=self.payload)

    async def _specs(self, decision: Tunnel, now: float) -> list[TunnelSpec]:
        key = decision.keys[0]  # best precedence first (RFC 4025 2.3)
        gateway_addr: Address | None = None
        if isinstance(key.gateway, dns.name.Name):
            gateway_addr = await self._gateway_address(key.gateway, decision.destinations, now)
        return [tunnel_spec(key, dest, gateway_addr) for dest in decision.destinations]

    async def _gateway_address(self, name: dns.name.Name, destinations: Sequence[Address],
                               now: float) -> Address:
        """The address of a gateway given by name: same family as the destination first."""
        order = (dns.rdatatype.A, dns.rdatatype.AAAA)
        if destinations and destinations[0].version == 6:
            order = (dns.rdatatype.AAAA, dns.rdatatype.A)
        for rdtype in order:
            found = gateway_addresses(await self.resolution.resolve(name, rdtype, now), name,
                                      rdtype)
            if found:
                return found[0]
        raise TunnelRejected(f"gateway {name} has no usable address")

    async def _refuse(self, query: dns.message.Message, decision: Refuse, now: float
                      ) -> dns.message.Message:
        self.counters.refused += 1
        log_event(log, logging.WARNING, "refused", name=query.question[0].name,
                  reason=decision.reason, ede=decision.ede)
        if decision.drop:
            try:
                await self.provisioner.shunt(decision.drop, now)
            except ProvisioningError as exc:
                log.warning("drop shunt for %s failed: %s", decision.drop, exc)
        verdict = Verdict(Security.INDETERMINATE, decision.reason, decision.ede)
        return replies.servfail(query, verdict, self.payload)


def _ignore_result(task: asyncio.Task[ValidatedAnswer]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log "never retrieved"
