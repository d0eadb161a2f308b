"""Caches: validated answers with their security status, raw upstream responses, final wire replies.

Theory of operation: bounded LRU maps (`LruCache`) with absolute expiry times, all driven by a
`now` passed in by the caller (no clock here). The resolution core holds two of them:

* the answer cache keeps `ValidatedAnswer`s per (qname, qtype). Positive answers live for the
  answer's TTL, negative ones for the RFC 2308 TTL (min of the SOA's TTL and MINIMUM field),
  bogus and indeterminate ones for `bogus_ttl` (60 s by default, DESIGN.md's limits), so a
  broken zone costs one validation a minute rather than one per query.
* the raw cache keeps upstream responses (fetched with CD=1) for the validator's own
  fetches (DNSKEY, DS, proofs). These are never served to a client: the validator checks them
  every time it uses them, so caching them saves round trips without trusting anything.
* `WireCache` keeps final replies as wire bytes for the server's fast path, keyed on the
  question and the client's flags, with the offsets of every TTL so that a hit is served by
  patching the ID, the RD bit, the question's letter case and the aged TTLs, without a parse.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A size-bounded map whose entries expire at an absolute time; least recently used goes first.

    Expired entries are removed when they are looked up or when they reach the LRU end, so the
    cost of every operation stays O(1).
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K, now: float) -> V | None:
        """The live value for key, or None (an expired entry is dropped)."""
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        expires_at, value = item
        if expires_at <= now:
            del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V, expires_at: float) -> None:
        """Store value until expires_at, evicting the least recently used entries if full."""
        self._data[key] = (expires_at, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evictions += 1

    def pop(self, key: K) -> None:
        """Forget key (no error if absent)."""
        self._data.pop(key, None)

    def clear(self) -> None:
        """Forget everything (e.g. when trust anchors or policy change)."""
        self._data.clear()

    def discard_if(self, doomed: Callable[[V], bool]) -> int:
        """Forget every entry whose value `doomed` picks; returns how many (O(n), rare)."""
        keys = [k for k, (_exp, v) in self._data.items() if doomed(v)]
        for k in keys:
            del self._data[k]
        return len(keys)


@dataclass(slots=True)
class WireEntry:
    """A final reply as wire bytes, ready to be patched for a new client.

    wire: the reply as first sent (ID and RD as for its first client).
    stored_at: `now` when it was stored; TTLs are aged from there.
    ttl_offsets: byte offsets of the TTL field of every record except OPT (whose "TTL" holds
        the extended RCODE and flags and must not be aged) and their original values.
    qname_len: length of the question name in wire form, starting at offset 12.
    """

    wire: bytes
    stored_at: float
    ttl_offsets: tuple[tuple[int, int], ...]
    qname_len: int
    # Aging happens in whole seconds: keep the pieces of the last aged copy (the header byte
    # with RD clear and set, the rest of the header, everything after the question name), so
    # a burst of hits within one second only joins four slices.
    _aged_second: int = field(default=-1)
    _heads: tuple[bytes, bytes] = field(default=(b"", b""))
    _tail: bytes = field(default=b"")

    def render(self, query: bytes, now: float) -> bytes:
        """The reply for `query` (its raw bytes) at time now: ID, RD, name case, aged TTLs."""
        elapsed = int(now - self.stored_at)
        end = 12 + self.qname_len
        if elapsed != self._aged_second:
            buf = bytearray(self.wire)
            for off, ttl in self.ttl_offsets:
                struct.pack_into("!I", buf, off, max(0, ttl - elapsed))
            rest = bytes(buf[3:12])
            self._heads = (bytes((buf[2] & 0xFE,)) + rest, bytes((buf[2] | 0x01,)) + rest)
            self._tail = bytes(buf[end:])
            self._aged_second = elapsed
        # ID and RD (RFC 1035: copied into the response) from the query, its name's case too
        return b"".join((query[0:2], self._heads[query[2] & 0x01], query[12:end], self._tail))


WireKey = tuple[bytes, int, int, int]  # (lowercased qname wire, qtype, qclass, flag bits)


class WireCache:
    """The server's cache of final replies (wire bytes)."""

    def __init__(self, max_entries: int) -> None:
        self._lru: LruCache[WireKey, WireEntry] = LruCache(max_entries)
        # Bumped by clear(): a reply computed before a clear (a tunnel it relied on was lost
        # meanwhile) must not be stored after it.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def hits(self) -> int:
        """Fast-path hits so far."""
        return self._lru.hits

    def get(self, key: WireKey, now: float) -> WireEntry | None:
        """The live entry for key, or None."""
        return self._lru.get(key, now)

    def put(self, key: WireKey, entry: WireEntry, expires_at: float,
            generation: int | None = None) -> None:
        """Store a reply until expires_at (not if the cache was cleared since `generation`)."""
        if generation is None or generation == self.generation:
            self._lru.put(key, entry, expires_at)

    def clear(self) -> None:
        """Forget every reply (policy, anchors or leases changed; a tunnel was lost)."""
        self._lru.clear()
        self.generation += 1
