"""Reply messages: cheap wire parsing for the fast path, and building replies from verdicts.

Theory of operation: this module does no I/O and reads no clock.

* `peek_query(wire)` reads only the header, the one question and an optional OPT record of a
  query, by slicing, and returns the cache key (lowercased qname, qtype, qclass, flag bits)
  or None when the query is not the plain shape the fast path serves. None never means
  "malformed": the slow path parses the message fully and decides. So anything the slow
  path would refuse must make peek return None: EDNS options are walked, and only NSID,
  padding and well-formed cookies (RFC 7873: client cookie 8 bytes, server cookie 8-32)
  stay on the fast path.
* `local_reply(query, payload)` answers the question types a resolver never sends upstream:
  qtype 0 and meta-types (FORMERR), zone transfers (REFUSED), ANY (RFC 8482 HINFO).
* `ttl_offsets(wire)` walks a reply we built ourselves and finds every TTL field, so cached
  replies can be aged by patching bytes (see cache.WireEntry).
* `build_reply`, `servfail`, `error_reply` and `header_error` turn results into messages:
  AD only for secure data and a client that set DO or AD; RRSIGs and NSEC/NSEC3 only for DO
  clients; SERVFAIL with an RFC 8914 Extended DNS Error for bogus or indeterminate results;
  every TTL capped by the answer's TTL and by max_ttl.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final, NamedTuple

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from resolver.validator.response import Security, ValidatedAnswer, Verdict
from resolver.wire.render import render

# Flag bits of the wire-cache key: every client property that changes the reply's bytes.
KEY_DO: Final = 1  # client wants DNSSEC records (and the DO echo)
KEY_CD: Final = 2  # client gets unvalidated data
KEY_AD: Final = 4  # client set AD: it wants the AD bit even without DO (RFC 6840 5.8)
KEY_EDNS: Final = 8  # client sent OPT: the reply carries one

_OPT: Final = int(dns.rdatatype.OPT)
_QR_RA: Final = int(dns.flags.QR | dns.flags.RA)
_RD: Final = int(dns.flags.RD)
_DO: Final = int(dns.flags.DO)
_DNSSEC_TYPES: Final = frozenset({dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3})
MAX_EDE_TEXT: Final = 120  # characters of EXTRA-TEXT; the log has the whole reason
ELLIPSIS: Final = " ..."
# EDNS options a fast-path query may carry: none of them changes the reply, and the only one
# with a shape to check (COOKIE) is checked in peek_query. Any other option: the slow path.
_FAST_OPTIONS: Final = frozenset({dns.edns.OptionType.NSID, dns.edns.OptionType.COOKIE,
                                  dns.edns.OptionType.PADDING})
# Question types that exist only as records in other sections, or are obsolete (Unbound's list,
# worker.c); with 128-248 (unassigned meta-types, NXNAME = 128 among them) they get FORMERR.
_NOT_QUESTIONS: Final = frozenset({0, dns.rdatatype.OPT, dns.rdatatype.TSIG,
                                   dns.rdatatype.TKEY, dns.rdatatype.MAILA,
                                   dns.rdatatype.MAILB})
_ZONE_TRANSFERS: Final = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})
ANY_HINFO_TTL: Final = 3600  # RFC 8482 4.2 leaves it to us; long enough to stop repeats


class QueryPeek(NamedTuple):
    """What the fast path needs from a query: its cache key and its UDP size.

    A NamedTuple: made for every query that arrives, and a frozen dataclass costs half a
    microsecond more to build (it sets each field through object.__setattr__).
    """

    key: tuple[bytes, int, int, int]
    qname_len: int
    udp_size: int  # the largest UDP reply this client takes (512 without EDNS)


_HH: Final = struct.Struct("!HH")
_OPT_FIXED: Final = struct.Struct("!HHBBHH")
_PLAIN_COUNTS: Final = b"\x00\x01\x00\x00\x00\x00"


def peek_query(wire: bytes) -> QueryPeek | None:
    """Read header, question and OPT by slicing; None if the query is not plain.

    Plain: QR=0, opcode QUERY, TC=0, QDCOUNT=1, ANCOUNT=NSCOUNT=0, ARCOUNT 0 or 1 (an OPT
    at the root with version 0), the name uncompressed, and nothing after the last record.
    """
    n = len(wire)
    if n < 17 or wire[2] & 0xFA:  # QR, opcode, TC must be 0 (AA ignored, RD allowed)
        return None
    if wire[4:10] != _PLAIN_COUNTS or wire[10] != 0 or wire[11] > 1:
        return None
    pos = 12
    while True:
        if pos >= n:
            return None
        length = wire[pos]
        if length == 0:
            break
        if length > 63:  # a compression pointer or a reserved label type
            return None
        pos += length + 1
    pos += 1
    qname_len = pos - 12
    if qname_len > 255 or pos + 4 > n:
        return None
    qtype, qclass = _HH.unpack_from(wire, pos)
    pos += 4
    flags = wire[3]
    bits = (KEY_CD if flags & 0x10 else 0) | (KEY_AD if flags & 0x20 else 0)
    udp_size = 512
    if wire[11] == 1:
        if pos + 11 > n or wire[pos] != 0:
            return None
        rtype, payload, _ext, version, eflags, rdlen = _OPT_FIXED.unpack_from(wire, pos + 1)
        if rtype != _OPT or version != 0 or pos + 11 + rdlen != n:
            return None
        if rdlen and not _fast_options(wire, pos + 11, n):
            return None
        bits |= KEY_EDNS | (KEY_DO if eflags & 0x8000 else 0)
        udp_size = max(512, payload)
    elif pos != n:
        return None
    return QueryPeek((wire[12:12 + qname_len].lower(), qtype, qclass, bits), qname_len,
                     udp_size)


def _fast_options(wire: bytes, pos: int, end: int) -> bool:
    """Whether the OPT RDATA at wire[pos:end] is well-formed and holds only _FAST_OPTIONS."""
    while pos < end:
        if pos + 4 > end:
            return False
        code, length = struct.unpack_from("!HH", wire, pos)
        pos += 4 + length
        if pos > end or code not in _FAST_OPTIONS:
            return False
        # RFC 7873 5.2.2: a client cookie alone (8) or with a server cookie (8-32 more);
        # any other length is FORMERR, which only the slow path gives.
        if code == dns.edns.OptionType.COOKIE and not (length == 8 or 16 <= length <= 40):
            return False
    return True


def query_key_bits(query: dns.message.Message) -> int:
    """The wire-cache flag bits of a parsed query (as peek_query computes them)."""
    bits = 0
    if query.flags & dns.flags.CD:
        bits |= KEY_CD
    if query.flags & dns.flags.AD:
        bits |= KEY_AD
    if query.edns >= 0:
        bits |= KEY_EDNS
        if query.ednsflags & dns.flags.DO:
            bits |= KEY_DO
    return bits


def _skip_name(wire: bytes, pos: int) -> int:
    while True:
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        pos += length + 1


def ttl_offsets(wire: bytes) -> tuple[tuple[int, int], ...]:
    """Offsets and values of every record TTL in a well-formed message, OPT excluded.

    Raises:
        IndexError, struct.error: if wire is not well-formed (we only call it on our own).
    """
    qd, an, ns, ar = struct.unpack_from("!HHHH", wire, 4)
    pos = 12
    for _ in range(qd):
        pos = _skip_name(wire, pos) + 4
    out: list[tuple[int, int]] = []
    for _ in range(an + ns + ar):
        pos = _skip_name(wire, pos)
        rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", wire, pos)
        if rtype != dns.rdatatype.OPT:
            out.append((pos + 4, ttl))
        pos += 10 + rdlen
    return tuple(out)


def min_ttl(message: dns.message.Message) -> int | None:
    """The smallest TTL of any record in the reply (OPT excluded), None if there are none."""
    ttls = [r.ttl for section in (message.answer, message.authority, message.additional)
            for r in section]
    return min(ttls) if ttls else None


def header_error(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A header-only error reply for a query we could not (or will not) parse; None to drop.

    Used for FORMERR when the message body is broken and NOTIMP for unknown opcodes. A
    packet shorter than a header, or one with QR set (a response: answering it could start a
    loop between two servers), is dropped.
    """
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    flags = 0x80 | (wire[2] & 0x79)  # QR, opcode and RD kept; AA, TC cleared
    return wire[0:2] + bytes((flags, int(rcode) & 0x0F)) + b"\x00" * 8


