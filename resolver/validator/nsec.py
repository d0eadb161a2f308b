"""Authenticated denial of existence with NSEC (RFC 4035 §5.4, RFC 6840 §4).

Theory of operation
-------------------
The caller hands us NSEC records whose RRSIGs it has already verified with the keys of ``zone``;
everything here is pure set logic over canonical name order (``dns.name.Name`` ordering is RFC
4034 §6.1 order). No crypto, no I/O, no budget: the work is linear in the few NSECs of one reply.

Rules that validators got wrong in practice and that this module enforces:

* an NSEC whose next name lies outside the zone is bogus (Unbound 1.25, Knot 6.4.1, 2026);
* an NSEC at a delegation (NS without SOA) or at a DNAME proves nothing about names below it:
  those belong to the child (or are synthesized);
* a NODATA proof needs the type *and CNAME* absent; a parent-side delegation NSEC cannot prove
  NODATA for a child's data; a DS denial must come from the parent side (SOA bit clear) and
  reports whether the name is a delegation (NS set: insecure child) or not a cut at all;
* NXDOMAIN needs an NSEC covering the name and one covering (not matching) ``*.<closest
  encloser>``; a wildcard answer needs the qname covered with the closest encloser equal to
  the wildcard's parent (RFC 4035 §5.3.4).
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.edns
import dns.name
import dns.rdatatype
from dns.rdtypes.ANY.NSEC import NSEC

from resolver.validator.types import SECURE, Denial, Verdict, bogus, type_text

NsecList = Sequence[tuple[dns.name.Name, NSEC]]
_MISSING = dns.edns.EDECode.NSEC_MISSING


def has_type(windows: Sequence[tuple[int, bytes]], rdtype: int) -> bool:
    """True if ``rdtype`` is set in an NSEC/NSEC3 type bitmap."""
    window, bit = divmod(int(rdtype), 256)
    for number, bitmap in windows:
        if number == window:
            index = bit // 8
            return index < len(bitmap) and bool(bitmap[index] & (0x80 >> (bit % 8)))
    return False


def check_zone(nsecs: NsecList, zone: dns.name.Name) -> Verdict | None:
    """Bogus if any NSEC's owner or next name lies outside ``zone``, else None."""
    for owner, nsec in nsecs:
        if not owner.is_subdomain(zone):
            return bogus(f"NSEC owner {owner} outside zone {zone}")
        if not nsec.next.is_subdomain(zone):
            return bogus(f"NSEC {owner} next name {nsec.next} outside zone {zone}")
    return None


def _covers(owner: dns.name.Name, nsec: NSEC, name: dns.name.Name, zone: dns.name.Name) -> bool:
    """True if the NSEC at ``owner`` proves that ``name`` does not exist."""
    if name == owner or not name.is_subdomain(zone):
        return False
    if name.is_subdomain(owner):
        delegation = has_type(nsec.windows, dns.rdatatype.NS) and not has_type(
            nsec.windows, dns.rdatatype.SOA
        )
        if delegation or has_type(nsec.windows, dns.rdatatype.DNAME):
            return False  # below a cut or a DNAME: the NSEC says nothing about it
    if nsec.next <= owner:  # the last NSEC of the zone wraps around to the apex
        return bool(name > owner)
    return bool(owner < name < nsec.next)


def _common(a: dns.name.Name, b: dns.name.Name) -> dns.name.Name:
    return a.split(a.fullcompare(b)[2])[1]


def _closest_encloser(owner: dns.name.Name, nsec: NSEC, name: dns.name.Name) -> dns.name.Name:
    """RFC 4035 §5.4: the longest ancestor of name shared with the covering NSEC's ends."""
    a, b = _common(name, owner), _common(name, nsec.next)
    return a if len(a) >= len(b) else b


def _find_match(nsecs: NsecList, name: dns.name.Name) -> NSEC | None:
    for owner, nsec in nsecs:
        if owner == name:
            return nsec
    return None


def _find_cover(
    nsecs: NsecList, name: dns.name.Name, zone: dns.name.Name
) -> tuple[dns.name.Name, NSEC] | None:
    for owner, nsec in nsecs:
        if _covers(owner, nsec, name, zone):
            return owner, nsec
    return None


