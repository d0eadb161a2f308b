"""The resolution core with a scripted upstream and a fake validator: caching, coalescing,
negative and bogus TTLs, upstream failure, the per-query upstream budget, and PlainHandler."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

from resolver.config import CacheConfig
from resolver.resolve import PlainHandler, Resolution, answer_key
from resolver.validator.response import Security, Verdict
from tests.helpers import ede
from tests.helpers import run as run_async
from tests.scripted_upstream import Delay, FakeValidator, ScriptedUpstream, answer, resolution

WHEN = 1_800_000_000.0
WWW = dns.name.from_text("www.example.test.")
BAD = dns.name.from_text("bad.example.test.")
NX = dns.name.from_text("nx.example.test.")
A = dns.rdatatype.A
SOA = "example.test. 3600 IN SOA ns.example.test. host.example.test. 1 2 3 4 30"


def script(q: dns.message.Message, _t: str) -> Any:
    name = q.question[0].name
    if name == NX:
        return answer(q, rcode=dns.rcode.NXDOMAIN, authority=(SOA,))
    if name == dns.name.from_text("slow.example.test."):
        return Delay(0.2, answer(q, "slow.example.test. 300 IN A 192.0.2.9"))
    return answer(q, f"{name} 300 IN A 192.0.2.1",
                  f"{name} 300 IN RRSIG A 13 3 300 20300101000000 20200101000000 1 "
                  "example.test. AAAA")


Body = Callable[[ScriptedUpstream, Resolution, FakeValidator], Awaitable[None]]


def run(body: Body, *, fetches: int = 0, cache: CacheConfig | None = None) -> None:
    async def main() -> None:
        async with ScriptedUpstream(script) as up:
            res, validator = resolution(up, {"bad.example.test.": Verdict(
                Security.BOGUS, "RRSIG over A does not verify", 6)}, fetches=fetches, cache=cache)
            await body(up, res, validator)

    run_async(main(), 20)


def test_positive_answer_is_cached_and_aged() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        a = await res.resolve(WWW, A, WHEN)
        assert a.verdict.security is Security.SECURE and a.ttl == 300
        b = await res.resolve(dns.name.from_text("WWW.Example.TEST."), A, WHEN + 100)
        assert b.ttl == 200 and len(v.calls) == 1 and up.count() == 1
        c = await res.resolve(WWW, A, WHEN + 301)  # expired: asked again
        assert c.ttl == 300 and len(v.calls) == 2

    run(body)


def test_fresh_skips_the_cache_and_replaces_the_entry() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        await res.resolve(WWW, A, WHEN)
        await res.resolve(WWW, A, WHEN + 10, fresh=True)
        assert up.count() == 2 and len(v.calls) == 2
        assert (await res.resolve(WWW, A, WHEN + 20)).ttl == 290

    run(body)


def test_concurrent_identical_resolutions_share_one_validation() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        slow = dns.name.from_text("slow.example.test.")
        answers = await asyncio.gather(*(res.resolve(slow, A, WHEN) for _ in range(25)))
        assert {a.verdict.security for a in answers} == {Security.SECURE}
        assert up.count() == 1 and len(v.calls) == 1

    run(body)


def test_bogus_is_rechecked_once_over_tcp_then_remembered_for_bogus_ttl(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bogus verdict is asked again once (over TCP, the validator's bogus cache dropped)
    before it is believed; confirmed, it is kept for bogus_ttl (60 s)."""
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        with caplog.at_level(logging.DEBUG, logger="resolver"):
            a = await res.resolve(BAD, A, WHEN)
            await res.resolve(BAD, A, WHEN + 59)
        assert a.verdict.security is Security.BOGUS and len(v.calls) == 2
        assert [t for t, _ in up.queries] == ["udp", "tcp"] and v.forgot == 1
        assert res.rechecks == 1 and res.refuted == 0
        # One warning for the failure (after the re-check), none for the cached repeat.
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == ['event=validation-failed name=bad.example.test. type=A '
                            'security=bogus reason="RRSIG over A does not verify" ede=6']
        await res.resolve(BAD, A, WHEN + 61)
        assert len(v.calls) == 4

    run(body)


