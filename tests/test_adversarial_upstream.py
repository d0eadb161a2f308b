"""The whole resolver, as the daemon assembles it, against an adversarial upstream.

Theory of operation
-------------------
`Stack` builds what `resolver.cli.serve` builds, from a TOML file and a trust-anchor file like
the daemon's: Forwarder (real UDP/TCP sockets) -> Resolution -> our Validator -> PlainHandler ->
Server on 127.0.0.1 (random port) with the wire cache. The only differences are the pinned clock
(the server's `clock`, as tests/test_server.py injects it, set to the fixtures' WHEN) and a thin
wrapper that records each ValidatedAnswer so its Work counters can be checked.

The upstream is a ScriptedUpstream on 127.0.0.153 that answers like an honest recursive resolver
from the zones tests/dnssec_fixtures.py signs at test time (with TC and a TCP retry when a
reply exceeds the query's EDNS size), except for the one (name, type) a scenario breaks.

Each side runs its own event loop in its own thread, as two processes would, and every question
is asked by a real client (dns.query.udp from the test thread). Per scenario we check the rcode,
the AD bit, the Extended DNS Error, the validator's Work counters and the number of queries the
upstream saw (DESIGN.md: at most 64 per client query), and the CPU the query cost: process CPU
(time.process_time: client + upstream + resolver) and the resolver thread's own CPU.

The last tests fire KeyTrap queries, silent upstreams and garbage while another client asks a
warm name in a loop: every one of those answers must come back right and fast, because the wire
cache answers without the validator and the validator yields while it works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dns.dnssec
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from resolver import config as configuration
from resolver.cache import WireCache
from resolver.cli import build_anchors
from resolver.config import Config, HostPort
from resolver.resolve import Fetch, PlainHandler, Resolution
from resolver.server import Server
from resolver.upstream.forward import Forwarder
from resolver.validator.response import Limits, ValidatedAnswer, Validator
from tests.dnssec_fixtures import (
    WHEN,
    N,
    T,
    build_world,
    forge_nsec_next_outside_zone,
    resign,
    without,
)
from tests.helpers import edes
from tests.scripted_upstream import Reply, ScriptedUpstream

EDE = dns.edns.EDECode
UPSTREAM_HOST = "127.0.0.153"
UPSTREAM_TIMEOUT = 0.25  # per attempt; 2 attempts: a silent upstream costs 0.5 s
WARM = "www.example.test."
CPU_BOUND = 0.5  # seconds; generous so a loaded 2-core machine does not flake
LATENCY_BOUND = 0.25  # seconds, for cached answers while attacks run

# A hook gets the query, the honest reply and the transport, and returns what to send.
Hook = Callable[[dns.message.Message, dns.message.Message, str], Reply]
R = TypeVar("R")

FIGURES: list[str] = []  # printed at the end of the module (run with -s to see them live)


def on_reply(mutate: Callable[[dns.message.Message], dns.message.Message]) -> Hook:
    """A hook from one of dnssec_fixtures' reply mutators."""
    return lambda _q, reply, _t: mutate(reply)


