"""Iterator against a small hierarchy of in-process authoritative servers on 127.0.0.x.

Every server listens on the same port of its own loopback address; the Iterator is told that
port and allowed loopback (in production it refuses to query loopback addresses). The
hierarchy has the cases of a real one: in-domain and sibling glue, a glueless NS name in
another TLD, a dead server, lame servers (REFUSED, sideways referral), an NXNS-style
delegation, a glueless cycle, a CNAME out of the zone and a broken empty non-terminal.
The lab tests (tests/integration/test_iterate_lab.py) run the same walk against real BIND.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from resolver.config import HostPort
from resolver.errors import UpstreamError
from resolver.iterate.iterator import IterationLimitReached, Iterator
from resolver.upstream.forward import QueryBudget, current_budget
from resolver.validator.types import Limits
from tests.nano_authority import DEFAULT, Authority, Behave

N = dns.name.from_text
A, DS = dns.rdatatype.A, dns.rdatatype.DS
SOA = "@ 60 IN SOA ns h 1 3600 600 86400 5"
ROOT, TEST, EXAMPLE, SIB, NET, REFUSER, DEAD = (f"127.0.0.{i}" for i in (2, 3, 4, 5, 6, 7, 9))
DS_RDATA = "12345 13 2 " + "ab" * 32

ZONES: dict[str, dict[str, str]] = {
    ROOT: {".": f"""{SOA}
@ 60 IN NS a.root.
a.root. 60 IN A {ROOT}
test. 60 IN NS ns1.test.
ns1.test. 60 IN A {TEST}
net. 60 IN NS ns.net.
ns.net. 60 IN A {NET}
"""},
    TEST: {"test.": f"""{SOA}
@ 60 IN NS ns1
ns1 60 IN A {TEST}
example 60 IN NS ns.example
ns.example 60 IN A {EXAMPLE}
example 60 IN DS {DS_RDATA}
sib 60 IN NS ns-sib
ns-sib 60 IN A {SIB}
outside 60 IN NS ns.outside.net.
dead 60 IN NS ns-dead.dead
dead 60 IN NS ns-live.dead
ns-dead.dead 60 IN A {DEAD}
ns-live.dead 60 IN A {SIB}
lame 60 IN NS ns-refused.lame
lame 60 IN NS ns-loop.lame
lame 60 IN NS ns-live.lame
ns-refused.lame 60 IN A {REFUSER}
ns-loop.lame 60 IN A {TEST}
ns-live.lame 60 IN A {SIB}
cyc-a 60 IN NS ns.cyc-b.net.
""" + "".join(f"nxns 60 IN NS n{i}.victim.net.\n" for i in range(30))},
    EXAMPLE: {"example.test.": f"""{SOA}
@ 60 IN NS ns
ns 60 IN A {EXAMPLE}
bob 60 IN A 192.0.2.11
www 60 IN CNAME bob
ext 60 IN CNAME www.outside.test.
a.b 60 IN A 192.0.2.99
""" + "".join(f"h{i} 60 IN A 192.0.2.{i}\n" for i in range(1, 6))},
    SIB: {z: f"{SOA}\n@ 60 IN NS ns\nhost 60 IN A 192.0.2.50\nhost2 60 IN A 192.0.2.51\n"
                 "www 60 IN A 192.0.2.52\n" for z in ("sib.test.", "dead.test.", "lame.test.",
                                                     "outside.test.")},
    NET: {"net.": f"""{SOA}
@ 60 IN NS ns
ns 60 IN A {NET}
ns.outside 60 IN A {SIB}
cyc-b 60 IN NS ns.cyc-a.test.
"""},
    REFUSER: {},  # answers REFUSED to everything: a lame server
    DEAD: {},  # never answers
}


def free_port() -> int:
    """A port free on every 127.0.0.x we use (UDP and TCP)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ROOT, 0))
            port = int(s.getsockname()[1])
        ok = True
        for host in ZONES:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    try:
                        s.bind((host, port))
                    except OSError:
                        ok = False
        if ok:
            return port
    raise RuntimeError("no common free port on 127.0.0.x")