def test_flush_failures_forgets_bogus_and_failed_answers_only() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        assert (await res.resolve(WWW, A, WHEN)).verdict.security is Security.SECURE
        assert (await res.resolve(BAD, A, WHEN)).verdict.security is Security.BOGUS
        res.answers.put(answer_key(NX, A), (WHEN + 5, dataclasses.replace(
            await res.resolve(BAD, A, WHEN), verdict=Verdict(Security.INDETERMINATE, "t/o"))),
            WHEN + 5)
        assert len(res.raw) > 0
        calls, forgot = len(v.calls), v.forgot
        seen: list[Verdict] = []
        res.on_verdict.append(seen.append)
        assert res.flush_failures() == 2  # the bogus and the indeterminate answer
        assert v.forgot == forgot + 1 and len(res.raw) == 0  # the validator's bogus steps too
        await res.resolve(WWW, A, WHEN + 1)  # still cached: secure is secure, whoever carried it
        assert len(v.calls) == calls and seen == []
        await res.resolve(BAD, A, WHEN + 1)  # asked and validated again
        assert len(v.calls) > calls and [s.security for s in seen] == [Security.BOGUS]

    run(body)


def test_negative_answer_cached_for_rfc2308_ttl() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        a = await res.resolve(NX, A, WHEN)
        assert a.rcode == dns.rcode.NXDOMAIN and a.ttl == 30  # min(SOA TTL 3600, MINIMUM 30)
        await res.resolve(NX, A, WHEN + 29)
        assert len(v.calls) == 1
        await res.resolve(NX, A, WHEN + 31)
        assert len(v.calls) == 2

    run(body)


def test_max_ttl_caps_what_is_kept() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        assert (await res.resolve(WWW, A, WHEN)).ttl == 100
        await res.resolve(WWW, A, WHEN + 101)
        assert len(v.calls) == 2

    run(body, cache=CacheConfig(max_ttl=100))


def test_upstream_failure_is_an_indeterminate_verdict_not_an_exception() -> None:
    async def main() -> None:
        async with ScriptedUpstream(lambda q, t: None) as up:
            res, _ = resolution(up, timeout=0.1, attempts=1)
            a = await res.resolve(WWW, A, WHEN)
            assert a.verdict.security is Security.INDETERMINATE
            assert a.verdict.ede == dns.edns.EDECode.NO_REACHABLE_AUTHORITY
            assert "timeout" in a.verdict.reason

    asyncio.run(main())


def test_validator_fetches_count_against_the_64_query_budget() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        res.raw.clear()
        res.raw.max_entries = 0  # every fetch goes upstream  # type: ignore[misc]
        a = await res.resolve(WWW, A, WHEN)
        assert a.verdict.security is Security.INDETERMINATE
        assert "more than 64 upstream queries" in a.verdict.reason
        assert up.count() == 64  # the client question + 63 validator fetches

    run(body, fetches=100)


def test_validator_fetches_are_cached_raw() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        a = await res.resolve(WWW, A, WHEN)
        assert a.verdict.security is Security.SECURE
        assert up.count() == 2  # the question + one DNSKEY fetch; 9 repeats from the raw cache

    run(body, fetches=10)


# --- PlainHandler ----------------------------------------------------------------------------

def handle(query: dns.message.Message, *, max_ttl: int = 86400) -> dns.message.Message:
    out: list[dns.message.Message] = []

    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        out.append(await PlainHandler(res, max_ttl=max_ttl).handle(query, WHEN))

    run(body)
    return out[0]