class LoopThread:
    """An asyncio event loop in a daemon thread (a stand-in for a separate process)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, R], timeout: float = 20.0) -> R:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def cpu(self) -> float:
        """CPU seconds this thread has used (Linux per-thread clock)."""
        assert self.thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Recording:
    """Our Validator, unchanged, with each result kept for the Work counters."""

    def __init__(self, inner: Validator) -> None:
        self.inner = inner
        self.results: dict[tuple[dns.name.Name, int], ValidatedAnswer] = {}

    async def validate(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
                       response: dns.message.Message, now: float) -> ValidatedAnswer:
        result = await self.inner.validate(qname, qtype, response, now)
        self.results[(qname, int(qtype))] = result
        return result

    def forget_bogus(self) -> None:
        self.inner.forget_bogus()


@dataclass
class Outcome:
    reply: dns.message.Message
    cpu: float  # process CPU seconds (all threads) around the client query
    resolver_cpu: float  # the resolver thread's CPU seconds
    upstream_queries: int  # queries the scripted upstream received meanwhile
    wall: float

    @property
    def ede(self) -> list[tuple[int, str]]:
        return edes(self.reply)


class Stack:
    """Scripted upstream + the daemon's resolver stack, each on its own loop thread."""

    def __init__(self, workdir: Path) -> None:
        self.world = build_world()
        self.honest = self.world.upstream()
        self.hooks: dict[tuple[dns.name.Name, int], Hook] = {}
        self.upstream_loop = LoopThread("scripted-upstream")
        self.up = self.upstream_loop.run(ScriptedUpstream(self.script, UPSTREAM_HOST).start())
        self.cfg = self._config(workdir)
        self.resolver_loop = LoopThread("resolver")
        self.resolver_loop.run(self._build())
        self.host, self.port = self.server.bound[0]

    def _config(self, workdir: Path) -> Config:
        root_ds = dns.dnssec.make_ds(dns.name.root, self.world["."].ksk.dnskey, "SHA256")
        anchor = workdir / "root.key"
        anchor.write_text(f". 3600 IN DS {root_ds.to_text()}\n", encoding="utf-8")
        toml = workdir / "resolver.toml"
        toml.write_text(
            "[upstream]\n"
            f'servers = ["{UPSTREAM_HOST}:{self.up.port}"]\n'
            f"timeout = {UPSTREAM_TIMEOUT}\nattempts = 2\ntcp_timeout = 1.0\n"
            "[dnssec]\nbuiltin_root_anchors = false\n"
            f'trust_anchor_files = ["{anchor}"]\n', encoding="utf-8")
        return configuration.load(toml, listen_override=(HostPort("127.0.0.1", 0),))

    async def _build(self) -> None:
        """What resolver.cli.serve assembles (plain mode), with the pinned clock."""
        cfg = self.cfg
        anchors = build_anchors(cfg)
        self.limits: Limits = cfg.limits
        self.validator: Recording | None = None

        def make_validator(fetch: Fetch) -> Recording:
            self.validator = Recording(Validator(anchors, fetch, self.limits))
            return self.validator

        self.forwarder = Forwarder(cfg.upstream.servers, timeout=cfg.upstream.timeout,
                                   attempts=cfg.upstream.attempts,
                                   tcp_timeout=cfg.upstream.tcp_timeout,
                                   payload=cfg.server.edns_payload)
        self.resolution = Resolution(self.forwarder, make_validator, cache=cfg.cache,
                                     max_upstream_queries=cfg.limits.max_fetches)
        plain = PlainHandler(self.resolution, max_ttl=cfg.cache.max_ttl,
                             payload=cfg.server.edns_payload)
        self.server = Server(plain, cfg.server, cache=WireCache(cfg.cache.max_entries),
                             clock=lambda: WHEN)
        await self.server.start(cfg.server.listen)

    def close(self) -> None:
        self.resolver_loop.run(self.server.stop())
        self.resolver_loop.stop()
        self.upstream_loop.run(self.up.close())
        self.upstream_loop.stop()

    # -- the upstream's side ------------------------------------------------------------------

    def honest_reply(self, query: dns.message.Message) -> dns.message.Message:
        """What an honest recursive resolver (with CD=1) would say to query."""
        q = query.question[0]
        msg = self.honest.resolve(q.name, q.rdtype)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        reply.answer = list(msg.answer)
        reply.authority = list(msg.authority)
        reply.set_rcode(msg.rcode())
        return reply

    def script(self, query: dns.message.Message, transport: str) -> Reply:
        q = query.question[0]
        reply = self.honest_reply(query)
        hook = self.hooks.get((q.name, q.rdtype))
        out = hook(query, reply, transport) if hook is not None else reply
        if (transport == "udp" and isinstance(out, dns.message.Message)
                and len(out.to_wire(max_size=65535)) > max(512, query.payload)):
            tc = dns.message.make_response(query)
            tc.flags |= dns.flags.TC
            return tc
        return out

    def on(self, name: str, rdtype: str, hook: Hook) -> None:
        self.hooks[(N(name), dns.rdatatype.from_text(rdtype))] = hook

    # -- the client's side --------------------------------------------------------------------

    def ask(self, name: str, rdtype: str = "A", timeout: float = 5.0) -> Outcome:
        """One DO=1 query over UDP from a real client socket, with its costs."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        seen = self.up.count()
        cpu0, rcpu0, t0 = time.process_time(), self.resolver_loop.cpu(), time.monotonic()
        reply = dns.query.udp(query, self.host, port=self.port, timeout=timeout)
        wall = time.monotonic() - t0
        cpu, rcpu = time.process_time() - cpu0, self.resolver_loop.cpu() - rcpu0
        return Outcome(reply, cpu, rcpu, self.up.count() - seen, wall)

    def work(self, name: str, rdtype: str = "A") -> ValidatedAnswer:
        assert self.validator is not None
        return self.validator.results[(N(name), dns.rdatatype.from_text(rdtype))]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("adversarial"))
    try:
        warm = s.ask(WARM)
        assert warm.reply.rcode() == dns.rcode.NOERROR and warm.reply.flags & dns.flags.AD
        yield s
    finally:
        s.close()
        print("\n" + "\n".join(FIGURES))


def record(label: str, out: Outcome, extra: str = "") -> None:
    line = (f"{label:<28} rcode={dns.rcode.to_text(out.reply.rcode()):<8} ede={out.ede} "
            f"cpu={out.cpu * 1000:.1f} ms (resolver thread {out.resolver_cpu * 1000:.1f} ms) "
            f"wall={out.wall * 1000:.0f} ms upstream_queries={out.upstream_queries} {extra}")
    FIGURES.append(line)
    print(line)


def within_limits(stack: Stack, out: Outcome, name: str, rdtype: str = "A",
                  validated: bool = True) -> str:
    """Work stayed within DESIGN.md's limits; returns the counters for the figures."""
    assert out.upstream_queries <= stack.cfg.limits.max_fetches, out.upstream_queries
    assert out.cpu < CPU_BOUND, out.cpu
    assert out.resolver_cpu < CPU_BOUND, out.resolver_cpu
    if not validated:
        return ""
    work = stack.work(name, rdtype).work
    limits = stack.limits
    assert work.sig_checks <= limits.max_sig_checks_per_query, work
    assert work.sig_failures <= limits.max_sig_failures_per_query + 1, work
    assert work.nsec3_hashes <= limits.max_nsec3_hashes, work
    assert work.fetches <= limits.max_fetches, work
    return (f"sig_checks={work.sig_checks} sig_failures={work.sig_failures} "
            f"nsec3_hashes={work.nsec3_hashes} fetches={work.fetches}")