def silent(_q: dns.message.Message, _t: str) -> Any:
    return None


@asynccontextmanager
async def hierarchy(behave: dict[str, Behave] | None = None, *, limits: Limits | None = None,
                    seed: int = 7) -> AsyncIterator[tuple[Iterator, dict[str, Authority]]]:
    behave = dict(behave or {})
    behave.setdefault(DEAD, silent)
    port = free_port()
    servers = {host: Authority(host, port, zones, behave.get(host)) for host, zones in
               ZONES.items()}
    for s in servers.values():
        await s.start()
    it = Iterator([HostPort(ROOT, port)], port=port, allow_loopback=True, timeout=0.5,
                  limits=limits, rng=random.Random(seed))
    try:
        yield it, servers
    finally:
        for s in servers.values():
            await s.close()


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 30))


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(str(rd) for rr in reply.answer if rr.rdtype == A for rd in rr)


def test_walks_down_minimised_with_0x20_and_caches_the_cuts() -> None:
    async def main() -> None:
        async with hierarchy() as (it, s):
            asked_as = N("Bob.Example.TEST.")
            reply = await it.query(asked_as, A)
            assert addresses(reply) == ["192.0.2.11"] and reply.rcode() == dns.rcode.NOERROR
            # The answer comes back in the caller's letter case, whatever 0x20 sent.
            assert reply.answer[0].name.labels == asked_as.labels
            assert s[ROOT].asked() == [". NS", "test. A"]  # priming, then one label only
            assert s[TEST].asked() == ["example.test. A"]
            assert s[EXAMPLE].asked() == ["bob.example.test. A"]
            sent = [q for srv in (s[ROOT], s[TEST], s[EXAMPLE]) for _t, q in srv.queries]
            for q in sent:
                assert not q.flags & dns.flags.RD
                assert q.ednsflags & dns.flags.DO and q.payload == 1232
            lower = [q.question[0].name.labels for q in sent]
            assert any(labels != tuple(x.lower() for x in labels) for labels in lower)
            assert len({q.id for q in sent}) >= len(sent) - 1
            # The cuts are cached: another name in example.test goes straight there.
            reply = await it.query(N("www.example.test."), A)
            assert [rr.rdtype for rr in reply.answer] == [dns.rdatatype.CNAME, A]
            assert len(s[ROOT].queries) == 2 and len(s[TEST].queries) == 1
            assert it.stats.referrals == 2 and it.stats.primed == 1

    run(main)


def test_ds_is_asked_of_the_parent_unless_the_referral_brought_it() -> None:
    async def main() -> None:
        async with hierarchy() as (it, s):
            await it.query(N("bob.example.test."), A)  # example.test's cut is cached now
            reply = await it.query(N("example.test."), DS)
            assert reply.answer and reply.answer[0].rdtype == DS
            assert str(reply.answer[0][0]) == DS_RDATA
            # The DS came with test.'s referral: not asked again, of either side.
            assert s[TEST].asked("example.test.") == ["example.test. A"]
            assert s[EXAMPLE].asked("example.test.") == []
            # sib.test's referral had no DS: the question goes to the parent side (test.),
            # although the cut sib.test. is known and its own server would answer too.
            await it.query(N("host.sib.test."), A)
            reply = await it.query(N("sib.test."), DS)
            assert not reply.answer and reply.rcode() == dns.rcode.NOERROR
            assert s[TEST].asked("sib.test.") == ["sib.test. A", "sib.test. DS"]
            assert s[SIB].asked("sib.test.") == []

    run(main)


def test_sibling_glue_is_used_and_out_of_zone_ns_names_are_resolved() -> None:
    async def main() -> None:
        async with hierarchy() as (it, s):
            assert addresses(await it.query(N("host.sib.test."), A)) == ["192.0.2.50"]
            assert it.stats.ns_lookups == 0  # ns-sib.test came as (sibling) glue
            assert addresses(await it.query(N("host.outside.test."), A)) == ["192.0.2.50"]
            assert it.stats.ns_lookups == 1  # ns.outside.net had to be resolved
            assert "ns.outside.net. A" in s[NET].asked()

    run(main)


