"""Built-in root hints: the IANA root servers (named.root), used until priming replaces them.

The addresses change rarely (b.root-servers.net moved in November 2023); priming asks one of
them for the root NS RRset at start-up and whenever its TTL runs out, so a stale entry here
costs one timeout, not correctness. ``[upstream] root_hints`` replaces this list (the lab
points it at its own root).
"""

from __future__ import annotations

from typing import Final

import dns.name

from resolver.iterate.infra import Delegation

ROOT_SERVERS: Final[tuple[tuple[str, str, str], ...]] = (
    ("a.root-servers.net.", "198.41.0.4", "2001:503:ba3e::2:30"),
    ("b.root-servers.net.", "170.247.170.2", "2801:1b8:10::b"),
    ("c.root-servers.net.", "192.33.4.12", "2001:500:2::c"),
    ("d.root-servers.net.", "199.7.91.13", "2001:500:2d::d"),
    ("e.root-servers.net.", "192.203.230.10", "2001:500:a8::e"),
    ("f.root-servers.net.", "192.5.5.241", "2001:500:2f::f"),
    ("g.root-servers.net.", "192.112.36.4", "2001:500:12::d0d"),
    ("h.root-servers.net.", "198.97.190.53", "2001:500:1::53"),
    ("i.root-servers.net.", "192.36.148.17", "2001:7fe::53"),
    ("j.root-servers.net.", "192.58.128.30", "2001:503:c27::2:30"),
    ("k.root-servers.net.", "193.0.14.129", "2001:7fd::1"),
    ("l.root-servers.net.", "199.7.83.42", "2001:500:9f::42"),
    ("m.root-servers.net.", "202.12.27.33", "2001:dc3::35"),
)


def builtin_root() -> Delegation:
    """The root delegation from the built-in hints (names with their addresses as glue)."""
    names = tuple(dns.name.from_text(n) for n, _v4, _v6 in ROOT_SERVERS)
    glue = {dns.name.from_text(n): (v4, v6) for n, v4, v6 in ROOT_SERVERS}
    return Delegation(dns.name.root, names, glue)


def configured_root(addresses: tuple[tuple[str, int], ...]) -> Delegation:
    """The root delegation from ``[upstream] root_hints`` (addresses only, no names)."""
    return Delegation(dns.name.root, (), {}, addresses)
