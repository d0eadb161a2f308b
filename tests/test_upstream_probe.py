"""The DNSSEC probe against the signed test world: which forwarders pass, and why others fail.

Each forwarder is the in-memory recursive of tests/dnssec_fixtures.py behind a rewriter that
does what a real middlebox does (drops RRSIGs, ignores DO, drops denial proofs, damages a
signature, times out, answers SERVFAIL); the judge is our real validator on the world's anchor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest

from resolver.config import HostPort
from resolver.errors import UpstreamError
from resolver.resolve import Fetch, Validating
from resolver.upstream.probe import ProbeResult, ProbeStatus, probe
from resolver.validator.response import Limits, Validator
from tests.dnssec_fixtures import WHEN, build_world

T = dns.rdatatype
SERVER = HostPort("192.0.2.53")
Rewrite = Callable[[dns.message.Message], dns.message.Message]


def strip_dnssec(msg: dns.message.Message) -> dns.message.Message:
    """What a DNSSEC-unaware proxy hands on: no RRSIG, NSEC or NSEC3 anywhere."""
    for section in ("answer", "authority", "additional"):
        setattr(msg, section, [r for r in getattr(msg, section)
                               if r.rdtype not in (T.RRSIG, T.NSEC, T.NSEC3)])
    return msg


def strip_denial(msg: dns.message.Message) -> dns.message.Message:
    """Answers intact, denial proofs gone (the authority section emptied)."""
    msg.authority = []
    return msg


def damage_signatures(msg: dns.message.Message) -> dns.message.Message:
    """Every RRSIG's signature with one byte flipped (a rewriting middlebox)."""
    out = []
    for r in msg.answer:
        if r.rdtype == T.RRSIG:
            damaged = r.copy()
            damaged.clear()
            for sig in r:
                raw = bytearray(sig.signature)
                raw[0] ^= 0xFF
                damaged.add(sig.replace(signature=bytes(raw)))
            r = damaged
        out.append(r)
    msg.answer = out
    return msg


def servfail(msg: dns.message.Message) -> dns.message.Message:
    msg.set_rcode(dns.rcode.SERVFAIL)
    msg.answer, msg.authority = [], []
    return msg


def forwarder(rewrite: Rewrite | None = None, *, silent: bool = False
              ) -> tuple[Fetch, list[tuple[dns.name.Name, int]]]:
    upstream = build_world().upstream()
    asked: list[tuple[dns.name.Name, int]] = []

    async def ask(qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> dns.message.Message:
        asked.append((qname, int(qtype)))
        if silent:
            raise UpstreamError(f"{SERVER}: timeout after 1.5 s")
        msg = await upstream.fetch(qname, qtype)
        return rewrite(msg) if rewrite else msg

    return ask, asked


def make_validator(fetch: Fetch) -> Validating:
    return Validator(build_world().anchors, fetch, Limits())


def run_probe(ask: Fetch, probe_ds: str = "test.") -> ProbeResult:
    return asyncio.run(probe(SERVER, ask, make_validator, WHEN, dns.name.from_text(probe_ds)))


@pytest.mark.parametrize("probe_ds", ["test.", "com."])
def test_an_honest_forwarder_passes(probe_ds: str) -> None:
    # test. has a signed DS; com. does not exist in this root: its signed denial passes too.
    ask, asked = forwarder()
    result = run_probe(ask, probe_ds)
    assert result.ok and result.status is ProbeStatus.PASSED, result
    # The root DNSKEY is asked once (memoised), although the validator needs it twice.
    assert asked.count((dns.name.root, int(T.DNSKEY))) == 1
    assert (dns.name.from_text(probe_ds), int(T.DS)) in asked


@pytest.mark.parametrize(("rewrite", "probe_ds", "question", "words"), [
    (strip_dnssec, "test.", ". DNSKEY", "no RRSIG"),
    (damage_signatures, "test.", ". DNSKEY", "bogus"),
    (strip_denial, "com.", "com. DS", "bogus"),
])
def test_a_forwarder_that_strips_or_mangles_fails(rewrite: Rewrite, probe_ds: str,
                                                  question: str, words: str) -> None:
    result = run_probe(forwarder(rewrite)[0], probe_ds)
    assert result.status is ProbeStatus.STRIPS, result
    assert result.reason.startswith(question) and words in result.reason, result.reason
    assert str(result).startswith("192.0.2.53:53 strips or mangles DNSSEC (")


def test_a_forwarder_that_does_not_answer_is_silent() -> None:
    ask, asked = forwarder(silent=True)
    result = run_probe(ask)
    assert result.status is ProbeStatus.SILENT and "timeout" in result.reason
    assert len(asked) == 1  # no point asking the second question


def test_a_forwarder_that_answers_servfail_is_silent() -> None:
    result = run_probe(forwarder(servfail)[0])
    assert result.status is ProbeStatus.SILENT and result.reason == ". DNSKEY: SERVFAIL"


def test_a_failed_probe_is_not_logged_as_a_failed_validation(
        caplog: pytest.LogCaptureFixture) -> None:
    # A failed probe is reported once, by the selector's switch line: the probe's own
    # validations are not client answers and log nothing at warning level or above.
    with caplog.at_level(logging.INFO, logger="resolver"):
        assert run_probe(forwarder(strip_dnssec)[0]).status is ProbeStatus.STRIPS
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