def bogus(stack: Stack, label: str, name: str, rdtype: str, ede: int, text: str) -> Outcome:
    """Ask, and expect SERVFAIL with this EDE (and reason text), within the limits."""
    out = stack.ask(name, rdtype)
    counters = within_limits(stack, out, name, rdtype)
    record(label, out, counters)
    assert out.reply.rcode() == dns.rcode.SERVFAIL
    assert not out.reply.flags & dns.flags.AD
    assert not out.reply.answer
    assert len(out.ede) == 1 and out.ede[0][0] == ede, out.ede
    assert text in out.ede[0][1], out.ede
    return out


def unreachable(stack: Stack, label: str, name: str, rdtype: str = "A") -> Outcome:
    """Ask, and expect SERVFAIL "no reachable authority" after bounded tries upstream."""
    ignored = stack.forwarder.stats.ignored
    out = stack.ask(name, rdtype)
    within_limits(stack, out, name, rdtype, validated=False)
    record(label, out, f"ignored_datagrams={stack.forwarder.stats.ignored - ignored}")
    assert out.reply.rcode() == dns.rcode.SERVFAIL
    assert out.ede and out.ede[0][0] == EDE.NO_REACHABLE_AUTHORITY, out.ede
    assert "no upstream answered" in out.ede[0][1], out.ede
    assert out.upstream_queries <= 2 * stack.cfg.upstream.attempts  # UDP (+ TCP after TC)
    return out


# -- signatures ------------------------------------------------------------------------------


def test_stripped_rrsigs(stack: Stack) -> None:
    """Stripped RRSIGs.

    The upstream answers host.example.test. A with the A RRset but without its RRSIG, as an
    on-path attacker or a DNSSEC-unaware middlebox would. example.test. is signed (its DS is in
    test.), so unsigned data there is bogus: SERVFAIL, EDE 10 "RRSIGs Missing".
    """
    stack.on("host.example.test.", "A", on_reply(without({T.RRSIG}, covers=False)))
    bogus(stack, "stripped RRSIGs", "host.example.test.", "A", EDE.RRSIGS_MISSING,
          "no RRSIG in secure zone")


def test_signer_from_another_zone(stack: Stack) -> None:
    """A signer name from another zone.

    host.example.test. TXT arrives signed, with valid crypto, by nsec3.test.'s ZSK and signer
    name nsec3.test.: a key the attacker holds for a zone it controls. The signer is not an
    ancestor of the owner, so the signature is refused before any key is looked up:
    SERVFAIL, EDE 6 "DNSSEC Bogus".
    """
    world = stack.world
    stack.on("host.example.test.", "TXT", on_reply(resign(
        "host.example.test.", "TXT", world["nsec3.test."].zsk, "nsec3.test.")))
    bogus(stack, "signer from another zone", "host.example.test.", "TXT", EDE.DNSSEC_BOGUS,
          "not an ancestor of the owner")


