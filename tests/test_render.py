"""resolver.wire.render against dnspython's renderer: the same bytes, or render declines.

Each message is rendered by `render` and by `Message.to_wire` with the same random seed (both
shuffle the records of an RRset with the global `random`), at several size limits. Messages:
the real BIND responses and the signed test world of tests/test_wireparse.py (with their
additional sections), the resolver's own replies (answer.build_reply, servfail with EDE), and
hand-made ones for compression corners (case, the 0x3FFF offset limit, long names).
"""

from __future__ import annotations

import random

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from resolver import answer as replies
from resolver.validator.response import Security, ValidatedAnswer, Verdict
from resolver.wire.render import render
from tests.test_wireparse import _bind, _world

SIZES = (65535, 4096, 1232, 512, 0)


def _same(msg: dns.message.Message, seed: int) -> bool:
    """True if render wrote the message (and its bytes are dnspython's), False if it declined."""
    rendered = False
    for size in SIZES:
        random.seed(seed)
        mine = render(msg, size)
        random.seed(seed)
        ref = msg.to_wire(max_size=size, prefer_truncation=True)
        if mine is not None:
            assert mine == ref, (size, msg)
            rendered = True
    return rendered


def _query(name: str = "www.example.test.", rdtype: str = "A", **kw: object
           ) -> dns.message.QueryMessage:
    return dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]


def _own_replies() -> list[dns.message.Message]:
    rrsets = [dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.1",
                                  "192.0.2.2", "192.0.2.3"),
              dns.rrset.from_text("www.example.test.", 300, "IN", "RRSIG",
                                  "A 13 3 300 20300101000000 20200101000000 1 example.test. "
                                  "AAAA")]
    out: list[dns.message.Message] = []
    for q in (_query(want_dnssec=True), _query(use_edns=False), _query(use_edns=0)):
        for security in (Security.SECURE, Security.INSECURE, Security.BOGUS):
            verdict = Verdict(security, "why not", 6 if security is Security.BOGUS else None)
            ans = ValidatedAnswer(verdict, dns.rcode.NOERROR, rrsets, [], 300)
            out.append(replies.build_reply(q, ans, max_ttl=100, payload=1232))
        out.append(replies.servfail(q, Verdict(Security.INDETERMINATE, "x" * 300, 22), 1232))
        out.append(replies.error_reply(q, dns.rcode.REFUSED, 1232))
    return out


def _crafted() -> list[dns.message.Message]:
    out = []
    q = _query("WwW.ExAmPlE.tEsT.", "TXT", use_edns=0)
    r = dns.message.make_response(q)
    r.answer = [dns.rrset.from_text("www.example.test.", 60, "IN", "CNAME", "A.EXAMPLE.test."),
                dns.rrset.from_text("a.example.TEST.", 60, "IN", "TXT", '"x"'),
                dns.rrset.from_text("A.example.test.", 60, "IN", "MX", "10 WWW.example.test.")]
    r.authority = [dns.rrset.from_text("example.test.", 60, "IN", "SOA",
                                       "ns.example.test. HOST.master.example.test. 1 2 3 4 5"),
                   dns.rrset.from_text("example.test.", 60, "IN", "NS", "ns.EXAMPLE.test."),
                   dns.rrset.from_text("dn.example.test.", 60, "IN", "DNAME", "example.test.")]
    out.append(r)
    # More than 0x3FFF bytes before the last names: no new compression entries past it.
    big = dns.message.make_response(_query("big.example.test.", "TXT"))
    big.answer = [dns.rrset.from_text(f"t{i}.big.example.test.", 60, "IN", "TXT",
                                      '"' + "y" * 250 + '"') for i in range(80)]
    big.answer += [dns.rrset.from_text("late.big.example.test.", 60, "IN", t, d)
                   for t, d in (("A", "192.0.2.1"), ("TXT", '"z"'))]
    out.append(big)
    long = ".".join(["abcdefghij"] * 22) + "."
    out.append(dns.message.make_response(_query(long, "A")))
    # Not ours to render: a type render does not write.
    r2 = dns.message.make_response(_query())
    r2.answer = [dns.rrset.from_text("www.example.test.", 60, "IN", "SRV", "0 0 1 x.test.")]
    out.append(r2)
    return out


def test_byte_for_byte_on_real_and_built_responses() -> None:
    messages = [dns.message.from_wire(w) for w in _bind() + _world()] + _own_replies()
    rendered = sum(_same(m, i) for i, m in enumerate(messages))
    # SRV, IPSECKEY, NSEC3PARAM and the like are dnspython's: most are ours.
    assert rendered >= 0.8 * len(messages)


@pytest.mark.parametrize("index", range(4))
def test_crafted(index: int) -> None:
    msg = _crafted()[index]
    assert _same(msg, index) == (index < 3)


def test_server_replies_go_through_render() -> None:
    """answer.to_wire gives dnspython's bytes for a reply render writes itself."""
    msg = _own_replies()[0]
    assert render(msg, 1232) is not None
    random.seed(5)
    expected = msg.to_wire(max_size=1232, prefer_truncation=True)
    random.seed(5)
    assert replies.to_wire(msg, 1232) == expected


def test_declines_relative_names_and_empty_rrsets() -> None:
    r = dns.message.make_response(_query())
    r.answer = [dns.rrset.from_text("www", 60, "IN", "A", "192.0.2.1")]
    assert render(r, 1232) is None
    r.answer = [dns.rrset.RRset(dns.name.from_text("www.example.test."), 1, 1)]
    assert render(r, 1232) is None


def test_truncation_is_left_to_dnspython() -> None:
    big = _crafted()[1]
    assert render(big, 1232) is None
    wire = replies.to_wire(big, 1232)
    assert len(wire) <= 1232 and dns.message.from_wire(wire).flags & dns.flags.TC