def test_ad_and_rrsigs_only_for_do_clients() -> None:
    do = handle(dns.message.make_query(WWW, A, want_dnssec=True))
    assert do.flags & dns.flags.AD and do.ednsflags & dns.flags.DO
    assert {r.rdtype for r in do.answer} == {A, dns.rdatatype.RRSIG}
    plain = handle(dns.message.make_query(WWW, A))
    assert not plain.flags & dns.flags.AD and [r.rdtype for r in plain.answer] == [A]
    ad = dns.message.make_query(WWW, A)
    ad.flags |= dns.flags.AD
    ad_reply = handle(ad)
    assert ad_reply.flags & dns.flags.AD and [r.rdtype for r in ad_reply.answer] == [A]


def test_bogus_is_servfail_with_ede() -> None:
    r = handle(dns.message.make_query(BAD, A, use_edns=0))
    assert r.rcode() == dns.rcode.SERVFAIL and not r.answer
    assert ede(r) == (dns.edns.EDECode.DNSSEC_BOGUS, "RRSIG over A does not verify")


def test_cd_client_gets_unvalidated_data_never_cached() -> None:
    async def body(up: ScriptedUpstream, res: Resolution, v: FakeValidator) -> None:
        h = PlainHandler(res)
        q = dns.message.make_query(BAD, A, want_dnssec=True)
        q.flags |= dns.flags.CD
        r = await h.handle(q, WHEN)
        assert r.rcode() == dns.rcode.NOERROR and not r.flags & dns.flags.AD
        assert r.answer[0][0].to_text() == "192.0.2.1"
        assert v.calls == [] and len(res.answers) == 0
        r2 = await h.handle(dns.message.make_query(BAD, A, use_edns=0), WHEN)
        assert r2.rcode() == dns.rcode.SERVFAIL

    run(body)


def test_ttl_capped_by_max_ttl_and_other_classes_refused() -> None:
    r = handle(dns.message.make_query(WWW, A), max_ttl=60)
    assert r.answer[0].ttl == 60
    assert handle(dns.message.make_query(WWW, A, rdclass="CH")).rcode() == dns.rcode.REFUSED
    # Meta-types, qtype 0 and ANY are answered by the server before any handler:
    # tests/test_server.py::test_meta_types_qtype0_and_any_answered_locally.


def test_upstream_failure_is_remembered_for_failure_ttl_only() -> None:
    """RFC 9520: a failed resolution is cached at least 1 s (here failure_ttl = 5 s), so a
    dead upstream is not asked again for every retry, and not longer, so recovery shows."""
    async def main() -> None:
        async with ScriptedUpstream(lambda q, t: None) as up:
            res, _ = resolution(up, timeout=0.1, attempts=1)
            assert (await res.resolve(WWW, A, WHEN)).verdict.security is Security.INDETERMINATE
            asked = up.count()
            again = await res.resolve(WWW, A, WHEN + 4)
            assert again.verdict.security is Security.INDETERMINATE and up.count() == asked
            await res.resolve(WWW, A, WHEN + 6)  # past failure_ttl: asked again
            assert up.count() > asked

    asyncio.run(main())


def test_indeterminate_from_validation_is_not_kept_for_bogus_ttl() -> None:
    """A DNSKEY fetch that failed inside validation is an upstream failure, not evidence that
    the data is bad: failure_ttl (5 s), not bogus_ttl (60 s)."""
    indeterminate = Verdict(Security.INDETERMINATE, "upstream failed for example.test./DNSKEY",
                            int(dns.edns.EDECode.NETWORK_ERROR))

    async def main() -> None:
        async with ScriptedUpstream(script) as up:
            res, validator = resolution(up, {"www.example.test.": indeterminate})
            await res.resolve(WWW, A, WHEN)
            await res.resolve(WWW, A, WHEN + 4)
            assert len(validator.calls) == 1  # kept for a few seconds
            await res.resolve(WWW, A, WHEN + 10)
            assert len(validator.calls) == 2  # but not for bogus_ttl (60 s)

    asyncio.run(main())
