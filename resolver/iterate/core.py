"""Iterative resolution without I/O: what a response means, which glue to use, what to ask next.

Theory of operation
-------------------
The asyncio driver (resolver/iterate/iterator.py) walks down the delegation tree; every decision it
makes about the bytes it got back is taken here, so it can be tested with tables:

* ``classify(response, qname, qtype, zone)`` says what one authoritative server's response to
  (qname, qtype), sent to a server of ``zone``, means:

  - ``Answer``: AA set, and the answer section holds the RRset asked for, a CNAME at qname, or
    a DNAME above it (all in ``zone``'s bailiwick);
  - ``Negative``: AA set, NXDOMAIN or NOERROR without the data (NODATA);
  - ``Referral``: AA clear, no answer, and an NS RRset in the authority section whose owner
    (the cut) is strictly below ``zone`` and at or above qname. A DS question is answered by
    the parent, so a referral to qname itself for a DS question is a failure;
  - ``Failure``: everything else. ``lame`` says whether the server is unfit for the zone
    (REFUSED, NOTIMP, FORMERR, a non-authoritative answer, a referral sideways or upwards —
    the classic referral loop) rather than having a bad moment (SERVFAIL).

  The response handed on is *scrubbed*: only answer and authority RRsets in ``zone``'s
  bailiwick are kept and the additional section is dropped, so a server cannot plant data
  for names it is not authoritative for (RFC 9520's and Unbound's scrubber rule). DNSSEC is
  checked later by the validator, exactly as for forwarded answers.

* Glue (``referral_glue``): an A/AAAA record in the additional section is used only if its
  owner is one of the referral's NS names *and* lies in the bailiwick of the zone that sent
  the referral: in-domain glue (under the delegated zone) and sibling glue (elsewhere under
  the referring zone), RFC 9471's terms. The referring zone could delegate the child anywhere
  anyway, and glue is kept with that one delegation (never as the NS name's address for other
  uses), so sibling glue gives a lying parent nothing more; accepting it, as Unbound and BIND
  do, saves a lookup per delegation. Glue for names outside the referring zone is dropped and
  the name resolved from its own zone. Loopback, unspecified and multicast addresses are never
  used: a zone must not be able to point us at ourselves.

* QNAME minimisation (RFC 9156, relaxed mode): ``plan(child, qname, qtype, count)`` gives the
  next question: one more label of qname below the deepest name known not to be a cut, asked
  with QTYPE A (RFC 9156 section 2.1: A draws fewer broken answers than NS), the first
  ``MINIMISE_ONE_LAB`` steps one label each, then larger steps so that at most
  ``MAX_MINIMISE_COUNT`` minimised queries are made; a label starting with "_" (service
  names) ends minimisation. The driver falls back to the full name when a minimised question
  draws NXDOMAIN or no server answers it (relaxed mode: some servers get empty non-terminals
  wrong).

* ``chain_next(response, qname, qtype)`` follows CNAME/DNAME links inside one authoritative
  response and says which name must be asked next when the chain leaves the server's zone.

* ``referral_ds`` turns the DS RRset a referral carries into the response to "cut DS", and
  ``randomise_case`` draws the 0x20 letter case of a question.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.DNAME import DNAME
from dns.rdtypes.ANY.NS import NS

MINIMISE_ONE_LAB: Final = 4  # RFC 9156 section 3: steps that add a single label
MAX_MINIMISE_COUNT: Final = 10  # RFC 9156 section 3: most minimised queries per name
_ADDRESS_TYPES: Final = (dns.rdatatype.A, dns.rdatatype.AAAA)
_LAME_RCODES: Final = frozenset({dns.rcode.REFUSED, dns.rcode.NOTIMP, dns.rcode.FORMERR})


# -- outcomes of one exchange ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """An authoritative answer (possibly a CNAME/DNAME link); ``response`` is scrubbed."""

    response: dns.message.Message


@dataclass(frozen=True, slots=True)
class Negative:
    """An authoritative NXDOMAIN or NODATA; ``response`` is scrubbed."""

    response: dns.message.Message
    nxdomain: bool


@dataclass(frozen=True, slots=True)
class Referral:
    """A delegation to ``cut``: its NS names (at most ``max_ns``) and the usable glue."""

    cut: dns.name.Name
    ns: tuple[dns.name.Name, ...]
    glue: Mapping[dns.name.Name, tuple[str, ...]]
    ttl: int
    dropped_ns: int = 0  # NS names beyond max_ns, ignored (NXNSAttack)


@dataclass(frozen=True, slots=True)
class Failure:
    """The server gave nothing usable. ``lame``: unfit for this zone, not just unlucky."""

    reason: str
    lame: bool


Outcome = Answer | Negative | Referral | Failure


# -- classification -------------------------------------------------------------------------


def in_bailiwick(name: dns.name.Name, zone: dns.name.Name) -> bool:
    """Whether ``name`` is ``zone`` or below it."""
    return name.is_subdomain(zone)


def _answers_question(section: Sequence[dns.rrset.RRset], qname: dns.name.Name,
                      qtype: int) -> bool:
    for rr in section:
        if rr.name == qname and rr.rdtype == qtype:
            return True
        if qtype not in (dns.rdatatype.CNAME, dns.rdatatype.DNAME):
            if rr.rdtype == dns.rdatatype.CNAME and rr.name == qname:
                return True
            if rr.rdtype == dns.rdatatype.DNAME and qname.is_subdomain(rr.name) \
                    and qname != rr.name:
                return True
    return False


def scrub(response: dns.message.Message, zone: dns.name.Name) -> dns.message.Message:
    """A copy of ``response`` with only answer/authority RRsets in ``zone``'s bailiwick.

    The additional section is dropped (glue is taken from the original by ``classify``).
    """
    out = dns.message.Message(id=response.id)
    out.flags = response.flags
    out.set_rcode(response.rcode())
    out.question = list(response.question)
    out.answer = [rr for rr in response.answer if in_bailiwick(rr.name, zone)]
    out.authority = [rr for rr in response.authority if in_bailiwick(rr.name, zone)]
    return out  # no OPT: nothing downstream reads the server's EDNS


def classify(response: dns.message.Message, qname: dns.name.Name, qtype: int,
             zone: dns.name.Name, *, max_ns: int = 13, allow_loopback: bool = False
             ) -> Outcome:
    """What the response of a server of ``zone`` to (qname, qtype) means (module docstring).

    The caller has matched the response to its query (ID, question, source) already.
    """
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return Failure(f"rcode {dns.rcode.to_text(rcode)}", lame=rcode in _LAME_RCODES)
    aa = bool(response.flags & dns.flags.AA)
    answer = [rr for rr in response.answer if in_bailiwick(rr.name, zone)]
    if rcode == dns.rcode.NOERROR and _answers_question(answer, qname, qtype):
        if not aa:
            return Failure("answer without AA (not authoritative)", lame=True)
        return Answer(scrub(response, zone))
    if aa:
        return Negative(scrub(response, zone), nxdomain=rcode == dns.rcode.NXDOMAIN)
    if rcode == dns.rcode.NXDOMAIN:
        return Failure("NXDOMAIN without AA (not authoritative)", lame=True)
    ns_sets = [rr for rr in response.authority if rr.rdtype == dns.rdatatype.NS]
    below = [rr for rr in ns_sets if rr.name != zone and rr.name.is_subdomain(zone)
             and qname.is_subdomain(rr.name)]
    if not below:
        if ns_sets:
            return Failure(f"referral to {ns_sets[0].name}, not below {zone} towards {qname}",
                           lame=True)
        return Failure("neither an answer nor a referral", lame=True)
    ns_rrset = max(below, key=len)  # the deepest cut offered
    if qtype == dns.rdatatype.DS and ns_rrset.name == qname:
        return Failure(f"referral to {qname} itself for its DS (the parent must answer)",
                       lame=True)
    names = list(dict.fromkeys(rd.target for rd in ns_rrset if isinstance(rd, NS)))
    kept = tuple(names[:max_ns])
    glue = referral_glue(response.additional, kept, zone, allow_loopback=allow_loopback)
    return Referral(ns_rrset.name, kept, glue, ns_rrset.ttl, dropped_ns=len(names) - len(kept))


# -- glue and addresses ---------------------------------------------------------------------


def usable_address(text: str, *, allow_loopback: bool = False) -> bool:
    """Whether we may send a query to this address (never ourselves, never a group)."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    if addr.is_unspecified or addr.is_multicast:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return False  # ::ffff:127.0.0.1 would reach what the IPv4 check refuses
    return allow_loopback or not addr.is_loopback


