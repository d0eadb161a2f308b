"""The DNSSEC probe: does a forwarder hand signed data through intact?

Theory of operation: `[upstream] mode = "auto"` forwards only to forwarders that pass this
probe (resolver/upstream/select.py decides; this module asks and judges). A forwarder passes
when two questions, sent to it alone with DO=1 CD=1 like every forwarded question, come back
and validate through our own validator from our own trust anchors:

  P1. `. DNSKEY`: the root's keys with their RRSIGs, a SECURE positive answer. This is what
      a stripping router (RRSIGs dropped, DO ignored, EDNS cut so the ~1 KB answer does not
      fit) fails first.
  P2. `<probe_ds> DS` (`[upstream] probe_ds`, "com." by default): a DS from the parent side
      of a cut, SECURE: the signed DS, or, in a private root without that name, the signed
      NSEC/NSEC3 proof that it does not exist. A forwarder that answers DS from the child
      side, or drops denial proofs, fails here.

Each probe gets a fresh `Validator` whose fetches go to the probed forwarder only (memoised
for the probe, so the root DNSKEY is asked once): the verdict is about that forwarder, and
nothing it says enters the resolver's caches. The outcome is PASSED, STRIPS (it answers, but
what it hands over does not validate: the verdict's reason says how) or SILENT (no answer:
timeouts, refusals, an unreachable network). The judging is the pure `judge`; only `probe`
waits on the network.

The same validator that decides every client answer decides the probe, so "passes the probe"
and "answers validate" cannot drift apart. Like dnssec-trigger, we probe rather than trust;
unlike systemd-resolved's allow-downgrade, a forwarder that fails is not used without
validation: we resolve from the root instead.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from resolver.config import HostPort
from resolver.errors import UpstreamError
from resolver.resolve import Fetch, Validating
from resolver.validator.response import Security, ValidatedAnswer

# Sends one question to the probed forwarder alone (the validator's Fetch, same shape).
Ask = Fetch
MakeValidator = Callable[[Fetch], Validating]


class ProbeStatus(enum.Enum):
    """How a forwarder did."""

    PASSED = "passed"
    STRIPS = "strips or mangles DNSSEC"
    SILENT = "does not answer"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One forwarder's probe: status and, when it failed, why (question and verdict)."""

    server: HostPort
    status: ProbeStatus
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when the forwarder may be used."""
        return self.status is ProbeStatus.PASSED

    def __str__(self) -> str:
        text = f"{self.server} {self.status.value}"
        return f"{text} ({self.reason})" if self.reason else text


ROOT_DNSKEY: Final = (dns.name.root, dns.rdatatype.DNSKEY)


def questions(probe_ds: dns.name.Name) -> tuple[tuple[dns.name.Name, dns.rdatatype.RdataType],
                                                 ...]:
    """P1 and P2, in the order they are asked."""
    return (ROOT_DNSKEY, (probe_ds, dns.rdatatype.DS))


def judge(qname: dns.name.Name, qtype: dns.rdatatype.RdataType, ans: ValidatedAnswer
          ) -> tuple[ProbeStatus, str]:
    """The status one validated probe answer gives (PASSED, or why not).

    P1 must be a SECURE answer with the DNSKEY RRset; P2 SECURE, answer or proven absence.
    INDETERMINATE (a fetch inside validation failed) is SILENT; anything else STRIPS.
    """
    what = f"{qname.to_text()} {dns.rdatatype.to_text(qtype)}"
    verdict = ans.verdict
    if verdict.security is Security.INDETERMINATE:
        return ProbeStatus.SILENT, f"{what}: {verdict.reason}"
    if verdict.security is not Security.SECURE:
        ede = f" (EDE {verdict.ede})" if verdict.ede is not None else ""
        return ProbeStatus.STRIPS, f"{what}: {verdict.security.value}: {verdict.reason}{ede}"
    if (qname, qtype) == ROOT_DNSKEY and not any(r.rdtype == dns.rdatatype.DNSKEY
                                                 for r in ans.answer):
        return ProbeStatus.STRIPS, f"{what}: no DNSKEY RRset in a secure answer"
    return ProbeStatus.PASSED, ""


async def probe(server: HostPort, ask: Ask, make_validator: MakeValidator,
                now: float, probe_ds: dns.name.Name) -> ProbeResult:
    """Ask P1 and P2 of one forwarder (through `ask`) and judge the answers.

    Args:
        server: the forwarder (for the result only; `ask` is what reaches it).
        ask: sends one question to this forwarder alone (DO=1, CD=1).
        make_validator: a fresh validator over a fetch function.
        now: POSIX time, for signature validity.
        probe_ds: P2's owner name.

    Never raises except for cancellation: failures are results.
    """
    memo: dict[tuple[dns.name.Name, int], dns.message.Message] = {}

    async def fetch(qname: dns.name.Name, qtype: dns.rdatatype.RdataType
                    ) -> dns.message.Message:
        key = (qname.canonicalize(), int(qtype))
        if key not in memo:
            memo[key] = await ask(qname, qtype)
        return memo[key]

    validator = make_validator(fetch)
    for qname, qtype in questions(probe_ds):
        try:
            response = await fetch(qname, qtype)
        except UpstreamError as e:
            return ProbeResult(server, ProbeStatus.SILENT, str(e))
        if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return ProbeResult(server, ProbeStatus.SILENT,
                               f"{qname} {dns.rdatatype.to_text(qtype)}: "
                               f"{dns.rcode.to_text(response.rcode())}")
        ans = await validator.validate(qname, qtype, response, now)
        status, reason = judge(qname, qtype, ans)
        if status is not ProbeStatus.PASSED:
            return ProbeResult(server, status, reason)
    return ProbeResult(server, ProbeStatus.PASSED)