def _reply(query: dns.message.Message, payload: int) -> dns.message.Message:
    """make_response(query, recursion_available=True, our_payload=payload), DO echoed.

    Built directly for the usual query (opcode QUERY, no TSIG, no padding option): the same
    message (tests/test_answer_reply.py compares them) without make_response's flag enum
    arithmetic, which was 7 % of a cold lookup. Anything else goes through make_response.
    """
    flags = int(query.flags)
    opt = query.opt
    if flags & 0xF800 or query.tsig is not None or (
            opt and any(o.otype == dns.edns.OptionType.PADDING for o in query.options)):
        reply = dns.message.make_response(query, recursion_available=True,
                                          our_payload=payload)
        if query.edns >= 0 and query.ednsflags & dns.flags.DO:
            reply.ednsflags |= dns.flags.DO
        return reply
    reply = dns.message.QueryMessage(id=query.id)
    reply.flags = dns.flags.Flag(_QR_RA | (flags & _RD))
    reply.question = list(query.question)
    if opt:
        reply.use_edns(0, opt.ttl & _DO, payload, query.payload)
    return reply


def error_reply(query: dns.message.Message, rcode: dns.rcode.Rcode, payload: int
                ) -> dns.message.Message:
    """A reply with rcode and no records."""
    reply = _reply(query, payload)
    reply.set_rcode(rcode)
    return reply


