"""Reply messages to wire bytes: dnspython's exact bytes, written without its renderer.

Theory of operation: this module does no I/O and reads no clock.

`render(message, max_size)` returns what `message.to_wire(max_size=max_size,
prefer_truncation=True)` returns, byte for byte, or None when it does not render this message
itself: a record of a type not written here, a relative name, an empty RRset, TSIG, padding,
or a message larger than max_size (truncation stays dnspython's). The caller then asks
dnspython. Every cold answer is rendered once (then served from the wire cache), and
dnspython's renderer builds a `Name` object for every suffix of every name it writes, to look
it up in its compression table, and writes the message through a file object field by field.

Same bytes, by construction and by test (tests/test_render.py, against dnspython on the
real BIND responses and the signed test world):

* names are compressed as dnspython compresses them: every suffix of every name written
  with a table (owner names, and the rdata names of CNAME, NS, PTR, MX and SOA) is looked
  up without case, a new non-root suffix is recorded at its offset if the offset fits in a
  pointer (below 0x4000), the first one found becomes a pointer; the rdata names of RRSIG,
  NSEC and DNAME are written whole and recorded nowhere;
* the records of an RRset are shuffled with `random.shuffle`, as dnspython shuffles them
  (it consumes the same random numbers: with the same seed, the same order);
* the OPT record comes last, with the message's EDNS flags, payload and options.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from typing import Any, Final

import dns.message
import dns.name
import dns.rdata
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.DNAME import DNAME
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.NS import NS
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.NSEC3 import NSEC3
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.RRSIG import RRSIG
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

Table = dict[tuple[bytes, ...], int]
_RR: Final = struct.Struct("!HHI")
_U16: Final = struct.Struct("!H")
_SIG_HEAD: Final = struct.Struct("!HBBIIIH")


class _Unsupported(Exception):
    """This message is dnspython's to render (see the module comment)."""


def _name(out: bytearray, name: dns.name.Name, table: Table | None) -> None:
    """Write a name; with a table, compressed as dns.name.Name.to_wire compresses."""
    labels = name.labels
    if not labels or labels[-1] != b"":
        raise _Unsupported  # relative: dnspython raises NeedAbsoluteNameOrOrigin
    if table is None:
        for label in labels:
            out.append(len(label))
            out += label
        return
    lowered = tuple(label.lower() for label in labels)
    for i in range(len(labels) - 1):
        suffix = lowered[i:]
        pos = table.get(suffix)
        if pos is not None:
            out += _U16.pack(0xC000 | pos)
            return
        here = len(out)
        if here <= 0x3FFF:
            table[suffix] = here
        out.append(len(labels[i]))
        out += labels[i]
    out.append(0)


def _bitmap(out: bytearray, windows: Any) -> None:
    for window, bitmap in windows:
        out.append(window)
        out.append(len(bitmap))
        out += bitmap


def _a(out: bytearray, rd: Any, table: Table) -> None:
    out += socket.inet_pton(socket.AF_INET, rd.address)


def _aaaa(out: bytearray, rd: Any, table: Table) -> None:
    out += socket.inet_pton(socket.AF_INET6, rd.address)


def _rrsig(out: bytearray, rd: Any, table: Table) -> None:
    out += _SIG_HEAD.pack(rd.type_covered, rd.algorithm, rd.labels, rd.original_ttl,
                          rd.expiration, rd.inception, rd.key_tag)
    _name(out, rd.signer, None)
    out += rd.signature


def _nsec(out: bytearray, rd: Any, table: Table) -> None:
    _name(out, rd.next, None)
    _bitmap(out, rd.windows)


def _nsec3(out: bytearray, rd: Any, table: Table) -> None:
    out += struct.pack("!BBHB", rd.algorithm, rd.flags, rd.iterations, len(rd.salt))
    out += rd.salt
    out.append(len(rd.next))
    out += rd.next
    _bitmap(out, rd.windows)


def _dnskey(out: bytearray, rd: Any, table: Table) -> None:
    out += struct.pack("!HBB", rd.flags, rd.protocol, rd.algorithm)
    out += rd.key


def _ds(out: bytearray, rd: Any, table: Table) -> None:
    out += struct.pack("!HBB", rd.key_tag, rd.algorithm, rd.digest_type)
    out += rd.digest


def _soa(out: bytearray, rd: Any, table: Table) -> None:
    _name(out, rd.mname, table)
    _name(out, rd.rname, table)
    out += struct.pack("!IIIII", rd.serial, rd.refresh, rd.retry, rd.expire, rd.minimum)


def _target(out: bytearray, rd: Any, table: Table) -> None:
    _name(out, rd.target, table)


def _dname(out: bytearray, rd: Any, table: Table) -> None:
    _name(out, rd.target, None)


def _mx(out: bytearray, rd: Any, table: Table) -> None:
    out += _U16.pack(rd.preference)
    _name(out, rd.exchange, table)


def _txt(out: bytearray, rd: Any, table: Table) -> None:
    for s in rd.strings:
        out.append(len(s))
        out += s


# Exact classes only: a subclass may write itself differently.
_WRITERS: Final[dict[type, Callable[[bytearray, Any, Table], None]]] = {
    A: _a, AAAA: _aaaa, RRSIG: _rrsig, NSEC: _nsec, NSEC3: _nsec3, DNSKEY: _dnskey, DS: _ds,
    SOA: _soa, CNAME: _target, NS: _target, PTR: _target, DNAME: _dname, MX: _mx, TXT: _txt,
}


def _rrset(out: bytearray, rrset: dns.rrset.RRset, table: Table) -> int:
    rdatas = list(rrset)
    if not rdatas or rrset.deleting is not None:
        raise _Unsupported
    random.shuffle(rdatas)  # as Rdataset.to_wire(want_shuffle=True)
    fixed = _RR.pack(rrset.rdtype, rrset.rdclass, rrset.ttl)
    for rd in rdatas:
        writer = _WRITERS.get(type(rd))
        if writer is None:
            raise _Unsupported
        _name(out, rrset.name, table)
        out += fixed
        at = len(out)
        out += b"\0\0"
        writer(out, rd, table)
        _U16.pack_into(out, at, len(out) - at - 2)
    return len(rdatas)


def render(message: dns.message.Message, max_size: int) -> bytes | None:
    """message.to_wire(max_size=max_size, prefer_truncation=True), or None (see above)."""
    if message.tsig is not None or message.pad or message.origin is not None or max_size <= 0:
        return None
    out = bytearray(12)
    table: Table = {}
    counts = [len(message.question), 0, 0, 0]
    try:
        for q in message.question:
            _name(out, q.name, table)
            out += struct.pack("!HH", q.rdtype, q.rdclass)
        for section in (1, 2, 3):
            for rrset in message.sections[section]:
                counts[section] += _rrset(out, rrset, table)
        opt = message.opt
        if opt is not None:
            out += b"\0" + _RR.pack(opt.rdtype, opt.rdclass, opt.ttl)
            at = len(out)
            out += b"\0\0"
            for option in opt[0].options:
                data = option.to_wire() or b""
                out += struct.pack("!HH", option.otype, len(data))
                out += data
            _U16.pack_into(out, at, len(out) - at - 2)
            counts[3] += 1
    except _Unsupported:
        return None
    if len(out) > max(512, min(max_size, 65535)):
        return None  # dnspython truncates
    struct.pack_into("!HHHHHH", out, 0, message.id, message.flags, *counts)
    return bytes(out)