def addresses_of(rrsets: Iterable[dns.rrset.RRset], name: dns.name.Name, *,
                 allow_loopback: bool = False) -> tuple[tuple[str, ...], int]:
    """The usable A/AAAA addresses at ``name`` in ``rrsets`` and their smallest TTL."""
    out: list[str] = []
    ttl: int | None = None
    for rr in rrsets:
        if rr.name != name or rr.rdtype not in _ADDRESS_TYPES:
            continue
        for rd in rr:
            text = str(rd.address)
            if usable_address(text, allow_loopback=allow_loopback) and text not in out:
                out.append(text)
        ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
    return tuple(out), ttl or 0


def referral_glue(additional: Sequence[dns.rrset.RRset], ns_names: Sequence[dns.name.Name],
                  referring_zone: dns.name.Name, *, allow_loopback: bool = False
                  ) -> dict[dns.name.Name, tuple[str, ...]]:
    """Glue addresses per NS name, only for names in the referring zone's bailiwick."""
    glue: dict[dns.name.Name, tuple[str, ...]] = {}
    for name in ns_names:
        if not in_bailiwick(name, referring_zone):
            continue  # out-of-bailiwick glue: dropped, the name is resolved instead
        addrs, _ttl = addresses_of(additional, name, allow_loopback=allow_loopback)
        if addrs:
            glue[name] = addrs
    return glue