def ede_text(reason: str, limit: int = MAX_EDE_TEXT) -> str:
    """`reason` in at most `limit` characters, cut between items, never inside one.

    A reason lists items ("A: REFUSED; B: timeout"); cutting at a fixed length once left half
    an address ("... REFUSED; 198.51.100.4:5"), which reads as a different server. So a long
    reason is cut after its last whole item ("; " or ", ") that fits, else after its last
    whole word, and ends with " ..." to say that it was cut. A single word longer than the
    limit is the one thing cut inside (there is no boundary to cut at).
    """
    reason = " ".join(reason.split())
    if len(reason) <= limit:
        return reason
    room = limit - len(ELLIPSIS)
    head = reason[:room + 1]  # +1: a separator right after `room` characters still counts
    for sep in ("; ", ", ", " "):
        cut = head.rfind(sep)
        # An item boundary is worth it only if it keeps most of the text; words always are.
        if cut > 0 and (sep == " " or cut >= room // 2):
            return reason[:cut].rstrip(" ;,:") + ELLIPSIS
    return reason[:room] + ELLIPSIS


def _attach_ede(query: dns.message.Message, reply: dns.message.Message, verdict: Verdict,
                payload: int) -> None:
    if query.edns >= 0:
        code = dns.edns.EDECode.make(verdict.ede if verdict.ede is not None
                                     else dns.edns.EDECode.OTHER)
        text = ede_text(verdict.reason) or None
        reply.use_edns(0, reply.ednsflags, payload, options=[dns.edns.EDEOption(code, text)])


def servfail(query: dns.message.Message, verdict: Verdict, payload: int) -> dns.message.Message:
    """SERVFAIL with an Extended DNS Error (when the client speaks EDNS) saying why."""
    reply = error_reply(query, dns.rcode.SERVFAIL, payload)
    _attach_ede(query, reply, verdict, payload)
    return reply


def local_reply(query: dns.message.Message, payload: int) -> dns.message.Message | None:
    """The reply to a question type a resolver answers itself and never forwards, or None.

    * qtype 0, OPT, TSIG, TKEY, MAILA, MAILB and the meta-types 128-248: FORMERR with EDE 30
      "Invalid Query Type" (as Unbound; RFC 9824 3.5 for NXNAME, 128: FORMERR, not forwarded).
    * AXFR, IXFR: REFUSED over any transport (a resolver has no zones to transfer; Unbound).
    * ANY: RFC 8482 4.2, the synthesized HINFO "RFC8482" "". A conventional ANY answer would
      hand out addresses without the capture step (A/AAAA are only answered after their
      tunnel is up), and its RRsets cannot be validated as one answer anyway. Unsigned and
      made up here, so never with AD.
    """
    q = query.question[0]
    qtype = int(q.rdtype)
    if qtype in _NOT_QUESTIONS or 128 <= qtype <= 248:
        reply = error_reply(query, dns.rcode.FORMERR, payload)
        _attach_ede(query, reply, Verdict(Security.INDETERMINATE, "meta-type as question",
                                          dns.edns.EDECode.INVALID_QUERY_TYPE), payload)
        return reply
    if qtype in _ZONE_TRANSFERS:
        reply = error_reply(query, dns.rcode.REFUSED, payload)
        _attach_ede(query, reply, Verdict(Security.INDETERMINATE, "no zone transfers",
                                          dns.edns.EDECode.NOT_SUPPORTED), payload)
        return reply
    if qtype == dns.rdatatype.ANY:
        reply = _reply(query, payload)
        hinfo = dns.rrset.from_text(q.name, ANY_HINFO_TTL, q.rdclass, dns.rdatatype.HINFO,
                                    '"RFC8482" ""')
        reply.answer = [hinfo]
        return reply
    return None


def _for_client(rrsets: Iterable[dns.rrset.RRset], dnssec: bool, ttl: int
                ) -> list[dns.rrset.RRset]:
    out = []
    for rrset in rrsets:
        if not dnssec and rrset.rdtype in _DNSSEC_TYPES:
            continue
        if rrset.ttl <= ttl:
            # Served as it is: the reply shares the cached RRset (a reply's RRsets are
            # rendered, never changed). The common case of a fresh answer, whose TTL is
            # its RRsets' own; a copy costs a hash of every rdata.
            out.append(rrset)
            continue
        # A new RRset sharing the rdatas (rrset.copy() and update() are untyped in dnspython
        # 2.9); the cached one must keep its TTL for the next client.
        copy = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype, rrset.covers)
        for rdata in rrset:
            copy.add(rdata)
        copy.ttl = max(0, min(rrset.ttl, ttl))
        out.append(copy)
    return out


