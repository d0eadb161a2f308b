"""Name equality and ancestry, as dnspython defines them, without its `fullcompare`.

Theory of operation: `dns.name.Name.__eq__` and `is_subdomain` go through `fullcompare`,
which lowercases and reverses both label tuples and walks them in Python on every call; the
validator compares names about ten times per answer (finding an RRset and its RRSIGs,
checking a signer against the zone and the owner), and that was a quarter of its non-crypto
time. These give dnspython's answers (tests/test_validate_names.py checks them against it on
random names of random case) and return early in the common cases: the very same object
(resolver.wire.parse hands out one Name per distinct name), or labels equal as they are.
Relative names, which the validator never sees, are left to dnspython.
"""

from __future__ import annotations

import dns.name


def same_name(a: dns.name.Name, b: dns.name.Name) -> bool:
    """a == b: the same labels, ASCII case ignored."""
    if a is b:
        return True
    la, lb = a.labels, b.labels
    if la == lb:
        return True
    if len(la) != len(lb) or not la or la[-1] != b"" or lb[-1] != b"":
        return len(la) == len(lb) and a == b  # relative names: dnspython's rules
    return all(x.lower() == y.lower() for x, y in zip(la, lb, strict=True))


def is_below(name: dns.name.Name, ancestor: dns.name.Name) -> bool:
    """name.is_subdomain(ancestor): ancestor's labels end name's (equal names included)."""
    la, lb = name.labels, ancestor.labels
    if not la or not lb or la[-1] != b"" or lb[-1] != b"":
        return name.is_subdomain(ancestor)  # relative names: dnspython's rules
    n = len(lb)
    if n > len(la):
        return False
    tail = la[len(la) - n:]
    if tail == lb:
        return True
    return all(x.lower() == y.lower() for x, y in zip(tail, lb, strict=True))
