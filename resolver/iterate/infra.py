"""What iterative resolution remembers between queries: zone cuts, server addresses, server health.

Theory of operation (no I/O, no clock: every method takes ``now``, monotonic seconds):

* ``DelegationCache`` maps a zone cut to its ``Delegation`` (NS names, the glue that came with
  the referral, and nameless hint addresses for the root) until the NS RRset's TTL runs out,
  and NS names to the addresses learnt by resolving them (authoritative A/AAAA answers, kept
  apart from glue: glue is only ever used for the delegation it came with). Names that did not
  resolve are remembered for ``NEGATIVE_TTL`` seconds, so an NXNS-style delegation full of
  names that do not exist costs their victim one query per name, not one per client query.
  ``closest(name)`` gives the deepest known cut at or above a name; ``above=True`` the deepest
  strictly above, which is where a DS question must go (the parent side of a cut).

* ``ServerTable`` keeps per server address a smoothed RTT and variance (RFC 6298), the
  retransmission timeout derived from them, and a backoff after timeouts: each consecutive
  timeout doubles the RTO (up to the configured maximum) and parks the address for
  ``BLOCK_BASE * 2**(n-1)`` seconds (at most ``BLOCK_MAX``), during which it is tried only
  when nothing better is left. Lame servers are remembered per (zone, address) for
  ``LAME_TTL`` and sorted last for that zone. ``order()`` sorts candidates: usable before
  parked before lame, then by smoothed RTT; unknown servers get ``UNKNOWN_RTT`` plus a random
  jitter, so first contacts are spread over a zone's servers (as Unbound does), and known-fast
  servers win afterwards. Randomness comes in as a parameter.

Both tables are bounded (oldest entries go first, resolver.cache.LruCache).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import dns.name

from resolver.cache import LruCache

Address = tuple[str, int]  # (IP address, port)

UNKNOWN_RTT: Final = 0.3  # seconds assumed for a server never heard from
MIN_RTO: Final = 0.2  # never time out faster than this (Python's event loop has hiccups)
BLOCK_BASE: Final = 2.0  # seconds a server is parked after its first timeout
BLOCK_MAX: Final = 120.0
LAME_TTL: Final = 600.0
NEGATIVE_TTL: Final = 30.0  # an NS name without addresses
MAX_TTL: Final = 86400  # cap on cached delegations and addresses
MIN_TTL: Final = 5  # a zero TTL would make every query walk from the root again


@dataclass(frozen=True, slots=True)
class Delegation:
    """A zone cut and how to reach the zone's servers."""

    zone: dns.name.Name
    ns: tuple[dns.name.Name, ...]
    glue: Mapping[dns.name.Name, tuple[str, ...]] = field(default_factory=dict)
    hints: tuple[Address, ...] = ()  # addresses without names (root hints from the config)


@dataclass(slots=True)
class _Health:
    srtt: float | None = None
    rttvar: float = 0.0
    timeouts: int = 0
    rto_backoff: float = 0.0  # RTO after timeouts (0: none)
    parked_until: float = 0.0