# -- QNAME minimisation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One question to ask the current zone's servers."""

    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    minimised: bool


def minimised_child(child: dns.name.Name, qname: dns.name.Name, count: int) -> dns.name.Name:
    """The next name to ask below ``child`` on the way to ``qname`` (RFC 9156 section 3)."""
    remaining = len(qname) - len(child)
    if remaining <= 0:
        return qname
    if count < MINIMISE_ONE_LAB:
        step = 1
    elif count < MAX_MINIMISE_COUNT:
        step = max(1, remaining // (MAX_MINIMISE_COUNT - count))
    else:
        step = remaining
    nxt = qname.split(len(child) + step)[1]
    if nxt.labels[0].startswith(b"_"):
        return qname  # _service._proto names are not zone cuts in practice: ask in full
    return nxt


def plan(child: dns.name.Name, qname: dns.name.Name, qtype: dns.rdatatype.RdataType,
         count: int, *, minimise: bool = True) -> Step:
    """The next question, given the deepest name ``child`` known to be in the current zone."""
    if not minimise or child == qname:
        return Step(qname, qtype, False)
    nxt = minimised_child(child, qname, count)
    if nxt == qname:
        return Step(qname, qtype, False)
    return Step(nxt, dns.rdatatype.A, True)


# -- CNAME/DNAME chains ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainEnd:
    """Where the chain inside one response ends: ``follow`` is the name still to be asked."""

    follow: dns.name.Name | None
    names: tuple[dns.name.Name, ...] = field(default=())  # every name the chain went through


def chain_next(response: dns.message.Message, qname: dns.name.Name, qtype: int,
               max_links: int) -> ChainEnd:
    """Follow CNAME/DNAME links in ``response``'s answer section from ``qname``.

    Returns ``follow=None`` when the response itself ends the chain (the data, or a negative
    answer for the last name), else the target to ask next. Loops and over-long chains end
    here too (``follow=None``); the validator judges them.
    """
    current, seen = qname, [qname]
    section = response.answer
    for _ in range(max_links + 1):
        if any(rr.name == current and rr.rdtype == qtype for rr in section):
            return ChainEnd(None, tuple(seen))
        target = _link_target(section, current, qtype)
        if target is None:
            break
        if target in seen:
            return ChainEnd(None, tuple(seen))
        seen.append(target)
        current = target
    else:
        return ChainEnd(None, tuple(seen))
    if current == qname or response.rcode() == dns.rcode.NXDOMAIN:
        return ChainEnd(None, tuple(seen))
    # The chain left the answer section: followed unless the server proved the last name's
    # absence (an SOA of a zone holding it means the server answered for that name).
    for rr in response.authority:
        if rr.rdtype == dns.rdatatype.SOA and current.is_subdomain(rr.name):
            return ChainEnd(None, tuple(seen))
    return ChainEnd(current, tuple(seen))


def _link_target(section: Sequence[dns.rrset.RRset], name: dns.name.Name, qtype: int
                 ) -> dns.name.Name | None:
    if qtype in (dns.rdatatype.CNAME, dns.rdatatype.DNAME):
        return None
    for rr in section:
        if rr.rdtype == dns.rdatatype.CNAME and rr.name == name:
            rd = next(iter(rr))
            return rd.target if isinstance(rd, CNAME) else None
    dnames = [rr for rr in section if rr.rdtype == dns.rdatatype.DNAME
              and name.is_subdomain(rr.name) and name != rr.name]
    if dnames:
        dname = max(dnames, key=len)
        rd = next(iter(dname))
        if isinstance(rd, DNAME):
            try:
                return name.relativize(dname.name).concatenate(rd.target)
            except dns.name.NameTooLong:
                return None
    return None


def referral_ds(response: dns.message.Message, cut: dns.name.Name
                ) -> tuple[dns.message.Message, int] | None:
    """The DS RRset (and its RRSIGs) a referral to ``cut`` carries, as a response to "cut DS".

    A signed parent puts the child's DS in its referrals; keeping it saves the validator's DS
    query to the parent, as Unbound does. Nothing is trusted by this: the validator checks the
    DS RRset against the parent's keys exactly as if it had been asked for. Only a positive
    DS is kept (an unsigned delegation's NSEC/NSEC3 proof comes with the real DS query, SOA
    included). Returns the response and the smallest TTL, or None.
    """
    ds = next((rr for rr in response.authority if rr.name == cut
               and rr.rdtype == dns.rdatatype.DS), None)
    if ds is None:
        return None
    sigs = [rr for rr in response.authority if rr.name == cut
            and rr.rdtype == dns.rdatatype.RRSIG and rr.covers == dns.rdatatype.DS]
    out = dns.message.Message()
    out.flags = dns.flags.QR | dns.flags.AA
    out.question = [dns.rrset.RRset(cut, dns.rdataclass.IN, dns.rdatatype.DS)]
    out.answer = [ds, *sigs]
    out.use_edns(0, dns.flags.DO, 1232)
    return out, min(rr.ttl for rr in out.answer)


def merge_chain(qname: dns.name.Name, qtype: int, parts: Sequence[dns.message.Message],
                payload: int) -> dns.message.Message:
    """One response to (qname, qtype) from the responses along a CNAME chain, in order.

    The answer sections are concatenated (duplicates dropped); authority and rcode are the
    last response's, as a recursive server's would be. A single part is returned as it is.
    """
    last = parts[-1]
    if len(parts) == 1 and last.question and last.question[0].name == qname:
        return last
    out = dns.message.Message()
    out.flags = dns.flags.QR | dns.flags.RA | (last.flags & dns.flags.AA)
    out.set_rcode(last.rcode())
    out.question = [dns.rrset.RRset(qname, dns.rdataclass.IN,
                                    dns.rdatatype.RdataType.make(qtype))]
    seen: set[tuple[dns.name.Name, int, int]] = set()
    for part in parts:
        for rr in part.answer:
            key = (rr.name, rr.rdtype, rr.covers)
            if key not in seen:
                seen.add(key)
                out.answer.append(rr)
    out.authority = list(last.authority)
    out.use_edns(0, dns.flags.DO, payload)
    return out


# -- 0x20 ---------------------------------------------------------------------------------


def randomise_case(name: dns.name.Name, bits: int) -> dns.name.Name:
    """``name`` with the case of each ASCII letter taken from ``bits`` (draft-vixie-dnsext-dns0x20).

    A server echoes the question as sent, so a forged reply must also guess the case pattern:
    one more bit of entropy per letter on top of the 16-bit ID and the random source port.
    """
    labels = []
    for label in name.labels:
        out = bytearray(label)
        for i, c in enumerate(out):
            if 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A:
                out[i] = c | 0x20 if bits & 1 else c & ~0x20
                bits >>= 1
        labels.append(bytes(out))
    return dns.name.Name(labels)
