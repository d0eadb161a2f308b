"""resolver.wire.parse against dnspython's own reader: the same message, or both refuse.

Differential: every response is read by `parse_response` and by `dns.message.from_wire`, and
the results are compared field by field (exact name case, the class of every value, every
slot of every rdata). Inputs: real BIND responses (tests/data/bind_responses.txt, NSEC and
NSEC3 zones with wildcards, CNAME/DNAME chains, referrals with glue), the signed test world of
tests/dnssec_fixtures.py, hand-made malformed messages, and mutations of all of these.

The rule (wire/parse's module comment): where dnspython reads the message, we read the same
header, question, answer, authority and OPT; where dnspython refuses the message without its
additional section, we refuse too; a message that dnspython refuses only because of its
additional section may go either way.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.wire.parse import parse_response
from tests.dnssec_fixtures import build_world

DATA = Path(__file__).parent / "data" / "bind_responses.txt"


def _bind() -> list[bytes]:
    return [bytes.fromhex(line.split()[2]) for line in DATA.read_text().splitlines()]


def _world() -> list[bytes]:
    upstream = build_world().upstream()
    out = []
    for zone in ("example.test.", "nsec3.test.", "optout.test.", "iter.test.", "test.", "."):
        for label in ("www", "nope", "alias", "x.wild", "a.b", "b", "loop1", "x.wc", "dn",
                      "www.dn", "ext", "unsig", "x.unsig", "@"):
            text = zone if label == "@" else f"{label}.{zone}".replace("..", ".")
            name = dns.name.from_text(text)
            for rdtype in ("A", "AAAA", "TXT", "DNSKEY", "DS", "NS", "SOA", "CNAME"):
                msg = upstream.resolve(name, dns.rdatatype.from_text(rdtype))
                out.append(msg.to_wire())
    return out


def _crafted() -> list[bytes]:
    """Shapes the corpora lack: odd grouping, odd TTLs, and every way a name can break."""
    def parse(text: str) -> dns.rrset.RRset:
        owner, ttl, rdtype, rdata = text.split(None, 3)
        return dns.rrset.from_text(owner, int(ttl), "IN", rdtype, rdata)

    def msg(*records: str, additional: tuple[str, ...] = (), opcode: int = 0) -> bytes:
        q = dns.message.make_query("www.example.", "A", use_edns=0, want_dnssec=True)
        r = dns.message.make_response(q)
        r.flags |= opcode << 11
        for text in records:
            r.answer.append(parse(text))
        for text in additional:
            r.additional.append(parse(text))
        return r.to_wire()

    good = msg("www.example. 300 A 192.0.2.1",
               "www.example. 300 RRSIG A 13 2 300 20300101000000 20200101000000 1 example. "
               "AAAA", "WWW.example. 200 A 192.0.2.2",
               additional=("ns.example. 300 A 192.0.2.53",))
    out = [good, msg(opcode=4), msg(opcode=5), msg("www.example. 300 CNAME a.example.",
                                                   "www.example. 300 CNAME b.example."),
           # rdata whose items have no value equality (a mutated type field made one of
           # these out of a BIND response once: the comparison must still compare them)
           msg("www.example. 300 APL 1:192.0.2.0/24 !2:2001:db8::/32")]
    head = bytearray(good[:12])
    # question www.example. A IN, then hand-made answer records
    question = b"\x03www\x07example\x00\x00\x01\x00\x01"

    def raw(*records: bytes, an: int | None = None, ar: int = 0) -> bytes:
        h = bytearray(head)
        struct.pack_into("!HHHH", h, 4, 1, len(records) if an is None else an, 0, ar)
        return bytes(h) + question + b"".join(records)

    def rr(owner: bytes, rdtype: int, rdata: bytes, ttl: int = 300, rdclass: int = 1) -> bytes:
        return owner + struct.pack("!HHIH", rdtype, rdclass, ttl, len(rdata)) + rdata

    ptr = b"\xc0\x0c"
    sig = struct.pack("!HBBIIIH", 1, 13, 2, 300, 2**31, 2**30, 7)
    out += [
        raw(rr(ptr, 1, b"\xc0\x00\x02\x01", ttl=2**31)),  # TTL above 2^31-1: 0
        raw(rr(ptr, 1, b"\xc0\x00\x02\x01", ttl=5), rr(ptr, 1, b"\xc0\x00\x02\x01", ttl=9)),
        raw(rr(ptr, 1, b"\xc0\x00\x02")),  # A of 3 bytes
        raw(rr(ptr, 28, b"\x20\x01" + b"\x00" * 13)),  # AAAA of 15 bytes
        raw(rr(ptr, 28, b"\x00" * 10 + b"\xff\xff\xc0\x00\x02\x01")),  # v4-mapped
        raw(rr(ptr, 46, sig + b"\x07example\x00" + b"sig")),
        raw(rr(ptr, 46, sig + b"\xc0\x10" + b"sig")),  # compressed signer: refused
        raw(rr(ptr, 46, sig[:10])),  # short RRSIG
        raw(rr(ptr, 46, sig + b"\x07example")),  # signer runs off the rdata
        raw(rr(b"\xc0\x1d", 1, b"\x01\x02\x03\x04")),  # pointer forward (to itself)
        raw(rr(b"\xc0\x0d", 1, b"\x01\x02\x03\x04")),  # pointer into a label
        raw(rr(b"\x40abc\x00", 1, b"\x01\x02\x03\x04")),  # label type 0x40
        raw(rr(b"\x80abc\x00", 1, b"\x01\x02\x03\x04")),  # label type 0x80
        raw(rr(b"\x03abc" + ptr, 1, b"\x01\x02\x03\x04")),
        raw(rr(b"\x3f" + b"x" * 63 + b"\x3f" + b"y" * 63 + b"\x3f" + b"z" * 63 + b"\x3e"
               + b"w" * 62 + b"\x00", 1, b"\x01\x02\x03\x04")),  # 255 bytes: fits
        raw(rr(b"\x3f" + b"x" * 63 + b"\x3f" + b"y" * 63 + b"\x3f" + b"z" * 63 + b"\x3f"
               + b"w" * 63 + b"\x00", 1, b"\x01\x02\x03\x04")),  # 256 bytes: too long
        raw(rr(b"\x00", 41, b"")),  # OPT in the answer
        raw(rr(b"\x00", 250, b"")),  # TSIG in the answer
        raw(rr(b"\x00", 41, b"", ttl=0x8000) , an=0, ar=1),
        raw(rr(b"\x00", 41, b"", ttl=0x8000), rr(b"\x00", 41, b""), an=0, ar=2),  # two OPTs
        raw(rr(ptr, 41, b""), an=0, ar=1),  # OPT not at the root
        raw(rr(b"\x00", 41, b"\x00\x0a\x00\x08" + b"c" * 8), an=0, ar=1),  # OPT + cookie
        raw(rr(b"\x00", 41, b"\x00\x0a\x00\x09" + b"c" * 8), an=0, ar=1),  # option overrun
        raw(rr(b"\x00", 250, b"\x00"), an=0, ar=1),  # TSIG
        raw(rr(ptr, 1, b"\x01\x02\x03\x04"), an=2),  # count beyond the records
        raw(rr(ptr, 1, b"\x01\x02\x03\x04"), b"junk", an=1),  # trailing bytes: ignored
        raw(rr(ptr, 1, b"\x01\x02\x03\x04"), rr(ptr, 16, b"\x02hi"),
            rr(ptr, 1, b"\x05\x06\x07\x08")),  # an RRset split by another
        raw(rr(ptr, 1, b"\x01\x02\x03\x04", rdclass=3)),  # CH A: dnspython's CH reader
        raw(rr(ptr, 46, sig + b"\x00" + b"s", rdclass=3)),  # RRSIG in class CH
        raw(rr(ptr, 5, b"\x01a" + ptr), rr(ptr, 5, b"\x01b" + ptr)),  # two CNAMEs: last kept
        raw(rr(ptr, 99, b"\x01\x02\x03\x04")),  # SPF: a generic type
        raw(rr(ptr, 65280, b"\x01\x02")),  # a private type
        b"\x00" * 11,
        bytes(head[:12]) + question[:-1],
        # owner names differing in case only: one RRset, the first one's case
        raw(rr(ptr, 1, b"\x01\x02\x03\x04"),
            rr(b"\x03WWW\x07EXAMPLE\x00", 1, b"\x05\x06\x07\x08")),
        raw(rr(b"\x03WwW\xc0\x10", 1, b"\x01\x02\x03\x04"),
            rr(ptr, 1, b"\x05\x06\x07\x08")),
        _chain(raw, rr, 16), _chain(raw, rr, 17),  # pointer chains: 16 hops allowed, not 17
    ]
    return out


def _chain(raw: Any, rr: Any, hops: int) -> bytes:
    """A name reached through `hops` pointers: each one points at the one before it, the
    first at the question name. The chain sits in the rdata of a private-type record; the
    next record's owner is a pointer to its last link."""
    start = 12 + 17 + 10 + 2  # header, question, the private record's owner and fixed part
    links = b"\xc0\x0c" + b"".join(struct.pack("!H", 0xC000 | (start + 2 * i))
                                    for i in range(hops - 2))
    last = struct.pack("!H", 0xC000 | (start + 2 * (hops - 2)))
    return raw(rr(b"\xc0\x0c", 65280, links), rr(last, 1, b"\x01\x02\x03\x04"))