def build_reply(query: dns.message.Message, answer: ValidatedAnswer, *, max_ttl: int,
                payload: int) -> dns.message.Message:
    """The reply to query from a validated answer (bogus/indeterminate become SERVFAIL).

    AD is set when the answer is secure and the client set DO or AD. RRSIG, NSEC and NSEC3
    are kept only for DO clients (except the RRSIGs an RRSIG question asks for). Every TTL
    is capped by answer.ttl and max_ttl. A verdict that carries an EDE code puts it in the
    reply (EDNS clients), whatever the rcode.
    """
    verdict = answer.verdict
    if verdict.security in (Security.BOGUS, Security.INDETERMINATE):
        return servfail(query, verdict, payload)
    reply = _reply(query, payload)
    dnssec = query.edns >= 0 and bool(query.ednsflags & dns.flags.DO)
    ttl = min(answer.ttl, max_ttl)
    # A question for RRSIG asks for the signatures themselves: they are the data, DO or not.
    asked_sigs = query.question[0].rdtype == dns.rdatatype.RRSIG
    reply.answer = _for_client(answer.answer, dnssec or asked_sigs, ttl)
    reply.authority = _for_client(answer.authority, dnssec, ttl)
    reply.set_rcode(dns.rcode.Rcode(answer.rcode))
    if verdict.security is Security.SECURE and (dnssec or query.flags & dns.flags.AD):
        reply.flags |= dns.flags.AD
    if verdict.ede is not None:
        # An answer served as insecure for a reason RFC 8914 names (NSEC3 iterations: EDE 27,
        # RFC 9276 section 3.2; unsupported algorithm or digest: EDE 1/2) says so too.
        _attach_ede(query, reply, verdict, payload)
    return reply


def unvalidated_reply(query: dns.message.Message, upstream: dns.message.Message, *,
                      max_ttl: int, payload: int) -> dns.message.Message:
    """The reply to a CD=1 client: the upstream's data as it came, never with AD."""
    reply = _reply(query, payload)
    dnssec = query.edns >= 0 and bool(query.ednsflags & dns.flags.DO)
    asked_sigs = query.question[0].rdtype == dns.rdatatype.RRSIG
    reply.answer = _for_client(upstream.answer, dnssec or asked_sigs, max_ttl)
    reply.authority = _for_client(upstream.authority, dnssec, max_ttl)
    rcode = upstream.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        rcode = dns.rcode.SERVFAIL
    reply.set_rcode(rcode)
    return reply


def to_wire(reply: dns.message.Message, max_size: int) -> bytes:
    """Render reply in at most max_size bytes, setting TC and dropping records if needed.

    resolver.wire.render writes dnspython's bytes at a fraction of the cost; what it does not
    render (other record types, truncation) dnspython renders.
    """
    wire = render(reply, max_size)
    if wire is not None:
        return wire
    return reply.to_wire(max_size=max_size, prefer_truncation=True)