def test_a_dead_server_costs_one_timeout_then_is_avoided() -> None:
    async def main() -> None:
        async with hierarchy() as (it, s):
            # The dead server was the fastest until now, so it is tried first.
            it.servers.record_rtt((DEAD, s[DEAD].port), 0.001, it.clock())
            assert addresses(await it.query(N("host.dead.test."), A)) == ["192.0.2.50"]
            assert len(s[DEAD].queries) == 1 and it.stats.timeouts == 1
            start = time.monotonic()
            for name in ("host2.dead.test.", "www.dead.test."):
                assert addresses(await it.query(N(name), A))
            assert time.monotonic() - start < 0.3  # no second wait for the dead server
            assert len(s[DEAD].queries) == 1

    run(main)


def test_lame_servers_are_passed_over() -> None:
    async def main() -> None:
        async with hierarchy() as (it, s):
            for lame in (REFUSER, TEST):  # REFUSED, and a sideways referral (a loop)
                it.servers.record_rtt((lame, s[lame].port), 0.001, it.clock())
            assert addresses(await it.query(N("host.lame.test."), A)) == ["192.0.2.50"]
            assert s[REFUSER].asked() == ["host.lame.test. A"]
            assert s[TEST].asked("host.lame.test.") == ["host.lame.test. A"]
            assert it.stats.lame == 2
            assert addresses(await it.query(N("host2.lame.test."), A)) == ["192.0.2.51"]
            assert len(s[REFUSER].queries) == 1 and s[TEST].asked("host2.lame.test.") == []

    run(main)


def test_nxns_delegation_stays_within_the_limits() -> None:
    async def main() -> None:
        async with hierarchy() as (it, s):
            budget = QueryBudget(64)
            current_budget.set(budget)
            with pytest.raises(IterationLimitReached, match="NS names"):
                await it.query(N("x.nxns.test."), A)
            victims = [q for q in s[NET].asked() if ".victim.net." in q]
            limits = Limits()
            # 30 NS names offered, 13 considered, 10 resolved: one query each (not minimised).
            assert len(victims) == limits.max_ns_lookups == budget.ns_lookups - 1
            assert budget.used <= 16
            # The names that did not resolve are remembered: a retry costs the victim nothing.
            current_budget.set(QueryBudget(64))
            with pytest.raises(UpstreamError):
                await it.query(N("y.nxns.test."), A)
            assert len([q for q in s[NET].asked() if ".victim.net." in q]) <= 13

    run(main)


def test_glueless_cycle_fails_fast() -> None:
    async def main() -> None:
        async with hierarchy() as (it, _s):
            budget = QueryBudget(64)
            current_budget.set(budget)
            start = time.monotonic()
            with pytest.raises(UpstreamError, match="cyc"):
                await it.query(N("www.cyc-a.test."), A)
            assert time.monotonic() - start < 2 and budget.used < 20

    run(main)


def test_budget_and_referral_limits() -> None:
    async def main() -> None:
        async with hierarchy() as (it, _s):
            current_budget.set(QueryBudget(3))  # priming + 3 steps do not fit
            with pytest.raises(IterationLimitReached, match="more than 3 upstream queries"):
                await it.query(N("bob.example.test."), A)
        async with hierarchy(limits=Limits(max_referrals=1)) as (it, _s):
            current_budget.set(QueryBudget(64))
            with pytest.raises(IterationLimitReached, match="more than 1 referrals"):
                await it.query(N("bob.example.test."), A)
        async with hierarchy() as (it, _s):
            budget = QueryBudget(64)
            current_budget.set(budget)
            await it.query(N("bob.example.test."), A)
            assert (budget.used, budget.referrals) == (4, 2)

    run(main)


def _lowercase_question(q: dns.message.Message, transport: str, s: Authority) -> Any:
    if transport != "udp":
        return DEFAULT
    q2 = dns.message.make_query(q.question[0].name.to_text().lower(), q.question[0].rdtype,
                                want_dnssec=True)
    q2.id = q.id
    return s.answer(q2)