CORPUS = _bind() + _world() + _crafted()


def _slots(rd: dns.rdata.Rdata) -> list[str]:
    return sorted({s for k in type(rd).__mro__ for s in getattr(k, "__slots__", ())})


def _same_value(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, dns.name.Name):
        assert a.labels == b.labels
    elif isinstance(a, tuple | list):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            _same_value(x, y)
    elif type(a).__eq__ is object.__eq__:
        # Items without a value equality of their own (an APL record's APLItem, which a
        # mutation can make out of any record): compared by what they say.
        assert str(a) == str(b), (a, b)
    else:
        assert a == b


def _same_rrsets(mine: list[dns.rrset.RRset], ref: list[dns.rrset.RRset]) -> None:
    assert len(mine) == len(ref)
    for x, y in zip(mine, ref, strict=True):
        assert x.name.labels == y.name.labels
        for attr in ("rdclass", "rdtype", "covers", "deleting", "ttl"):
            _same_value(getattr(x, attr), getattr(y, attr))
        assert len(x) == len(y)
        for r, s in zip(x, y, strict=True):
            assert type(r) is type(s)
            assert _slots(r) == _slots(s)
            for slot in _slots(r):
                _same_value(getattr(r, slot), getattr(s, slot))


def _same(mine: dns.message.Message, ref: dns.message.Message, *, opt: bool) -> None:
    assert mine.id == ref.id
    _same_value(mine.flags, ref.flags)
    assert type(mine) is type(ref)
    _same_rrsets(mine.question, ref.question)
    _same_rrsets(mine.answer, ref.answer)
    _same_rrsets(mine.authority, ref.authority)
    if opt:
        assert mine.rcode() == ref.rcode()
        assert (mine.opt is None) == (ref.opt is None)
        if ref.opt is not None and mine.opt is not None:
            _same_rrsets([mine.opt], [ref.opt])
            assert (mine.edns, mine.ednsflags, mine.payload, mine.options) == \
                (ref.edns, ref.ednsflags, ref.payload, ref.options)