def test_rrsig_labels_below_signer(stack: Stack) -> None:
    """RRSIG labels below the signer's (the wildcard bypass).

    a.b.example.test. A carries an RRSIG made with example.test.'s real ZSK but computed as if
    the data were the expansion of "*.test." (labels = 1, fewer than the signer's 2). Accepting
    it would let one zone's key sign wildcard data in its parent's namespace:
    SERVFAIL, EDE 6.
    """
    world = stack.world
    stack.on("a.b.example.test.", "A", on_reply(resign(
        "a.b.example.test.", "A", world["example.test."].zsk, "example.test.",
        sign_as="*.test.")))
    bogus(stack, "RRSIG labels < signer's", "a.b.example.test.", "A", EDE.DNSSEC_BOGUS,
          "wildcard bypass")


@pytest.mark.parametrize("label,times,ede,text,name", [
    ("expired signature", {"inception": WHEN - 40 * 86400, "expiration": WHEN - 3 * 86400},
     EDE.SIGNATURE_EXPIRED, "expired", "www.nsec3.test."),
    ("not-yet-valid signature", {"inception": WHEN + 3 * 86400,
                                 "expiration": WHEN + 40 * 86400},
     EDE.SIGNATURE_NOT_YET_VALID, "not-yet-valid", "host.nsec3.test."),
])
def test_signature_times(stack: Stack, label: str, times: dict[str, float], ede: int,
                         text: str, name: str) -> None:
    """Expired and not-yet-valid signatures.

    The A RRset is re-signed with the zone's real ZSK but a validity window that ended three
    days before (or starts three days after) the pinned clock, far outside the clock skew.
    SERVFAIL with EDE 7 "Signature Expired" or EDE 8 "Signature Not Yet Valid".
    """
    world = stack.world
    stack.on(name, "A", on_reply(resign(name, "A", world["nsec3.test."].zsk, "nsec3.test.",
                                        **times)))
    bogus(stack, label, name, "A", ede, text)


def test_keytrap(stack: Stack) -> None:
    """A KeyTrap zone: dozens of keys with one key tag, dozens of signatures (CVE-2023-50387).

    keytrap.test.'s DNSKEY RRset has 40 keys sharing the ZSK's key tag (too big for UDP: the
    upstream truncates and the forwarder retries over TCP), and www.keytrap.test. A carries
    40 RRSIGs with that tag, all garbage. A naive validator tries 40 x 40 = 1600 signature
    checks. Ours tries at most max_keys_per_tag keys per signature and gives up after
    max_sig_failures_per_query failures: SERVFAIL, EDE 6, a handful of checks, a few ms of CPU.
    """
    tcp = stack.up.count("tcp")
    out = bogus(stack, "KeyTrap (40 keys x 40 sigs)", "www.keytrap.test.", "A",
                EDE.DNSSEC_BOGUS, "budget exhausted")
    work = stack.work("www.keytrap.test.").work
    # DS->DNSKEY, DNSKEY self-signature, then 2 keys x 2 failures before the failure budget.
    assert work.sig_checks <= stack.limits.max_sig_checks_per_rrset + 2, work
    assert stack.up.count("tcp") > tcp, "the 40-key DNSKEY RRset should have come over TCP"
    assert out.resolver_cpu < 0.2, out.resolver_cpu


# -- denial of existence ---------------------------------------------------------------------


@pytest.mark.parametrize("label,name,rdtype,denial", [
    ("stripped NSEC (NXDOMAIN)", "nope.example.test.", "A", T.NSEC),
    ("stripped NSEC3 (NODATA)", "host.nsec3.test.", "AAAA", T.NSEC3),
])
def test_stripped_denial(stack: Stack, label: str, name: str, rdtype: str, denial: int) -> None:
    """Stripped NSEC/NSEC3 proofs.

    The negative answer arrives with its signed SOA but without the NSEC (NXDOMAIN in an NSEC
    zone) or NSEC3 (NODATA in an NSEC3 zone) records that prove it. An unproven denial from a
    signed zone could hide any name: SERVFAIL, EDE 12 "NSEC Missing".
    """
    stack.on(name, rdtype, on_reply(without({denial}, section="authority")))
    bogus(stack, label, name, rdtype, EDE.NSEC_MISSING, "no NSEC/NSEC3 proof")


def test_nsec_next_name_outside_zone(stack: Stack) -> None:
    """NSEC next name outside the zone.

    The NXDOMAIN for nope2.example.test. carries an NSEC, validly signed with example.test.'s
    ZSK, whose next name is zzz.elsewhere.: one record that would "prove" the non-existence of
    everything after it, across zones (the aggressive-cache attack Knot fixed in 6.4.1).
    SERVFAIL, EDE 6.
    """
    zsk = stack.world["example.test."].zsk

    forge = forge_nsec_next_outside_zone(zsk)
    stack.on("nope2.example.test.", "A", on_reply(forge))
    bogus(stack, "NSEC next outside zone", "nope2.example.test.", "A", EDE.DNSSEC_BOGUS,
          "outside zone")