class ServerTable:
    """Smoothed RTT, timeouts, backoff and lameness per server address (module docstring)."""

    def __init__(self, *, max_rto: float = 1.5, unknown_rto: float = 0.4,
                 max_entries: int = 10000) -> None:
        self.max_rto = max_rto
        self.unknown_rto = min(unknown_rto, max_rto)
        self._health: LruCache[Address, _Health] = LruCache(max_entries)
        self._lame: LruCache[tuple[dns.name.Name, Address], bool] = LruCache(max_entries)

    def _get(self, addr: Address, now: float) -> _Health:
        h = self._health.get(addr, now)
        if h is None:
            h = _Health()
            self._health.put(addr, h, now + 24 * 3600)
        return h

    def rto(self, addr: Address, now: float) -> float:
        """How long to wait for this server's reply."""
        h = self._get(addr, now)
        if h.rto_backoff:
            return h.rto_backoff
        if h.srtt is None:
            return self.unknown_rto
        return min(self.max_rto, max(MIN_RTO, h.srtt + 4 * h.rttvar))

    def record_rtt(self, addr: Address, rtt: float, now: float) -> None:
        """A reply came back after ``rtt`` seconds: the server is healthy again."""
        h = self._get(addr, now)
        if h.srtt is None or h.timeouts:  # first sample, or back after timeouts: start over
            h.srtt, h.rttvar = rtt, rtt / 2
        else:
            h.rttvar = 0.75 * h.rttvar + 0.25 * abs(h.srtt - rtt)
            h.srtt = 0.875 * h.srtt + 0.125 * rtt
        h.timeouts, h.rto_backoff, h.parked_until = 0, 0.0, 0.0

    def record_timeout(self, addr: Address, now: float) -> None:
        """No reply within the RTO (or the network refused to carry the query)."""
        h = self._get(addr, now)
        h.rto_backoff = min(self.max_rto, 2 * self.rto(addr, now))
        h.timeouts += 1
        h.parked_until = now + min(BLOCK_MAX, BLOCK_BASE * 2 ** (h.timeouts - 1))
        # An address that never answered is ranked like a slow one, not like an unknown one.
        h.srtt = max(h.srtt or 0.0, h.rto_backoff)

    def record_lame(self, zone: dns.name.Name, addr: Address, now: float) -> None:
        """The server answered, but not as an authority for ``zone``."""
        self._lame.put((zone, addr), True, now + LAME_TTL)

    def is_parked(self, addr: Address, now: float) -> bool:
        """Whether the address is in its backoff period."""
        h = self._health.get(addr, now)
        return h is not None and h.parked_until > now

    def is_lame(self, zone: dns.name.Name, addr: Address, now: float) -> bool:
        """Whether the address was lame for ``zone`` recently."""
        return self._lame.get((zone, addr), now) is not None

    def srtt(self, addr: Address, now: float) -> float | None:
        """The smoothed RTT, None for a server never heard from."""
        h = self._health.get(addr, now)
        return None if h is None else h.srtt

    def order(self, candidates: Sequence[Address], zone: dns.name.Name, now: float,
              rng: random.Random) -> list[Address]:
        """Candidates best first: usable, then parked, then lame; each by smoothed RTT."""
        def key(addr: Address) -> tuple[bool, bool, float]:
            h = self._health.get(addr, now)
            srtt = h.srtt if h is not None and h.srtt is not None else None
            rank = UNKNOWN_RTT + rng.random() * 0.1 if srtt is None else srtt
            parked = h is not None and h.parked_until > now
            return (self.is_lame(zone, addr, now), parked, rank)

        return sorted(dict.fromkeys(candidates), key=key)


class DelegationCache:
    """Zone cuts and NS-name addresses with TTLs (module docstring)."""

    def __init__(self, max_entries: int = 10000) -> None:
        self._cuts: LruCache[dns.name.Name, Delegation] = LruCache(max_entries)
        self._addrs: LruCache[dns.name.Name, tuple[str, ...]] = LruCache(max_entries)

    def put(self, delegation: Delegation, ttl: float, now: float) -> None:
        """Remember a cut for ``ttl`` seconds (clamped to [MIN_TTL, MAX_TTL])."""
        ttl = min(MAX_TTL, max(MIN_TTL, ttl))
        self._cuts.put(delegation.zone.canonicalize(), delegation, now + ttl)

    def get(self, zone: dns.name.Name, now: float) -> Delegation | None:
        """The cached delegation of exactly this zone."""
        return self._cuts.get(zone.canonicalize(), now)

    def closest(self, name: dns.name.Name, now: float, *, above: bool = False
                ) -> Delegation | None:
        """The deepest cached cut at or above ``name`` (strictly above with ``above``)."""
        start = 1 if above else 0
        for skip in range(start, len(name)):
            candidate = name.split(len(name) - skip)[1]
            d = self._cuts.get(candidate.canonicalize(), now)
            if d is not None:
                return d
        return None

    def put_addresses(self, name: dns.name.Name, addrs: tuple[str, ...], ttl: float,
                      now: float) -> None:
        """Addresses of an NS name (empty: the name did not resolve; kept NEGATIVE_TTL)."""
        ttl = NEGATIVE_TTL if not addrs else min(MAX_TTL, max(MIN_TTL, ttl))
        self._addrs.put(name.canonicalize(), addrs, now + ttl)

    def addresses(self, name: dns.name.Name, now: float) -> tuple[str, ...] | None:
        """Cached addresses of an NS name; () if it is known not to resolve; None: unknown."""
        return self._addrs.get(name.canonicalize(), now)