def prove_nxdomain(name: dns.name.Name, zone: dns.name.Name, nsecs: NsecList) -> Verdict:
    """NXDOMAIN: the name is covered, it is no empty non-terminal, and no wildcard applies."""
    cover = _find_cover(nsecs, name, zone)
    if cover is None:
        return bogus(f"no NSEC proves that {name} does not exist", _MISSING)
    owner, nsec = cover
    if nsec.next.is_subdomain(name):
        return bogus(f"NSEC shows {name} exists (empty non-terminal), yet NXDOMAIN")
    encloser = _closest_encloser(owner, nsec, name)
    wildcard = dns.name.Name(("*", *encloser.labels))
    if _find_match(nsecs, wildcard) is not None:
        return bogus(f"wildcard {wildcard} exists, yet NXDOMAIN for {name}")
    if _find_cover(nsecs, wildcard, zone) is None:
        return bogus(f"no NSEC proves that wildcard {wildcard} does not exist", _MISSING)
    return SECURE


def nodata_from_bitmap(kind: str, windows: Sequence[tuple[int, bytes]], name: dns.name.Name,
                       rdtype: int, zone: dns.name.Name) -> Denial:
    """What the type bitmap of the NSEC or NSEC3 (`kind`) matching `name` proves for a NODATA
    of `rdtype`: the same rules for both (RFC 4035 5.4, RFC 5155 8.5-8.6), including whether
    a DS denial shows an insecure delegation (NS without SOA)."""
    what = f"{name}/{type_text(rdtype)}"
    if has_type(windows, rdtype):
        return Denial(bogus(f"{kind} shows the type exists: {what}"))
    if rdtype != dns.rdatatype.CNAME and has_type(windows, dns.rdatatype.CNAME):
        return Denial(bogus(f"{kind} shows a CNAME at {name}, yet NODATA"))
    soa, ns = has_type(windows, dns.rdatatype.SOA), has_type(windows, dns.rdatatype.NS)
    if rdtype == dns.rdatatype.DS:
        if soa and name != zone:
            return Denial(bogus(f"child-apex {kind} used to deny DS at {name}"))
        return Denial(SECURE, cut=ns and not soa)
    if ns and not soa and name != zone:
        return Denial(bogus(f"parent-side delegation {kind} cannot prove NODATA for {what}"))
    return Denial(SECURE)


def prove_nodata(
    name: dns.name.Name, rdtype: int, zone: dns.name.Name, nsecs: NsecList
) -> Denial:
    """NODATA: exact match without the type, an empty non-terminal, or wildcard NODATA."""
    match = _find_match(nsecs, name)
    if match is not None:
        return nodata_from_bitmap("NSEC", match.windows, name, rdtype, zone)
    cover = _find_cover(nsecs, name, zone)
    if cover is not None:
        owner, nsec = cover
        if nsec.next.is_subdomain(name) and nsec.next != name:
            return Denial(SECURE)  # empty non-terminal (RFC 4035 §3.1.3.2 / RFC 6840 §4.3)
        wildcard = dns.name.Name(("*", *_closest_encloser(owner, nsec, name).labels))
        wild = _find_match(nsecs, wildcard)
        if wild is not None and rdtype != dns.rdatatype.DS:
            return nodata_from_bitmap("NSEC", wild.windows, wildcard, rdtype, zone)
        if rdtype == dns.rdatatype.DS:
            return Denial(SECURE)  # the name does not exist: certainly no zone cut there
    what = f"{name}/{type_text(rdtype)}"
    return Denial(bogus(f"no NSEC proves NODATA for {what}", _MISSING))


def prove_wildcard(
    name: dns.name.Name,
    parent: dns.name.Name,
    zone: dns.name.Name,
    nsecs: NsecList,
) -> Verdict:
    """A wildcard expansion of ``*.parent`` to ``name``: no closer match may exist."""
    cover = _find_cover(nsecs, name, zone)
    if cover is None:
        return bogus(f"wildcard answer for {name} without NSEC proving it absent", _MISSING)
    owner, nsec = cover
    if nsec.next.is_subdomain(name):
        return bogus(f"wildcard answer for {name}, but the name exists")
    if _closest_encloser(owner, nsec, name) != parent:
        return bogus(f"wildcard *.{parent} is not the closest encloser's for {name}")
    return SECURE