def _read(wire: bytes, **kw: Any) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(wire, ignore_trailing=True, **kw)
    except dns.exception.DNSException:
        return None
    except (ValueError, UnicodeError, IndexError, struct.error):  # dnspython's own escapes
        return None


def check(wire: bytes) -> str:
    """Compare both readers on `wire`; returns which case of the rule applied."""
    full = _read(wire)
    no_ar = _read(wire[:10] + b"\0\0" + wire[12:]) if len(wire) >= 12 else None
    try:
        mine: dns.message.Message | None = parse_response(wire)
    except dns.exception.DNSException:
        mine = None
    if no_ar is None:
        assert mine is None, "dnspython refuses this message; we read it"
        return "both refuse"
    if full is not None:
        assert mine is not None, "dnspython reads this message; we refuse it"
        _same(mine, full, opt=True)
        return "same"
    if mine is not None:  # dnspython refused it for its additional section only
        _same(mine, no_ar, opt=False)
    return "additional"


def test_corpus_has_the_shapes_we_meant() -> None:
    kinds = [check(w) for w in CORPUS]
    assert kinds.count("same") > 400
    assert kinds.count("both refuse") >= 12
    assert kinds.count("additional") >= 2  # TSIG, two OPTs...
    types = {rrset.rdtype for w in _bind() for m in [parse_response(w)]
             for rrset in m.answer + m.authority}
    for t in ("A", "AAAA", "RRSIG", "NSEC", "NSEC3", "SOA", "DNSKEY", "DS", "CNAME", "DNAME",
              "MX", "TXT", "SRV", "IPSECKEY", "NS", "NSEC3PARAM"):
        assert dns.rdatatype.from_text(t) in types, t


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_same_as_dnspython(index: int) -> None:
    check(CORPUS[index])


def test_real_responses_have_no_additional_section_but_keep_the_opt() -> None:
    for wire in _bind():
        msg = parse_response(wire)
        assert msg.additional == [] and msg.opt is not None
        assert msg.ednsflags & dns.flags.DO


def test_seeded_mutations() -> None:
    """Bit flips, byte changes, cuts and splices of every corpus message, 20 each."""
    rng = random.Random(13)
    for wire in CORPUS:
        for _ in range(20):
            w = bytearray(wire)
            kind = rng.randrange(4)
            if kind == 0 and w:
                i = rng.randrange(len(w))
                w[i] ^= 1 << rng.randrange(8)
            elif kind == 1 and w:
                for _ in range(rng.randint(1, 4)):
                    w[rng.randrange(len(w))] = rng.choice((0, 0xC0, 0x3F, 0xFF,
                                                           rng.randrange(256)))
            elif kind == 2:
                w = w[:rng.randrange(len(w) + 1)]
            else:
                other = rng.choice(CORPUS)
                cut = rng.randrange(len(w) + 1)
                w = w[:cut] + other[rng.randrange(len(other) + 1):]
            check(bytes(w))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS), st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 255)),
                                         max_size=6), st.integers(0, 1300))
def test_fuzzed(wire: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    w = bytearray(wire[:cut] if cut < len(wire) else wire)
    for pos, value in edits:
        if pos < len(w):
            w[pos] = value
    check(bytes(w))


@given(st.binary(min_size=12, max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes(wire: bytes) -> None:
    check(wire)
