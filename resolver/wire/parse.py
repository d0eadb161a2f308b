"""Upstream responses into dnspython messages, at a fraction of `dns.message.from_wire`'s cost.

Theory of operation: this module does no I/O and reads no clock.

`parse_response(wire)` returns the `dns.message.Message` that
`dns.message.from_wire(wire, ignore_trailing=True)` returns, for the parts the resolver reads
(header, flags, question, answer, authority, OPT), or raises `dns.exception.DNSException`
where from_wire raises one. Every cold lookup parses at least one signed response, and
dnspython's generic reader spends most of its time in its own machinery (a `Parser` object
with a method call per byte field, a validated `Name` per owner, enum conversions, a
contextvar set per immutable object), not in the DNS. Measured on the benchmark's signed
responses: 120 us (A + RRSIG) to 370 us (NXDOMAIN with NSEC proofs) per response with
from_wire; see DESIGN.md for this module's figures.

What is the same, by construction and by test (tests/test_wireparse.py compares the two on the
lab zones' real responses and on mutated and random bytes):

* names follow dnspython's rules exactly: labels of 0-63 bytes, pointers only backwards, each
  one before the previous, at most 16 hops, the target never overlapping the name that
  points to it, 255 bytes at most; an RRSIG's signer may not be compressed;
* rdata: A, AAAA and RRSIG, the types every positive answer carries, are read here into
  the same objects (same classes, same attribute values: the test compares every slot)
  without dnspython's per-field validation, whose checks cannot fail on values read from
  fixed-width fields; SOA, NSEC, NSEC3, DNSKEY, DS, CNAME, DNAME, NS and PTR are read here
  and built with their classes' own constructors (so their checks run); every other type
  goes through `dns.rdata.from_wire_parser` itself, on the same bytes;
* records are grouped into RRsets as dnspython groups them (owner name compared without
  case, class, type, covered type; the TTL of an RRset is its smallest, a TTL above 2^31-1
  counts as 0; singleton types keep their last record), through `Rdataset.add` itself;
* OPT and TSIG outside the additional section, a second OPT, an OPT not owned by the root,
  or any TSIG (we never sign queries, so there is no key) make the message unreadable.

What differs, on purpose:

* the additional section is not kept (only its OPT is read: the extended RCODE and the DO
  bit live there). The forwarding path never reads it; iterative mode drops it as well
  (iterate/net.py). A record there is skipped by its length, so broken rdata in the
  additional section no longer makes the whole response unreadable.
* `message.index` is None (dnspython's own "no index" setting: find_rrset searches the
  sections), because filling it would hash every owner name, which dnspython does one
  character at a time.
* messages with an opcode other than QUERY are handed to from_wire whole.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any, Final

import dns.dnssectypes
import dns.exception
import dns.flags
import dns.ipv6
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.wire
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.DNAME import DNAME
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from dns.rdtypes.ANY.NS import NS
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.NSEC3 import NSEC3
from dns.rdtypes.ANY.OPT import OPT
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.RRSIG import RRSIG
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

import resolver.wire.patch  # noqa: F401  # rdata hashing without a Name per suffix

_MAX_HOPS: Final = dns.name.MAX_COMPRESSION_POINTER_CHAIN
_RR: Final = struct.Struct("!HHIH")
_SIG_HEAD: Final = struct.Struct("!HBBIIIH")
_HEAD: Final = struct.Struct("!HHHHHH")
_OPT: Final = int(dns.rdatatype.OPT)
_TSIG: Final = int(dns.rdatatype.TSIG)
_RRSIG: Final = int(dns.rdatatype.RRSIG)
_IN: Final = int(dns.rdataclass.IN)
_A: Final = int(dns.rdatatype.A)
_AAAA: Final = int(dns.rdatatype.AAAA)
_NAMES_MAX: Final = 4096

# Memos of values dnspython would compute again for every record: enum conversions, and
# Names by their labels (a Name is immutable, so one object may stand for all equal ones).
_types: dict[int, Any] = {}
_classes: dict[int, Any] = {}
_algorithms: dict[int, Any] = {}
_flags: dict[int, dns.flags.Flag] = {}
_names: dict[tuple[bytes, ...], tuple[dns.name.Name, tuple[bytes, ...]]] = {}


def _rdtype(value: int) -> Any:
    try:
        return _types[value]
    except KeyError:
        made = _types[value] = dns.rdatatype.RdataType.make(value)
        return made


def _rdclass(value: int) -> Any:
    try:
        return _classes[value]
    except KeyError:
        made = _classes[value] = dns.rdataclass.RdataClass.make(value)
        return made


def _name(wire: bytes, pos: int, end: int, decompress: bool = True
          ) -> tuple[dns.name.Name, tuple[bytes, ...], int]:
    """The name at pos (no byte read at or past `end`): (Name, its lowered labels, next pos).

    The rules are dns.name.from_wire_parser's (see the module comment); so are the
    exceptions, all of them dns.exception.FormError or a subclass.
    """
    labels: list[bytes] = []
    start = biggest = pos
    after = -1
    hops = 0
    while True:
        if pos >= end:
            raise dns.exception.FormError
        n = wire[pos]
        if n == 0:
            pos += 1
            break
        if n < 64:
            nxt = pos + 1 + n
            if nxt > end:
                raise dns.exception.FormError
            labels.append(wire[pos + 1:nxt])
            pos = nxt
        elif n >= 192:
            if not decompress:
                raise dns.name.DecompressionForbidden
            if pos + 2 > end:
                raise dns.exception.FormError
            target = ((n & 0x3F) << 8) | wire[pos + 1]
            if target >= biggest:
                raise dns.name.BadPointer
            biggest = target
            hops += 1
            if hops > _MAX_HOPS:
                raise dns.name.PointerChainTooLong
            if after < 0:
                after = pos + 2
            end = start  # the target may not run into the part that pointed to it
            pos = start = target
        else:
            raise dns.name.BadLabelType
    key = (*labels, b"")
    hit = _names.get(key)
    if hit is None:
        name = dns.name.Name(key)  # validates: NameTooLong above 255 bytes
        if len(_names) >= _NAMES_MAX:
            _names.clear()
        hit = _names[key] = (name, tuple(label.lower() for label in key))
    return hit[0], hit[1], (pos if after < 0 else after)


def _algorithm(value: int) -> Any:
    try:
        return _algorithms[value]
    except KeyError:
        made = _algorithms[value] = dns.dnssectypes.Algorithm.make(value)
        return made


_new = object.__new__
_set = object.__setattr__  # past dnspython's immutability guard: these objects are new


def _a(rdclass: int, rdtype: int, address: str, cls: type[A] | type[AAAA]) -> dns.rdata.Rdata:
    # What A(rdclass, rdtype, raw) builds (Rdata.__init__ + A.__init__, whose only check
    # is the length, done by the caller), without its per-field validation machinery.
    rd = _new(cls)
    _set(rd, "rdclass", _rdclass(rdclass))
    _set(rd, "rdtype", _rdtype(rdtype))
    _set(rd, "rdcomment", None)
    _set(rd, "address", address)
    return rd


def _rrsig(wire: bytes, pos: int, end: int, rdclass: int, rdtype: int) -> dns.rdata.Rdata:
    # What RRSIG.from_wire_parser builds. Its constructor's checks cannot fail on these
    # values (each integer comes from a struct field of the width it is checked against);
    # the enum conversions are the constructor's own, memoized.
    if end - pos < _SIG_HEAD.size:
        raise dns.exception.FormError
    covered, alg, labels, ottl, expiration, inception, tag = _SIG_HEAD.unpack_from(wire, pos)
    signer, _, after = _name(wire, pos + _SIG_HEAD.size, end, decompress=False)
    rd = _new(RRSIG)
    _set(rd, "rdclass", _rdclass(rdclass))
    _set(rd, "rdtype", _rdtype(rdtype))
    _set(rd, "rdcomment", None)
    _set(rd, "type_covered", _rdtype(covered))
    _set(rd, "algorithm", _algorithm(alg))
    _set(rd, "labels", labels)
    _set(rd, "original_ttl", ottl)
    _set(rd, "expiration", expiration)
    _set(rd, "inception", inception)
    _set(rd, "key_tag", tag)
    _set(rd, "signer", signer)
    _set(rd, "signature", wire[after:end])
    return rd


def _counted(wire: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """A length byte and that many bytes (wirebase.Parser.get_counted_bytes)."""
    if pos >= end:
        raise dns.exception.FormError
    nxt = pos + 1 + wire[pos]
    if nxt > end:
        raise dns.exception.FormError
    return wire[pos + 1:nxt], nxt


def _windows(wire: bytes, pos: int, end: int) -> list[tuple[int, bytes]]:
    """An NSEC/NSEC3 type bitmap (util.Bitmap.from_wire_parser; its constructor checks it)."""
    windows = []
    while pos < end:
        window = wire[pos]
        bitmap, pos = _counted(wire, pos + 1, end)
        windows.append((window, bitmap))
    return windows


def _fixed(wire: bytes, pos: int, end: int, fmt: struct.Struct) -> tuple[Any, ...]:
    if pos + fmt.size > end:
        raise dns.exception.FormError
    return fmt.unpack_from(wire, pos)


def _done(pos: int, end: int) -> None:
    if pos != end:  # restrict_to: the rdata must be read to its last byte
        raise dns.exception.FormError


# The types of every negative answer, referral and DNSKEY/DS fetch. Each is read here and
# built with its own class's constructor (whose checks, such as a DS digest's length or an
# NSEC bitmap's window order, run as they do under from_wire), as the class's
# from_wire_parser would build it. These classes are dnspython's for every rdata class.
def _soa(wire: bytes, pos: int, end: int, c: Any, t: Any) -> dns.rdata.Rdata:
    mname, _, pos = _name(wire, pos, end)
    rname, _, pos = _name(wire, pos, end)
    ints = _fixed(wire, pos, end, _SOA_INTS)
    _done(pos + _SOA_INTS.size, end)
    return SOA(c, t, mname, rname, *ints)  # type: ignore[no-untyped-call]


def _nsec(wire: bytes, pos: int, end: int, c: Any, t: Any) -> dns.rdata.Rdata:
    nxt, _, pos = _name(wire, pos, end, decompress=False)
    return NSEC(c, t, nxt, _windows(wire, pos, end))  # type: ignore[no-untyped-call]


def _nsec3(wire: bytes, pos: int, end: int, c: Any, t: Any) -> dns.rdata.Rdata:
    alg, flags, iterations = _fixed(wire, pos, end, _NSEC3_HEAD)
    salt, pos = _counted(wire, pos + _NSEC3_HEAD.size, end)
    nxt, pos = _counted(wire, pos, end)
    return NSEC3(c, t, alg, flags, iterations, salt, nxt,  # type: ignore[no-untyped-call]
                 _windows(wire, pos, end))


def _target(wire: bytes, pos: int, end: int, c: Any, t: Any) -> dns.rdata.Rdata:
    cls = _TARGET_TYPES[int(t)]
    target, _, pos = _name(wire, pos, end, decompress=cls is not DNAME)
    _done(pos, end)
    rd: dns.rdata.Rdata = cls(c, t, target)
    return rd


def _dnskey(wire: bytes, pos: int, end: int, c: Any, t: Any) -> dns.rdata.Rdata:
    flags, protocol, alg = _fixed(wire, pos, end, _KEY_HEAD)
    return DNSKEY(c, t, flags, protocol, alg, wire[pos + 4:end])  # type: ignore[no-untyped-call]


def _ds(wire: bytes, pos: int, end: int, c: Any, t: Any) -> dns.rdata.Rdata:
    tag, alg, digest_type = _fixed(wire, pos, end, _KEY_HEAD)
    return DS(c, t, tag, alg, digest_type, wire[pos + 4:end])  # type: ignore[no-untyped-call]


_SOA_INTS: Final = struct.Struct("!IIIII")
_NSEC3_HEAD: Final = struct.Struct("!BBH")
_KEY_HEAD: Final = struct.Struct("!HBB")
_TARGET_TYPES: Final[dict[int, Any]] = {int(dns.rdatatype.CNAME): CNAME,
                                        int(dns.rdatatype.NS): NS,
                                        int(dns.rdatatype.PTR): PTR,
                                        int(dns.rdatatype.DNAME): DNAME}
_READERS: Final[dict[int, Callable[[bytes, int, int, Any, Any], dns.rdata.Rdata]]] = {
    int(dns.rdatatype.SOA): _soa, int(dns.rdatatype.NSEC): _nsec,
    int(dns.rdatatype.NSEC3): _nsec3, int(dns.rdatatype.DNSKEY): _dnskey,
    int(dns.rdatatype.DS): _ds, **dict.fromkeys(_TARGET_TYPES, _target)}


def _rdata(wire: bytes, pos: int, end: int, rdclass: int, rdtype: int,
           parser: dns.wire.Parser) -> dns.rdata.Rdata:
    """The rdata in wire[pos:end], as dns.rdata.from_wire_parser reads it."""
    if rdclass == _IN and rdtype == _A:
        if end - pos != 4:
            raise dns.exception.FormError
        return _a(rdclass, rdtype, socket.inet_ntoa(wire[pos:end]), A)
    if rdtype == _RRSIG:
        return _rrsig(wire, pos, end, rdclass, rdtype)
    if rdclass == _IN and rdtype == _AAAA:
        if end - pos != 16:
            raise dns.exception.FormError
        return _a(rdclass, rdtype, dns.ipv6.inet_ntoa(wire[pos:end]), AAAA)
    reader = _READERS.get(rdtype)
    if reader is not None:
        try:
            return reader(wire, pos, end, _rdclass(rdclass), _rdtype(rdtype))
        except dns.exception.DNSException:
            raise
        except Exception as e:  # as dnspython's ExceptionWrapper(FormError) does
            raise dns.exception.FormError from e
    parser.seek(pos)
    with parser.restrict_to(end - pos):
        return dns.rdata.from_wire_parser(_rdclass(rdclass), _rdtype(rdtype), parser, None)


def parse_response(wire: bytes) -> dns.message.Message:
    """The message in `wire`, without its additional section (see the module comment).

    Raises:
        dns.exception.DNSException: where dns.message.from_wire(wire, ignore_trailing=True)
            raises one (malformed bytes), and for any TSIG record.
    """
    if len(wire) < 12:
        raise dns.message.ShortHeader
    qid, flags, qd, an, ns, ar = _HEAD.unpack_from(wire)
    if (flags >> 11) & 0x0F != 0:  # not QUERY: another message class, dnspython's business
        return dns.message.from_wire(wire, ignore_trailing=True)
    msg = dns.message.QueryMessage(id=qid)
    flag = _flags.get(flags)
    if flag is None:
        flag = _flags[flags] = dns.flags.Flag(flags)
        if len(_flags) > 1024:
            _flags.clear()
    msg.flags = flag
    msg.wire = wire
    msg.index = None  # type: ignore[assignment]  # dnspython's "search the sections"
    n = len(wire)
    pos = 12
    question = msg.sections[0]
    for _ in range(qd):
        name, _key, pos = _name(wire, pos, n)
        if pos + 4 > n:
            raise dns.exception.FormError
        rdtype, rdclass = struct.unpack_from("!HH", wire, pos)
        pos += 4
        question.append(dns.rrset.RRset(name, _rdclass(rdclass), _rdtype(rdtype)))
    parser = dns.wire.Parser(wire)
    for section, count in ((1, an), (2, ns)):
        pos = _read_section(wire, pos, count, msg.sections[section], section, parser)
    for _ in range(ar):
        pos = _read_additional(wire, pos, msg, parser)
    return msg


def _read_section(wire: bytes, pos: int, count: int, out: list[dns.rrset.RRset],
                  section: int, parser: dns.wire.Parser) -> int:
    n = len(wire)
    rrsets: dict[tuple[tuple[bytes, ...], int, int, int], dns.rrset.RRset] = {}
    for _ in range(count):
        name, key, pos = _name(wire, pos, n)
        if pos + 10 > n:
            raise dns.exception.FormError
        rdtype, rdclass, ttl, rdlen = _RR.unpack_from(wire, pos)
        pos += 10
        end = pos + rdlen
        if end > n:
            raise dns.exception.FormError
        if rdtype in (_OPT, _TSIG):  # BadEDNS / BadTSIG: only in the additional section
            raise dns.exception.FormError
        rd = _rdata(wire, pos, end, rdclass, rdtype, parser)
        pos = end
        covers = int(rd.covers())
        group = (key, rdclass, rdtype, covers)
        rrset = rrsets.get(group)
        if rrset is None:
            rrset = rrsets[group] = dns.rrset.RRset(name, _rdclass(rdclass), _rdtype(rdtype),
                                                    _rdtype(covers))
            out.append(rrset)
        rrset.add(rd, 0 if ttl > 0x7FFFFFFF else ttl)
    return pos


def _read_additional(wire: bytes, pos: int, msg: dns.message.Message,
                     parser: dns.wire.Parser) -> int:
    """One additional record: the OPT is read (once, at the root), anything else skipped."""
    n = len(wire)
    name, key, pos = _name(wire, pos, n)
    if pos + 10 > n:
        raise dns.exception.FormError
    rdtype, rdclass, ttl, rdlen = _RR.unpack_from(wire, pos)
    pos += 10
    end: int = pos + rdlen
    if end > n:
        raise dns.exception.FormError
    if rdtype == _TSIG:
        raise dns.message.UnknownTSIGKey  # we sign nothing: there is no key to check it
    if rdtype == _OPT:
        if msg.opt is not None or key != (b"",):  # a second OPT, or not at the root
            raise dns.message.BadEDNS
        if rdlen == 0:  # OPT(payload, OPT, ()): no options to read
            rd: dns.rdata.Rdata = _new(OPT)
            _set(rd, "rdclass", _rdclass(rdclass))
            _set(rd, "rdtype", _rdtype(rdtype))
            _set(rd, "rdcomment", None)
            _set(rd, "options", ())
        else:
            rd = _rdata(wire, pos, end, rdclass, rdtype, parser)
        msg.opt = dns.rrset.from_rdata(name, ttl, rd)
    return end