def test_a_server_that_does_not_echo_the_case_is_asked_over_tcp() -> None:
    async def main() -> None:
        holder: dict[str, Authority] = {}
        behave = {EXAMPLE: lambda q, t: _lowercase_question(q, t, holder["s"])}
        async with hierarchy(behave) as (it, s):
            holder["s"] = s[EXAMPLE]
            assert addresses(await it.query(N("bob.example.test."), A)) == ["192.0.2.11"]
            assert [t for t, _q in s[EXAMPLE].queries] == ["udp", "tcp"]
            assert it.stats.case_mismatch == 1
            # From now on this server gets the name as it is, over UDP.
            assert addresses(await it.query(N("h1.example.test."), A)) == ["192.0.2.1"]
            assert [t for t, _q in s[EXAMPLE].queries] == ["udp", "tcp", "udp"]
            assert s[EXAMPLE].queries[-1][1].question[0].name.labels == \
                N("h1.example.test.").labels

    run(main)


def test_a_forged_reply_with_the_wrong_case_is_ignored() -> None:
    async def main() -> None:
        holder: dict[str, Authority] = {}

        def behave(q: dns.message.Message, t: str) -> Any:
            if t != "udp":
                return DEFAULT
            swapped = N(q.question[0].name.to_text().swapcase())
            forged = dns.message.make_response(dns.message.make_query(swapped, A))
            forged.id = q.id
            forged.answer.append(dns.rrset.from_text(swapped, 60, "IN", "A", "203.0.113.66"))
            forged.flags |= dns.flags.AA
            return [forged, holder["s"].answer(q)]

        async with hierarchy({EXAMPLE: behave}) as (it, s):
            holder["s"] = s[EXAMPLE]
            assert addresses(await it.query(N("BOB.example.test."), A)) == ["192.0.2.11"]
            assert it.stats.ignored >= 1 and it.stats.sent_tcp == 0

    run(main)


def test_truncated_reply_is_asked_again_over_tcp() -> None:
    async def main() -> None:
        holder: dict[str, Authority] = {}

        def behave(q: dns.message.Message, t: str) -> Any:
            if t == "tcp":
                return DEFAULT
            r = holder["s"].answer(q)
            r.answer = []
            r.flags |= dns.flags.TC
            return r

        async with hierarchy({EXAMPLE: behave}) as (it, s):
            holder["s"] = s[EXAMPLE]
            assert addresses(await it.query(N("bob.example.test."), A)) == ["192.0.2.11"]
            assert [t for t, _q in s[EXAMPLE].queries] == ["udp", "tcp"]

    run(main)


def test_cname_out_of_the_zone_is_followed_and_merged() -> None:
    async def main() -> None:
        async with hierarchy() as (it, _s):
            reply = await it.query(N("ext.example.test."), A)
            assert reply.question[0].name == N("ext.example.test.")
            assert [(str(rr.name), rr.rdtype) for rr in reply.answer] == [
                ("ext.example.test.", dns.rdatatype.CNAME), ("www.outside.test.", A)]

    run(main)


def test_relaxed_minimisation_survives_a_broken_empty_non_terminal() -> None:
    async def main() -> None:
        holder: dict[str, Authority] = {}

        def behave(q: dns.message.Message, _t: str) -> Any:
            if q.question[0].name == N("b.example.test."):  # an ENT, wrongly NXDOMAIN
                r = holder["s"].answer(q)
                r.set_rcode(dns.rcode.NXDOMAIN)
                return r
            return DEFAULT

        async with hierarchy({EXAMPLE: behave}) as (it, s):
            holder["s"] = s[EXAMPLE]
            assert addresses(await it.query(N("a.b.example.test."), A)) == ["192.0.2.99"]
            assert s[EXAMPLE].asked() == ["b.example.test. A", "a.b.example.test. A"]

    run(main)


def test_identical_questions_share_one_walk() -> None:
    async def main() -> None:
        async with hierarchy() as (it, s):
            replies = await asyncio.gather(*(it.query(N("bob.example.test."), A)
                                             for _ in range(5)))
            assert all(addresses(r) == ["192.0.2.11"] for r in replies)
            assert s[EXAMPLE].asked() == ["bob.example.test. A"] and it.stats.coalesced == 4

    run(main)