@pytest.mark.parametrize("label,name,rdtype,rcode", [
    ("NSEC3 200 iterations NODATA", "www.iter.test.", "TXT", dns.rcode.NOERROR),
    ("NSEC3 200 iterations NXDOMAIN", "nope.iter.test.", "A", dns.rcode.NXDOMAIN),
])
def test_nsec3_200_iterations(stack: Stack, label: str, name: str, rdtype: str,
                              rcode: int) -> None:
    """NSEC3 with 200 iterations.

    iter.test. is properly signed but uses 200 NSEC3 iterations, above the 50 we accept
    (RFC 9276). Hashing them would cost 201 SHA-1 rounds per name, so the proof is not
    checked: the answer is INSECURE, served as the upstream gave it (NOERROR/NXDOMAIN) without
    AD, no NSEC3 hash computed, and EDE 27 "Unsupported NSEC3 Iterations Value" attached
    (RFC 9276 section 3.2: SHOULD, for insecure and SERVFAIL results alike).
    """
    out = stack.ask(name, rdtype)
    counters = within_limits(stack, out, name, rdtype)
    record(label, out, counters)
    assert out.reply.rcode() == rcode
    assert not out.reply.flags & dns.flags.AD
    assert stack.work(name, rdtype).work.nsec3_hashes == 0
    assert out.ede and out.ede[0][0] == EDE.UNSUPPORTED_NSEC3_ITERATIONS_VALUE, out.ede
    assert "iterations 200" in out.ede[0][1]


def test_cname_loop(stack: Stack) -> None:
    """A CNAME loop.

    loop1.example.test. CNAME loop2, loop2 CNAME loop1, both validly signed. Following it must
    stop at the first repeated name, not at max_cname_chain or the upstream query budget:
    SERVFAIL, EDE 6.
    """
    out = bogus(stack, "CNAME loop", "loop1.example.test.", "A", EDE.DNSSEC_BOGUS,
                "loop at loop1.example.test.")
    assert out.upstream_queries <= 4


# -- garbage ---------------------------------------------------------------------------------


def _random_with_id(query: dns.message.Message, _reply: dns.message.Message, _t: str) -> bytes:
    # Our ID, so the bytes get past the ID check and reach the parser.
    return query.id.to_bytes(2, "big") + random.Random(query.id).randbytes(200)


def _wrong_id(query: dns.message.Message, reply: dns.message.Message, _t: str) -> bytes:
    reply.id = (query.id + 1) % 65536
    return reply.to_wire()


