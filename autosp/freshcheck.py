"""`publish --require-secure`: is what we just published DNSSEC-secure? Asked without caches.

Theory of operation. Asking a validating resolver for the records right after an update is
fooled by its cache: it still holds the old RRset for up to its TTL and says "other data", so
a DHCP hook would fail on almost every move although the update was applied and signed. The
check therefore validates along the authoritative path:

  1. the zone's DNSKEY RRset is asked of the validating resolver, which must answer it with
     the AD bit: the resolver vouches for the keys from its trust anchors (keys do not change
     when a record does, so its cached copy is the right one);
  2. each published RRset is read fresh from the primary (the server the update went to, the
     only one certain to have it), with its RRSIGs;
  3. each RRset must be exactly what was published and carry a signature that validates with
     one of those keys, now (dnspython's dns.dnssec.validate: key tag, algorithm, signer,
     validity period). A type published empty must be absent at the primary.

The primary signs within milliseconds (BIND's inline signing), so steps 2-3 are polled until
`timeout`. A primary that serves no signatures at all (the zone is signed somewhere after it)
cannot be checked this way: then the answer of the validating resolver is taken, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import dns.dnssec
import dns.exception
import dns.flags
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rrset

from autosp.publish import CheckResult, Server, ask, check_secure, poll_check

Final = dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]]


class _Unsigned(Exception):
    """The primary serves the RRset without any RRSIG."""


def check_fresh(name: dns.name.Name, zone: dns.name.Name, final: Final, primary: Server,
                resolver: Server, timeout: float, *,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep,
                wall: Callable[[], float] = time.time) -> CheckResult:
    """Poll until the published RRsets validate along the authoritative path (see above)."""
    start = clock()
    per_query = max(0.5, min(2.0, timeout))
    try:
        return poll_check(lambda: _once(name, zone, final, primary, resolver, per_query, wall()),
                          start, timeout, clock=clock, sleep=sleep)
    except _Unsigned:
        left = max(0.0, timeout - (clock() - start))
        return check_secure(name, final, resolver, left, clock=clock, sleep=sleep)


def _once(name: dns.name.Name, zone: dns.name.Name, final: Final, primary: Server,
          resolver: Server, timeout: float, now: float) -> str:
    """'' when secure, else why not. Raises _Unsigned (see the module docstring)."""
    fresh: list[tuple[str, dns.rrset.RRset, dns.rrset.RRset | None]] = []
    for rdtype, want in sorted(final.items()):
        what = f"{name} {dns.rdatatype.to_text(rdtype)}"
        r = ask(primary, name, rdtype, timeout, tcp=True)
        if isinstance(r, str):
            return r
        got = r.get_rrset(r.answer, name, dns.rdataclass.IN, rdtype)
        if not want:
            if got is not None:
                return f"the primary {primary} still serves {what}"
            continue
        if got is None or frozenset(got) != want:
            return f"the primary {primary} does not serve the published {what} yet"
        sigs = r.get_rrset(r.answer, name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rdtype)
        fresh.append((what, got, sigs))
    if fresh and all(sigs is None for _, _, sigs in fresh):
        raise _Unsigned
    unsigned = [what for what, _, sigs in fresh if sigs is None]
    if unsigned:
        return f"the primary {primary} serves {', '.join(unsigned)} without a signature yet"
    keys = ask(resolver, zone, dns.rdatatype.DNSKEY, timeout)
    if isinstance(keys, str):
        return keys
    if keys.rcode() != dns.rcode.NOERROR:
        return f"{resolver} answers {dns.rcode.to_text(keys.rcode())} for {zone} DNSKEY"
    if not keys.flags & dns.flags.AD:
        return (f"{resolver} returns {zone} DNSKEY without the AD bit: the zone is unsigned, "
                "its chain of trust is broken, or the resolver does not validate")
    dnskey = keys.get_rrset(keys.answer, zone, dns.rdataclass.IN, dns.rdatatype.DNSKEY)
    if dnskey is None:
        return f"{resolver} returns no DNSKEY RRset for {zone}"
    for what, got, sigs in fresh:
        assert sigs is not None  # `unsigned` above returned otherwise
        try:
            dns.dnssec.validate(got, sigs, {zone: dnskey}, now=now)
        except dns.exception.ValidationFailure as exc:
            return f"the signature over {what} at the primary does not validate ({exc})"
    return ""
