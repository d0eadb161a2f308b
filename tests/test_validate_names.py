"""resolver.validator.names gives dnspython's answers for name equality and ancestry."""

from __future__ import annotations

import dns.name
from hypothesis import given, settings
from hypothesis import strategies as st

from resolver.validator.names import is_below, same_name

# Few distinct letters, so that equal and related names come up often; case flips too.
_LABEL = st.lists(st.sampled_from([b"a", b"A", b"b", b"B", b"xn--x", b"\x00", b".", b"-"]),
                  min_size=0, max_size=3).map(b"".join).filter(bool)
_NAMES = st.builds(lambda labels, absolute: dns.name.Name([*labels, b""] if absolute
                                                          else labels),
                   st.lists(_LABEL, max_size=4), st.booleans())


@given(_NAMES, _NAMES)
@settings(max_examples=3000, deadline=None)
def test_same_as_dnspython(a: dns.name.Name, b: dns.name.Name) -> None:
    assert same_name(a, b) == (a == b)
    assert is_below(a, b) == a.is_subdomain(b)
    assert is_below(b, a) == b.is_subdomain(a)


def test_cases_that_matter() -> None:
    n = dns.name.from_text
    assert same_name(n("WwW.Example."), n("www.example."))
    assert not same_name(n("www.example."), n("www.example.com."))
    assert is_below(n("a.B.c."), n("b.C."))
    assert is_below(n("b.c."), n("B.C."))
    assert is_below(n("x."), dns.name.root)
    assert not is_below(n("b.c."), n("a.b.c."))
    assert not is_below(n("ab.c."), n("b.c."))  # a suffix of bytes is not a suffix of labels