def _truncated(_q: dns.message.Message, reply: dns.message.Message, _t: str) -> bytes:
    wire = reply.to_wire()
    return wire[:len(wire) // 2]  # cut inside a record, TC not set


def _other_question(stack: Stack) -> Hook:
    def hook(query: dns.message.Message, _r: dns.message.Message, _t: str) -> bytes:
        other = dns.message.make_query(WARM, "A", want_dnssec=True)
        other.id = query.id  # our ID, a genuine signed answer, but to another question
        return stack.honest_reply(other).to_wire()
    return hook


def _tcp_garbage(query: dns.message.Message, reply: dns.message.Message, t: str) -> Reply:
    if t == "udp":
        tc = dns.message.make_response(query)
        tc.flags |= dns.flags.TC
        return tc
    return random.Random(query.id).randbytes(300)


@pytest.mark.parametrize("label,make", [
    ("garbage: random bytes", lambda s: _random_with_id),
    ("garbage: wrong ID", lambda s: _wrong_id),
    ("garbage: truncated message", lambda s: _truncated),
    ("garbage: other question", _other_question),
    ("garbage: TC then TCP junk", lambda s: _tcp_garbage),
    ("silent upstream", lambda s: lambda q, r, t: None),
])
def test_garbage_replies(stack: Stack, label: str, make: Callable[[Stack], Hook]) -> None:
    """Garbage replies: random bytes, wrong ID, a truncated message, a reply to another question.

    Every reply the upstream sends for this name is unusable. The forwarder must ignore it (it
    could be a spoofing attempt racing the real answer) and keep waiting until the attempt
    times out; after `attempts` rounds the client gets SERVFAIL with EDE 22 "No Reachable
    Authority", after exactly `attempts` upstream queries, and the resolver carries on. Over
    TCP (after a TC reply) junk fails the attempt at once instead.
    """
    name = f"{label.split(':')[-1].strip().replace(' ', '-')}.garbage.example.test."
    stack.on(name, "A", make(stack))
    out = unreachable(stack, label, name)
    if "TCP" not in label:  # UDP garbage is ignored, so the attempts time out
        assert out.wall >= stack.cfg.upstream.attempts * UPSTREAM_TIMEOUT * 0.9
        assert out.upstream_queries == stack.cfg.upstream.attempts
    else:
        assert out.wall < UPSTREAM_TIMEOUT, out.wall


def test_garbage_before_the_real_answer_is_ignored(stack: Stack) -> None:
    """Spoofing race: random bytes, a wrong ID, a truncated message and an answer to another
    question arrive before the genuine reply on the same socket. All four are ignored, the
    genuine one is taken and validates: NOERROR with AD, one upstream query."""
    other = _other_question(stack)

    def hook(query: dns.message.Message, reply: dns.message.Message, t: str) -> Reply:
        junk = [h(query, stack.honest_reply(query), t)
                for h in (_random_with_id, _wrong_id, _truncated, other)]
        return [*junk, reply]

    stack.on("www.example.test.", "AAAA", hook)
    ignored = stack.forwarder.stats.ignored
    out = stack.ask("www.example.test.", "AAAA")
    record("garbage then real answer", out,
           f"ignored_datagrams={stack.forwarder.stats.ignored - ignored}")
    assert out.reply.rcode() == dns.rcode.NOERROR and out.reply.flags & dns.flags.AD
    assert out.upstream_queries == 1
    assert stack.forwarder.stats.ignored - ignored == 4


# -- a forged reply with the right port and ID (issue 10 item 9) ----------------------------


def _bad_signatures(msg: dns.message.Message) -> dns.message.Message:
    """Every RRSIG in the answer with its signature bytes flipped (crypto fails)."""
    out = []
    for r in msg.answer:
        if r.rdtype == T.RRSIG:
            bad = dns.rrset.RRset(r.name, r.rdclass, r.rdtype, r.covers)
            for rd in r:
                bad.add(rd.replace(signature=bytes(b ^ 0xFF for b in rd.signature)), r.ttl)
            r = bad
        out.append(r)
    msg.answer = out
    return msg


def _forged_once(mutate: Callable[[dns.message.Message], dns.message.Message]) -> Hook:
    """The first reply is forged (as if an attacker hit our port and ID); the rest honest."""
    calls: list[str] = []

    def hook(_q: dns.message.Message, reply: dns.message.Message, transport: str) -> Reply:
        calls.append(transport)
        return mutate(reply) if len(calls) == 1 else reply

    return hook


def test_forged_answer_is_rechecked_and_the_real_one_served(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A forged reply to the question itself.

    The first reply for www.nsec3.test. AAAA carries the real records with broken signatures,
    as a blind spoofer who guessed port and ID could send. Before caching "bogus" for 60 s the
    resolver asks again, over TCP: the real answer validates and is served (NOERROR, AD) and
    cached; the next client gets it from the cache.
    """
    res = stack.resolution
    rechecks, refuted = res.rechecks, res.refuted
    tcp = stack.up.count("tcp")
    stack.on("www.nsec3.test.", "AAAA", _forged_once(_bad_signatures))
    with caplog.at_level(logging.WARNING, logger="resolver"):
        out = stack.ask("www.nsec3.test.", "AAAA")
    record("forged answer, re-checked", out, within_limits(stack, out, "www.nsec3.test.", "AAAA"))
    assert out.reply.rcode() == dns.rcode.NOERROR and out.reply.flags & dns.flags.AD
    assert [rd.to_text() for r in out.reply.answer if r.rdtype == T.AAAA for rd in r] == [
        "2001:db8::1"]
    assert (res.rechecks, res.refuted) == (rechecks + 1, refuted + 1)
    assert stack.up.count("tcp") > tcp
    # One line for the operator, saying the bogus verdict was not confirmed; no "failed".
    (line,) = [r.getMessage() for r in caplog.records if "www.nsec3.test." in r.getMessage()]
    assert line.startswith("event=bogus-not-confirmed name=www.nsec3.test. type=AAAA"), line
    assert "second=secure" in line, line
    again = stack.ask("www.nsec3.test.", "AAAA")
    assert again.reply.rcode() == dns.rcode.NOERROR and again.upstream_queries == 0


def test_forged_dnskey_does_not_poison_the_zone(stack: Stack) -> None:
    """A forged reply to the validator's own DNSKEY fetch.

    The first DNSKEY reply for optout.test. comes with broken signatures, so the chain step
    for the zone turns bogus, and the validator caches bogus steps for 60 s. The re-check makes
    the validator forget them and fetch DS and DNSKEY again over TCP: www.optout.test. A is
    served secure, and a second name of the zone validates from the (now good) chain cache
    without another re-check.
    """
    res = stack.resolution
    rechecks, refuted = res.rechecks, res.refuted
    stack.on("optout.test.", "DNSKEY", _forged_once(_bad_signatures))
    out = stack.ask("www.optout.test.", "A")
    record("forged DNSKEY, re-checked", out)
    assert out.reply.rcode() == dns.rcode.NOERROR and out.reply.flags & dns.flags.AD
    assert (res.rechecks, res.refuted) == (rechecks + 1, refuted + 1)
    other = stack.ask("www.optout.test.", "AAAA")  # NODATA, proven by NSEC3
    assert other.reply.rcode() == dns.rcode.NOERROR and other.reply.flags & dns.flags.AD
    assert res.rechecks == rechecks + 1


def test_real_bogus_is_confirmed_then_cached(stack: Stack) -> None:
    """A zone that really is broken: every reply for www.nsec3.test. TXT (NODATA) lacks its
    NSEC3 proof, over UDP and TCP alike. The re-check confirms it: SERVFAIL with EDE 12, two
    upstream queries (UDP, then TCP), and the verdict is cached: the next client costs none."""
    res = stack.resolution
    rechecks, refuted = res.rechecks, res.refuted
    tcp = stack.up.count("tcp")
    stack.on("www.nsec3.test.", "TXT", on_reply(without({T.NSEC3}, section="authority")))
    out = bogus(stack, "real bogus, confirmed", "www.nsec3.test.", "TXT", EDE.NSEC_MISSING,
                "no NSEC/NSEC3 proof")
    assert out.upstream_queries == 2 and stack.up.count("tcp") == tcp + 1
    assert (res.rechecks, res.refuted) == (rechecks + 1, refuted)
    again = stack.ask("www.nsec3.test.", "TXT")
    assert again.reply.rcode() == dns.rcode.SERVFAIL and again.upstream_queries == 0


# -- RRSIG questions ------------------------------------------------------------------------


def _signatures_at(stack: Stack, name: str) -> Hook:
    """What a recursive resolver answers to NAME RRSIG: every signature held at the name."""

    def hook(_q: dns.message.Message, reply: dns.message.Message, _t: str) -> Reply:
        reply.answer = [r for t in (T.A, T.AAAA) for r in stack.honest.resolve(N(name), t).answer
                        if r.rdtype == T.RRSIG and r.name == N(name)]
        reply.set_rcode(dns.rcode.NOERROR)
        return reply

    return hook


def test_rrsig_question_is_answered_as_data(stack: Stack) -> None:
    """An RRSIG question for a signed name.

    A signature has no signature of its own, so the RRSIGs at www.example.test. cannot be
    validated as an RRset; Unbound passes a positive RRSIG answer on unchecked. So do we:
    NOERROR, the signatures (to DO and non-DO clients alike), no AD, no EDE. A negative
    answer to an RRSIG question is validated as any other (NXDOMAIN with AD).
    """
    stack.on("www.example.test.", "RRSIG", _signatures_at(stack, "www.example.test."))
    out = stack.ask("www.example.test.", "RRSIG")
    record("RRSIG question", out)
    assert out.reply.rcode() == dns.rcode.NOERROR and not out.reply.flags & dns.flags.AD
    assert not out.ede
    assert {r.covers for r in out.reply.answer if r.rdtype == T.RRSIG} == {T.A, T.AAAA}
    plain = dns.query.udp(dns.message.make_query("www.example.test.", "RRSIG"), stack.host,
                          port=stack.port, timeout=5)
    assert {r.covers for r in plain.answer if r.rdtype == T.RRSIG} == {T.A, T.AAAA}
    nx = stack.ask("nope3.example.test.", "RRSIG")
    assert nx.reply.rcode() == dns.rcode.NXDOMAIN and nx.reply.flags & dns.flags.AD


# -- the resolver keeps answering ------------------------------------------------------------


class Stream:
    """Another client asking the warm name over and over, timing every answer."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stream", daemon=True)

    def _run(self) -> None:
        query = dns.message.make_query(WARM, "A", want_dnssec=True)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                reply = dns.query.udp(query, self.stack.host, port=self.stack.port, timeout=1.0)
            except Exception as e:  # a timeout is a failure of the property under test
                self.failures.append(repr(e))
                continue
            self.latencies.append(time.monotonic() - t0)
            a = reply.get_rrset(reply.answer, N(WARM), 1, T.A)
            if (reply.rcode() != dns.rcode.NOERROR or not reply.flags & dns.flags.AD
                    or a is None or [r.to_text() for r in a] != ["192.0.2.1"]):
                self.failures.append(reply.to_text())
            time.sleep(0.002)

    def __enter__(self) -> Stream:
        self.thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def _keytrap_as(stack: Stack, name: str) -> Hook:
    """www.keytrap.test.'s 40 bogus signatures, served under another name (no cache hit)."""

    def hook(query: dns.message.Message, reply: dns.message.Message, _t: str) -> Reply:
        honest = stack.honest.resolve(N("www.keytrap.test."), T.A)
        reply.answer = []
        for r in honest.answer:
            copy = dns.rrset.RRset(N(name), r.rdclass, r.rdtype, r.covers)
            copy.update_ttl(r.ttl)
            for rd in r:
                copy.add(rd)
            reply.answer.append(copy)
        reply.set_rcode(dns.rcode.NOERROR)
        return reply

    return hook


def _loop_lag(stack: Stack, stop: threading.Event) -> Coroutine[Any, Any, float]:
    """The longest the resolver's event loop went without running a 5 ms ticker."""

    async def probe() -> float:
        worst = 0.0
        while not stop.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(0.005)
            worst = max(worst, time.monotonic() - t0 - 0.005)
        return worst

    return probe()


def test_cached_answers_flow_during_attacks(stack: Stack) -> None:
    """The resolver keeps answering other queries meanwhile.

    www.example.test. A is warm (answered once, so it sits in the answer and wire caches).
    While a second client asks it every ~2 ms, we fire 16 KeyTrap queries (distinct names, so
    nothing is coalesced or cached: 16 x 40 bogus signatures), 2 queries to a silent upstream
    and 2 that draw garbage, all at once. Every KeyTrap ends SERVFAIL/EDE 6 within the limits,
    the others SERVFAIL/EDE 22, and every one of the stream's answers is NOERROR, AD, the
    right address, within LATENCY_BOUND.
    """
    attacks: dict[str, int] = {}
    for i in range(16):
        name = f"k{i}.keytrap.test."
        stack.on(name, "A", _keytrap_as(stack, name))
        attacks[name] = EDE.DNSSEC_BOGUS
    for i in range(2):
        stack.on(f"silent{i}.example.test.", "A", lambda q, r, t: None)
        attacks[f"silent{i}.example.test."] = EDE.NO_REACHABLE_AUTHORITY
        stack.on(f"junk{i}.example.test.", "A", _random_with_id)
        attacks[f"junk{i}.example.test."] = EDE.NO_REACHABLE_AUTHORITY

    stop_probe = threading.Event()
    lag = asyncio.run_coroutine_threadsafe(_loop_lag(stack, stop_probe), stack.resolver_loop.loop)
    cpu0, rcpu0, t0 = time.process_time(), stack.resolver_loop.cpu(), time.monotonic()
    with Stream(stack) as stream, concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {name: pool.submit(stack.ask, name) for name in attacks}
        outcomes = {name: f.result(10) for name, f in futures.items()}
        time.sleep(0.05)
    wall = time.monotonic() - t0
    cpu, rcpu = time.process_time() - cpu0, stack.resolver_loop.cpu() - rcpu0
    stop_probe.set()
    worst_lag = lag.result(5)

    for name, ede in attacks.items():
        reply = outcomes[name].reply
        assert reply.rcode() == dns.rcode.SERVFAIL, (name, reply)
        assert outcomes[name].ede[0][0] == ede, (name, outcomes[name].ede)
        if ede == EDE.DNSSEC_BOGUS:
            work = stack.work(name).work
            assert work.sig_checks <= stack.limits.max_sig_checks_per_rrset + 2, (name, work)
    keytrap_checks = sum(stack.work(n).work.sig_checks for n, e in attacks.items()
                         if e == EDE.DNSSEC_BOGUS)
    lat = sorted(stream.latencies)
    line = (f"{'stream during attacks':<28} answers={len(lat)} failures={len(stream.failures)} "
            f"max={lat[-1] * 1000:.1f} ms p50={lat[len(lat) // 2] * 1000:.2f} ms "
            f"resolver loop max lag={worst_lag * 1000:.1f} ms; attacks took {wall:.2f} s, "
            f"cpu {cpu * 1000:.0f} ms (resolver thread {rcpu * 1000:.0f} ms, "
            f"{keytrap_checks} sig checks for 16 KeyTraps)")
    FIGURES.append(line)
    print(line)
    assert not stream.failures, stream.failures[:3]
    assert len(lat) >= 20, len(lat)  # the stream ran through the whole attack
    assert lat[-1] < LATENCY_BOUND, lat[-1]
    assert worst_lag < LATENCY_BOUND, worst_lag
