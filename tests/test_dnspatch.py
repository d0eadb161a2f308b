"""resolver.wire.patch writes the bytes dnspython's own Name.to_wire writes."""

from __future__ import annotations

import io

import dns.name
from hypothesis import given, settings
from hypothesis import strategies as st

import resolver.wire.patch as patch

_LABEL = st.binary(min_size=1, max_size=8)
_NAMES = st.builds(lambda labels, absolute: dns.name.Name([*labels, b""] if absolute
                                                          else labels),
                   st.lists(_LABEL, max_size=5), st.booleans())


def _write(fn: object, name: dns.name.Name, **kw: object) -> bytes | str:
    f = io.BytesIO()
    try:
        fn(name, f, **kw)  # type: ignore[operator]
    except dns.name.NeedAbsoluteNameOrOrigin:
        return "relative"
    return f.getvalue()


def test_installed() -> None:
    assert dns.name.Name.to_wire is not patch.original_to_wire


@given(_NAMES, st.booleans(), st.sampled_from([None, dns.name.from_text("Example.")]))
@settings(max_examples=500, deadline=None)
def test_same_bytes(name: dns.name.Name, canonicalize: bool, origin: dns.name.Name | None
                    ) -> None:
    for table in (False, True):  # without and with a compression table (a fresh one each)
        mine = _write(dns.name.Name.to_wire, name, compress={} if table else None,
                      origin=origin, canonicalize=canonicalize)
        ref = _write(patch.original_to_wire, name, compress={} if table else None,
                     origin=origin, canonicalize=canonicalize)
        assert mine == ref


def test_digest_of_rdata_unchanged() -> None:
    import dns.rdata

    rd = dns.rdata.from_text("IN", "SOA", "NS.Example. Host.Example. 1 2 3 4 5")
    assert rd.to_digestable() == b"\x02ns\x07example\x00\x04host\x07example\x00" + \
        bytes.fromhex("0000000100000002000000030000000400000005")
